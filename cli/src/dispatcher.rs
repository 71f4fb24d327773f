//! `sluice dispatcher`.

use sluice_core::streams::StreamSettings;
use sluice_dispatcher::DispatcherConfig;
use tokio_util::sync::CancellationToken;

use crate::args::{DispatcherArgs, Global};

pub async fn run(
    global: &Global,
    a: DispatcherArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = DispatcherConfig {
        streams: StreamSettings {
            replicas: a.stream_replicas,
            ..StreamSettings::default()
        },
        default_cluster: a.default_cluster,
        concurrency: a.concurrency.max(1),
        max_attempts: a.max_attempts.max(1),
        ..DispatcherConfig::new(global.nats("sluice-dispatcher"))
    };
    sluice_dispatcher::run(config, shutdown).await?;
    Ok(())
}
