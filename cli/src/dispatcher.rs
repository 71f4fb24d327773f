//! `sluice dispatcher`.

use anyhow::Context;
use secrecy::SecretString;
use sluice_core::streams::StreamSettings;
use sluice_dispatcher::forge::ForgeConfig;
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
        forge: ForgeConfig {
            github_app,
            github_token: a.github_token,
            github_api_url: a.github_api_url,
            gitlab_token: a.gitlab_token,
            gitlab_api_url: a.gitlab_api_url,
            ..ForgeConfig::default()
        },
        reporter: a.report_statuses.then(|| ReporterConfig {
            link_base_url: a.status_link_base_url.clone(),
            requests_per_hour: a.forge_requests_per_hour,
            ..ReporterConfig::default()
        }),
        ..DispatcherConfig::new(global.nats("sluice-dispatcher"))
    };
    sluice_dispatcher::run(config, shutdown).await?;
    Ok(())
}
