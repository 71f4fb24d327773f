//! `sluice dashboard`.

use tokio_util::sync::CancellationToken;

use crate::args::{DashboardArgs, Global};

/// Serves the dashboard until `shutdown`. Its NATS credential should be the dashboard
/// role's (`dashboard.nk`): it may read every run, log and decision, and change nothing.
pub async fn run(
    global: &Global,
    a: DashboardArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let client = sluice_core::nats::connect(&global.nats("sluice-dashboard")).await?;
    let dashboard = sluice_dashboard::start(client, a.listen, shutdown).await?;
    eprintln!("dashboard on http://{}/runs", dashboard.addr);
    dashboard.wait().await;
    Ok(())
}
