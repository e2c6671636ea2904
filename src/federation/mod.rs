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
//! - [`recent`]: the latest refusals, for the status page;
//! - [`turns`]: each origin's share of Synapse, served in turn.

pub mod canonical;
pub mod counters;
pub mod discover;
pub mod fetch;
pub mod gate;
pub mod header;
pub mod keys;
pub mod recent;
pub mod signing;

/// Why a request to another server, a key document or a signature failed:
/// the server could not be reached (DNS, TCP, TLS, a local file), it
/// answered outside the protocol (status, framing, JSON), or its keys do
/// not hold. The message names what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FederationError {
    #[error("{0}")]
    Unreachable(String),
    #[error("{0}")]
    BadAnswer(String),
    #[error("{0}")]
    BadKeys(String),
    /// A rule given to the client (`--connect-to`, `connect_to:`) that does not parse.
    #[error("{0}")]
    BadConfig(String),
}

pub(crate) fn bad_config(message: impl std::fmt::Display) -> FederationError {
    FederationError::BadConfig(message.to_string())
}

pub(crate) fn unreachable(message: impl std::fmt::Display) -> FederationError {
    FederationError::Unreachable(message.to_string())
}

pub(crate) fn bad_answer(message: impl std::fmt::Display) -> FederationError {
    FederationError::BadAnswer(message.to_string())
}

pub(crate) fn bad_keys(message: impl std::fmt::Display) -> FederationError {
    FederationError::BadKeys(message.to_string())
}
pub mod turns;
