//! CORS preflights the edge answers itself.

use crate::request::admission::Preflight;
use crate::request::response::LocalResponse;

pub fn answer(kind: Preflight) -> LocalResponse {
    match kind {
        Preflight::Matrix => matrix(),
        Preflight::Rendezvous => rendezvous(),
    }
}

/// Synapse's own CORS answer (`synapse/http/server.py`, `set_cors_headers`).
pub fn matrix() -> LocalResponse {
    LocalResponse::empty(204)
        .with_header("Access-Control-Allow-Origin", "*".into())
        .with_header("Access-Control-Allow-Methods", "GET, HEAD, POST, PUT, DELETE, OPTIONS".into())
        .with_header("Access-Control-Allow-Headers", "X-Requested-With, Content-Type, Authorization, Date".into())
        .with_header("Access-Control-Expose-Headers", "Synapse-Trace-Id, Server".into())
}

/// QR-code login's rendezvous (MSC4108, MSC4388): the browser must be allowed
/// to send `If-Match`/`If-None-Match` and to read `ETag`, which Synapse's
/// generic CORS answer does not grant. The headers are the ones Element
/// Server Suite answers with.
pub fn rendezvous() -> LocalResponse {
    LocalResponse::empty(204)
        .with_header("Access-Control-Allow-Origin", "*".into())
        .with_header("Access-Control-Allow-Methods", "GET, PUT, POST, DELETE, OPTIONS".into())
        .with_header("Access-Control-Allow-Headers", "Origin, Content-Type, Accept, If-Match, If-None-Match".into())
        .with_header("Access-Control-Expose-Headers", "Synapse-Trace-Id, Server, ETag".into())
        .with_header("Access-Control-Max-Age", "86400".into())
}
