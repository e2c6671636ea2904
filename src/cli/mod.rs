pub mod doctor;
pub mod explain;
pub mod init;
pub mod probe;
pub mod reload_command;
pub mod renew;
pub mod synapse_check;
pub mod workers;
