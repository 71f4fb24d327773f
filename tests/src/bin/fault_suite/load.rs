//! A steady load of signed webhooks, like a forge: each delivery has its own id, and a
//! delivery answered anything but 2xx (or not answered) is sent again later with the
//! same id until it is answered 2xx.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// One fixture the load sends, and the event kind it normalizes to.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub github: bool,
    /// `X-GitHub-Event` / `X-Gitlab-Event`.
    pub event: &'static str,
    pub body: Arc<Vec<u8>>,
}

pub fn fixtures() -> Vec<Fixture> {
    let f = |github: bool, event: &'static str, file: &str| Fixture {
        github,
        event,
        body: Arc::new(sluice_tests::fixture(file)),
    };
    vec![
        f(true, "push", "github/push.with-new-branch.json"),
        f(true, "pull_request", "github/pull_request.opened.json"),
        f(true, "pull_request", "github/pull_request.synchronize.json"),
        f(true, "issue_comment", "github/issue_comment.created.json"),
        f(false, "Push Hook", "gitlab/push-event.json"),
        f(
            false,
            "Merge Request Hook",
            "gitlab/merge-request-event.json",
        ),
    ]
}

/// What one request got.
#[derive(Debug, Clone)]
pub struct Answer {
    pub event_id: String,
    /// Which ingest (index into the URLs) answered.
    pub ingest: usize,
    pub sent: Instant,
    pub took: Duration,
    /// The HTTP status; `None` when no answer came (the error is in `error`).
    pub status: Option<u16>,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    /// Event id (`github:<delivery>`) → answered 2xx yet.
    delivered: HashMap<String, bool>,
    answers: Vec<Answer>,
    /// Deliveries to send again, with when.
    redeliver: VecDeque<(Instant, String, usize)>,
    /// Event id → requests sent for it so far (the redelivery backoff).
    attempts: HashMap<String, u32>,
    in_flight: usize,
}

/// The load while it runs.
pub struct Load {
    state: Arc<Mutex<State>>,
    generate: CancellationToken,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

/// What the load saw.
#[derive(Debug, Clone)]
pub struct Report {
    /// Event id → answered 2xx in the end.
    pub delivered: HashMap<String, bool>,
    pub answers: Vec<Answer>,
}

/// A delivery not answered 2xx is sent again after 2 s, then 4 s, 8 s, at most 10 s.
fn redeliver_after(attempts: u32) -> Duration {
    Duration::from_secs((1u64 << attempts.min(4)).min(10))
}
/// Longer than any answer may take (10 s), so a slow answer is measured, not cut.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

impl Load {
    /// Starts sending `rate` new deliveries a second, spread over `ingests` (base URLs),
    /// with delivery ids `<prefix>-<n>`.
    pub fn start(ingests: Vec<String>, rate: u32, prefix: &str) -> Load {
        let state = Arc::new(Mutex::new(State::default()));
        let generate = CancellationToken::new();
        let stop = CancellationToken::new();
        let http = reqwest::Client::builder()
            .timeout(CLIENT_TIMEOUT)
            .pool_max_idle_per_host(64)
            .build()
            .expect("http client");
        let fixtures = fixtures();
        let task = tokio::spawn(generator(
            GenCtx {
                http,
                ingests,
                fixtures,
                prefix: prefix.to_owned(),
                state: state.clone(),
                generate: generate.clone(),
                stop: stop.clone(),
            },
            rate,
        ));
        Load {
            state,
            generate,
            stop,
            task,
        }
    }

    /// When the first request sent at or after `since` was answered 2xx.
    pub fn first_ok_since(&self, since: Instant) -> Option<Instant> {
        let state = self.state.lock().expect("load");
        state
            .answers
            .iter()
            .filter(|a| a.sent >= since && a.status.is_some_and(|s| (200..300).contains(&s)))
            .map(|a| a.sent + a.took)
            .min()
    }

    /// Stops new deliveries and sends the unanswered ones again until each is answered
    /// 2xx or `deadline` passes.
    pub async fn finish(self, deadline: Duration) -> Report {
        self.generate.cancel();
        let until = Instant::now() + deadline;
        loop {
            let done = {
                let s = self.state.lock().expect("load");
                s.in_flight == 0 && s.delivered.values().all(|ok| *ok)
            };
            if done || Instant::now() > until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop.cancel();
        let _ = self.task.await;
        let s = self.state.lock().expect("load");
        Report {
            delivered: s.delivered.clone(),
            answers: s.answers.clone(),
        }
    }
}

struct GenCtx {
    http: reqwest::Client,
    ingests: Vec<String>,
    fixtures: Vec<Fixture>,
    prefix: String,
    state: Arc<Mutex<State>>,
    generate: CancellationToken,
    stop: CancellationToken,
}

async fn generator(ctx: GenCtx, rate: u32) {
    let ctx = Arc::new(ctx);
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: usize = 0;
    let mut sent: usize = 0;
    loop {
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let mut batch = Vec::new();
        if !ctx.generate.is_cancelled() {
            let fixture = n % ctx.fixtures.len();
            let delivery = format!("{}-{n:06}", ctx.prefix);
            batch.push((delivery, fixture));
            n += 1;
        }
        {
            let mut s = ctx.state.lock().expect("load");
            let now = Instant::now();
            while batch.len() < 8 {
                match s.redeliver.front() {
                    Some((due, _, _)) if *due <= now => {
                        let (_, id, fixture) = s.redeliver.pop_front().expect("front");
                        if !s.delivered.get(&id).copied().unwrap_or(false) {
                            let delivery = id.split_once(':').expect("provider:id").1.to_owned();
                            batch.push((delivery, fixture));
                        }
                    }
                    _ => break,
                }
            }
            s.in_flight += batch.len();
        }
        for (delivery, fixture) in batch {
            let ingest = sent % ctx.ingests.len();
            sent += 1;
            tokio::spawn(send(ctx.clone(), ingest, delivery, fixture));
        }
    }
}

async fn send(ctx: Arc<GenCtx>, ingest: usize, delivery: String, fixture: usize) {
    let f = &ctx.fixtures[fixture];
    let base = &ctx.ingests[ingest];
    let body = f.body.as_ref().clone();
    let (event_id, request) = if f.github {
        (
            format!("github:{delivery}"),
            ctx.http
                .post(format!("{base}/webhooks/github"))
                .header("content-type", "application/json")
                .header("x-github-event", f.event)
                .header("x-github-delivery", &delivery)
                .header(
                    "x-hub-signature-256",
                    sluice_tests::sign::github_sha256(sluice_tests::ingest::GITHUB_SECRET, &body),
                ),
        )
    } else {
        (
            format!("gitlab:{delivery}"),
            ctx.http
                .post(format!("{base}/webhooks/gitlab"))
                .header("content-type", "application/json")
                .header("x-gitlab-event", f.event)
                .header("x-gitlab-event-uuid", &delivery)
                .header("x-gitlab-token", sluice_tests::ingest::GITLAB_TOKEN),
        )
    };
    {
        let mut s = ctx.state.lock().expect("load");
        s.delivered.entry(event_id.clone()).or_insert(false);
    }
    let sent = Instant::now();
    let result = request.body(body).send().await;
    let took = sent.elapsed();
    let (status, error) = match result {
        Ok(r) => (Some(r.status().as_u16()), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let ok = status.is_some_and(|s| (200..300).contains(&s));
    let mut s = ctx.state.lock().expect("load");
    s.in_flight -= 1;
    s.answers.push(Answer {
        event_id: event_id.clone(),
        ingest,
        sent,
        took,
        status,
        error,
    });
    if ok {
        s.delivered.insert(event_id, true);
    } else if !s.delivered.get(&event_id).copied().unwrap_or(false) {
        let attempts = {
            let n = s.attempts.entry(event_id.clone()).or_insert(0);
            *n += 1;
            *n
        };
        let due = Instant::now() + redeliver_after(attempts);
        // Keep the queue ordered by due time.
        let at = s.redeliver.partition_point(|(d, _, _)| *d <= due);
        s.redeliver.insert(at, (due, event_id, fixture));
    }
}
