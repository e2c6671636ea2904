pub mod balance;
pub mod named;
pub mod peer;
pub mod pool;
pub mod shared_admin;
pub mod shared_limits;
pub mod state;
