//! The dashboard with a big store, in headless Chromium: `/runs` with 100,000 runs
//! stored, and the page of a run whose step logged 1,000,000 lines. Seeds a real
//! nats-server, starts `sluice dashboard` as its own process (timing how long it takes
//! to fold the stored states before `/readyz` says ready), then has
//! `tests/browser/first-paint.mjs` open each page cold and report the server's answer
//! time, first contentful paint, load and the page's DOM node count.
//!
//! Run with `./scripts/bench-dashboard` (docs/BENCHMARKS.md).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, message::PublishMessage};
use sluice_core::run::{LogChunk, LogLine, RunState, StatusUpdate};
use sluice_core::subjects;
use sluice_tests::nats::{reserve_port, NatsServer};
use sluice_tests::process::sluice_bin;
use sluice_tests::{dispatcher, workspace_root};
use time::OffsetDateTime;

/// The run whose step logs every line.
const BIG_RUN: &str = "bigrun000000000000000";
const LINES_PER_CHUNK: usize = 1_000;
/// Publishes awaited together while seeding.
const IN_FLIGHT: usize = 512;

struct Args {
    runs: usize,
    lines: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        runs: 100_000,
        lines: 1_000_000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => a.runs = value.parse()?,
            "--lines" => a.lines = value.parse()?,
            other => bail!("unknown flag {other}: use --runs, --lines"),
        }
    }
    Ok(a)
}

fn state(run_id: &str, i: usize, state: RunState) -> StatusUpdate {
    StatusUpdate {
        run_id: run_id.into(),
        pipeline: format!("p-{}", i % 50),
        state,
        step: None,
        at: OffsetDateTime::now_utc(),
        cluster: Some(format!("c{}", i % 3)),
        event_id: Some(format!("github:bench-{i}")),
        concurrency_group: None,
        exit_code: None,
        message: None,
        runner: Some("runner-1".into()),
        repo: Some(format!("acme/app-{}", i % 100)),
        sha: Some("0123456789abcdef0123456789abcdef01234567".into()),
        parent: None,
    }
}

/// Publishes every `(subject, id, payload)`, `IN_FLIGHT` acknowledgements awaited at a
/// time.
async fn publish_all(
    js: &jetstream::Context,
    messages: impl Iterator<Item = (String, String, Vec<u8>)>,
) -> anyhow::Result<usize> {
    let mut pending = Vec::with_capacity(IN_FLIGHT);
    let mut n = 0;
    for (subject, id, payload) in messages {
        let ack = js
            .send_publish(
                subject,
                PublishMessage::build()
                    .payload(payload.into())
                    .message_id(id),
            )
            .await?;
        pending.push(ack);
        n += 1;
        if pending.len() == IN_FLIGHT {
            for ack in pending.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in pending {
        ack.await?;
    }
    Ok(n)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let nats = NatsServer::start().await;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    dispatcher::provision(&js).await;

    let seeding = Instant::now();
    let runs = publish_all(
        &js,
        (0..args.runs).map(|i| {
            let run = format!("r{i:019}");
            let final_state = if i % 7 == 0 {
                RunState::Failed
            } else {
                RunState::Succeeded
            };
            let u = state(&run, i, final_state);
            let payload = serde_json::to_vec(&u).expect("json");
            (u.subject(), u.message_id(), payload)
        }),
    )
    .await?;
    let big = state(BIG_RUN, 0, RunState::Running);
    let mut step = big.clone();
    step.step = Some("build".into());
    publish_all(
        &js,
        [big, step].into_iter().map(|u| {
            let payload = serde_json::to_vec(&u).expect("json");
            (u.subject(), u.message_id(), payload)
        }),
    )
    .await?;
    let chunks = args.lines.div_ceil(LINES_PER_CHUNK);
    publish_all(
        &js,
        (0..chunks).map(|seq| {
            let first = seq * LINES_PER_CHUNK;
            let lines = (first..(first + LINES_PER_CHUNK).min(args.lines))
                .map(|n| LogLine {
                    stream: "stdout".into(),
                    text: format!("line {} of the build: compiling module_{n} ... ok", n + 1),
                })
                .collect();
            let chunk = LogChunk {
                run_id: BIG_RUN.into(),
                step: "build".into(),
                seq: seq as u64,
                lines,
            };
            (
                subjects::logs("c0", BIG_RUN),
                subjects::log_chunk_id(BIG_RUN, "build", seq as u64),
                serde_json::to_vec(&chunk).expect("json"),
            )
        }),
    )
    .await?;
    println!(
        "seeded {runs} runs and {} log lines ({chunks} chunks) in {:.1} s",
        args.lines,
        seeding.elapsed().as_secs_f64()
    );

    let port = reserve_port();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    let mut dashboard = Command::new(sluice_bin()?)
        .args(["dashboard", "--listen", &format!("127.0.0.1:{port}")])
        .env("SLUICE_NATS_URL", nats.url())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start sluice dashboard")?;
    let http = reqwest::Client::new();
    let ready = sluice_tests::wait_for(
        "the dashboard to fold every stored state",
        Duration::from_secs(600),
        || {
            let (http, url) = (http.clone(), format!("{base}/readyz"));
            async move {
                let r = http.get(url).send().await.ok()?;
                r.status().is_success().then(|| started.elapsed())
            }
        },
    )
    .await;
    let rss = sluice_tests::process::peak_rss(dashboard.id()).unwrap_or(0);

    let script = workspace_root().join("tests/browser/first-paint.mjs");
    let out = Command::new("node")
        .arg(&script)
        .arg(format!("{base}/runs"))
        .arg(format!("{base}/runs/{BIG_RUN}"))
        // Again: the dashboard has the log's map of chunks by now.
        .arg(format!("{base}/runs/{BIG_RUN}"))
        .current_dir(workspace_root().join("tests/browser"))
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run node {}", script.display()))?;
    let _ = dashboard.kill();
    let _ = dashboard.wait();
    if !out.status.success() {
        bail!("{} failed", script.display());
    }
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| dashboard start → ready ({runs} runs folded) | {:.2} s, peak RSS {:.1} MiB |",
        ready.as_secs_f64(),
        rss as f64 / 1_048_576.0
    );
    let mut seen = std::collections::HashSet::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let m: serde_json::Value = serde_json::from_str(line).context("first-paint output")?;
        let page = m["page"].as_str().unwrap_or_default().to_owned();
        let again = if seen.insert(page.clone()) {
            ""
        } else {
            " (opened again)"
        };
        println!(
            "| {page}{again} | answer {:.0} ms, first contentful paint {:.0} ms, load {:.0} ms, {} DOM nodes, {} KiB of HTML |",
            m["responseEnd"].as_f64().unwrap_or(f64::NAN),
            m["fcp"].as_f64().unwrap_or(f64::NAN),
            m["load"].as_f64().unwrap_or(f64::NAN),
            m["nodes"],
            m["htmlBytes"].as_u64().unwrap_or(0) / 1024
        );
    }
    Ok(())
}
