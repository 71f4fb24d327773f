//! The scenarios: one fault each, under load, then the invariants.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::sys::signal::Signal;
use sluice_core::subjects;
use tokio_util::sync::CancellationToken;

use crate::check;
use crate::env::{wait_healed, wait_healthy, Env};
use crate::load::{Answer, Load};
use crate::net;
use sluice_tests::process::{self as services, Service};

/// New deliveries a second during every scenario.
const RATE: u32 = 10;
/// Steady load before the fault, and after it is healed.
const BEFORE: Duration = Duration::from_secs(5);
const AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scenario {
    Baseline,
    LeaderKill,
    MajorityDown,
    LeaderPause,
    DispatcherKill,
    LeaderLinkCut,
    RollingRestart,
    RunnerKill,
    IngestNodeCut,
}

impl Scenario {
    /// Whether the fault strikes once, at its start, and nothing more happens until the
    /// heal (the kills at random moments and the rolling restart strike again and
    /// again).
    fn is_one_moment(self) -> bool {
        matches!(
            self,
            Scenario::LeaderKill
                | Scenario::LeaderPause
                | Scenario::LeaderLinkCut
                | Scenario::IngestNodeCut
        )
    }
}

pub const ALL: [Scenario; 9] = [
    Scenario::Baseline,
    Scenario::LeaderKill,
    Scenario::MajorityDown,
    Scenario::LeaderPause,
    Scenario::DispatcherKill,
    Scenario::LeaderLinkCut,
    Scenario::RollingRestart,
    Scenario::RunnerKill,
    Scenario::IngestNodeCut,
];

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::LeaderKill => "leader-kill",
            Scenario::MajorityDown => "majority-down",
            Scenario::LeaderPause => "leader-pause",
            Scenario::DispatcherKill => "dispatcher-kill",
            Scenario::LeaderLinkCut => "leader-link-cut",
            Scenario::RollingRestart => "rolling-restart",
            Scenario::RunnerKill => "runner-kill",
            Scenario::IngestNodeCut => "ingest-node-cut",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Scenario::Baseline => "no fault: the load alone, 10 s",
            Scenario::LeaderKill => {
                "the events stream's leader SIGKILLed, restarted 10 s later on its store"
            }
            Scenario::MajorityDown => "two of three nodes (the leader and one more) down for 60 s",
            Scenario::LeaderPause => "the events stream's leader paused (SIGSTOP) for 15 s",
            Scenario::DispatcherKill => {
                "dispatcher-1 SIGKILLed at random moments for 30 s, restarted each time"
            }
            Scenario::LeaderLinkCut => {
                "the events stream leader's link cut (ip link set … down) for 30 s"
            }
            Scenario::RollingRestart => {
                "every node in turn put in lame duck mode (SIGUSR2), restarted when it exits"
            }
            Scenario::RunnerKill => {
                "runner-c1 SIGKILLed right after a Pod create reaches the API, 3 times"
            }
            Scenario::IngestNodeCut => {
                "the node most ingest connections use cut off for 30 s without a TCP reset"
            }
        }
    }
}

pub fn choose(wanted: &[String]) -> anyhow::Result<Vec<Scenario>> {
    if wanted.is_empty() {
        return Ok(ALL.to_vec());
    }
    wanted
        .iter()
        .map(|w| {
            ALL.iter()
                .copied()
                .find(|s| s.name() == w)
                .with_context(|| format!("no scenario {w}: see --help"))
        })
        .collect()
}

/// A scenario's result and figures.
#[derive(Debug)]
pub struct Outcome {
    pub name: &'static str,
    pub failures: Vec<String>,
    took: Duration,
    requests: usize,
    deliveries: usize,
    unavailable: usize,
    other: usize,
    max_answer: Duration,
    recovery: String,
}

impl Outcome {
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {:.0} s | {} ({} deliveries) | {} | {} | {:.2} s | {} |",
            self.name,
            if self.failures.is_empty() {
                "pass"
            } else {
                "FAIL"
            },
            self.took.as_secs_f64(),
            self.requests,
            self.deliveries,
            self.unavailable,
            self.other,
            self.max_answer.as_secs_f64(),
            self.recovery
        )
    }
}

/// How often each ingest's `/readyz` is polled.
const READY_POLL: Duration = Duration::from_millis(500);

/// Polls each ingest's `/readyz` every [`READY_POLL`].
struct ReadyPoller {
    polls: Arc<Mutex<Vec<(Instant, usize, u16)>>>,
    stop: CancellationToken,
}

impl ReadyPoller {
    fn start(http: reqwest::Client, urls: Vec<String>) -> ReadyPoller {
        let polls = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        for (i, url) in urls.into_iter().enumerate() {
            let (polls, stop, http) = (polls.clone(), stop.clone(), http.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(READY_POLL);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let at = Instant::now();
                    let status = services::status_of(
                        &http,
                        &format!("{url}/readyz"),
                        Duration::from_secs(3),
                    )
                    .await;
                    polls.lock().expect("polls").push((at, i, status));
                }
            });
        }
        ReadyPoller { polls, stop }
    }

    fn finish(self) -> Vec<(Instant, usize, u16)> {
        self.stop.cancel();
        self.polls.lock().expect("polls").clone()
    }
}

/// A small xorshift generator: the random moments, reproducible from the printed seed.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("SLUICE_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!("  random moments from SLUICE_FAULT_SEED={seed}");
        Rng(seed | 1)
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(low + self.0 % (high - low))
    }
}

fn ok(a: &Answer) -> bool {
    a.status.is_some_and(|s| (200..300).contains(&s))
}

/// Holds the fault for its fixed duration (the scenario, not a synchronisation).
async fn hold(d: Duration) {
    tokio::time::sleep(d).await;
}

pub async fn run(env: &mut Env, scenario: Scenario) -> Outcome {
    let name = scenario.name();
    println!("\n== {name}: {}", scenario.describe());
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut notes = Vec::new();
    if let Err(e) = env.seen.update(&env.js).await {
        failures.push(format!("reading the streams before the scenario: {e:#}"));
    }
    match check::runs_last_seq(&env.js).await {
        Ok(seq) => env.seen.runs_seq = seq,
        Err(e) => failures.push(format!("SLUICE_RUNS info: {e:#}")),
    }
    let pods_before: usize = env.apis.iter().map(|a| a.created().len()).sum();
    // Numbered so a scenario asked for twice sends new deliveries, not duplicates of
    // the first run's (which JetStream would drop, and no run would be planned).
    static RUNS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let nth = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let load = Load::start(
        env.ingest_urls(),
        RATE,
        &format!("fs-{name}-{}-{nth}", std::process::id()),
    );
    let poller = ReadyPoller::start(env.http.clone(), env.ingest_admin_urls());
    // The other services' readiness, as a Kubernetes probe would see it.
    let (other_names, other_urls): (Vec<String>, Vec<String>) = env
        .dispatchers
        .iter()
        .chain(&env.runners)
        .map(|s| (s.name.clone(), s.admin.clone()))
        .unzip();
    let others = ReadyPoller::start(env.http.clone(), other_urls);
    hold(BEFORE).await;
    let fault_start = Instant::now();
    // Services the fault restarts on purpose (the rest must never exit).
    let mut restarted: Vec<String> = Vec::new();
    let starts: Vec<u32> = env.services().map(|s| s.starts).collect();
    if let Err(e) = fault(env, scenario, &mut notes, &mut restarted).await {
        failures.push(format!("the fault itself: {e:#}"));
    }
    let heal = Instant::now();
    notes.push(format!(
        "fault {} – heal {} (UTC, for the logs)",
        clock(fault_start),
        clock(heal)
    ));
    let resumed = dispatch_resumed(env.js.clone());
    for node in &env.nodes {
        // An R1 ordered consumer (a reader's, or a service's bucket watch) that a
        // healed node still lists but does not hold keeps its /healthz at 503 (NATS);
        // the replicas and the services are checked below.
        match wait_healed(
            &env.http,
            node,
            Duration::from_secs(60),
            orphaned_ordered_consumer,
        )
        .await
        {
            Ok(services::Health::Healthy(d)) if d > Duration::from_millis(500) => {
                notes.push(format!(
                    "{} healthy (/healthz) {:.1} s after the heal",
                    node.name,
                    (Instant::now() - heal).as_secs_f64()
                ))
            }
            Ok(services::Health::Healthy(_)) => {}
            Ok(services::Health::Tolerated(said)) => {
                notes.push(format!("NATS: {} {said}", node.name))
            }
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    hold(AFTER.saturating_sub(heal.elapsed())).await;
    let first_ok = load.first_ok_since(heal);
    let report = load.finish(Duration::from_secs(60)).await;
    let polls = poller.finish();
    let other_polls = others.finish();

    // Figures.
    let answers = &report.answers;
    let unavailable = answers.iter().filter(|a| a.status == Some(503)).count();
    let other = answers
        .iter()
        .filter(|a| !ok(a) && a.status != Some(503))
        .count();
    let max_answer = answers.iter().map(|a| a.took).max().unwrap_or_default();
    let failed_after_heal = answers
        .iter()
        .filter(|a| a.sent >= heal && !ok(a))
        .map(|a| a.sent + a.took)
        .max();
    let recovery = match (failed_after_heal, first_ok) {
        (None, _) => "0 s".to_owned(),
        (Some(last), Some(first)) => format!(
            "{:.1} s (first 2xx +{:.1} s)",
            (last - heal).as_secs_f64(),
            (first - heal).as_secs_f64()
        ),
        (Some(last), None) => format!("{:.1} s", (last - heal).as_secs_f64()),
    };
    let during: Vec<&Answer> = answers
        .iter()
        .filter(|a| a.sent >= fault_start && a.sent < heal)
        .collect();
    notes.push(format!(
        "during the fault ({:.1} s): {} requests, {} answered 2xx, {} 503",
        (heal - fault_start).as_secs_f64(),
        during.len(),
        during.iter().filter(|a| ok(a)).count(),
        during.iter().filter(|a| a.status == Some(503)).count()
    ));
    notes.push(readiness(&polls, answers, fault_start, heal));
    if scenario.is_one_moment() {
        // Once the fault has struck and the cluster has found its way round it (a new
        // leader, a healthy node for the clients), nothing may be refused for what
        // still waits on a leader or a connection that is gone.
        if let Err(e) = check::stored_after_recovery(answers, fault_start, heal) {
            failures.push(e);
        }
    }
    notes.push(ready_counts(&other_names, &other_polls, fault_start, heal));
    let mut latencies: Vec<Duration> = answers.iter().map(|a| a.took).collect();
    latencies.sort();
    if !latencies.is_empty() {
        notes.push(format!(
            "answer time p50 {:.0} ms, p99 {:.0} ms, max {:.2} s",
            latencies[latencies.len() / 2].as_secs_f64() * 1000.0,
            latencies[(latencies.len() * 99 / 100).min(latencies.len() - 1)].as_secs_f64() * 1000.0,
            max_answer.as_secs_f64()
        ));
    }

    // Invariants. The suite's own connection may have been on a node just cut off:
    // a stalled read is tried again.
    let until = Instant::now() + Duration::from_secs(60);
    while let Err(e) = env.seen.update(&env.js).await {
        if Instant::now() > until {
            failures.push(format!("reading the streams: {e:#}"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let runs = check::expected_runs(env, &report);
    let settle = Instant::now();
    match check::wait_finals(env, &runs, Duration::from_secs(120)).await {
        Ok(missing) if missing.is_empty() => notes.push(format!(
            "{} runs expected, all final {:.1} s after the load ended",
            runs.len(),
            settle.elapsed().as_secs_f64()
        )),
        Ok(missing) => failures.push(format!(
            "{} of {} runs without a final state after 120 s (e.g. {})",
            missing.len(),
            runs.len(),
            missing
                .iter()
                .take(3)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(e) => failures.push(format!("reading states: {e:#}")),
    }
    let runs_stored = match check::runs_last_seq(&env.js).await {
        Ok(seq) => seq - env.seen.runs_seq,
        Err(e) => {
            failures.push(format!("SLUICE_RUNS info: {e:#}"));
            0
        }
    };
    failures.extend(check::invariants(env, &report, &runs));
    let new_pods = env
        .apis
        .iter()
        .map(|a| a.created().len())
        .sum::<usize>()
        .saturating_sub(pods_before);
    match check::run_requests(runs_stored, runs.len(), new_pods) {
        Ok(note) => notes.extend(note),
        Err(failure) => failures.push(failure),
    }
    resumed.abort();
    if let Ok(Some(d)) = resumed.await {
        notes.push(format!(
            "first run request stored {:.1} s after the heal",
            d.as_secs_f64()
        ));
    }
    match check::replicas_agree(env, Duration::from_secs(60)).await {
        Ok(d) => notes.push(format!(
            "replicas agree on every stream's last sequence ({:.1} s after the checks began)",
            d.as_secs_f64()
        )),
        Err(e) => failures.push(e),
    }
    for (s, before) in env.services_mut().zip(starts) {
        if let Some(status) = s.exited() {
            failures.push(format!(
                "{} exited ({status}); see {}",
                s.name,
                s.log_path().display()
            ));
        } else if s.starts > before && !restarted.contains(&s.name) {
            failures.push(format!("{} was restarted", s.name));
        }
    }
    let all: Vec<&Service> = env.services().collect();
    match services::wait_ready(&env.http, &all, Duration::from_secs(60)).await {
        Ok(_) => {}
        Err(e) => failures.push(format!("services: {e}")),
    }
    for n in &notes {
        println!("  {n}");
    }
    for f in &failures {
        println!("  FAIL: {f}");
    }
    let outcome = Outcome {
        name,
        failures,
        took: started.elapsed(),
        requests: answers.len(),
        deliveries: report.delivered.len(),
        unavailable,
        other,
        max_answer,
        recovery,
    };
    println!("  {}", outcome.row());
    outcome
}

/// Wall-clock time of an instant, `HH:MM:SS.mmm` UTC.
fn clock(at: Instant) -> String {
    let t = time::OffsetDateTime::now_utc() - at.elapsed();
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// How long after now `SLUICE_RUNS` first stores a new run request (polled for up to
/// 150 s, or until aborted).
fn dispatch_resumed(
    js: async_nats::jetstream::Context,
) -> tokio::task::JoinHandle<Option<Duration>> {
    tokio::spawn(async move {
        let start = Instant::now();
        let mut first = None;
        while start.elapsed() < Duration::from_secs(150) {
            if let Ok(Ok(seq)) =
                tokio::time::timeout(Duration::from_secs(2), check::runs_last_seq(&js)).await
            {
                match first {
                    None => first = Some(seq),
                    Some(f) if seq > f => return Some(start.elapsed()),
                    Some(_) => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        None
    })
}

/// What `/readyz` said during the fault, against what the same ingest answered
/// webhooks sent within a second of each poll.
fn readiness(polls: &[check::Poll], answers: &[Answer], from: Instant, to: Instant) -> String {
    let r = check::readiness(polls, answers, from, to, READY_POLL);
    format!(
        "ingest /readyz during the fault: {} of {} polls ready; {} said ready while that ingest answered every webhook within 1 s non-2xx (longest {:.1} s), {} said not ready while it answered all 2xx (longest {:.1} s)",
        r.ready,
        r.polls,
        r.false_ready,
        r.longest_false_ready.as_secs_f64(),
        r.false_unready,
        r.longest_false_unready.as_secs_f64()
    )
}

/// How many of each service's `/readyz` polls during the fault answered 200.
fn ready_counts(
    names: &[String],
    polls: &[(Instant, usize, u16)],
    from: Instant,
    to: Instant,
) -> String {
    let counts: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let mine: Vec<u16> = polls
                .iter()
                .filter(|(at, who, _)| *who == i && *at >= from && *at < to)
                .map(|p| p.2)
                .collect();
            let ready = mine.iter().filter(|s| **s == 200).count();
            format!("{name} {ready}/{}", mine.len())
        })
        .collect();
    format!(
        "/readyz ready during the fault (polls): {}",
        counts.join(", ")
    )
}

async fn fault(
    env: &mut Env,
    scenario: Scenario,
    notes: &mut Vec<String>,
    restarted: &mut Vec<String>,
) -> anyhow::Result<()> {
    match scenario {
        Scenario::Baseline => hold(Duration::from_secs(10)).await,
        Scenario::LeaderKill => {
            let l = env.leader(subjects::EVENTS_STREAM).await?;
            notes.push(format!("events leader {}", env.nodes[l].name));
            let killed = Instant::now();
            env.nodes[l].kill();
            match new_leader(env, l, Duration::from_secs(30)).await {
                Some((n, d)) => notes.push(format!(
                    "new events leader {} after {:.1} s",
                    env.nodes[n].name,
                    d.as_secs_f64()
                )),
                None => notes.push("no new events leader within 30 s".into()),
            }
            hold(Duration::from_secs(10).saturating_sub(killed.elapsed())).await;
            env.nodes[l].spawn()?;
        }
        Scenario::MajorityDown => {
            let l = env.leader(subjects::EVENTS_STREAM).await?;
            let other = (l + 1) % env.nodes.len();
            notes.push(format!(
                "down: {} (events leader) and {}",
                env.nodes[l].name, env.nodes[other].name
            ));
            env.nodes[l].kill();
            env.nodes[other].kill();
            hold(Duration::from_secs(60)).await;
            env.nodes[l].spawn()?;
            env.nodes[other].spawn()?;
        }
        Scenario::LeaderPause => {
            let l = env.leader(subjects::EVENTS_STREAM).await?;
            notes.push(format!("paused: {} (events leader)", env.nodes[l].name));
            env.nodes[l].signal(Signal::SIGSTOP);
            hold(Duration::from_secs(15)).await;
            env.nodes[l].signal(Signal::SIGCONT);
        }
        Scenario::DispatcherKill => {
            let mut rng = Rng::new();
            let end = Instant::now() + Duration::from_secs(30);
            let mut kills = 0;
            while Instant::now() < end {
                hold(rng.millis(500, 4000)).await;
                env.dispatchers[0].kill();
                kills += 1;
                hold(rng.millis(200, 1500)).await;
                env.dispatchers[0].spawn()?;
            }
            restarted.push(env.dispatchers[0].name.clone());
            notes.push(format!("dispatcher-1 killed {kills} times"));
        }
        Scenario::LeaderLinkCut => {
            let l = env.leader(subjects::EVENTS_STREAM).await?;
            notes.push(format!("cut: {} (events leader)", env.nodes[l].name));
            net::link_down(env.nodes[l].index)?;
            hold(Duration::from_secs(30)).await;
            net::link_up(env.nodes[l].index)?;
        }
        Scenario::RollingRestart => {
            let l = env.leader(subjects::EVENTS_STREAM).await?;
            let mut order: Vec<usize> = (0..env.nodes.len()).filter(|i| *i != l).collect();
            order.push(l);
            for i in order {
                let began = Instant::now();
                env.nodes[i].signal(Signal::SIGUSR2);
                if !env.nodes[i].wait_exit(Duration::from_secs(30)).await {
                    notes.push(format!(
                        "{} still running 30 s into lame duck mode: killed",
                        env.nodes[i].name
                    ));
                    env.nodes[i].kill();
                }
                let exited = began.elapsed();
                env.nodes[i].spawn()?;
                let healthy = wait_healthy(&env.http, &env.nodes[i], Duration::from_secs(60))
                    .await
                    .map_err(|e| anyhow::anyhow!("{e:#} after its restart"))?;
                notes.push(format!(
                    "{}: exited {:.1} s after SIGUSR2, healthy {:.1} s after its restart",
                    env.nodes[i].name,
                    exited.as_secs_f64(),
                    healthy.as_secs_f64()
                ));
            }
        }
        Scenario::RunnerKill => {
            for round in 0..3 {
                let before = env.apis[0].created().len();
                let until = Instant::now() + Duration::from_secs(20);
                while env.apis[0].created().len() <= before {
                    anyhow::ensure!(Instant::now() < until, "no Pod create for c1 within 20 s");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                env.runners[0].kill();
                notes.push(format!(
                    "round {}: runner-c1 killed after Pod create #{}",
                    round + 1,
                    before + 1
                ));
                hold(Duration::from_secs(2)).await;
                env.runners[0].spawn()?;
                services::wait_ready(&env.http, &[&env.runners[0]], Duration::from_secs(30))
                    .await
                    .map_err(anyhow::Error::msg)?;
            }
            restarted.push(env.runners[0].name.clone());
        }
        Scenario::IngestNodeCut => {
            let n = ingest_node(env).await?;
            notes.push(format!(
                "cut without a reset: {} (the node most ingest connections use)",
                env.nodes[n].name
            ));
            net::link_down(env.nodes[n].index)?;
            hold(Duration::from_secs(30)).await;
            net::link_up(env.nodes[n].index)?;
        }
    }
    Ok(())
}

/// Waits until a node other than `old` leads the events stream.
async fn new_leader(env: &Env, old: usize, deadline: Duration) -> Option<(usize, Duration)> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if let Ok(Ok(l)) =
            tokio::time::timeout(Duration::from_secs(2), env.leader(subjects::EVENTS_STREAM)).await
        {
            if l != old {
                return Some((l, start.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The node holding the most connections named `sluice-ingest` (from `/connz`).
async fn ingest_node(env: &Env) -> anyhow::Result<usize> {
    let mut best = (0, 0);
    for (i, node) in env.nodes.iter().enumerate() {
        let v: serde_json::Value = env
            .http
            .get(format!("{}/connz?limit=1024", node.monitor()))
            .send()
            .await?
            .json()
            .await?;
        let n = v["connections"].as_array().map_or(0, |c| {
            c.iter().filter(|c| c["name"] == "sluice-ingest").count()
        });
        if n > best.1 {
            best = (i, n);
        }
    }
    anyhow::ensure!(best.1 > 0, "no node has an ingest connection");
    Ok(best.0)
}

/// Whether a node's `/healthz` complaint is only an ordered consumer it no longer holds:
/// `JetStream consumer 'ACCOUNT > STREAM > NAME' is not current: consumer not found`
/// where NAME is not one of Sluice's durable consumers (`sluice-…`) but a reader's
/// (`sluice-read-…`) or a generated one (a KV watch's).
fn orphaned_ordered_consumer(said: &str) -> bool {
    if !said.contains("consumer not found") {
        return false;
    }
    let Some(rest) = said.split("JetStream consumer '").nth(1) else {
        return false;
    };
    let Some(path) = rest.split('\'').next() else {
        return false;
    };
    // The body is JSON as NATS writes it: `>` escaped as `\u003e`.
    let path = path.replace("\\u003e", ">");
    let name = path.rsplit('>').next().unwrap_or("").trim();
    name.starts_with("sluice-read-") || !name.starts_with("sluice-")
}

#[cfg(test)]
mod tests {
    use super::orphaned_ordered_consumer;

    #[test]
    fn only_ordered_consumers_a_node_lost_are_notes() {
        let said = |name: &str| {
            format!("n3 not healthy after 60s: /healthz 503 Service Unavailable: {{\"status\":\"unavailable\",\"error\":\"JetStream consumer 'SLUICE > KV_SLUICE_PIPELINES > {name}' is not current: consumer not found\"}}")
        };
        assert!(orphaned_ordered_consumer(&said("ctutrNiE")));
        // As NATS's JSON writes it.
        assert!(orphaned_ordered_consumer(
            &said("ctutrNiE").replace('>', "\\u003e")
        ));
        assert!(!orphaned_ordered_consumer(
            &said("sluice-runner-c1").replace('>', "\\u003e")
        ));
        assert!(orphaned_ordered_consumer(&said("sluice-read-7")));
        assert!(!orphaned_ordered_consumer(&said("sluice-runner-c1")));
        assert!(!orphaned_ordered_consumer(
            "n3 not healthy after 60s: /healthz error sending request"
        ));
    }
}
