//! `sluice runs …`: what ran, how it went, its output; cancel.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use anyhow::{bail, Context};
use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures::StreamExt;
use sluice_core::run::{LogChunk, RerunAnswer, RunState, RunView, StatusUpdate};
use sluice_core::{bus, subjects};

use crate::args::{Global, Output, RunsCommand};
use crate::output;

pub async fn run(
    global: &Global,
    command: RunsCommand,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<i32> {
    let client = crate::connect(global).await?;
    let js = jetstream::new(client);
    match command {
        RunsCommand::List {
            pipeline,
            repo,
            state,
            limit,
            output,
            watch,
        } => {
            let filter = Filter {
                pipeline,
                repo,
                state,
                limit,
            };
            if watch {
                crate::output::watch(&shutdown, || list(&js, &filter, output)).await?;
            } else {
                list(&js, &filter, output).await?;
            }
            Ok(0)
        }
        RunsCommand::Get {
            run_id,
            wait,
            output,
        } => {
            let view = if wait {
                wait_final(&js, &run_id).await?
            } else {
                run_view(&js, &run_id).await?.with_context(|| {
                    format!("no run {run_id}: `sluice runs list` shows recent runs")
                })?
            };
            if output != Output::Table {
                output::structured(&view, output)?;
            } else {
                print_run(&view);
            }
            Ok(exit_code(wait, view.state))
        }
        RunsCommand::Logs {
            run_id,
            follow,
            step,
        } => {
            logs(&js, &run_id, follow, step.as_deref()).await?;
            Ok(0)
        }
        RunsCommand::Rerun { run_id, wait } => {
            let new = rerun(&js, &run_id).await?;
            println!("{new}");
            eprintln!("rerun of {run_id} requested: run {new} (`sluice runs get {new} --wait`)");
            if !wait {
                return Ok(0);
            }
            let view = wait_final(&js, &new).await?;
            print_run(&view);
            Ok(exit_code(true, view.state))
        }
        RunsCommand::Cancel { run_id } => {
            let view = run_view(&js, &run_id).await?.with_context(|| {
                format!("no run {run_id}: `sluice runs list` shows recent runs")
            })?;
            if view.state.is_final() {
                bail!("run {run_id} already ended: {}", view.state.as_str());
            }
            let cluster = view.cluster.context("the run's cluster is unknown")?;
            bus::cancel(&js, &cluster, &run_id, "cancelled by a user").await?;
            println!("cancel requested for run {run_id} on cluster {cluster}");
            Ok(0)
        }
    }
}

/// What `runs list` shows.
#[derive(Debug)]
struct Filter {
    pipeline: Option<String>,
    repo: Option<String>,
    state: Option<String>,
    limit: usize,
}

async fn list(js: &jetstream::Context, f: &Filter, output: Output) -> anyhow::Result<()> {
    let runs = recent_runs(js, 20_000).await?;
    let mut runs: Vec<RunView> = runs
        .into_values()
        .filter(|r| f.pipeline.as_ref().is_none_or(|p| &r.pipeline == p))
        .filter(|r| f.repo.as_ref().is_none_or(|p| r.repo.as_ref() == Some(p)))
        .filter(|r| f.state.as_ref().is_none_or(|s| r.state.as_str() == s))
        .collect();
    runs.sort_by_key(|r| std::cmp::Reverse(r.updated_at));
    runs.truncate(f.limit);
    if output != Output::Table {
        return output::structured(&runs, output);
    }
    if runs.is_empty() {
        println!("No runs yet.");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            vec![
                r.run_id.clone(),
                r.pipeline.clone(),
                paint(r.state),
                r.repo.clone().unwrap_or_default(),
                r.cluster.clone().unwrap_or_default(),
                r.updated_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &["RUN", "PIPELINE", "STATE", "REPO", "CLUSTER", "UPDATED"],
        &rows,
    );
    Ok(())
}

/// Starts the run's pipeline again for the event that started it
/// ([`sluice_core::bus::rerun`]); the new run gets its own id.
async fn rerun(js: &jetstream::Context, run_id: &str) -> anyhow::Result<String> {
    let view = run_view(js, run_id)
        .await?
        .with_context(|| format!("no run {run_id}: `sluice runs list` shows recent runs"))?;
    let event_id = view
        .event_id
        .clone()
        .with_context(|| format!("run {run_id} names no event"))?;
    match bus::rerun(js, &event_id, &view.pipeline, view.first_seen)
        .await
        .context("JetStream did not store the rerun's event")?
    {
        RerunAnswer::Started { run_id } => Ok(run_id),
        RerunAnswer::Refused { reason } => bail!("run {run_id} cannot be rerun: {reason}"),
    }
}

/// `runs get --wait` exits 0 only for a run that succeeded, so scripts can rely on it.
fn exit_code(wait: bool, state: RunState) -> i32 {
    match (wait, state) {
        (false, _) | (true, RunState::Succeeded) => 0,
        (true, RunState::Cancelled) => 3,
        (true, _) => 1,
    }
}

fn paint(state: RunState) -> String {
    let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    if !colour {
        return state.as_str().to_owned();
    }
    let code = match state {
        RunState::Succeeded => "32",
        RunState::Failed | RunState::Error => "31",
        RunState::Cancelled => "33",
        _ => "36",
    };
    format!("\x1b[{code}m{}\x1b[0m", state.as_str())
}

fn print_run(v: &RunView) {
    println!("run       {}", v.run_id);
    println!("pipeline  {}", v.pipeline);
    println!(
        "state     {}{}",
        paint(v.state),
        v.message
            .as_deref()
            .map(|m| format!(" ({m})"))
            .unwrap_or_default()
    );
    if let Some(r) = &v.repo {
        println!("repo      {r}");
    }
    if let Some(e) = &v.event_id {
        println!("event     {e}");
    }
    if let Some(c) = &v.cluster {
        println!(
            "cluster   {c}{}",
            v.runner
                .as_deref()
                .map(|r| format!(" (runner {r})"))
                .unwrap_or_default()
        );
    }
    if !v.steps.is_empty() {
        println!("steps:");
        for s in &v.steps {
            let extra = s
                .message
                .as_deref()
                .map(|m| format!("  {m}"))
                .unwrap_or_default();
            println!("  {:<20} {}{extra}", s.name, paint(s.state));
        }
    }
}

async fn ordered(
    js: &jetstream::Context,
    stream: &str,
    filter: String,
    policy: DeliverPolicy,
) -> anyhow::Result<(
    jetstream::consumer::Consumer<jetstream::consumer::pull::OrderedConfig>,
    u64,
)> {
    bus::ordered(js, stream, filter, policy)
        .await
        .with_context(|| {
            format!("cannot read {stream}: has `sluice streams apply` run against this NATS?")
        })
}

async fn recent_runs(
    js: &jetstream::Context,
    max: u64,
) -> anyhow::Result<BTreeMap<String, RunView>> {
    let mut status = js
        .get_stream(subjects::STATUS_STREAM)
        .await
        .context("no SLUICE_STATUS stream")?;
    let last = status.info().await?.state.last_sequence;
    let start = last.saturating_sub(max).max(1);
    let (consumer, pending) = ordered(
        js,
        subjects::STATUS_STREAM,
        subjects::ALL_STATUS.into(),
        DeliverPolicy::ByStartSequence {
            start_sequence: start,
        },
    )
    .await?;
    let mut runs: BTreeMap<String, RunView> = BTreeMap::new();
    let mut messages = consumer.messages().await?.take(pending as usize);
    while let Some(m) = messages.next().await {
        let m = m?;
        if let Ok(u) = serde_json::from_slice::<StatusUpdate>(&m.payload) {
            runs.entry(u.run_id.clone())
                .or_insert_with(|| RunView::new(&u))
                .apply(&u);
        }
    }
    Ok(runs)
}

async fn run_view(js: &jetstream::Context, run_id: &str) -> anyhow::Result<Option<RunView>> {
    Ok(bus::run_view(js, None, run_id).await?)
}

/// Follows a run's states until a final one, printing each change as it comes.
async fn wait_final(js: &jetstream::Context, run_id: &str) -> anyhow::Result<RunView> {
    let (consumer, _) = ordered(
        js,
        subjects::STATUS_STREAM,
        subjects::status_of_run(run_id),
        DeliverPolicy::All,
    )
    .await?;
    let mut messages = consumer.messages().await?;
    let mut view: Option<RunView> = None;
    let progress = std::io::stderr().is_terminal();
    let spinner = crate::output::Spinner::start(format!("run {run_id}: waiting to be queued"));
    while let Some(m) = messages.next().await {
        let Ok(u) = serde_json::from_slice::<StatusUpdate>(&m?.payload) else {
            continue;
        };
        let v = view.get_or_insert_with(|| RunView::new(&u));
        v.apply(&u);
        if progress {
            match &u.step {
                Some(s) => spinner.println(&format!("  step {s}: {}", u.state.as_str())),
                None => spinner.println(&format!("  run: {}", u.state.as_str())),
            }
            let running = v
                .steps
                .iter()
                .rev()
                .find(|s| s.state == RunState::Running)
                .map(|s| format!(", step {}", s.name))
                .unwrap_or_default();
            spinner.set(format!("run {run_id}: {}{running}", v.state.as_str()));
        }
        if u.step.is_none() && u.state.is_final() {
            return Ok(v.clone());
        }
    }
    bail!("the status stream ended before run {run_id} finished")
}

async fn logs(
    js: &jetstream::Context,
    run_id: &str,
    follow: bool,
    step: Option<&str>,
) -> anyhow::Result<()> {
    let (consumer, pending) = ordered(
        js,
        subjects::LOGS_STREAM,
        subjects::logs_of_run(run_id),
        DeliverPolicy::All,
    )
    .await?;
    let mut messages = consumer.messages().await?;
    let mut printed = 0u64;
    let mut last_step = String::new();
    let mut print = |chunk: LogChunk| {
        if step.is_some_and(|s| s != chunk.step) {
            return;
        }
        for line in chunk.lines {
            if step.is_none() && chunk.step != last_step {
                println!("── {} ──", chunk.step);
                last_step = chunk.step.clone();
            }
            println!("{}", line.text);
        }
    };
    while printed < pending {
        let Some(m) = messages.next().await else {
            break;
        };
        printed += 1;
        if let Ok(chunk) = serde_json::from_slice::<LogChunk>(&m?.payload) {
            print(chunk);
        }
    }
    if !follow {
        if pending == 0 && run_view(js, run_id).await?.is_none() {
            bail!("no run {run_id}: `sluice runs list` shows recent runs");
        }
        return Ok(());
    }
    // Follow the logs and the run's states side by side, one consumer each for as long as
    // it takes; a runner stores a step's logs before the run's final state, so once that
    // state is in, the logs are complete: count them once and print the rest.
    let mut states = bus::follow(
        js,
        subjects::STATUS_STREAM,
        subjects::status_of_run(run_id),
        DeliverPolicy::All,
    )
    .await?;
    loop {
        tokio::select! {
            m = messages.next() => {
                let Some(m) = m else { return Ok(()) };
                printed += 1;
                if let Ok(chunk) = serde_json::from_slice::<LogChunk>(&m?.payload) {
                    print(chunk);
                }
            }
            u = states.next() => {
                let Some(u) = u else {
                    bail!("the status stream ended before run {run_id} finished");
                };
                let Ok(u) = serde_json::from_slice::<StatusUpdate>(&u?.payload) else {
                    continue;
                };
                if u.step.is_none() && u.state.is_final() {
                    break;
                }
            }
        }
    }
    let (_, all) = ordered(
        js,
        subjects::LOGS_STREAM,
        subjects::logs_of_run(run_id),
        DeliverPolicy::All,
    )
    .await?;
    while printed < all {
        let Some(m) = messages.next().await else {
            break;
        };
        printed += 1;
        if let Ok(chunk) = serde_json::from_slice::<LogChunk>(&m?.payload) {
            print(chunk);
        }
    }
    Ok(())
}
