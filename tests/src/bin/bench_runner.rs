//! Runner pickup benchmark: the time from "run request stored" to "scheduled state
//! stored", both taken from JetStream's own timestamps, with free capacity, at a fixed
//! rate. Uses the local executor (the Kubernetes executor is not built yet), with runs
//! that need no clone and one trivial step.
//!
//! Run with `./scripts/bench-runner`.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use sluice_core::run::{RunState, StatusUpdate};
use sluice_core::subjects;
use sluice_tests::dispatcher::provision;
use sluice_tests::nats::NatsServer;
use sluice_tests::runner::{publish_run, run_request, step, Runner};
use sluice_tests::wait_for;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut runs: u64 = 500;
    let mut rate: u64 = 50;
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => runs = value.parse()?,
            "--rate" => rate = value.parse()?,
            other => anyhow::bail!("unknown flag {other}: use --runs, --rate"),
        }
    }
    let nats = NatsServer::start().await;
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client);
    provision(&js).await;
    let _runner =
        Runner::start_with(&nats.url(), "bench", "bench-runner", |c| c.max_running = 50).await;
    // Wait until the runner's consumer exists, so the first run is not measured
    // against the runner's start-up.
    wait_for("the runner to join", Duration::from_secs(20), || {
        let js = js.clone();
        async move {
            let stream = js.get_stream(subjects::RUNS_STREAM).await.ok()?;
            stream
                .consumer_info("sluice-runner-bench")
                .await
                .ok()
                .map(|_| ())
        }
    })
    .await;
    let dir = tempfile::tempdir()?;
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    let mut stored_at = std::collections::HashMap::new();
    for i in 0..runs {
        ticker.tick().await;
        let mut req = run_request(
            &format!("b-{i}"),
            "bench",
            dir.path(),
            "x",
            vec![step("s", &["true"])],
        );
        req.clone_url = None;
        publish_run(&js, &req).await;
        // The request is stored once its publish is acknowledged; the work queue
        // deletes it when the run ends, so its own timestamp cannot be read later.
        stored_at.insert(req.run_id, time::OffsetDateTime::now_utc());
    }
    let scheduled = wait_for(
        "every run to be scheduled",
        Duration::from_secs(300),
        || {
            let js = js.clone();
            async move {
                let stream = js.get_stream(subjects::STATUS_STREAM).await.ok()?;
                let mut found = std::collections::HashMap::new();
                let mut info = js.get_stream(subjects::STATUS_STREAM).await.ok()?;
                let last = info.info().await.ok()?.state.last_sequence;
                for seq in 1..=last {
                    let Ok(m) = stream.get_raw_message(seq).await else {
                        continue;
                    };
                    let Ok(u) = serde_json::from_slice::<StatusUpdate>(&m.payload) else {
                        continue;
                    };
                    if u.step.is_none() && u.state == RunState::Scheduled {
                        found.insert(u.run_id, m.time);
                    }
                }
                (found.len() as u64 >= runs).then_some(found)
            }
        },
    )
    .await;
    let mut pickups: Vec<f64> = stored_at
        .iter()
        .filter_map(|(id, at)| {
            scheduled
                .get(id)
                .map(|s| (*s - *at).as_seconds_f64() * 1000.0)
        })
        .collect();
    pickups.sort_by(f64::total_cmp);
    let pct = |p: f64| pickups[((pickups.len() as f64 * p) as usize).min(pickups.len() - 1)];
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| pickup at {rate} runs/s, free capacity (request stored → scheduled stored) | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} runs) |",
        pct(0.5),
        pct(0.99),
        pickups[pickups.len() - 1],
        pickups.len()
    );
    Ok(())
}
