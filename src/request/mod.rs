pub mod admission;
pub mod errors;
pub mod forward;
pub mod ratelimit;
pub mod response;
