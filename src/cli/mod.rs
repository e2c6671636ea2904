pub mod doctor;
pub mod explain;
pub mod init;
pub mod reload_command;
pub mod renew;
pub mod synapse_check;
