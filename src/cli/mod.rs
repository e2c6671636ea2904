pub mod doctor;
pub mod explain;
pub mod reload_command;
pub mod renew;
