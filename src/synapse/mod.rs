pub mod federation_cost;
pub mod long_poll;
pub mod sticky;
pub mod table;
