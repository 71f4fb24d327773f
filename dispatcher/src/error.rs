//! The one error type of `sluice-dispatcher`.

/// Why the dispatcher could not start, or could not process one event.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    #[error("configuration: {0}")]
    Config(String),

    /// NATS refused or did not answer; retried with backoff.
    #[error("NATS: {0}")]
    Nats(String),

    /// The event cannot be read as an envelope; retrying cannot help.
    #[error("not an event envelope: {0}")]
    Malformed(String),

    #[error("concurrency group {0:?} changed too often to update; will retry")]
    Contention(String),
}

impl Error {
    /// Whether trying the same event again can succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Error::Malformed(_))
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
