pub mod access_log;
pub mod metrics;
pub mod redact;
pub mod request_metrics;
