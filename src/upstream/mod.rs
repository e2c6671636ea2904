pub mod named;
pub mod peer;
pub mod pool;
