//! `sluice runner`.

use anyhow::Context;
use sluice_runner::kubernetes::{KubeExecutor, KubeSettings};
use sluice_runner::local::LocalExecutor;
use sluice_runner::{Executor, RunnerConfig};
use tokio_util::sync::CancellationToken;

use crate::args::{ExecutorKind, Global, KubeArgs, RunnerArgs};

pub async fn run(
    global: &Global,
    a: RunnerArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut nats = global.nats("sluice-runner");
    // Replies come to the cluster's own inbox, which its credential may read.
    nats.inbox_prefix = Some(sluice_core::roles::inbox_prefix(
        &sluice_core::roles::Role::Runner(a.cluster.clone()),
    ));
    let mut config = RunnerConfig::new(nats, a.cluster, a.workdir.clone());
    // clap refused what is out of range; the library checks again.
    config.max_running = a.max_running;
    config.ack_wait = a.ack_wait.0;
    config.admin_listen = Some(a.admin_listen);
    config.executor = match a.executor {
        ExecutorKind::Local => {
            tracing::warn!(
                "local executor: step images are ignored and steps run unisolated on this host"
            );
            Executor::Local(LocalExecutor {
                workdir: a.workdir,
                keep_workspaces: a.keep_workspaces,
            })
        }
        ExecutorKind::Kubernetes => Executor::Kubernetes(kube_executor(&a.kube).await?),
    };
    if let Some(id) = a.runner_id {
        config.runner_id = id;
    }
    sluice_runner::run(config, shutdown).await?;
    Ok(())
}

/// The Kubernetes executor, with credentials found as kubectl finds them: the
/// in-cluster service account, else `KUBECONFIG` or `~/.kube/config`.
pub async fn kube_executor(a: &KubeArgs) -> anyhow::Result<KubeExecutor> {
    let config = kube::Config::infer().await.context(
        "no Kubernetes credentials: run in a cluster with a service account, or set KUBECONFIG \
         (or use `--executor local`)",
    )?;
    let settings = KubeSettings {
        namespace: a
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone()),
        default_image: a.default_image.clone(),
        clone_image: a.clone_image.clone(),
        clone_secret: a.clone_secret.clone(),
        service_account: a.pod_service_account.clone(),
        run_as_user: a.run_as_user,
        cache_storage_class: a.cache_storage_class.clone(),
        cache_size: a.cache_size.clone(),
        cache_access_mode: a.cache_access_mode.clone(),
        pending_timeout: a.pending_timeout.0,
        delete_after: a.delete_after.0,
        qps: a.kube_qps,
        burst: a.kube_burst,
        log_streams_per_connection: a.kube_log_streams_per_connection,
    };
    tracing::info!(
        api = %config.cluster_url,
        namespace = %settings.namespace,
        qps = settings.qps,
        burst = settings.burst,
        "Kubernetes executor"
    );
    Ok(KubeExecutor::new(config, settings)?)
}
