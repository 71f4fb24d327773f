//! The end-of-sprint spike: 10,000 signed `pull_request` webhooks sent within 10 s
//! (open loop: each is sent on schedule whether or not earlier ones were answered) to
//! two `sluice ingest` processes, two dispatchers holding 1,000 pipelines, and two
//! runners per cluster for three clusters against the Kubernetes API double in its
//! load mode, on the production setting: a 3-node JetStream cluster with R3 streams and
//! `sync_interval: always` (then the same on one node, for comparison). Every service
//! runs on its own credential from `sluice nats init`.
//!
//! Reported per configuration: the raw R3 publish capacity measured first in the same
//! run, answer times, what the streams stored (against the answers), time from the
//! last webhook to the last run planned, Pod creation per cluster against its limit,
//! the time the backlog took to drain, and every process's peak RSS. A webhook
//! answered 2xx but not stored, or stored twice, or a stored event without exactly one
//! run, exits non-zero. A timeline of the spike from inside follows (see [`timeline`]).
//!
//! Run with `./scripts/bench-spike` (docs/BENCHMARKS.md).

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, message::PublishMessage, stream};
use sluice_core::nats::NatsOptions;
use sluice_core::roles::{Role, ServerOptions};
use sluice_core::run::{Decision, RunState, StatusUpdate};
use sluice_core::{subjects, Event};
use sluice_tests::auth::nats_admin;
use sluice_tests::kubeapi::KubeApi;
use sluice_tests::nats::{reserve_port, server_binary};
use sluice_tests::process::{self, strings, Service};
use sluice_tests::streams::read_from;
use time::OffsetDateTime;

mod timeline;

const CLUSTERS: [&str; 3] = ["c1", "c2", "c3"];
/// The fixture's repository, replaced per webhook so events spread over pipelines.
const FIXTURE_REPO: &str = "Codertocat/Hello-World";

struct Args {
    webhooks: usize,
    seconds: f64,
    pipelines: usize,
    nodes: Vec<usize>,
    runners: usize,
    kube_qps: u32,
    /// How long each simulated container runs.
    run_for: Duration,
    /// The load generator's nice value (see [`send_from_own_thread`]).
    load_nice: i32,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        webhooks: 10_000,
        seconds: 10.0,
        pipelines: 1_000,
        nodes: vec![3, 1],
        runners: 2,
        kube_qps: sluice_runner::kubernetes::QPS,
        run_for: Duration::from_millis(200),
        load_nice: LOAD_NICE,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--webhooks" => a.webhooks = value.parse()?,
            "--seconds" => a.seconds = value.parse()?,
            "--pipelines" => a.pipelines = value.parse()?,
            "--nodes" => {
                a.nodes = value
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?;
                if a.nodes.iter().any(|n| *n != 1 && *n != 3) {
                    bail!("--nodes takes 3, 1 or 3,1");
                }
            }
            "--runners" => a.runners = value.parse()?,
            "--kube-qps" => a.kube_qps = value.parse()?,
            "--load-nice" => a.load_nice = value.parse()?,
            other => bail!(
                "unknown flag {other}: use --webhooks, --seconds, --pipelines, --nodes, --runners, --kube-qps, --load-nice"
            ),
        }
    }
    anyhow::ensure!(
        a.webhooks > 0 && a.pipelines > 0 && a.runners > 0,
        "counts must be above zero"
    );
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = args()?;
    let sluice = process::sluice_bin()?;
    let payload = String::from_utf8(sluice_tests::fixture("github/pull_request.opened.json"))?;
    println!(
        "{} signed pull_request webhooks ({} bytes each) in {} s to 2 ingest; 2 dispatchers, {} pipelines; {} clusters x {} runners at {} Kubernetes requests/s each; the load generator at nice {}",
        args.webhooks,
        payload.len(),
        args.seconds,
        args.pipelines,
        CLUSTERS.len(),
        args.runners,
        args.kube_qps,
        args.load_nice
    );
    let mut failed = false;
    for nodes in &args.nodes {
        let report = spike(&args, *nodes, &sluice, &payload).await?;
        report.print(&args);
        failed |= !report.correct();
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

/// What one configuration measured.
struct Report {
    nodes: usize,
    raw_publish_per_s: f64,
    sent: usize,
    /// Answer time of each request, by its status (0: no answer).
    answers: Vec<(u16, Duration)>,
    /// Requests without an answer, by why, with the first and last send offset.
    unanswered: Vec<(&'static str, usize, f64, f64)>,
    send_window: Duration,
    stored_events: usize,
    stored_twice: usize,
    /// Answered 2xx yet not stored.
    lost: usize,
    /// Answered something else yet stored (the forge counts it as failed).
    stored_but_refused: usize,
    runs: usize,
    runs_doubled: usize,
    events_without_run: usize,
    last_planned_after_last_webhook: Option<f64>,
    /// Per cluster: Pods, Pods/s between the first and the last create, drained after
    /// the last webhook (s), the limit.
    clusters: Vec<(String, usize, f64, f64, f64)>,
    /// Per cluster: API requests the double answered, and their rate over the same
    /// span as the Pod creates (the runners' client limit counts requests, not Pods).
    requests: Vec<(usize, f64)>,
    /// Per cluster, within that span: Pod creates and the other requests by kind; and
    /// the requests after the last create. The runners' one limiter serves them all,
    /// so Pods/s reads against the creates' share of it.
    request_mix: Vec<RequestMix>,
    all_final_after_last_webhook: Option<f64>,
    /// The whole path, per event that started one run: webhook sent → the run's Pod
    /// create received by the API double, and → its `scheduled` state stored.
    to_pod_create: Vec<Duration>,
    to_scheduled: Vec<Duration>,
    rss: Vec<(String, u64)>,
    /// What was sampled inside while the spike ran.
    timeline: timeline::Timeline,
}

/// One cluster's API requests, told apart around its Pod creates.
struct RequestMix {
    creates: usize,
    /// Every other request between the first and the last create, by kind.
    others: Vec<(&'static str, usize)>,
    after_last_create: usize,
}

impl Report {
    fn correct(&self) -> bool {
        self.lost == 0
            && self.stored_twice == 0
            && self.runs_doubled == 0
            && self.events_without_run == 0
    }

    fn print(&self, args: &Args) {
        let mut times: Vec<Duration> = self.answers.iter().map(|(_, t)| *t).collect();
        times.sort();
        let pct = |p: f64| -> f64 {
            if times.is_empty() {
                return 0.0;
            }
            let i = ((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1;
            times[i].as_secs_f64() * 1000.0
        };
        let mut by_status: HashMap<u16, usize> = HashMap::new();
        for (s, _) in &self.answers {
            *by_status.entry(*s).or_default() += 1;
        }
        let mut statuses: Vec<_> = by_status.into_iter().collect();
        statuses.sort();
        let statuses = statuses
            .iter()
            .map(|(s, n)| match s {
                0 => format!("{n} unanswered"),
                s => format!("{n} × {s}"),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let ok = self
            .answers
            .iter()
            .filter(|(s, _)| (200..300).contains(s))
            .count();
        let secs = |v: Option<f64>| v.map_or("never".to_owned(), |v| format!("{v:.2} s"));
        println!();
        let setting = if self.nodes == 3 {
            "3 nodes, R3, sync_interval: always"
        } else {
            "1 node, R1, sync_interval: always"
        };
        println!("### {setting}");
        println!();
        println!("| measure | value |");
        println!("|---|---|");
        println!(
            "| raw publish+ack capacity (28 KB, 64 in flight) | {:.0} msg/s |",
            self.raw_publish_per_s
        );
        println!(
            "| webhooks sent | {} in {:.2} s ({:.0}/s offered) |",
            self.sent,
            self.send_window.as_secs_f64(),
            self.sent as f64 / self.send_window.as_secs_f64().max(0.001)
        );
        println!("| answers | {statuses} |");
        for (why, n, first, last) in &self.unanswered {
            println!("| unanswered: {why} | {n}, sent {first:.2}–{last:.2} s into the spike |");
        }
        println!(
            "| answer time | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
            pct(0.50),
            pct(0.99),
            pct(1.0)
        );
        // Stored answers wait for JetStream; shed ones should not wait at all.
        for status in [202, 503] {
            let took: Vec<Duration> = self
                .answers
                .iter()
                .filter(|(s, _)| *s == status)
                .map(|(_, t)| *t)
                .collect();
            if !took.is_empty() {
                println!(
                    "| answer time of the {status}s | {} |",
                    percentiles(&took, "answers")
                );
            }
        }
        println!(
            "| events stored | {} ({} answered 2xx; {} lost, {} stored twice, {} stored although refused) |",
            self.stored_events, ok, self.lost, self.stored_twice, self.stored_but_refused
        );
        println!(
            "| runs planned | {} ({} events without exactly one run, {} doubled) |",
            self.runs, self.events_without_run, self.runs_doubled
        );
        println!(
            "| last webhook → last run planned | {} |",
            secs(self.last_planned_after_last_webhook)
        );
        for (
            ((cluster, pods, rate, drained, limit), (requests, per_s)),
            RequestMix {
                creates,
                others,
                after_last_create: after,
            },
        ) in self
            .clusters
            .iter()
            .zip(&self.requests)
            .zip(&self.request_mix)
        {
            println!(
                "| {cluster}: Pods created | {pods} at {rate:.1}/s; {requests} API requests at {per_s:.1}/s ({:.1} per Pod; limit {limit:.0} requests/s: {} runners × {}); backlog drained {drained:.1} s after the last webhook |",
                *requests as f64 / (*pods).max(1) as f64,
                args.runners, args.kube_qps
            );
            let others: Vec<String> = others.iter().map(|(k, n)| format!("{n} {k}")).collect();
            println!(
                "| {cluster}: requests between the first and the last Pod create | {creates} creates; others: {}; {after} after the last create |",
                if others.is_empty() { "none".to_owned() } else { others.join(", ") }
            );
        }
        println!(
            "| last webhook → every run final | {} |",
            secs(self.all_final_after_last_webhook)
        );
        for (what, samples) in [
            ("webhook sent → Pod create received", &self.to_pod_create),
            ("webhook sent → `scheduled` stored", &self.to_scheduled),
        ] {
            println!("| {what} | {} |", percentiles(samples, "runs"));
        }
        let rss = self
            .rss
            .iter()
            .map(|(name, b)| format!("{name} {:.1}", *b as f64 / 1048576.0))
            .collect::<Vec<_>>()
            .join(", ");
        println!("| peak RSS (MiB) | {rss} |");
        println!(
            "| correct (nothing lost or doubled) | {} |",
            if self.correct() { "yes" } else { "**NO**" }
        );
        timeline::print_ingest_answers(&self.timeline.last_metrics);
        timeline::print(&self.timeline);
    }
}

/// The NATS nodes of one configuration.
struct Nodes {
    children: Vec<Child>,
    monitors: Vec<String>,
    urls: String,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn spike(args: &Args, nodes: usize, sluice: &Path, payload: &str) -> anyhow::Result<Report> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;

    // Credentials and configuration as an operator makes them (`sluice nats init`
    // writes `sync_interval: always`).
    let auth = dir.join("nats-auth");
    let clusters: Vec<String> = CLUSTERS.iter().map(|c| (*c).to_owned()).collect();
    nats_admin::init(
        &auth,
        &clusters,
        &ServerOptions {
            listen: "127.0.0.1:4222".into(),
            store_dir: "/unused".into(),
            max_file_store: Some(sluice_tests::nats::MAX_FILE_STORE.into()),
        },
        false,
    )?;
    let nats = start_nodes(&auth.join(nats_admin::CONFIG_FILE), dir, nodes)?;
    for monitor in &nats.monitors {
        process::nats_healthy(&http, monitor, Duration::from_secs(60)).await?;
    }
    let seed = |role: &Role| auth.join(role.seed_file());
    let admin = NatsOptions {
        nkey_file: Some(seed(&Role::Admin)),
        inbox_prefix: Some("_INBOX".into()),
        ..NatsOptions::new(nats.urls.clone(), "bench-spike")
    };
    let js = jetstream::new(sluice_core::nats::connect(&admin).await?);
    let role_env = |role: &Role| {
        vec![
            ("SLUICE_NATS_URL".to_owned(), nats.urls.clone()),
            (
                "SLUICE_NATS_NKEY".to_owned(),
                seed(role).display().to_string(),
            ),
            ("RUST_LOG".to_owned(), "warn".to_owned()),
        ]
    };
    let replicas = nodes.to_string();
    let cluster_list = CLUSTERS.join(",");
    // The cluster may still be settling ("insufficient resources"): retry a while.
    retry(Duration::from_secs(60), || {
        cli(
            sluice,
            &role_env(&Role::Admin),
            &[
                "streams",
                "apply",
                "--replicas",
                &replicas,
                "--clusters",
                &cluster_list,
                // JetStream refuses to place a stream whose byte limit exceeds the
                // free disk (the default logs limit is 5 GiB).
                "--logs-max-bytes",
                "268435456",
            ],
        )
    })
    .await?;
    let pipelines = dir.join("pipelines.yaml");
    std::fs::write(&pipelines, pipelines_yaml(args.pipelines))?;
    cli(
        sluice,
        &role_env(&Role::Admin),
        &["pipelines", "apply", "-f", &pipelines.display().to_string()],
    )?;

    let raw_publish_per_s = raw_capacity(&js, nodes, payload.as_bytes()).await?;

    let mut apis = Vec::new();
    for _ in CLUSTERS {
        apis.push(KubeApi::start_simulated(args.run_for).await);
    }
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let mut services = Vec::new();
    let mut ingest_urls = Vec::new();
    for i in 1..=2 {
        let (port, admin_port) = (reserve_port(), reserve_port());
        let mut env = role_env(&Role::Ingest);
        env.push((
            "SLUICE_GITHUB_WEBHOOK_SECRET".into(),
            sluice_tests::ingest::GITHUB_SECRET.into(),
        ));
        let listen = format!("127.0.0.1:{port}");
        let admin = format!("127.0.0.1:{admin_port}");
        let s = Service::new(
            &format!("ingest-{i}"),
            sluice,
            admin_port,
            strings(&[
                "ingest",
                "--listen",
                &listen,
                "--admin-listen",
                &admin,
                "--stream-replicas",
                &replicas,
            ]),
            env,
            &logs,
        )
        .with_webhooks(port);
        ingest_urls.push(s.webhooks().to_owned());
        services.push(s);
    }
    for i in 1..=2 {
        let port = reserve_port();
        let listen = format!("127.0.0.1:{port}");
        services.push(Service::new(
            &format!("dispatcher-{i}"),
            sluice,
            port,
            strings(&[
                "dispatcher",
                "--admin-listen",
                &listen,
                "--stream-replicas",
                &replicas,
            ]),
            role_env(&Role::Dispatcher),
            &logs,
        ));
    }
    for (c, cluster) in CLUSTERS.iter().enumerate() {
        let kube_dir = dir.join(format!("kube-{cluster}"));
        std::fs::create_dir_all(&kube_dir)?;
        let kubeconfig = apis[c].write_kubeconfig(&kube_dir);
        for r in 0..args.runners {
            let port = reserve_port();
            let listen = format!("127.0.0.1:{port}");
            let mut env = role_env(&Role::Runner((*cluster).to_owned()));
            env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
            services.push(Service::new(
                &format!("runner-{cluster}-{r}"),
                sluice,
                port,
                strings(&[
                    "runner",
                    "--cluster",
                    cluster,
                    "--executor",
                    "kubernetes",
                    "--runner-id",
                    &format!("{cluster}-{r}"),
                    "--admin-listen",
                    &listen,
                    "--max-running",
                    "500",
                    "--kube-qps",
                    &args.kube_qps.to_string(),
                ]),
                env,
                &logs,
            ));
        }
    }
    for s in &mut services {
        s.spawn()?;
    }
    let all: Vec<&Service> = services.iter().collect();
    process::wait_ready(&http, &all, Duration::from_secs(90))
        .await
        .map_err(anyhow::Error::msg)?;

    // Signed before the timeline starts, which counts the schedule from its start.
    let requests = build_requests(args, payload);
    let mut watched = timeline::Watched::new(
        &services,
        &nats.children.iter().map(Child::id).collect::<Vec<_>>(),
    );
    watched.names.push("bench (load)".into());
    watched.pids.push(std::process::id());
    let progress = Arc::new(timeline::Progress::default());
    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = timeline::start(
        watched,
        progress.clone(),
        stop_sampling.clone(),
        Duration::from_secs_f64(args.seconds) + Duration::from_secs(60),
        args.webhooks as f64 / args.seconds,
    )
    .await?;

    // The spike.
    let started_wall = SystemTime::now();
    let (answers, send_window, last_sent) =
        send_from_own_thread(args, &ingest_urls, requests, &progress).await?;
    stop_sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let timeline = tokio::task::spawn_blocking(move || sampler.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the timeline's sampler panicked"))??;
    let last_sent_wall = started_wall + last_sent;

    // What was stored, what was planned, and the drain.
    let expected: usize = answers
        .iter()
        .filter(|a| (200..300).contains(&a.status))
        .count();
    let mut events_cursor = 0;
    // Event id → the stream sequences it was stored at.
    let mut stored: HashMap<String, Vec<u64>> = HashMap::new();
    let mut decisions_cursor = 0;
    // Event id → the runs its (latest) decision published.
    let mut runs: HashMap<String, Vec<String>> = HashMap::new();
    let mut last_planned: Option<OffsetDateTime> = None;
    let mut status_cursor = 0;
    let mut finals: HashMap<String, OffsetDateTime> = HashMap::new();
    let mut scheduled: HashMap<String, OffsetDateTime> = HashMap::new();
    let drain_deadline = Instant::now()
        + Duration::from_secs(120)
        + Duration::from_secs_f64(
            args.webhooks as f64 / (CLUSTERS.len() * args.runners) as f64 / args.kube_qps as f64
                * 3.0,
        );
    let mut progress = Instant::now();
    loop {
        for m in read_from(
            &js,
            subjects::EVENTS_STREAM,
            "sluice.events.>",
            &mut events_cursor,
        )
        .await?
        {
            let e: Event = serde_json::from_slice(&m.payload).context("stored event")?;
            stored.entry(e.id).or_default().push(m.sequence);
        }
        // Run requests leave their work-queue stream once taken; the decisions say
        // which runs each event started (stored after its run requests).
        for m in read_from(
            &js,
            subjects::DECISIONS_STREAM,
            "sluice.decisions.>",
            &mut decisions_cursor,
        )
        .await?
        {
            let d: Decision = serde_json::from_slice(&m.payload).context("decision")?;
            let published: Vec<String> = d
                .runs
                .into_iter()
                .filter(|r| r.outcome == "published")
                .map(|r| r.run_id)
                .collect();
            runs.insert(d.event_id, published);
            last_planned = Some(last_planned.map_or(m.published, |l| l.max(m.published)));
        }
        for m in read_from(
            &js,
            subjects::STATUS_STREAM,
            "sluice.status.>",
            &mut status_cursor,
        )
        .await?
        {
            let u: StatusUpdate = serde_json::from_slice(&m.payload).context("state")?;
            if u.step.is_none() && u.state.is_final() {
                finals.entry(u.run_id).or_insert(m.published);
            } else if u.step.is_none() && u.state == RunState::Scheduled {
                scheduled.entry(u.run_id).or_insert(m.published);
            }
        }
        let planned: usize = runs.values().map(Vec::len).sum();
        let done = stored.len() >= expected
            && planned >= stored.len()
            && finals.len() >= planned
            && planned > 0;
        if done {
            break;
        }
        if Instant::now() > drain_deadline {
            println!(
                "drain deadline passed: {} events stored, {planned} runs planned, {} final",
                stored.len(),
                finals.len()
            );
            break;
        }
        if progress.elapsed() > Duration::from_secs(10) {
            // Each runner's own count of the runs it holds, beside the Pods: a runner at
            // `--max-running` pulls nothing more, whatever its client limit allows.
            let mut held = Vec::new();
            for s in services.iter().filter(|s| s.name.starts_with("runner-")) {
                let text = match http.get(format!("{}/metrics", s.admin)).send().await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                held.push(
                    gauge(&text, "sluice_runner_runs_in_flight")
                        .map_or_else(|| "?".to_owned(), |v| format!("{v}")),
                );
            }
            eprintln!(
                "  draining: {} events stored, {planned} runs planned, {} final, Pods {}, runs held by each runner {}",
                stored.len(),
                finals.len(),
                apis.iter()
                    .map(|a| a.created().len().to_string())
                    .collect::<Vec<_>>()
                    .join("/"),
                held.join("/")
            );
            progress = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut rss: Vec<(String, u64)> = services
        .iter()
        .map(|s| (s.name.clone(), s.peak_rss().unwrap_or(0)))
        .collect();
    for (i, c) in nats.children.iter().enumerate() {
        rss.push((
            format!("nats-{}", i + 1),
            process::peak_rss(c.id()).unwrap_or(0),
        ));
    }

    let status_of: HashMap<&str, u16> = answers
        .iter()
        .map(|a| (a.event_id.as_str(), a.status))
        .collect();
    let lost = answers
        .iter()
        .filter(|a| (200..300).contains(&a.status) && !stored.contains_key(&a.event_id))
        .count();
    let stored_but_refused = stored
        .keys()
        .filter(|id| {
            status_of
                .get(id.as_str())
                .is_some_and(|s| !(200..300).contains(s))
        })
        .count();
    let twice: Vec<_> = stored.iter().filter(|(_, seqs)| seqs.len() > 1).collect();
    let stored_twice = twice.len();
    for (id, seqs) in twice.iter().take(5) {
        println!("stored twice: {id} at sequences {seqs:?}");
    }
    // A run created twice shows as its Pod created twice (Pod names come from the run
    // id); an event that started more than one run, in its decision.
    let mut pods_twice = 0;
    for api in &apis {
        let mut names = api.created();
        let all = names.len();
        names.sort();
        names.dedup();
        pods_twice += all - names.len();
    }
    let runs_doubled = pods_twice + runs.values().filter(|r| r.len() > 1).count();
    let events_without_run = stored
        .keys()
        .filter(|id| runs.get(*id).is_none_or(|r| r.len() != 1))
        .count();
    let since_last = |t: OffsetDateTime| -> f64 {
        let t: SystemTime = t.into();
        match t.duration_since(last_sent_wall) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        }
    };
    let last_sent_instant = answers
        .iter()
        .map(|a| a.sent)
        .max()
        .unwrap_or_else(Instant::now);
    let mut per_cluster = Vec::new();
    let mut requests = Vec::new();
    let mut request_mix = Vec::new();
    for (c, cluster) in CLUSTERS.iter().enumerate() {
        let mut created: Vec<Instant> = apis[c].created_at().into_values().collect();
        created.sort();
        let (rate, drained) = match (created.first(), created.last()) {
            (Some(first), Some(last)) if created.len() > 1 => (
                (created.len() - 1) as f64 / last.duration_since(*first).as_secs_f64(),
                last.saturating_duration_since(last_sent_instant)
                    .as_secs_f64(),
            ),
            _ => (0.0, 0.0),
        };
        let answered = apis[c].requests();
        let span = match (created.first(), created.last()) {
            (Some(first), Some(last)) if last > first => Some((*first, *last)),
            _ => None,
        };
        let in_span = span.map_or(0, |(first, last)| {
            answered
                .iter()
                .filter(|r| r.at >= first && r.at <= last)
                .count()
        });
        let per_s = span.map_or(0.0, |(first, last)| {
            in_span as f64 / last.duration_since(first).as_secs_f64()
        });
        requests.push((answered.len(), per_s));
        let mut kinds = std::collections::BTreeMap::new();
        if let Some((first, last)) = span {
            for r in answered.iter().filter(|r| r.at >= first && r.at <= last) {
                *kinds.entry(request_kind(&r.method, &r.uri)).or_insert(0) += 1;
            }
        }
        let creates = kinds.remove("pod create").unwrap_or(0);
        let after = span.map_or(0, |(_, last)| {
            answered.iter().filter(|r| r.at > last).count()
        });
        request_mix.push(RequestMix {
            creates,
            others: kinds.into_iter().collect(),
            after_last_create: after,
        });
        per_cluster.push((
            (*cluster).to_owned(),
            created.len(),
            rate,
            drained,
            (args.runners as u32 * args.kube_qps) as f64,
        ));
    }
    let (to_pod_create, to_scheduled) = whole_path(&answers, &runs, &apis, &scheduled);
    for s in &mut services {
        s.kill();
    }
    drop(nats);
    Ok(Report {
        nodes,
        raw_publish_per_s,
        sent: answers.len(),
        answers: answers.iter().map(|a| (a.status, a.took)).collect(),
        unanswered: unanswered_by_cause(&answers),
        send_window,
        stored_events: stored.len(),
        stored_twice,
        lost,
        stored_but_refused,
        runs: runs.values().map(Vec::len).sum(),
        runs_doubled,
        events_without_run,
        last_planned_after_last_webhook: last_planned.map(since_last),
        clusters: per_cluster,
        requests,
        request_mix,
        all_final_after_last_webhook: finals.values().max().copied().map(since_last),
        to_pod_create,
        to_scheduled,
        rss,
        timeline,
    })
}

/// For each event that started exactly one run: the time from sending its webhook to
/// the API double receiving the run's Pod create (both clocks of this process), and to
/// the run's `scheduled` state being stored (the server's clock against this one's wall
/// clock: the same machine).
fn whole_path(
    answers: &[Answer],
    runs: &HashMap<String, Vec<String>>,
    apis: &[KubeApi],
    scheduled: &HashMap<String, OffsetDateTime>,
) -> (Vec<Duration>, Vec<Duration>) {
    let created: HashMap<String, Instant> = apis.iter().flat_map(KubeApi::created_at).collect();
    let (mut to_pod, mut to_scheduled) = (Vec::new(), Vec::new());
    for a in answers {
        let Some([run]) = runs.get(&a.event_id).map(Vec::as_slice) else {
            continue;
        };
        if let Some(at) = created.get(&sluice_runner::kubernetes::pod::pod_name(run, 0)) {
            to_pod.push(at.saturating_duration_since(a.sent));
        }
        if let Some(at) = scheduled.get(run) {
            if let Ok(d) = SystemTime::from(*at).duration_since(a.sent_wall) {
                to_scheduled.push(d);
            }
        }
    }
    (to_pod, to_scheduled)
}

/// `p50 …, p99 …, max … (n)` in milliseconds.
fn percentiles(samples: &[Duration], of: &str) -> String {
    if samples.is_empty() {
        return "none".into();
    }
    let mut sorted = samples.to_vec();
    sorted.sort();
    let at = |p: f64| {
        let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
        sorted[i].as_secs_f64() * 1000.0
    };
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} {of})",
        at(0.5),
        at(0.99),
        at(1.0),
        sorted.len()
    )
}

/// 95 % of the pipelines watch one repository each; every twentieth a glob of another
/// organisation, so every event also evaluates it. Spread over the clusters.
fn pipelines_yaml(n: usize) -> String {
    let mut yaml = String::new();
    for i in 0..n {
        let repos = if i.is_multiple_of(20) {
            format!("[\"team-{i}/*\"]")
        } else {
            format!("[acme/app-{i}]")
        };
        yaml.push_str(&format!(
            "---\nname: p-{i}\ntriggers:\n  - repos: {repos}\n    kinds: [pull_request]\n    when: \"event.sha != ''\"\nruntime: {{ cluster: {} }}\nsteps:\n  - {{name: test, image: alpine, commands: [make]}}\n",
            CLUSTERS[i % CLUSTERS.len()]
        ));
    }
    yaml
}

/// The repository webhook `i` is for: one with its own pipeline.
fn target_repo(i: usize, pipelines: usize) -> String {
    let mut target = (i * 7919) % pipelines;
    if target.is_multiple_of(20) {
        target = (target + 1) % pipelines;
    }
    format!("acme/app-{target}")
}

struct Request {
    delivery: String,
    body: bytes::Bytes,
    signature: String,
}

/// Every request built and signed before the clock starts, so the sender only sends.
fn build_requests(args: &Args, payload: &str) -> Vec<Request> {
    (0..args.webhooks)
        .map(|i| {
            let body = payload.replace(FIXTURE_REPO, &target_repo(i, args.pipelines));
            let signature = sluice_tests::sign::github_sha256(
                sluice_tests::ingest::GITHUB_SECRET,
                body.as_bytes(),
            );
            Request {
                delivery: format!("spike-{i:06}"),
                body: bytes::Bytes::from(body),
                signature,
            }
        })
        .collect()
}

/// Unanswered requests grouped by cause, each with when the first and the last of them
/// was sent (seconds from the first webhook).
/// What a request the API double answered was for, from its method and path: the
/// spike reads the runners' request mix from these.
fn request_kind(method: &http::Method, uri: &str) -> &'static str {
    let path = uri.split('?').next().unwrap_or(uri);
    let watch = uri.contains("watch=true") || uri.contains("watch=1");
    let pods = path.contains("/pods");
    let named = path
        .split("/pods/")
        .nth(1)
        .is_some_and(|rest| !rest.is_empty());
    match *method {
        http::Method::POST if pods => "pod create",
        http::Method::DELETE if pods => "pod delete",
        http::Method::GET if path.ends_with("/log") => "log read",
        http::Method::GET if pods && watch => "pod watch",
        http::Method::GET if pods && named => "pod get",
        http::Method::GET if pods => "pod list",
        _ if path.contains("/secrets") => "secret",
        _ => "other",
    }
}

fn unanswered_by_cause(answers: &[Answer]) -> Vec<(&'static str, usize, f64, f64)> {
    let Some(start) = answers.iter().map(|a| a.sent).min() else {
        return Vec::new();
    };
    let mut by: HashMap<&'static str, (usize, f64, f64)> = HashMap::new();
    for a in answers {
        if let Some(why) = a.unanswered {
            let at = (a.sent - start).as_secs_f64();
            let e = by.entry(why).or_insert((0, f64::MAX, 0.0));
            e.0 += 1;
            e.1 = e.1.min(at);
            e.2 = e.2.max(at);
        }
    }
    let mut out: Vec<_> = by.into_iter().map(|(w, (n, f, l))| (w, n, f, l)).collect();
    out.sort_by_key(|&(w, ..)| w);
    out
}

struct Answer {
    event_id: String,
    sent: Instant,
    /// The same moment on the wall clock, to compare with the server's timestamps.
    sent_wall: SystemTime,
    took: Duration,
    /// 0: no answer.
    status: u16,
    /// Why there was no answer: `timeout` (none within the client's 30 s), `connect`
    /// (the connection was never made) or `reset` (closed before an answer).
    unanswered: Option<&'static str>,
}

/// The load generator's default nice value: above the services' (0), like a forge that
/// is not on these cores.
const LOAD_NICE: i32 = -5;

/// Runs [`send_all`] on a thread of its own, with a single-threaded runtime of its own,
/// at the nice value `args.load_nice`. The load generator shares the two cores with
/// everything it measures; at the services' priority it fell up to 1,800 requests
/// behind its schedule in some spikes and then sent them at once, so those runs
/// measured the generator's stall as much as ingest. `--load-nice 0` gives the runs
/// before this setting (to 2026-12-07).
async fn send_from_own_thread(
    args: &Args,
    ingests: &[String],
    requests: Vec<Request>,
    progress: &Arc<timeline::Progress>,
) -> anyhow::Result<(Vec<Answer>, Duration, Duration)> {
    let interval = Duration::from_secs_f64(args.seconds / args.webhooks as f64);
    let urls: Vec<Arc<str>> = ingests
        .iter()
        .map(|u| Arc::from(format!("{u}/webhooks/github")))
        .collect();
    let (nice, progress) = (args.load_nice, progress.clone());
    let (done, answers) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("load".into())
        .spawn(move || {
            let sent = renice_this_thread(nice).and_then(|()| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?
                    .block_on(send_all(interval, &urls, requests, &progress))
            });
            let _ = done.send(sent);
        })
        .context("start the load generator's thread")?;
    answers
        .await
        .context("the load generator's thread panicked")?
}

/// Sets the calling thread's nice value (Linux keeps one per thread; the process's
/// other threads and children keep theirs) with util-linux's `renice`.
fn renice_this_thread(nice: i32) -> anyhow::Result<()> {
    let tid = this_thread_id()?;
    let out = Command::new("renice")
        .args(["-n", &nice.to_string(), "-p", &tid])
        .output()
        .context("run renice (util-linux) to set the load generator's priority")?;
    anyhow::ensure!(
        out.status.success(),
        "renice -n {nice} of the load generator's thread failed ({}): a negative value needs root; pass --load-nice 0 to run at the services' priority",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The calling thread's id (its TID), from `/proc/thread-self`.
fn this_thread_id() -> anyhow::Result<String> {
    let link = std::fs::read_link("/proc/thread-self").context("read /proc/thread-self")?;
    link.file_name()
        .and_then(|t| t.to_str())
        .map(str::to_owned)
        .context("/proc/thread-self names no thread id")
}

/// Sends every request on its schedule, one each `interval` (open loop), alternating
/// between the ingest URLs; returns the answers, the time sending took and when the
/// last was sent (from the start).
async fn send_all(
    interval: Duration,
    urls: &[Arc<str>],
    requests: Vec<Request>,
    progress: &Arc<timeline::Progress>,
) -> anyhow::Result<(Vec<Answer>, Duration, Duration)> {
    let client = reqwest::Client::builder()
        // Longer than any answer may take, so slow answers are measured, not cut.
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1024)
        .build()?;
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(requests.len());
    for (i, r) in requests.into_iter().enumerate() {
        tokio::time::sleep_until(start + interval * i as u32).await;
        let client = client.clone();
        let url = urls[i % urls.len()].clone();
        let progress = progress.clone();
        tasks.push(tokio::spawn(async move {
            progress
                .sent
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (sent, sent_wall) = (Instant::now(), SystemTime::now());
            let result = client
                .post(&*url)
                .header("content-type", "application/json")
                .header("x-github-event", "pull_request")
                .header("x-github-delivery", &r.delivery)
                .header("x-hub-signature-256", &r.signature)
                .body(r.body)
                .send()
                .await;
            let (status, unanswered) = match result {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    // Read the (small) body so the connection is reused.
                    let _ = resp.bytes().await;
                    (status, None)
                }
                Err(e) if e.is_timeout() => (0, Some("timeout")),
                Err(e) if e.is_connect() => (0, Some("connect")),
                Err(_) => (0, Some("reset")),
            };
            progress
                .answered
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Answer {
                event_id: format!("github:{}", r.delivery),
                sent,
                sent_wall,
                took: sent.elapsed(),
                status,
                unanswered,
            }
        }));
    }
    let last_sent = start.elapsed();
    let send_window = last_sent;
    let mut answers = Vec::with_capacity(tasks.len());
    for t in tasks {
        answers.push(t.await?);
    }
    Ok((answers, send_window, last_sent))
}

/// Publish+ack capacity of a stream configured like `SLUICE_EVENTS` (file storage,
/// `replicas`), 64 publishes in flight for 5 s: the limit the spike's figures are read
/// against.
async fn raw_capacity(
    js: &jetstream::Context,
    replicas: usize,
    payload: &[u8],
) -> anyhow::Result<f64> {
    let name = "BENCH_RAW";
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec!["bench.raw".into()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .context("create the raw publish stream")?;
    let payload = bytes::Bytes::copy_from_slice(payload);
    let start = Instant::now();
    let window = Duration::from_secs(5);
    let mut pending = std::collections::VecDeque::new();
    let mut acked = 0u64;
    let mut n = 0u64;
    while start.elapsed() < window {
        while pending.len() < 64 {
            n += 1;
            let ack = js
                .send_publish(
                    "bench.raw",
                    PublishMessage::build()
                        .payload(payload.clone())
                        .message_id(format!("raw-{n}")),
                )
                .await?;
            pending.push_back(ack);
        }
        if let Some(ack) = pending.pop_front() {
            ack.await?;
            acked += 1;
        }
    }
    while let Some(ack) = pending.pop_front() {
        ack.await?;
        acked += 1;
    }
    let rate = acked as f64 / start.elapsed().as_secs_f64();
    js.delete_stream(name).await?;
    Ok(rate)
}

/// Each node's configuration from the `nats init` file (its users, `sync_interval:
/// always`) with its own ports, store and name; routes between them when there are
/// three.
fn start_nodes(base: &Path, dir: &Path, count: usize) -> anyhow::Result<Nodes> {
    let text = std::fs::read_to_string(base)?;
    anyhow::ensure!(
        text.contains("sync_interval: always"),
        "nats init no longer writes sync_interval: always"
    );
    let ports: Vec<(u16, u16, u16)> = (0..count)
        .map(|_| (reserve_port(), reserve_port(), reserve_port()))
        .collect();
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, route, _)| format!("    nats://127.0.0.1:{route}"))
        .collect();
    let mut nodes = Nodes {
        children: Vec::new(),
        monitors: Vec::new(),
        urls: ports
            .iter()
            .map(|(client, _, _)| format!("nats://127.0.0.1:{client}"))
            .collect::<Vec<_>>()
            .join(","),
    };
    for (i, (client, route, monitor)) in ports.iter().enumerate() {
        let store = dir.join(format!("n{i}-store"));
        let mut conf = String::new();
        for line in text.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("listen:") {
                conf.push_str(&format!("listen: \"127.0.0.1:{client}\"\n"));
            } else if trimmed.starts_with("store_dir:") {
                conf.push_str(&format!("  store_dir: \"{}\"\n", store.display()));
            } else {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        conf.push_str(&format!(
            "\nserver_name: n{i}\nhttp: \"127.0.0.1:{monitor}\"\n"
        ));
        if count > 1 {
            conf.push_str(&format!(
                "cluster {{\n  name: sluice-spike\n  listen: \"127.0.0.1:{route}\"\n  routes: [\n{}\n  ]\n}}\n",
                routes.join("\n")
            ));
        }
        let config = dir.join(format!("n{i}.conf"));
        std::fs::write(&config, conf)?;
        let log = std::fs::File::create(dir.join(format!("n{i}.log")))?;
        let child = Command::new(server_binary())
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start nats-server (./scripts/install-nats, SLUICE_NATS_SERVER)")?;
        nodes.children.push(child);
        nodes.monitors.push(format!("http://127.0.0.1:{monitor}"));
    }
    Ok(nodes)
}

async fn retry(
    deadline: Duration,
    mut f: impl FnMut() -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    let until = Instant::now() + deadline;
    loop {
        match f() {
            Ok(out) => return Ok(out),
            Err(e) if Instant::now() < until => {
                tracing::debug!("{e:#}; again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

fn cli(sluice: &Path, env: &[(String, String)], args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(sluice)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()?;
    if !out.status.success() {
        bail!(
            "sluice {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The sum of a gauge's samples (every label set) in a Prometheus text exposition.
fn gauge(text: &str, name: &str) -> Option<f64> {
    samples(text, name, None)
}

/// The sum of a metric's samples in a Prometheus text exposition, of those whose labels
/// include `label` (`outcome="shed"`) when one is given.
fn samples(text: &str, name: &str, label: Option<&str>) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        // `name{labels} value` or `name value`; not a longer name sharing the prefix.
        let (labels, value) = match rest.chars().next() {
            Some('{') => match rest[1..].rsplit_once('}') {
                Some(split) => split,
                None => continue,
            },
            Some(' ') => ("", rest),
            _ => continue,
        };
        if label.is_some_and(|l| !labels.split(',').any(|have| have == l)) {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::{gauge, renice_this_thread, request_kind, this_thread_id};
    use http::Method;

    /// The nice value of thread `tid` of this process, from `/proc`.
    fn nice_of(tid: &str) -> i64 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Field 19 counts from the pid; the command name before it may hold spaces.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split(' ').nth(16).unwrap().parse().unwrap()
    }

    #[test]
    fn only_the_load_generators_thread_is_reniced() {
        // A positive step needs no privilege, so this runs anywhere.
        let main = this_thread_id().unwrap();
        let before = nice_of(&main);
        let (tid, nice) = std::thread::spawn(move || {
            renice_this_thread(i32::try_from(before).unwrap() + 3).unwrap();
            let tid = this_thread_id().unwrap();
            let nice = nice_of(&tid);
            (tid, nice)
        })
        .join()
        .unwrap();
        assert_ne!(tid, main);
        assert_eq!(nice, before + 3);
        assert_eq!(nice_of(&main), before, "the other threads keep theirs");
    }

    #[test]
    fn a_gauge_is_summed_over_its_label_sets_and_not_confused_with_a_longer_name() {
        let text = "# TYPE sluice_runner_runs_in_flight gauge\n\
            sluice_runner_runs_in_flight{cluster=\"c1\"} 3\n\
            sluice_runner_runs_in_flight{cluster=\"c2\"} 4\n\
            sluice_runner_runs_in_flight_total 100\n";
        assert_eq!(gauge(text, "sluice_runner_runs_in_flight"), Some(7.0));
        assert_eq!(gauge("x 1\n", "sluice_runner_runs_in_flight"), None);
        assert_eq!(gauge("sluice_up 1\n", "sluice_up"), Some(1.0));
    }

    #[test]
    fn requests_are_told_apart_by_method_and_path() {
        let ns = "/api/v1/namespaces/ci/pods";
        assert_eq!(request_kind(&Method::POST, ns), "pod create");
        assert_eq!(
            request_kind(&Method::DELETE, &format!("{ns}/run-1-0")),
            "pod delete"
        );
        assert_eq!(
            request_kind(
                &Method::GET,
                &format!("{ns}/run-1-0/log?container=s0&follow=true")
            ),
            "log read"
        );
        assert_eq!(
            request_kind(
                &Method::GET,
                &format!("{ns}?labelSelector=a%3Db&watch=true")
            ),
            "pod watch"
        );
        assert_eq!(
            request_kind(&Method::GET, &format!("{ns}?labelSelector=a")),
            "pod list"
        );
        assert_eq!(
            request_kind(&Method::GET, &format!("{ns}/run-1-0")),
            "pod get"
        );
        assert_eq!(
            request_kind(&Method::GET, "/api/v1/namespaces/ci/secrets/s"),
            "secret"
        );
    }
}
