//! `sluice dashboard`.

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::args::{DashboardArgs, Global};

/// Serves the dashboard until `shutdown`. Its NATS credential should be the dashboard
/// role's (`dashboard.nk`), which may read every run, log and decision and nothing
/// more; with `--allow-actions` the dashboard-actions role's (`dashboard-actions.nk`),
/// which may also ask for a cancel or a rerun.
pub async fn run(
    global: &Global,
    a: DashboardArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let actions = actions(&a)?;
    let client = sluice_core::nats::connect(&global.nats("sluice-dashboard")).await?;
    let dashboard = sluice_dashboard::start(client, a.listen, actions, shutdown).await?;
    eprintln!("dashboard on http://{}/runs", dashboard.addr);
    dashboard.wait().await;
    Ok(())
}

fn actions(a: &DashboardArgs) -> anyhow::Result<Option<sluice_dashboard::Actions>> {
    if !a.allow_actions {
        return Ok(None);
    }
    let token =
        match &a.actions_token_file {
            Some(path) => Some(std::fs::read_to_string(path).with_context(|| {
                format!("cannot read the actions token from {}", path.display())
            })?),
            None => None,
        };
    sluice_dashboard::Actions::new(token, a.trusted_user_header.as_deref())
        .map(Some)
        .map_err(anyhow::Error::msg)
}
