pub mod access_log;
pub mod last_minute;
pub mod metrics;
pub mod probes;
pub mod redact;
pub mod request_metrics;
