//! `sluice`: every Sluice service and the user commands, in one binary.
#![forbid(unsafe_code)]

mod args;
mod dispatcher;
mod events;
mod ingest;
mod output;
mod pipelines;
mod runner;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = args::Cli::parse();
    sluice_core::telemetry::init(cli.global.log_format)?;
    let shutdown = sluice_core::shutdown::on_signal();
    match cli.command {
        args::Command::Ingest(a) => ingest::run(&cli.global, a, shutdown).await,
        args::Command::Dispatcher(a) => dispatcher::run(&cli.global, a, shutdown).await,
        args::Command::Runner(a) => runner::run(&cli.global, a, shutdown).await,
        args::Command::Pipelines(c) => pipelines::run(&cli.global, c).await,
        args::Command::Events(c) => events::run(&cli.global, c).await,
    }
}
