pub mod doctor;
pub mod explain;
pub mod init;
pub mod probe;
pub mod reload_command;
pub mod renew;
pub mod synapse_check;
pub mod workers;

/// Why a command failed: a file it was given, the running edge, or
/// another server. The message names what and where; `main` prints it and
/// exits non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CliError {
    /// A file or argument given to the command cannot be read or does not hold.
    #[error("{0}")]
    Input(String),
    /// The running edge (its process, control socket or probe) could not
    /// be reached, or answered no.
    #[error("{0}")]
    Edge(String),
    #[error("{0}")]
    Federation(#[from] crate::federation::FederationError),
}

pub(crate) fn input(message: impl std::fmt::Display) -> CliError {
    CliError::Input(message.to_string())
}

pub(crate) fn edge(message: impl std::fmt::Display) -> CliError {
    CliError::Edge(message.to_string())
}
