//! matrix-edge: the front door of a Matrix homeserver.
//!
//! A request, step by step:
//!
//! 1. A listener accepts; on TLS listeners [`tls::SniResolver`] picks the
//!    certificate from a prebuilt name map (exact, wildcard, first).
//! 2. [`proxy::EdgeProxy::new_ctx`] takes the current [`edge::Edge`]
//!    snapshot, so one request sees one configuration even across reloads.
//! 3. `request_filter` asks [`access::admit`] what to do with the target:
//!    answer a well-known document ([`well_known`]), refuse with a Matrix
//!    error ([`errors`]), or forward with a body limit.
//! 4. `upstream_peer` returns the Synapse process ([`upstream`]).
//! 5. `upstream_request_filter` rewrites forwarding headers only
//!    ([`forward`]); the request target is sent as received.
//! 6. `request_body_filter` counts streamed body bytes against the limit.
//! 7. `fail_to_proxy` turns any failure into Matrix JSON ([`errors`]).
//! 8. `logging` counts the request ([`metrics`]) and writes the access line
//!    ([`access_log`]) with tokens removed ([`redact`]).
//!
//! Beside requests: [`health`] checks workers, [`reload`] swaps in a new
//! snapshot on SIGHUP or certificate changes, [`metrics`] serves Prometheus.

pub mod access;
pub mod access_log;
pub mod balance;
pub mod config;
pub mod connections;
pub mod edge;
pub mod errors;
pub mod explain;
pub mod forward;
pub mod framing;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod heap;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod readiness;
pub mod redact;
pub mod reload;
pub mod response;
pub mod routes;
pub mod server;
pub mod sticky;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod well_known;
