//! Dispatcher benchmark: throughput (events/s in, run requests/s out) with 1,000
//! pipelines registered, and the latency added between "event stored" and "run
//! request stored" at a fixed 500 events/s, both taken from JetStream's own
//! timestamps.
//!
//! Run with `./scripts/bench-dispatch`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, message::PublishMessage};
use serde_json::value::RawValue;
use sluice_core::run::RunRequest;
use sluice_core::{subjects, Event, Provider};
use sluice_tests::dispatcher::{apply, count, provision, Dispatcher};
use sluice_tests::nats::NatsServer;
use sluice_tests::{fixture, wait_for};

struct Args {
    events: u64,
    pipelines: usize,
    rate: u64,
    seconds: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        events: 20_000,
        pipelines: 1_000,
        rate: 500,
        seconds: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--events" => a.events = value.parse()?,
            "--pipelines" => a.pipelines = value.parse()?,
            "--rate" => a.rate = value.parse()?,
            "--seconds" => a.seconds = value.parse()?,
            other => bail!("unknown flag {other}: use --events, --pipelines, --rate, --seconds"),
        }
    }
    Ok(a)
}

/// 95 % of pipelines watch one repository each; 5 % use a glob of another
/// organisation, so every event also evaluates them (and they fail on `repos`).
fn pipelines_yaml(n: usize) -> String {
    let mut yaml = String::new();
    for i in 0..n {
        let repos = if i.is_multiple_of(20) {
            format!("[\"team-{i}/*\"]")
        } else {
            format!("[acme/app-{i}]")
        };
        yaml.push_str(&format!(
            "---\nname: p-{i}\ntriggers:\n  - repos: {repos}\n    kinds: [push]\n    branches: [main, \"release/*\"]\n    when: \"event.sha != ''\"\nruntime: {{ cluster: c-{} }}\nsteps:\n  - {{name: build, image: alpine, commands: [make]}}\n",
            i % 4
        ));
    }
    yaml
}

fn event(i: u64, pipelines: usize, payload: &str) -> Event {
    // Events go to repositories that have a pipeline (not the glob ones).
    let mut target = (i as usize * 7919) % pipelines;
    if target.is_multiple_of(20) {
        target += 1;
    }
    let mut e = Event::new(Provider::Github, &format!("bench-{i}"), "push");
    e.repo = Some(format!("acme/app-{}", target.min(pipelines - 1)));
    e.git_ref = Some("refs/heads/main".into());
    e.sha = Some("6113728f27ae82c7b1a177c8d03f9e96e0adf246".into());
    e.changed_files = Some(vec!["README.md".into()]);
    e.changed_files_complete = true;
    e.payload = RawValue::from_string(payload.to_owned()).ok();
    e
}

async fn publish(js: &jetstream::Context, e: &Event) -> anyhow::Result<u64> {
    let ack = js
        .send_publish(
            e.subject(),
            PublishMessage::build()
                .payload(serde_json::to_vec(e)?.into())
                .message_id(&e.id),
        )
        .await?
        .await?;
    Ok(ack.sequence)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let payload = String::from_utf8(fixture("github/push.with-new-branch.json"))?;
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client);
    provision(&js).await;
    apply(&js, &pipelines_yaml(args.pipelines)).await;
    println!(
        "{} pipelines, {} events with the real {}-byte push payload, nats-server {}",
        args.pipelines,
        args.events,
        payload.len(),
        nats.url()
    );

    // Throughput: a backlog of events, then one dispatcher drains it.
    let mut acks = Vec::with_capacity(args.events as usize);
    for i in 0..args.events {
        let e = event(i, args.pipelines, &payload);
        let js = js.clone();
        acks.push(tokio::spawn(async move { publish(&js, &e).await }));
        if acks.len() >= 512 {
            for a in acks.drain(..) {
                a.await??;
            }
        }
    }
    for a in acks.drain(..) {
        a.await??;
    }
    let started = Instant::now();
    let dispatcher = Dispatcher::start_with(Dispatcher::config(&nats.url())).await;
    let total = args.events;
    wait_for(
        "the backlog to be dispatched",
        Duration::from_secs(600),
        || async { (count(&js, subjects::DECISIONS_STREAM).await >= total).then_some(()) },
    )
    .await;
    let wall = started.elapsed().as_secs_f64();
    // The drain itself, from JetStream's timestamps of the first and last decision:
    // the dispatcher's start-up (loading the pipelines) is not part of it.
    let mut decisions = js.get_stream(subjects::DECISIONS_STREAM).await?;
    let state = decisions.info().await?.state.clone();
    let first = decisions.get_raw_message(state.first_sequence).await?.time;
    let last = decisions.get_raw_message(state.last_sequence).await?.time;
    let elapsed = (last - first).as_seconds_f64();
    let runs = count(&js, subjects::RUNS_STREAM).await;
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| throughput, {} pipelines | {:.0} events/s in, {:.0} run requests/s out ({} events, {} runs drained in {:.2} s; {:.2} s with start-up) |",
        args.pipelines,
        total as f64 / elapsed,
        runs as f64 / elapsed,
        total,
        runs,
        elapsed,
        wall
    );

    // Latency at a fixed rate, from JetStream's own timestamps.
    let runs_before = runs;
    let n = args.rate * args.seconds;
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut pending = Vec::with_capacity(n as usize);
    for i in 0..n {
        ticker.tick().await;
        let e = event(10_000_000 + i, args.pipelines, &payload);
        let js = js.clone();
        pending.push(tokio::spawn(async move {
            publish(&js, &e).await.map(|seq| (e.id, seq))
        }));
    }
    let mut event_seq: HashMap<String, u64> = HashMap::new();
    for p in pending {
        let (id, seq) = p.await??;
        event_seq.insert(id, seq);
    }
    wait_for(
        "the fixed-rate events to be dispatched",
        Duration::from_secs(120),
        || async { (count(&js, subjects::RUNS_STREAM).await >= runs_before + n).then_some(()) },
    )
    .await;
    dispatcher.stop().await;

    let events_stream = js.get_stream(subjects::EVENTS_STREAM).await?;
    let mut runs_stream = js.get_stream(subjects::RUNS_STREAM).await?;
    let last = runs_stream.info().await?.state.last_sequence;
    let mut added = Vec::with_capacity(n as usize);
    for seq in (last + 1 - n)..=last {
        let run = runs_stream.get_raw_message(seq).await?;
        let req: RunRequest = serde_json::from_slice(&run.payload)?;
        let Some(ev_seq) = event_seq.get(&req.event_id) else {
            continue;
        };
        let ev = events_stream.get_raw_message(*ev_seq).await?;
        let gap = run.time - ev.time;
        added.push(gap.as_seconds_f64() * 1000.0);
    }
    added.sort_by(f64::total_cmp);
    let pct = |p: f64| added[((added.len() as f64 * p) as usize).min(added.len() - 1)];
    println!(
        "| added latency at {} events/s (event stored → run request stored) | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} runs) |",
        args.rate,
        pct(0.5),
        pct(0.99),
        added[added.len() - 1],
        added.len()
    );
    Ok(())
}
