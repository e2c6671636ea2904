pub mod acme;
pub mod control;
pub mod discovery;
pub mod health;
pub mod readiness;
pub mod reload;
pub mod shutdown;
pub mod status;
