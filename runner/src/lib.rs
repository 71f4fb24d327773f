//! `sluice runner`: one consumer group per cluster. Connects outwards to NATS, pulls
//! the runs of its cluster only while it has capacity, executes them, and reports
//! their states and output.
//!
//! A run request stays unacknowledged (with progress signals) until its final state
//! is stored, so a runner that dies mid-run loses nothing: the request is redelivered
//! to another replica.
#![forbid(unsafe_code)]

mod cancels;
mod consumer;
mod error;
pub mod executor;
pub mod kubernetes;
pub mod lines;
pub mod local;
pub mod mask;
pub mod metrics;
pub mod report;
mod resume;
mod wait;

use std::path::PathBuf;
use std::time::Duration;

use sluice_core::nats::NatsOptions;
use sluice_core::streams::StreamSettings;
use tokio_util::sync::CancellationToken;

pub use error::{Error, Result};

// === defaults (the CLI's flags point at these) ===

/// Runs executed at once.
pub const MAX_RUNNING: usize = 50;
/// How long a pulled run may go without a progress signal before NATS hands it to
/// another replica; the consumer's own, once it exists, is the one used.
pub const ACK_WAIT: Duration = sluice_core::streams::DEFAULT_RUNNER_ACK_WAIT;
/// The shortest ack wait: progress is signalled every third of it.
pub const MIN_ACK_WAIT: Duration = Duration::from_secs(1);
/// Where the local executor makes per-run workspaces.
pub const WORKDIR: &str = ".sluice-data/workspaces";

/// Everything `sluice runner` is configured with.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub nats: NatsOptions,
    pub streams: StreamSettings,
    /// The cluster whose runs this runner takes.
    pub cluster: String,
    /// This replica's name in heartbeats and logs.
    pub runner_id: String,
    /// Runs executed at once; no more are pulled while this many run. At least 1.
    pub max_running: usize,
    /// How long a pulled run may go without a progress signal before NATS gives it to
    /// another replica. At least [`MIN_ACK_WAIT`].
    pub ack_wait: Duration,
    pub executor: Executor,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; none when `None` (`sluice
    /// dev`, tests).
    pub admin_listen: Option<std::net::SocketAddr>,
}

/// Where steps run.
#[derive(Debug, Clone)]
pub enum Executor {
    /// Host processes: laptops and tests.
    Local(local::LocalExecutor),
    /// One Pod per run.
    Kubernetes(kubernetes::KubeExecutor),
}

impl Executor {
    pub(crate) async fn run(
        &self,
        req: &sluice_core::run::RunRequest,
        reporter: &report::Reporter,
        cancel: &CancellationToken,
    ) -> executor::Outcome {
        // Boxed: a run then carries room for its own executor's work only, sized
        // exactly, rather than for the larger of the two.
        match self {
            Executor::Local(local) => Box::pin(local.run(req, reporter, cancel)).await,
            Executor::Kubernetes(kube) => Box::pin(kube.run(req, reporter, cancel)).await,
        }
    }

    /// What the Kubernetes executor counts of its API requests; none for the local one.
    pub fn kube_metrics(&self) -> Option<&metrics::KubeMetrics> {
        match self {
            Executor::Local(_) => None,
            Executor::Kubernetes(kube) => Some(kube.metrics()),
        }
    }

    /// After the run's final state is stored.
    pub(crate) fn finished(&self, req: &sluice_core::run::RunRequest) {
        if let Executor::Kubernetes(kube) = self {
            kube.finished(req);
        }
    }
}

impl RunnerConfig {
    pub fn new(nats: NatsOptions, cluster: impl Into<String>, workdir: PathBuf) -> Self {
        RunnerConfig {
            nats,
            streams: StreamSettings::default(),
            cluster: cluster.into(),
            runner_id: default_runner_id(),
            max_running: MAX_RUNNING,
            ack_wait: ACK_WAIT,
            executor: Executor::Local(local::LocalExecutor {
                workdir,
                keep_workspaces: false,
            }),
            admin_listen: None,
        }
    }

    /// Refuses what the runner cannot work with, naming the setting.
    pub fn validate(&self) -> Result<()> {
        sluice_core::pipeline::Name::parse(&self.cluster).map_err(|problem| Error::Config {
            setting: "cluster",
            problem,
        })?;
        if self.max_running == 0 {
            return Err(Error::Config {
                setting: "max_running",
                problem: "must be at least 1".into(),
            });
        }
        if self.ack_wait < MIN_ACK_WAIT {
            return Err(Error::Config {
                setting: "ack_wait",
                problem: format!(
                    "{:?} is under {MIN_ACK_WAIT:?}, which leaves no room for progress signals",
                    self.ack_wait
                ),
            });
        }
        Ok(())
    }
}

fn default_runner_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "runner".into());
    let clean: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    format!("{clean}-{}", std::process::id())
}

/// Runs until `shutdown`: stops pulling, cancels nothing, waits for the runs in hand.
pub async fn run(config: RunnerConfig, shutdown: CancellationToken) -> Result<()> {
    config.validate()?;
    consumer::run(config, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RunnerConfig {
        let nats = NatsOptions::new("nats://127.0.0.1:4222", "test");
        RunnerConfig::new(nats, "eu-1", PathBuf::from("/tmp/sluice-test"))
    }

    #[test]
    fn the_defaults_are_valid() {
        let c = config();
        assert_eq!((c.max_running, c.ack_wait), (MAX_RUNNING, ACK_WAIT));
        c.validate().expect("valid");
    }

    #[test]
    fn settings_out_of_range_are_refused_not_clamped() {
        let refused = |tweak: fn(&mut RunnerConfig)| {
            let mut c = config();
            tweak(&mut c);
            match c.validate() {
                Err(Error::Config { setting, problem }) => format!("{setting}: {problem}"),
                other => panic!("not refused: {other:?}"),
            }
        };
        assert_eq!(
            refused(|c| c.max_running = 0),
            "max_running: must be at least 1"
        );
        assert!(refused(|c| c.ack_wait = Duration::from_millis(500)).starts_with("ack_wait:"));
        assert!(refused(|c| c.cluster = "EU 1".into()).starts_with("cluster:"));
    }
}
