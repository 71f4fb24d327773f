//! `sluice`: every Sluice service and the user commands, in one binary.
#![forbid(unsafe_code)]

mod args;
mod dashboard;
mod dev;
mod dispatcher;
mod events;
mod ingest;
mod install;
mod nats_admin;
mod output;
mod pipelines;
mod runner;
mod runs;
mod status;
mod streams;

use std::time::Duration;

use anyhow::Context;
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// What a failed command prints: the error and each cause, never a backtrace (anyhow
/// adds one under `RUST_BACKTRACE`, which services' environments often set for panics;
/// a user's mistake is told in words).
fn error_report(e: &anyhow::Error) -> String {
    let mut out = format!("Error: {e}");
    let causes: Vec<String> = e.chain().skip(1).map(ToString::to_string).collect();
    if !causes.is_empty() {
        out.push_str("\n\nCaused by:");
        for (i, cause) in causes.iter().enumerate() {
            out.push_str(&format!("\n    {i}: {cause}"));
        }
    }
    out
}

async fn run() -> anyhow::Result<()> {
    let cli = args::Cli::parse();
    sluice_core::telemetry::init(cli.global.log_format)?;
    let shutdown = sluice_core::shutdown::on_signal();
    if let args::Command::Runs(c) = cli.command {
        // Scripts rely on `runs get --wait` exit codes.
        let code = runs::run(&cli.global, c, shutdown).await?;
        std::process::exit(code);
    }
    match cli.command {
        args::Command::Ingest(a) => ingest::run(&cli.global, a, shutdown).await,
        args::Command::Dispatcher(a) => dispatcher::run(&cli.global, a, shutdown).await,
        args::Command::Dev(a) => dev::run(&cli.global, a, shutdown).await,
        args::Command::Runner(a) => runner::run(&cli.global, a, shutdown).await,
        args::Command::Dashboard(a) => dashboard::run(&cli.global, a, shutdown).await,
        args::Command::Pipelines(c) => pipelines::run(&cli.global, c).await,
        args::Command::Events(c) => events::run(&cli.global, c).await,
        args::Command::Runs(_) => Ok(()),
        args::Command::Status { output, watch } => {
            status::run(&cli.global, output, watch, shutdown).await
        }
        args::Command::Streams(c) => streams::run(&cli.global, c).await,
        args::Command::Nats(c) => nats_admin::run(c.action()),
        args::Command::Cluster(c) => nats_admin::run(c.action()),
        args::Command::Install(a) => install::run(*a).await,
        args::Command::Uninstall(a) => install::uninstall(a).await,
    }
}

/// Connects for a user command: fails within seconds, naming the URL, when NATS cannot
/// be reached.
async fn connect(global: &args::Global) -> anyhow::Result<async_nats::Client> {
    sluice_core::nats::connect_once(&global.nats("sluice-cli"), Duration::from_secs(5))
        .await
        .with_context(|| {
            format!(
                "cannot reach NATS at {} (set --nats-url or SLUICE_NATS_URL)",
                global.nats_url
            )
        })
}
