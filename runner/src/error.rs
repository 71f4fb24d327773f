//! The one error type of `sluice-runner`.

use sluice_core::error::BoxError;

/// Why the runner could not start, keep consuming, or do one part of a run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    /// A setting the runner cannot work with.
    #[error("{setting}: {problem}")]
    Config {
        setting: &'static str,
        problem: String,
    },

    /// A Kubernetes client cannot be made from the configuration found.
    #[error("{purpose}: {source}")]
    KubeClient {
        purpose: &'static str,
        #[source]
        source: kube::Error,
    },

    #[error("tls-server-name {name}: {source}")]
    TlsServerName {
        name: String,
        #[source]
        source: rustls::pki_types::InvalidDnsNameError,
    },

    /// The cluster's consumer group could not be joined or pulled from.
    #[error("consumer {consumer}: {source}")]
    Consumer {
        consumer: String,
        #[source]
        source: BoxError,
    },

    /// A call to NATS failed while doing one part of a run.
    #[error("cannot {doing}: {source}")]
    Bus {
        doing: &'static str,
        #[source]
        source: sluice_core::Error,
    },

    /// A program a run needs could not be started.
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The values of a run's Secrets could not be made into a masker (too many or too
    /// large); the problem never quotes a value.
    #[error("cannot mask the run's secret values: {problem}")]
    Mask { problem: String },

    /// A `git` command of the local executor's clone failed.
    #[error("git {command} exited with {code}")]
    Git { command: String, code: i32 },
}

impl Error {
    /// A short, fixed label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Core(e) => e.metric_label(),
            Error::Config { .. } => "config",
            Error::KubeClient { .. } => "kube_client",
            Error::TlsServerName { .. } => "tls_server_name",
            Error::Consumer { .. } => "consumer",
            Error::Bus { .. } => "bus",
            Error::Spawn { .. } => "spawn",
            Error::Mask { .. } => "mask",
            Error::Git { .. } => "git",
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
