//! The one error type of `sluice-core`.

use std::time::Duration;

/// Any error from a NATS client call, kept as the cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors raised by the shared helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {what} from {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },

    #[error("cannot write {path}: {source}")]
    WriteFile {
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

    /// A stream, bucket or consumer a service needs is missing, or laid out by another
    /// version; `fix` is the command that repairs it.
    #[error("{what}: {problem}; run `{fix}`")]
    Provisioning {
        what: String,
        problem: String,
        fix: String,
    },

    #[error("{what}: {source}")]
    Bus {
        what: String,
        #[source]
        source: BoxError,
    },

    #[error("cannot listen on {addr} for {what}: {source}{}", in_use_hint(.source))]
    Listen {
        what: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },

    #[error("JetStream did not answer within {0:?}: is the server running with JetStream enabled (`-js`)?")]
    Timeout(Duration),

    #[error("cannot set up logging: {0}")]
    Telemetry(String),

    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// A NATS or JetStream call that failed, with what was being done.
    pub fn bus(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Bus {
            what: what.into(),
            source: source.into(),
        }
    }

    /// A short, fixed label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::ReadFile { .. } => "read_file",
            Error::WriteFile { .. } => "write_file",
            Error::NatsUrl { .. } => "nats_url",
            Error::Connect { .. } => "connect",
            Error::Stream { .. } => "stream",
            Error::Provisioning { .. } => "provisioning",
            Error::Bus { .. } => "bus",
            Error::Listen { .. } => "listen",
            Error::Timeout(_) => "timeout",
            Error::Telemetry(_) => "telemetry",
            Error::Invalid(_) => "invalid",
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What to check when binding failed because the address is taken; nothing otherwise
/// (a permission or a missing interface is not another process).
pub fn in_use_hint(e: &std::io::Error) -> &'static str {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        "; is another process using the port?"
    } else {
        ""
    }
}
