//! `sluice dispatcher`.

use anyhow::Context;
use secrecy::SecretString;
use sluice_core::repo_pipelines::Limits;
use sluice_core::streams::StreamSettings;
use sluice_dispatcher::forge::ForgeConfig;
use sluice_dispatcher::recover::RecoverConfig;
use sluice_dispatcher::repo_pipelines::RepoPipelinesConfig;
use sluice_dispatcher::reporter::ReporterConfig;
use sluice_dispatcher::DispatcherConfig;
use tokio_util::sync::CancellationToken;

use crate::args::{DispatcherArgs, Global};

pub async fn run(
    global: &Global,
    a: DispatcherArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let github_app = match (a.github_app_id, &a.github_app_key_file) {
        (Some(id), Some(path)) => {
            let pem = std::fs::read_to_string(path).with_context(|| {
                format!("cannot read the GitHub App private key {}", path.display())
            })?;
            Some(sluice_dispatcher::github::GitHubApp {
                id,
                private_key: SecretString::from(pem),
            })
        }
        _ => None,
    };
    let config = DispatcherConfig {
        streams: StreamSettings {
            replicas: a.stream_replicas,
            ..StreamSettings::default()
        },
        default_cluster: a.default_cluster,
        concurrency: a.concurrency,
        max_attempts: a.max_attempts,
        shutdown_grace: a.shutdown_grace.0,
        forge: ForgeConfig {
            github_app,
            github_token: a.github_token,
            github_api_url: a.github_api_url,
            gitlab_token: a.gitlab_token,
            gitlab_api_url: a.gitlab_api_url,
            ..ForgeConfig::default()
        },
        repo_pipelines: RepoPipelinesConfig {
            repos: a.repo_pipelines.clone(),
            limits: Limits {
                max_files: a.repo_pipelines_max_files,
                max_file_bytes: a.repo_pipelines_max_file_bytes,
                max_depth: a.repo_pipelines_max_depth,
                max_pipelines: a.repo_pipelines_max_pipelines,
            },
        },
        reporter: a.report_statuses.then(|| ReporterConfig {
            link_base_url: a.status_link_base_url.clone(),
            requests_per_hour: a.forge_requests_per_hour,
            ..ReporterConfig::default()
        }),
        recover: a.recover_deliveries.then(|| RecoverConfig {
            hooks: a.recover_hooks.clone(),
            horizon: a.recover_horizon.0,
            interval: a.recover_interval.0,
            max_attempts: a.recover_max_attempts,
            requests_per_hour: a.recover_requests_per_hour,
            ..RecoverConfig::default()
        }),
        ..DispatcherConfig::new(global.nats("sluice-dispatcher"))
    };
    let metrics = config.metrics.clone();
    let handle = sluice_dispatcher::start(config, shutdown.clone());
    serve_admin(
        global,
        a.admin_listen,
        handle.consumers().clone(),
        &metrics,
        shutdown,
    )
    .await?;
    handle.wait().await?;
    Ok(())
}

/// `/healthz`, `/readyz` and `/metrics` for the dispatcher: ready while NATS is
/// connected, its streams exist and every consumer loop is pulling.
///
/// Readiness asks NATS through a connection of its own, so a probe never queues behind
/// the dispatcher's own traffic; both connect to the same servers with the same
/// credential.
async fn serve_admin(
    global: &Global,
    listen: std::net::SocketAddr,
    consumers: sluice_dispatcher::Consumers,
    metrics: &sluice_dispatcher::metrics::Metrics,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    use sluice_core::subjects;
    let client = sluice_core::nats::connect(&global.nats("sluice-dispatcher-admin")).await?;
    let js = async_nats::jetstream::new(client.clone());
    let mut admin = sluice_core::admin::Admin::new(env!("CARGO_PKG_VERSION"));
    metrics.register(&mut admin);
    admin.nats(client);
    admin.probe("streams", move || {
        let js = js.clone();
        async move {
            sluice_core::streams::check_streams(
                &js,
                &[
                    subjects::EVENTS_STREAM,
                    subjects::RUNS_STREAM,
                    subjects::STATUS_STREAM,
                ],
            )
            .await
            .map_err(|e| e.to_string())
        }
    });
    admin.probe("consumers", move || {
        let stopped = consumers.stopped();
        async move {
            if stopped.is_empty() {
                Ok(())
            } else {
                Err(format!("not consuming, recovering: {}", stopped.join(", ")))
            }
        }
    });
    admin.serve(listen, shutdown).await?;
    Ok(())
}
