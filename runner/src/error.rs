//! The one error type of `sluice-runner`.

/// Why the runner could not start or keep consuming.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    #[error("NATS: {0}")]
    Nats(String),

    #[error("configuration: {0}")]
    Config(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
