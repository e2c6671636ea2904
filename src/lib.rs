//! matrix-edge: the front door of a Matrix homeserver.
//!
//! A request, step by step:
//!
//! 1. A listener accepts; on TLS listeners [`tls::SniResolver`] picks the
//!    certificate from a prebuilt name map (exact, wildcard, first).
//! 2. [`server::proxy::EdgeProxy::new_ctx`] takes the current [`edge::Edge`]
//!    snapshot, so one request sees one configuration even across reloads.
//! 3. `request_filter` picks the site by Host ([`sites::Sites::pick`]); the
//!    site's router decides a [`sites::Target`]: the Matrix paths, where
//!    [`request::admission::admit`] answers a well-known document
//!    ([`local::well_known`]), refuses with a Matrix error
//!    ([`request::errors`]) or forwards with a body limit; a named upstream
//!    pool; or a local responder (static files, redirects).
//!    Either way the request's destination is decided here, once: the
//!    edge itself, a Synapse process by the table's decision, or a named
//!    upstream; the later phases match on it and decide nothing again.
//! 4. `upstream_peer` returns the process: a Synapse group's worker
//!    ([`synapse::table`], [`synapse::sticky`], [`upstream::pool`]) or a
//!    named upstream's member.
//! 5. `upstream_request_filter` rewrites forwarding headers only
//!    ([`request::forward`]); the request target is sent as received
//!    (unless a site route strips a prefix).
//! 6. `request_body_filter` counts streamed body bytes against the limit.
//! 7. `fail_to_proxy` turns any failure into Matrix JSON ([`request::errors`]).
//! 8. `logging` counts the request ([`observe::metrics`]) and writes the
//!    access line ([`observe::access_log`]) with tokens removed
//!    ([`observe::redact`]).
//!
//! Beside requests ([`services`]): health checks, reloads on SIGHUP or
//! certificate changes, readiness, heap trimming. Snapshots are swapped in
//! one place, [`services::install`]: reloads and DNS discovery send it
//! reasons and it builds and installs one snapshot at a time.
//!
//! Floors, top to bottom. A module imports only from floors below its own,
//! never from its own floor, so there is no cycle; `tests/it/layers.rs` reads
//! this list and every `crate::` path in src/ and fails on any other import.
//!
//! 1. `fuzzing`
//! 2. `server`, `cli`
//! 3. `services`
//! 4. `runtime`
//! 5. `edge`
//! 6. `sites`, `acme`
//! 7. `local`, `upstream`
//! 8. `request`
//! 9. `config`, `tls`, `federation`
//! 10. `observe`
//! 11. `synapse`

pub mod acme;
pub mod cli;
pub mod config;
pub mod edge;
pub mod federation;
#[doc(hidden)]
pub mod fuzzing;
pub mod local;
pub mod observe;
pub mod request;
pub mod runtime;
pub mod server;
pub mod services;
pub mod sites;
pub mod synapse;
pub mod tls;
pub mod upstream;
