pub mod plain_http;
pub mod preflight;
pub mod redirect;
pub mod static_files;
pub mod well_known;
