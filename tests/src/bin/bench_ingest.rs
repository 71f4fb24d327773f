//! Ingest benchmark: in one run on one machine, (a) raw JetStream publish throughput
//! with async-nats for a real 28 KB pull_request payload, (t) the same payload as
//! signed webhooks through the thinnest handler that verifies and publishes (its own
//! process: this binary with `--serve-thin`), (b) through a `sluice ingest` process end
//! to end, the ratios, and the p50/p99 latency of each at a fixed 1,000 requests/s, and
//! ingest's peak RSS. (t) and (b) run in rounds, both processes up the whole time,
//! both streams emptied and the disk synced before each phase and the order swapped
//! every round, so that the shared machine's drift lands on both alike; the ratio
//! reported is the median of the rounds'.
//!
//! Run with `./scripts/bench-ingest` (builds the release binaries first).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream::{self, message::PublishMessage, stream::Config};
use sluice_core::streams::StreamSettings;
use sluice_core::subjects::EVENTS_STREAM;
use sluice_tests::nats::{reserve_port, NatsServer};
use sluice_tests::{fixture, sign, wait_for};

const SECRET: &str = "bench-secret";

struct Args {
    seconds: u64,
    concurrency: usize,
    rate: u64,
    rounds: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        seconds: 10,
        concurrency: 32,
        rate: 1000,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seconds" => a.seconds = value.parse()?,
            "--concurrency" => a.concurrency = value.parse()?,
            "--rate" => a.rate = value.parse()?,
            "--rounds" => a.rounds = value.parse::<u64>()?.max(1),
            other => {
                bail!("unknown flag {other}: use --seconds, --concurrency, --rate, --rounds")
            }
        }
    }
    Ok(a)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args().skip(1);
    if argv.next().as_deref() == Some("--serve-thin") {
        let (listen, nats) = (argv.next(), argv.next());
        let (Some(listen), Some(nats)) = (listen, nats) else {
            bail!("--serve-thin LISTEN NATS_URL");
        };
        return thin::serve(&listen, &nats).await;
    }
    let args = args()?;
    let body = fixture("github/pull_request.opened.json");
    let nats = NatsServer::start().await;
    let window = Duration::from_secs(args.seconds);
    println!(
        "payload {} bytes, {} s per phase, {} in flight, nats-server {}",
        body.len(),
        args.seconds,
        args.concurrency,
        nats.url()
    );

    // (a) Raw JetStream: publish and await the ack, `concurrency` at a time, to a stream
    // configured like SLUICE_EVENTS (file storage, 72 h duplicate window, msg ids).
    let client = async_nats::connect(nats.url()).await?;
    let js = jetstream::new(client);
    js.create_stream(Config {
        name: "BENCH_RAW".into(),
        subjects: vec!["bench.raw".into()],
        ..StreamSettings::default().events()
    })
    .await?;
    let publish = {
        let js = js.clone();
        let body = bytes::Bytes::from(body.clone());
        move |i| {
            let (js, body) = (js.clone(), body.clone());
            async move {
                let ack = js
                    .send_publish(
                        "bench.raw",
                        PublishMessage::build()
                            .payload(body)
                            .message_id(format!("raw-{i}")),
                    )
                    .await
                    .ok()?;
                ack.await.ok().map(|_| ())
            }
        }
    };
    let raw = closed_loop(args.concurrency, window, publish.clone()).await;
    // The floor for (b)'s latency: the same publish at the same fixed rate.
    let raw_latencies = open_loop(args.rate, window, 10_000_000, publish).await;
    js.delete_stream("BENCH_RAW").await?;

    // (t) The thinnest verify-and-publish handler and (b) a real `sluice ingest`
    // process, each on a stream of its own so neither pays for the other's messages.
    let signature = sign::github_sha256(SECRET, &body);
    let body = bytes::Bytes::from(body);
    let mut thin = Server::thin(&nats.url()).await?;
    let mut ingest = Server::ingest(&nats.url()).await?;
    let poster = |server: &Server| Poster {
        addr: server.addr.clone(),
        body: body.clone(),
        signature: signature.clone(),
    };
    let (thin_post, ingest_post) = (poster(&thin), poster(&ingest));
    let mut rounds = Vec::new();
    for round in 0..args.rounds {
        // Distinct delivery ids per round: a repeated id is a duplicate, answered
        // without being stored, which would flatter whichever side got it.
        let first_id = (round + 1) * 100_000_000;
        let phase = |server: &Server, post: &Poster| {
            let (js, post, pid) = (js.clone(), post.clone(), server.child.id());
            async move {
                for stream in [thin::STREAM, EVENTS_STREAM] {
                    js.get_stream(stream).await?.purge().await?;
                }
                // Write back what the last phase left dirty, so that its disk work
                // is not charged to this one.
                Command::new("sync").status()?;
                let cpu = || sluice_tests::process::cpu_time(pid).context("no /proc stat");
                let before = cpu()?;
                let mut through = closed_loop_conn(args.concurrency, window, first_id, post).await;
                through.cpu = cpu()? - before;
                anyhow::Ok(through)
            }
        };
        // Alternate which goes first, so neither always follows the other.
        let (t, b) = if round.is_multiple_of(2) {
            let t = phase(&thin, &thin_post).await?;
            (t, phase(&ingest, &ingest_post).await?)
        } else {
            let b = phase(&ingest, &ingest_post).await?;
            (phase(&thin, &thin_post).await?, b)
        };
        println!(
            "round {}: (t) {:.0} req/s ({} errors, {:.1} µs CPU each), (b) {:.0} req/s ({} errors, {:.1} µs CPU each), (b)/(t) {:.1}%",
            round + 1,
            t.per_sec,
            t.errors,
            t.cpu_per_request_us(),
            b.per_sec,
            b.errors,
            b.cpu_per_request_us(),
            b.per_sec / t.per_sec * 100.0
        );
        rounds.push((t, b));
    }
    let thin_latencies = latency(&args, window, thin_post).await;
    let latencies = latency(&args, window, ingest_post).await;
    let rss = ingest.peak_rss_kib()?;
    thin.stop();
    ingest.stop();

    let mean = |side: fn(&(Throughput, Throughput)) -> &Throughput| Throughput {
        per_sec: rounds.iter().map(|r| side(r).per_sec).sum::<f64>() / rounds.len() as f64,
        errors: rounds.iter().map(|r| side(r).errors).sum(),
        requests: rounds.iter().map(|r| side(r).requests).sum(),
        cpu: rounds.iter().map(|r| side(r).cpu).sum(),
    };
    let (through_thin, through_ingest) = (mean(|r| &r.0), mean(|r| &r.1));
    let mut round_ratios: Vec<f64> = rounds.iter().map(|(t, b)| b.per_sec / t.per_sec).collect();
    round_ratios.sort_by(f64::total_cmp);
    let mid = round_ratios.len() / 2;
    let thin_ratio = if round_ratios.len().is_multiple_of(2) {
        (round_ratios[mid - 1] + round_ratios[mid]) / 2.0
    } else {
        round_ratios[mid]
    };
    let ratio = through_ingest.per_sec / raw.per_sec;
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| (a) raw JetStream publish+ack | {:.0} msg/s ({} errors) |",
        raw.per_sec, raw.errors
    );
    println!(
        "| (b) signed webhooks through ingest, mean of the rounds | {:.0} req/s ({} errors) |",
        through_ingest.per_sec, through_ingest.errors
    );
    println!(
        "| (t) signed webhooks through the thinnest verify-and-publish handler, mean of the rounds | {:.0} req/s ({} errors) |",
        through_thin.per_sec, through_thin.errors
    );
    println!(
        "| CPU per request of the handler's process, all rounds | (t) {:.1} µs, (b) {:.1} µs |",
        through_thin.cpu_per_request_us(),
        through_ingest.cpu_per_request_us()
    );
    println!("| ratio (b)/(a) | {:.1}% |", ratio * 100.0);
    println!(
        "| ratio (b)/(t), median of {} rounds | {:.1}% (rounds: {}) |",
        round_ratios.len(),
        thin_ratio * 100.0,
        round_ratios
            .iter()
            .map(|r| format!("{:.1}%", r * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| raw publish+ack latency at {} msg/s | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} messages, {} errors) |",
        args.rate, raw_latencies.p50_ms, raw_latencies.p99_ms, raw_latencies.max_ms, raw_latencies.count, raw_latencies.errors
    );
    println!(
        "| thin handler latency at {} req/s | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} requests, {} errors) |",
        args.rate, thin_latencies.p50_ms, thin_latencies.p99_ms, thin_latencies.max_ms, thin_latencies.count, thin_latencies.errors
    );
    println!(
        "| ingest latency at {} req/s | p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} requests, {} errors) |",
        args.rate, latencies.p50_ms, latencies.p99_ms, latencies.max_ms, latencies.count, latencies.errors
    );
    println!(
        "| ingest peak RSS (VmHWM) | {:.1} MiB |",
        rss as f64 / 1024.0
    );
    Ok(())
}

/// Latency at a fixed rate (open loop: requests start on schedule whether or not
/// earlier ones have finished) of signed webhooks through `post`. Keep-alive
/// connections are reused across requests, as a load balancer's.
async fn latency(args: &Args, window: Duration, post: Poster) -> Latencies {
    let pool: Arc<std::sync::Mutex<Vec<Conn>>> = Arc::default();
    open_loop(args.rate, window, 10_000_000, move |i| {
        let (post, pool) = (post.clone(), pool.clone());
        async move {
            let idle = pool.lock().ok()?.pop();
            let mut conn = match idle {
                Some(c) => c,
                None => post.connect().await?,
            };
            let sent = post.send(&mut conn, i).await;
            if sent.is_some() {
                pool.lock().ok()?.push(conn);
            }
            sent
        }
    })
    .await
}

/// The thinnest handler that does what any webhook receiver must before it answers:
/// read the body, check its HMAC in constant time, publish it with the delivery id as
/// `Nats-Msg-Id` and wait for the acknowledgement. No parsing, no normalizing, no
/// metrics, no limits: the floor ingest is compared with.
mod thin {
    use std::sync::Arc;

    use async_nats::jetstream::{self, message::PublishMessage, stream::Config};
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::{get, post};
    use hmac::{Hmac, Mac};
    use sluice_core::streams::StreamSettings;

    pub const STREAM: &str = "BENCH_THIN";

    struct Thin {
        js: jetstream::Context,
        key: Hmac<sha2::Sha256>,
    }

    pub async fn serve(listen: &str, nats: &str) -> anyhow::Result<()> {
        let js = jetstream::new(async_nats::connect(nats).await?);
        js.get_or_create_stream(Config {
            name: STREAM.into(),
            subjects: vec!["bench.thin".into()],
            ..StreamSettings::default().events()
        })
        .await?;
        let key = Hmac::new_from_slice(super::SECRET.as_bytes())?;
        let app = axum::Router::new()
            .route("/webhooks/github", post(webhook))
            .route("/readyz", get(|| async { "ok" }))
            .with_state(Arc::new(Thin { js, key }));
        let listener = tokio::net::TcpListener::bind(listen).await?;
        axum::serve(listener, app).await?;
        Ok(())
    }

    async fn webhook(
        State(thin): State<Arc<Thin>>,
        headers: HeaderMap,
        body: axum::body::Bytes,
    ) -> StatusCode {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let Some(signature) = header("x-hub-signature-256")
            .and_then(|s| s.strip_prefix("sha256="))
            .and_then(|s| hex::decode(s).ok())
        else {
            return StatusCode::UNAUTHORIZED;
        };
        let mut mac = thin.key.clone();
        mac.update(&body);
        if mac.verify_slice(&signature).is_err() {
            return StatusCode::UNAUTHORIZED;
        }
        let Some(delivery) = header("x-github-delivery") else {
            return StatusCode::BAD_REQUEST;
        };
        let message = PublishMessage::build()
            .payload(body)
            .message_id(format!("github:{delivery}"));
        let Ok(ack) = thin.js.send_publish("bench.thin", message).await else {
            return StatusCode::SERVICE_UNAVAILABLE;
        };
        match ack.await {
            Ok(_) => StatusCode::ACCEPTED,
            Err(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A minimal HTTP/1.1 client (hyper, one connection per worker), so the load generator
/// takes as little of the shared CPU as it can.
#[derive(Clone)]
struct Poster {
    addr: String,
    body: bytes::Bytes,
    signature: String,
}

type Conn = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

impl Poster {
    async fn connect(&self) -> Option<Conn> {
        let tcp = tokio::net::TcpStream::connect(&self.addr).await.ok()?;
        tcp.set_nodelay(true).ok()?;
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .ok()?;
        tokio::spawn(conn);
        Some(send)
    }

    async fn send(&self, conn: &mut Conn, i: u64) -> Option<()> {
        let request = hyper::Request::post("/webhooks/github")
            .header("host", &self.addr)
            .header("content-type", "application/json")
            .header("x-github-event", "pull_request")
            .header("x-github-delivery", format!("bench-{i}"))
            .header("x-hub-signature-256", &self.signature)
            .body(http_body_util::Full::new(self.body.clone()))
            .ok()?;
        conn.ready().await.ok()?;
        let response = conn.send_request(request).await.ok()?;
        let ok = response.status().as_u16() == 202;
        // Drain the small JSON answer so the connection can be reused.
        http_body_util::BodyExt::collect(response.into_body())
            .await
            .ok()?;
        ok.then_some(())
    }
}

/// `concurrency` workers, each on its own keep-alive connection, post back to back,
/// delivery ids from `first_id`.
async fn closed_loop_conn(
    concurrency: usize,
    window: Duration,
    first_id: u64,
    poster: Poster,
) -> Throughput {
    let next = Arc::new(AtomicU64::new(first_id));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (poster, next, done, errors, stop) = (
                poster.clone(),
                next.clone(),
                done.clone(),
                errors.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                let mut conn = None;
                while !stop.load(Ordering::Relaxed) {
                    if conn.is_none() {
                        conn = poster.connect().await;
                    }
                    let Some(c) = conn.as_mut() else {
                        errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    match poster.send(c, i).await {
                        Some(()) => done.fetch_add(1, Ordering::Relaxed),
                        None => {
                            conn = None;
                            errors.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let done = done.load(Ordering::Relaxed);
    Throughput {
        per_sec: done as f64 / started.elapsed().as_secs_f64(),
        errors: errors.load(Ordering::Relaxed),
        requests: done,
        cpu: Duration::ZERO,
    }
}

struct Throughput {
    per_sec: f64,
    errors: u64,
    requests: u64,
    /// CPU time of the process under test during the window (zero when not measured).
    cpu: Duration,
}

impl Throughput {
    fn cpu_per_request_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }
}

/// `concurrency` workers each run `op` back to back for `window`.
async fn closed_loop<F, Fut>(concurrency: usize, window: Duration, op: F) -> Throughput
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<()>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, next, done, errors, stop) = (
                op.clone(),
                next.clone(),
                done.clone(),
                errors.clone(),
                stop.clone(),
            );
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    match op(i).await {
                        Some(()) => done.fetch_add(1, Ordering::Relaxed),
                        None => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    tokio::time::sleep(window).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let done = done.load(Ordering::Relaxed);
    Throughput {
        per_sec: done as f64 / elapsed,
        errors: errors.load(Ordering::Relaxed),
        requests: done,
        cpu: Duration::ZERO,
    }
}

struct Latencies {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    count: usize,
    errors: usize,
}

/// Starts `op` `rate` times a second for `window`, ids from `first_id`.
async fn open_loop<F, Fut>(rate: u64, window: Duration, first_id: u64, op: F) -> Latencies
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<()>> + Send + 'static,
{
    let total = rate * window.as_secs();
    let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        ticker.tick().await;
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            op(first_id + i).await.map(|()| started.elapsed())
        }));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    let mut errors = 0;
    for t in tasks {
        match t.await.ok().flatten() {
            Some(d) => samples.push(d),
            None => errors += 1,
        }
    }
    samples.sort();
    let pct = |p: f64| {
        samples
            .get(((samples.len() as f64 * p) as usize).min(samples.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
    };
    Latencies {
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: samples
            .last()
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0),
        count: samples.len(),
        errors,
    }
}

/// A webhook receiver as its own process (so its memory is measured alone and it gets
/// its own runtime, as in production): `sluice ingest`, or the thin handler.
struct Server {
    child: Child,
    addr: String,
}

impl Server {
    async fn ingest(nats_url: &str) -> anyhow::Result<Self> {
        let bin = sibling_binary("sluice")?;
        let addr = format!("127.0.0.1:{}", reserve_port());
        let admin = format!("127.0.0.1:{}", reserve_port());
        let mut command = Command::new(&bin);
        command
            .arg("ingest")
            .env("SLUICE_INGEST_LISTEN", &addr)
            .env("SLUICE_ADMIN_LISTEN", &admin)
            .env("SLUICE_NATS_URL", nats_url)
            .env("SLUICE_GITHUB_WEBHOOK_SECRET", SECRET);
        Server::start(command, addr, &admin, "ingest").await
    }

    async fn thin(nats_url: &str) -> anyhow::Result<Self> {
        let addr = format!("127.0.0.1:{}", reserve_port());
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["--serve-thin", &addr, nats_url]);
        let ready_at = addr.clone();
        Server::start(command, addr, &ready_at, "the thin handler").await
    }

    /// Starts `command`, serving webhooks on `addr`, and waits for `/readyz` on `admin`.
    async fn start(
        mut command: Command,
        addr: String,
        admin: &str,
        what: &str,
    ) -> anyhow::Result<Self> {
        let child = command
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        let ready = format!("http://{admin}/readyz");
        wait_for(
            &format!("{what} to be ready"),
            Duration::from_secs(20),
            || {
                let ready = ready.clone();
                async move {
                    let r = reqwest::get(&ready).await.ok()?;
                    r.status().is_success().then_some(())
                }
            },
        )
        .await;
        Ok(Server { child, addr })
    }

    fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        sluice_tests::process::status_kib(self.child.id(), "VmHWM:")
            .context("no VmHWM in /proc status")
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary built next to this one (`target/release/sluice`).
fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.parent().context("binary folder")?.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p sluice`",
            path.display()
        );
    }
    Ok(path)
}
