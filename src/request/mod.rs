pub mod admission;
pub mod compress;
pub mod errors;
pub mod forward;
pub mod hold;
pub mod id;
pub mod ratelimit;
pub mod response;
