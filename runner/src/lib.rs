//! `sluice runner`: one consumer group per cluster. Connects outwards to NATS, pulls
//! the runs of its cluster only while it has capacity, executes them, and reports
//! their states and output.
//!
//! A run request stays unacknowledged (with progress signals) until its final state
//! is stored, so a runner that dies mid-run loses nothing: the request is redelivered
//! to another replica.
#![forbid(unsafe_code)]

mod consumer;
mod error;
pub mod executor;
pub mod kubernetes;
pub mod lines;
pub mod local;
pub mod report;
mod wait;

use std::path::PathBuf;
use std::time::Duration;

use sluice_core::nats::NatsOptions;
use sluice_core::streams::StreamSettings;
use tokio_util::sync::CancellationToken;

pub use error::{Error, Result};

/// Everything `sluice runner` is configured with.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    pub nats: NatsOptions,
    pub streams: StreamSettings,
    /// The cluster whose runs this runner takes.
    pub cluster: String,
    /// This replica's name in heartbeats and logs.
    pub runner_id: String,
    /// Runs executed at once; no more are pulled while this many run.
    pub max_running: usize,
    /// How long a pulled run may go without a progress signal before NATS gives it to
    /// another replica.
    pub ack_wait: Duration,
    pub executor: Executor,
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
            max_running: 50,
            ack_wait: Duration::from_secs(30),
            executor: Executor::Local(local::LocalExecutor {
                workdir,
                keep_workspaces: false,
            }),
        }
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
    sluice_core::pipeline::Name::parse(&config.cluster).map_err(|problem| Error::Config {
        setting: "cluster",
        problem,
    })?;
    consumer::run(config, shutdown).await
}
