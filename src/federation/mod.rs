//! Federation verified at the door: a request under `/_matrix/federation/`
//! carries the origin's X-Matrix signature, checked here against the
//! origin's published keys before Synapse spends any work on it.
//!
//! - [`header`]: the `Authorization: X-Matrix` auth-params;
//! - [`canonical`]: canonical JSON, byte for byte as Synapse writes it;
//! - [`signing`]: ed25519 over signed JSON, key documents;
//! - [`discover`], [`fetch`]: where a server answers, and one HTTPS GET;
//! - [`keys`]: origins' keys, fetched once and kept (outlives reloads);
//! - [`gate`]: the verdict on one request, counted by [`counters`];
//! - [`recent`]: the latest refusals, for the status page.

pub mod canonical;
pub mod counters;
pub mod discover;
pub mod fetch;
pub mod gate;
pub mod header;
pub mod keys;
pub mod recent;
pub mod signing;
