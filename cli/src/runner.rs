//! `sluice runner`.

use anyhow::bail;
use sluice_runner::RunnerConfig;
use tokio_util::sync::CancellationToken;

use crate::args::{ExecutorKind, Global, RunnerArgs};

pub async fn run(
    global: &Global,
    a: RunnerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if a.executor == ExecutorKind::Kubernetes {
        bail!(
            "the Kubernetes executor is not built yet in this version; run with `--executor local` \
             (steps as processes on this host, images ignored)"
        );
    }
    tracing::warn!("local executor: step images are ignored and steps run unisolated on this host");
    let mut config = RunnerConfig::new(global.nats("sluice-runner"), a.cluster, a.workdir);
    config.max_running = a.max_running.max(1);
    config.executor.keep_workspaces = a.keep_workspaces;
    if let Some(id) = a.runner_id {
        config.runner_id = id;
    }
    sluice_runner::run(config, shutdown).await?;
    Ok(())
}
