pub mod acme;
pub mod discovery;
pub mod health;
pub mod readiness;
pub mod reload;
pub mod shutdown;
