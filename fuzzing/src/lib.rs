//! The fuzz targets' bodies. Each takes raw bytes, feeds them to one parser the way its
//! caller does, and returns; a panic, a hang or unbounded memory is the finding.
//!
//! Inputs that carry headers as well as a body put the headers first, one per line,
//! and the body after the first empty line (`header\n\nbody`), so a seed is a request
//! a forge could send.
#![forbid(unsafe_code)]

use std::sync::OnceLock;

use secrecy::SecretString;

pub mod seeds;

/// The secret every verifier target checks against; seeds are signed with it so the
/// fuzzer starts past verification.
pub const SECRET: &str = "fuzzing-secret";

/// The Standard Webhooks secret of the generic target.
pub const STANDARD_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// `now` for the Standard Webhooks target, so seeds stay inside the tolerance.
pub const NOW: i64 = 1_700_000_000;

/// A target's body: raw bytes in, a panic or a hang as the finding.
pub type Target = fn(&[u8]);

/// Every target, by name: what `scripts/fuzz` runs and the replay test checks.
pub const TARGETS: &[(&str, Target)] = &[
    ("verify_github", verify_github),
    ("verify_gitlab", verify_gitlab),
    ("verify_standard", verify_standard),
    ("normalize_github", normalize_github),
    ("normalize_gitlab", normalize_gitlab),
    ("normalize_generic", normalize_generic),
    ("pipeline_yaml", pipeline_yaml),
    ("cel", cel),
    ("step_lines", step_lines),
    ("contract", contract),
    ("ingest_router", ingest_router),
];

/// Splits `header lines \n\n body`; an input without the blank line is all headers.
pub fn split(data: &[u8]) -> (Vec<&str>, &[u8]) {
    let (head, body) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &data[data.len()..]),
    };
    let head = std::str::from_utf8(head).unwrap_or("");
    (head.split('\n').collect(), body)
}

fn header<'a>(lines: &[&'a str], i: usize) -> &'a str {
    lines.get(i).copied().unwrap_or("")
}

fn secrets(secret: &str) -> Vec<SecretString> {
    vec![SecretString::from(secret.to_owned())]
}

/// `X-Hub-Signature-256` (or, on the second line, `X-Hub-Signature`) and the body.
pub fn verify_github(data: &[u8]) {
    let (lines, body) = split(data);
    let secrets = secrets(SECRET);
    let _ = sluice_ingest::verify::github_sha256(&secrets, header(&lines, 0), body);
    let _ = sluice_ingest::verify::github_sha1(&secrets, header(&lines, 1), body);
}

/// `X-Gitlab-Token`, checked as a plain token and as a Standard Webhooks signing token.
pub fn verify_gitlab(data: &[u8]) {
    let (lines, _) = split(data);
    let _ = sluice_ingest::verify::gitlab_token(&secrets(SECRET), header(&lines, 0));
}

/// `webhook-id`, `webhook-timestamp`, `webhook-signature`, then the body.
pub fn verify_standard(data: &[u8]) {
    let (lines, body) = split(data);
    let headers = sluice_ingest::verify::StandardHeaders {
        id: header(&lines, 0),
        timestamp: header(&lines, 1),
        signature: header(&lines, 2),
    };
    let _ = sluice_ingest::verify::standard(&secrets(STANDARD_SECRET), headers, body, NOW, 300);
}

/// `X-GitHub-Event`, then the payload: the secret-selecting scan, then the parse and
/// normalization a verified delivery gets.
pub fn normalize_github(data: &[u8]) {
    let (lines, body) = split(data);
    let _ = sluice_ingest::normalize::github_target(body);
    if let Ok(p) = serde_json::from_slice(body) {
        let _ = sluice_ingest::normalize::github(header(&lines, 0), "delivery", p);
    }
}

/// `X-Gitlab-Event`, then the payload.
pub fn normalize_gitlab(data: &[u8]) {
    let (lines, body) = split(data);
    let _ = sluice_ingest::normalize::gitlab_target(body);
    if let Ok(p) = serde_json::from_slice(body) {
        let _ = sluice_ingest::normalize::gitlab(header(&lines, 0), "delivery", p);
    }
}

/// A Standard Webhooks payload for `/webhooks/generic`.
pub fn normalize_generic(data: &[u8]) {
    let _ = sluice_ingest::normalize::generic_target(data);
    if let Ok(p) = serde_json::from_slice(data) {
        let _ = sluice_ingest::normalize::generic("delivery", p);
    }
}

/// A pipelines file, parsed and validated as `sluice pipelines apply` does.
pub fn pipeline_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = sluice_core::pipeline::parse_documents("fuzz.yaml", text);
}

/// A `when` expression (first line), compiled and evaluated against a real event's
/// envelope (the rest, JSON) as the dispatcher does.
pub fn cel(data: &[u8]) {
    let (lines, body) = split(data);
    let Ok(expr) = sluice_core::pipeline::Cel::parse(header(&lines, 0)) else {
        return;
    };
    let event = serde_json::from_slice::<sluice_core::Event>(body)
        .unwrap_or_else(|_| fallback_event().clone());
    let _ = sluice_dispatcher::matcher::CelEvent::new(&event).eval(&expr);
}

fn fallback_event() -> &'static sluice_core::Event {
    static EVENT: OnceLock<sluice_core::Event> = OnceLock::new();
    EVENT.get_or_init(|| {
        serde_json::from_str(seeds::EVENT_JSON).expect("the seed event is an envelope")
    })
}

/// A step's output, read into log lines through a small buffer, so lines cross reads.
pub fn step_lines(data: &[u8]) {
    let runtime = runtime();
    runtime.block_on(async {
        let reader = tokio::io::BufReader::with_capacity(7, data);
        let mut lines = sluice_runner::lines::Lines::new(reader);
        let mut total = 0;
        while let Ok(Some(line)) = lines.next_line().await {
            assert!(
                line.len() <= sluice_runner::lines::MAX_LINE,
                "a line over MAX_LINE"
            );
            total += line.len();
        }
        assert!(
            total <= data.len() * 3,
            "more text out than bytes in, beyond U+FFFD"
        );
    });
}

/// Every message of the contract a service decodes from the bus.
pub fn contract(data: &[u8]) {
    use sluice_core::run::*;
    let _ = serde_json::from_slice::<sluice_core::Event>(data);
    let _ = serde_json::from_slice::<RunRequest>(data);
    let _ = serde_json::from_slice::<StatusUpdate>(data);
    let _ = serde_json::from_slice::<LogChunk>(data);
    let _ = serde_json::from_slice::<CancelRequest>(data);
    let _ = serde_json::from_slice::<Decision>(data);
    let _ = serde_json::from_slice::<ChildRequest>(data);
    let _ = serde_json::from_slice::<ChildResult>(data);
    let _ = serde_json::from_slice::<Heartbeat>(data);
    let _ = serde_json::from_slice::<DeadLetter>(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sluice_core::subjects::parse_runner_key(text);
        let _ = sluice_core::duration::parse(text);
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

/// Raw bytes as a client's connection to ingest: hyper's HTTP/1.1 parser, the
/// connection's phases and ingest's whole router (body limits, content types, every
/// verifier and normalizer, the metrics). The seeds are signed requests, so the fuzzer
/// starts past verification; the store is a NATS client with no server (its publish
/// times out at once), so a verified event is answered 503, as when JetStream is away.
pub fn ingest_router(data: &[u8]) {
    ingest_exchange(data);
}

/// What ingest answers on a connection that sent `data` and then nothing more.
pub fn ingest_exchange(data: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (runtime, app) = ingest_app();
    runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(16 * 1024);
        let served = tokio::spawn(sluice_ingest::server::serve_connection(
            server,
            app.router.clone(),
            app.limits,
            app.metrics.connections.clone(),
            tokio_util::sync::CancellationToken::new(),
        ));
        let exchange = async {
            let (mut read, mut write) = tokio::io::split(&mut client);
            // Not shut down after the input: hyper closes a connection whose client
            // half-closed without answering its request. The server closes it
            // instead, once it has waited the (short) idle or header timeout.
            let send = async {
                // The server may answer and close before reading everything.
                let _ = write.write_all(data).await;
            };
            let mut answer = Vec::new();
            let receive = read.read_to_end(&mut answer);
            let _ = tokio::join!(send, receive);
            answer
        };
        // Every path ends at the input's end; the bound turns a hang into a finding
        // well inside libFuzzer's own timeout.
        let answer = tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
            .await
            .unwrap_or_else(|_| panic!("no answer within 5 s"));
        served.abort();
        answer
    })
}

struct IngestApp {
    router: axum::Router,
    limits: sluice_ingest::server::ConnectionLimits,
    metrics: sluice_ingest::metrics::Metrics,
}

/// One runtime and one router for every input: building them per input would be most
/// of the work.
fn ingest_app() -> &'static (tokio::runtime::Runtime, IngestApp) {
    static APP: OnceLock<(tokio::runtime::Runtime, IngestApp)> = OnceLock::new();
    APP.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let app = runtime.block_on(async {
            // Port 9 (discard) on loopback: nothing listens, so the client keeps
            // reconnecting in the background and every publish times out.
            let client = async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .connect("nats://127.0.0.1:9")
                .await
                .expect("a client that connects later");
            let github = SecretString::from(SECRET.to_owned());
            let standard = SecretString::from(STANDARD_SECRET.to_owned());
            let secrets = sluice_ingest::Secrets::load(sluice_ingest::SecretSources {
                github: Some(&github),
                gitlab: Some(&github),
                generic: Some(&standard),
                file: None,
            })
            .expect("the secrets");
            let metrics = sluice_ingest::metrics::Metrics::default();
            let state = std::sync::Arc::new(sluice_ingest::http::AppState {
                secrets,
                publisher: sluice_ingest::publish::Publisher::new(
                    client,
                    std::time::Duration::from_millis(1),
                    sluice_ingest::SHED_AFTER,
                ),
                metrics: metrics.clone(),
                limits: sluice_ingest::http::Limits {
                    max_body_bytes: 256 * 1024,
                    read_timeout: std::time::Duration::from_millis(100),
                    // The seeds are signed at NOW, years ago.
                    tolerance: std::time::Duration::from_secs(u64::from(u32::MAX)),
                    allow_sha1: true,
                    retry_after: std::time::Duration::from_secs(10),
                },
                refusals: Default::default(),
            });
            IngestApp {
                router: sluice_ingest::http::router(state),
                // Short, so that each input ends soon after its last byte: at once
                // after its last answer, soon for a request left unfinished.
                limits: sluice_ingest::server::ConnectionLimits {
                    header_timeout: std::time::Duration::from_millis(20),
                    idle_timeout: std::time::Duration::from_millis(1),
                    max_connections: 1,
                    queue_wait: std::time::Duration::from_millis(1),
                    retry_after: std::time::Duration::from_secs(10),
                },
                metrics,
            }
        });
        (runtime, app)
    })
}
