//! `sluice ingest`.

use sluice_core::streams::StreamSettings;
use sluice_ingest::{IngestConfig, SecretSources, Secrets};
use tokio_util::sync::CancellationToken;

use crate::args::{Global, IngestArgs};

pub async fn run(
    global: &Global,
    a: IngestArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let secrets = Secrets::load(SecretSources {
        github: a.github_webhook_secret.as_ref(),
        gitlab: a.gitlab_webhook_token.as_ref(),
        generic: a.webhook_signing_secret.as_ref(),
        file: a.secrets_file.as_deref(),
    })?;
    let config = IngestConfig {
        streams: StreamSettings {
            replicas: a.stream_replicas,
            dedup_window: a.dedup_window.0,
            events_max_age: a.events_max_age.0,
            ..StreamSettings::default()
        },
        max_body_bytes: a.max_body_bytes,
        publish_timeout: a.publish_timeout.0,
        shed_after: a.shed_after.0,
        read_timeout: a.read_timeout.0,
        tolerance: a.signature_tolerance.0,
        allow_sha1: a.allow_sha1,
        shutdown_grace: a.shutdown_grace.0,
        header_timeout: a.header_timeout.0,
        idle_timeout: a.idle_timeout.0,
        max_connections: a.max_connections,
        queue_wait: a.queue_wait.0,
        admin_listen: Some(a.admin_listen),
        ..IngestConfig::new(a.listen, global.nats("sluice-ingest"), secrets)
    };
    sluice_ingest::run(config, shutdown).await?;
    Ok(())
}
