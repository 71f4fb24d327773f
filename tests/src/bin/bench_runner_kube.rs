//! Kubernetes executor benchmarks, against the Kubernetes API test double in its
//! load-test mode (containers print one line instead of running commands):
//!
//! 1. pickup: run request stored → Pod create received by the API, with free capacity;
//! 2. Pods created per second by one runner at the default rate limit (20/s, burst
//!    40), and whether the limit held;
//! 3. the RSS of a `sluice runner` process with 5,000 runs in flight.
//!
//! Run with `./scripts/bench-runner --executor kubernetes`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use sluice_core::subjects;
use sluice_tests::dispatcher::provision;
use sluice_tests::kubeapi::KubeApi;
use sluice_tests::nats::NatsServer;
use sluice_tests::runner::{publish_run, run_request, step, Runner};
use sluice_tests::wait_for;

struct Args {
    pickup_runs: u64,
    rate: u64,
    burst_runs: u64,
    in_flight: u64,
    /// Which of the three parts to run (all by default).
    only: Option<String>,
    sluice: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut a = Args {
        pickup_runs: 200,
        rate: 5,
        burst_runs: 400,
        in_flight: 5000,
        only: None,
        sluice: std::env::var_os("SLUICE_BIN").map(PathBuf::from),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--runs" => a.pickup_runs = value.parse()?,
            "--rate" => a.rate = value.parse()?,
            "--burst-runs" => a.burst_runs = value.parse()?,
            "--in-flight" => a.in_flight = value.parse()?,
            "--only" => match value.as_str() {
                "pickup" | "pods" | "rss" => a.only = Some(value),
                other => anyhow::bail!("--only {other}: use pickup, pods or rss"),
            },
            other => {
                anyhow::bail!(
                    "unknown flag {other}: use --runs, --rate, --burst-runs, --in-flight, --only"
                )
            }
        }
    }
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    let part = |name: &str| a.only.as_deref().is_none_or(|only| only == name);
    if part("pickup") {
        pickup(&a).await?;
    }
    if part("pods") {
        pods_per_second(&a).await?;
    }
    if part("rss") {
        match &a.sluice {
            Some(bin) => rss(&a, bin).await?,
            None => println!("| runner RSS | skipped: set SLUICE_BIN to the sluice binary |"),
        }
    }
    Ok(())
}

async fn nats() -> anyhow::Result<(NatsServer, jetstream::Context)> {
    let nats = NatsServer::start().await;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    provision(&js).await;
    Ok((nats, js))
}

async fn joined(js: &jetstream::Context, cluster: &str) {
    let name = format!("sluice-runner-{cluster}");
    wait_for("the runner to join", Duration::from_secs(30), || {
        let (js, name) = (js.clone(), name.clone());
        async move {
            let stream = js.get_stream(subjects::RUNS_STREAM).await.ok()?;
            stream.consumer_info(&name).await.ok().map(|_| ())
        }
    })
    .await;
}

fn request(i: u64, prefix: &str, cluster: &str) -> sluice_core::run::RunRequest {
    let mut req = run_request(
        &format!("{prefix}-{i}"),
        cluster,
        std::path::Path::new("/nonexistent"),
        "x",
        vec![step("s", &["true"])],
    );
    req.clone_url = None;
    req
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// 1. Pickup with free capacity, at a rate well under the API budget.
async fn pickup(a: &Args) -> anyhow::Result<()> {
    let (_nats, js) = nats().await?;
    let api = KubeApi::start_simulated(Duration::ZERO).await;
    let _runner = Runner::start_kube(&_nats.url(), "pickup", "bench", &api, |_| {}).await;
    joined(&js, "pickup").await;
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / a.rate));
    let mut stored = HashMap::new();
    for i in 0..a.pickup_runs {
        ticker.tick().await;
        let req = request(i, "p", "pickup");
        publish_run(&js, &req).await;
        stored.insert(format!("sluice-{}", req.run_id), Instant::now());
    }
    let created = wait_for("every Pod", Duration::from_secs(120), || async {
        let c = api.created_at();
        (c.len() as u64 >= a.pickup_runs).then_some(c)
    })
    .await;
    let mut ms: Vec<f64> = stored
        .iter()
        .filter_map(|(pod, at)| {
            created
                .get(pod)
                .map(|c| c.saturating_duration_since(*at).as_secs_f64() * 1000.0)
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "| pickup at {} runs/s, free capacity (request stored → Pod create received) | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} runs) |",
        a.rate,
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms[ms.len() - 1],
        ms.len()
    );
    Ok(())
}

/// 2. A burst of runs against the default rate limit.
async fn pods_per_second(a: &Args) -> anyhow::Result<()> {
    let (_nats, js) = nats().await?;
    let api = KubeApi::start_simulated(Duration::ZERO).await;
    let _runner = Runner::start_kube_with(
        &_nats.url(),
        "burst",
        "bench",
        &api,
        |_| {},
        |c| c.max_running = 1000,
    )
    .await;
    joined(&js, "burst").await;
    // Let the start-up requests (list, watch) pass, then count from a quiet bucket.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = api.requests().len();
    for i in 0..a.burst_runs {
        publish_run(&js, &request(i, "b", "burst")).await;
    }
    let created = wait_for("every Pod", Duration::from_secs(600), || async {
        let c = api.created_at();
        (c.len() as u64 >= a.burst_runs).then_some(c)
    })
    .await;
    let mut times: Vec<Instant> = created.values().copied().collect();
    times.sort();
    let span = times[times.len() - 1] - times[0];
    let requests: Vec<Instant> = api.requests()[before..].iter().map(|r| r.at).collect();
    let (first, last) = (requests[0], requests[requests.len() - 1]);
    // The budget: 40 at once, then 20 a second. Worst 1 s window after the burst.
    let worst = requests
        .iter()
        .filter(|t| **t >= first + Duration::from_secs(3))
        .map(|t| {
            requests
                .iter()
                .filter(|u| **u >= *t && **u < *t + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    let steady = (requests.len().saturating_sub(40)) as f64 / (last - first).as_secs_f64();
    println!(
        "| Pods created per second, one runner, default limit 20/s burst 40 ({} runs at once) | {:.1} Pods/s ({} Pods in {:.1} s; each run also opens its log stream) |",
        a.burst_runs,
        (times.len() - 1) as f64 / span.as_secs_f64(),
        times.len(),
        span.as_secs_f64()
    );
    println!(
        "| Kubernetes API requests during the burst | {} requests, {:.2}/s after the first 40; busiest 1 s window after the burst: {} |",
        requests.len(),
        steady,
        worst
    );
    Ok(())
}

/// 3. A `sluice runner` process holding `in_flight` runs whose Pods keep running.
async fn rss(a: &Args, bin: &PathBuf) -> anyhow::Result<()> {
    let (nats, js) = nats().await?;
    let api = KubeApi::start_simulated(Duration::from_secs(3600)).await;
    let dir = tempfile::tempdir()?;
    let kubeconfig = api.write_kubeconfig(dir.path());
    let mut child = Command::new(bin)
        .args(["runner", "--cluster", "rss", "--executor", "kubernetes"])
        .args(["--max-running", &a.in_flight.to_string()])
        // The rate limit is not what this measures: fill up quickly (the burst, and
        // with it the Pod creates under way at once, stays at its default of 40).
        .args(["--kube-qps", "2000"])
        .args(["--ack-wait", "60s", "--delete-after", "1h"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .env("SLUICE_NATS_URL", nats.url())
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    joined(&js, "rss").await;
    let idle = sluice_tests::process::status_kib(child.id(), "VmRSS:").unwrap_or(0);
    for i in 0..a.in_flight {
        publish_run(&js, &request(i, "m", "rss")).await;
    }
    let started = Instant::now();
    wait_for(
        "every run's Pod running with its log followed",
        Duration::from_secs(900),
        || async {
            let logs = api
                .requests()
                .iter()
                .filter(|r| r.uri.contains("/log"))
                .count() as u64;
            (logs >= a.in_flight && api.created_at().len() as u64 >= a.in_flight).then_some(())
        },
    )
    .await;
    let filled = started.elapsed();
    let mut peak_rss = 0;
    for _ in 0..10 {
        peak_rss =
            peak_rss.max(sluice_tests::process::status_kib(child.id(), "VmRSS:").unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let hwm = sluice_tests::process::status_kib(child.id(), "VmHWM:").unwrap_or(0);
    let _ = child.kill();
    let _ = child.wait();
    println!(
        "| runner RSS with {} runs in flight (Pods running, logs followed) | {:.1} MiB (high-water mark {:.1} MiB; {:.1} MiB idle; all in flight {:.1} s after the last publish) |",
        a.in_flight,
        peak_rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        idle as f64 / 1024.0,
        filled.as_secs_f64()
    );
    Ok(())
}
