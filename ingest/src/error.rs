//! The one error type of `sluice-ingest`.

use std::path::PathBuf;

/// Why ingest could not start or keep running. Per-request failures are not errors of
/// the service: they are answered with a status code (see `http.rs`).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },

    #[error("cannot read the webhook secrets file {path}: {source}")]
    SecretsFile {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("the webhook secrets file {path} is not valid: {reason}")]
    SecretsFormat { path: PathBuf, reason: String },

    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),

    #[error("invalid ingest settings: {0}")]
    Config(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
