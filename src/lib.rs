//! matrix-edge: the front door of a Matrix homeserver.
//!
//! A request, step by step, and where each decision is made:
//!
//! 1. A listener accepts ([`server::connections`]: PROXY header, HTTP/1
//!    keep-alive, HTTP/2 in [`server::http2`]); on TLS listeners
//!    [`tls::SniResolver`] picks the certificate from a prebuilt name map.
//! 2. [`server::proxy::EdgeProxy::new_ctx`] takes the current [`edge::Edge`]
//!    snapshot, so one request sees one configuration even across reloads.
//! 3. `request_filter` finds the client (trusted proxies), refuses a request
//!    framed two ways ([`server::framing`]), then asks [`plan::plan`], a pure
//!    function of the snapshot and a [`plan::RequestView`], what to do: the
//!    site by Host ([`sites::Sites::pick`]), its router's
//!    [`sites::Target`], admission ([`request::admission`]) and, for
//!    Synapse's paths, the table's decision ([`synapse::table`]) with the
//!    body limit, long-poll timeout, sticky key ([`synapse::sticky`]),
//!    whether the federation gate and the rates apply and the hold policy.
//!    A [`plan::Plan`] either answers locally (well-known, preflight,
//!    redirects, static files, ACME, a refusal in Matrix JSON) or forwards;
//!    the glue writes it ([`server::respond`]) and decides nothing again.
//! 4. A forward passes the federation gate ([`server::gate`],
//!    [`federation::gate`]) and the rates ([`request::ratelimit`]), then
//!    gets a [`plan::attempt::Attempt`]: `upstream_peer` takes a member's
//!    slot ([`upstream::pool`]) or main; `fail_to_connect` and
//!    `error_while_proxy` report what failed and the attempt decides
//!    whether to hold ([`request::hold`]), go to another member, or stop.
//! 5. `upstream_request_filter` rewrites forwarding headers only
//!    ([`request::forward`]); the request target is sent as received
//!    (unless a site route strips a prefix).
//! 6. `request_body_filter` counts streamed body bytes against the limit
//!    and holds a large signed body until the gate has judged it.
//! 7. Every refusal is a [`request::errors::MatrixError`] or
//!    [`request::errors::Refused`] carried as the cause of Pingora's
//!    error; `fail_to_proxy` turns it into Matrix JSON in one place.
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
//! 5. `plan`
//! 6. `edge`
//! 7. `sites`, `acme`
//! 8. `local`, `upstream`
//! 9. `request`
//! 10. `config`, `tls`, `federation`
//! 11. `observe`
//! 12. `synapse`

pub mod acme;
pub mod cli;
pub mod config;
pub mod edge;
pub mod federation;
#[doc(hidden)]
pub mod fuzzing;
pub mod local;
pub mod observe;
pub mod plan;
pub mod request;
pub mod runtime;
pub mod server;
pub mod services;
pub mod sites;
pub mod synapse;
pub mod tls;
pub mod upstream;
