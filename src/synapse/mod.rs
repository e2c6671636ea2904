pub mod sticky;
pub mod table;
