//! The one error type of `sluice-core`.

use std::time::Duration;

/// Errors raised by the shared helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} from {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },

    #[error("invalid NATS URL {url:?}: {reason}")]
    NatsUrl { url: String, reason: String },

    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },

    #[error("stream {stream}: {reason}")]
    Stream { stream: String, reason: String },

    #[error("JetStream did not answer within {0:?}: is the server running with JetStream enabled (`-js`)?")]
    Timeout(Duration),

    #[error("cannot set up logging: {0}")]
    Telemetry(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
