//! Slow and idle clients: a connection that sends its headers slowly or idles is closed
//! after its timeout, and connections over the cap wait instead of starving ingest, so
//! signed deliveries are still stored.

use std::time::{Duration, Instant};

use sluice_tests::ingest::{jetstream, stored_count, Ingest};
use sluice_tests::nats::NatsServer;
use sluice_tests::{fixture, init_logs, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HEADER_TIMEOUT: Duration = Duration::from_millis(1500);

/// Reads until the server closes the connection (EOF or a reset) and returns when.
async fn closed_by_server(mut stream: TcpStream) -> Instant {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) => {}
        }
    }
}

/// The value of one sample on `/metrics`, e.g. `sluice_ingest_connections_open`.
async fn sample(ingest: &Ingest, name: &str) -> Option<u64> {
    let text = ingest
        .http
        .get(ingest.admin_url("/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn slow_headers_are_cut_and_the_cap_holds_while_deliveries_get_through() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.max_connections = 50;
    config.header_timeout = HEADER_TIMEOUT;
    let ingest = Ingest::start_with(config).await;
    let js = jetstream(&nats.url()).await;

    // 80 clients, more than the cap, each stuck half-way through its request line.
    let mut slow = Vec::new();
    for _ in 0..80 {
        // Taken before connecting: ingest cannot have accepted the connection earlier.
        let opened = Instant::now();
        let mut stream = TcpStream::connect(ingest.addr).await.expect("connect");
        stream
            .write_all(b"POST /webhooks/github HT")
            .await
            .expect("half a request line");
        slow.push((opened, tokio::spawn(closed_by_server(stream))));
    }

    // Signed deliveries sent meanwhile wait for a slot and are stored.
    let body = fixture("github/pull_request.opened.json");
    let mut deliveries = Vec::new();
    for i in 0..5 {
        let (ingest, body) = (&ingest, body.clone());
        deliveries.push(async move {
            ingest
                .post_github("pull_request", &format!("slow-{i}"), &body)
                .await
                .status()
                .as_u16()
        });
    }
    let statuses = tokio::time::timeout(
        Duration::from_secs(30),
        futures::future::join_all(deliveries),
    )
    .await
    .expect("deliveries answered");
    assert_eq!(statuses, [202; 5]);
    assert_eq!(stored_count(&js).await, 5);

    // Every slow connection was closed by ingest, none before its header timeout.
    for (opened, closed) in slow {
        let closed = tokio::time::timeout(Duration::from_secs(30), closed)
            .await
            .expect("closed in time")
            .expect("reader");
        let held = closed - opened;
        assert!(held >= HEADER_TIMEOUT, "closed after only {held:?}");
    }
    // The harness's own requests (readiness, these metrics) may idle out too, but
    // only the 80 are cut in their headers.
    wait_for(
        "the timeouts and the cap to be counted",
        Duration::from_secs(10),
        || async {
            let header = "sluice_ingest_connections_timed_out_total{phase=\"header\"}";
            let cut = sample(&ingest, header).await?;
            let limited = sample(&ingest, "sluice_ingest_connections_limited_total").await?;
            (cut == 80 && limited > 0).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_the_idle_timeout_not_before() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.header_timeout = Duration::from_millis(500);
    config.idle_timeout = Duration::from_millis(2500);
    let ingest = Ingest::start_with(config).await;

    // One request on a kept-alive connection (answered without a body), then silence.
    let mut stream = TcpStream::connect(ingest.addr).await.expect("connect");
    stream
        .write_all(b"GET /webhooks/github HTTP/1.1\r\nhost: ingest\r\n\r\n")
        .await
        .expect("request");
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.expect("answer");
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 405"), "{head}");
    assert!(head.contains("content-length: 0"), "{head}");
    let answered = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(20), closed_by_server(stream))
        .await
        .expect("closed in time");
    let idle = closed - answered;
    assert!(
        idle >= Duration::from_millis(2400),
        "closed after {idle:?}: the header timeout is not the idle timeout"
    );
    wait_for(
        "the idle timeout to be counted",
        Duration::from_secs(5),
        || async {
            let idle = "sluice_ingest_connections_timed_out_total{phase=\"idle\"}";
            (sample(&ingest, idle).await? >= 1).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_connection_that_opens_and_says_nothing_is_closed() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.header_timeout = Duration::from_millis(500);
    let ingest = Ingest::start_with(config).await;
    let opened = Instant::now();
    let stream = TcpStream::connect(ingest.addr).await.expect("connect");
    let closed = tokio::time::timeout(Duration::from_secs(20), closed_by_server(stream))
        .await
        .expect("closed in time");
    assert!(closed - opened >= Duration::from_millis(500));
}

/// A connection over the cap that finds no slot within `--queue-wait` is answered 503
/// with `Retry-After` at once, not left unanswered in the listen backlog until a slot
/// frees (a forge gives up after 10 s and counts the delivery failed either way, but
/// only an answer says why). It never reaches the handler, so nothing is stored.
#[tokio::test]
async fn a_connection_over_the_cap_is_answered_503_when_no_slot_frees_in_time() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.max_connections = 1;
    // The one slot stays taken for the whole test unless the client lets go of it.
    config.header_timeout = Duration::from_secs(60);
    config.queue_wait = Duration::from_millis(500);
    let ingest = Ingest::start_with(config).await;
    let addr = ingest.addr;

    // The backlog hands connections over in order: this one takes the slot.
    let mut holder = TcpStream::connect(addr).await.expect("connect");
    holder
        .write_all(b"POST /webhooks/github HT")
        .await
        .expect("half a request line");

    // The admin endpoints are outside the cap: the kubelet's probes and Prometheus are
    // answered at once while every webhook slot is taken (on the webhooks' port a
    // probe would wait for a slot, fail, and a liveness probe restart ingest).
    let http = reqwest::Client::new();
    for path in ["/healthz", "/readyz", "/metrics"] {
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            http.get(ingest.admin_url(path)).send(),
        )
        .await
        .unwrap_or_else(|_| panic!("{path} waited behind the webhooks' connection cap"))
        .expect("an answer");
        assert_eq!(answer.status().as_u16(), 200, "{path}");
    }

    let body = fixture("github/pull_request.opened.json");
    let answer = tokio::time::timeout(
        Duration::from_secs(20),
        http.post(format!("http://{addr}/webhooks/github"))
            .header("content-type", "application/json")
            .header("x-github-event", "pull_request")
            .header("x-github-delivery", "over-the-cap")
            .header(
                "x-hub-signature-256",
                sluice_tests::sign::github_sha256(sluice_tests::ingest::GITHUB_SECRET, &body),
            )
            .body(body)
            .send(),
    )
    .await
    .expect("answered while the slot is still taken, not after it frees")
    .expect("an answer, not a reset");
    assert_eq!(answer.status().as_u16(), 503);
    assert_eq!(
        answer
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("10")
    );
    let text = answer.text().await.expect("body");
    assert!(text.contains("--max-connections"), "{text}");

    // Let go of the slot: the refusal was counted and nothing was stored.
    drop(holder);
    let metrics = ingest.admin_url("/metrics");
    wait_for("the refusal to be counted", Duration::from_secs(20), || {
        let (http, metrics) = (http.clone(), metrics.clone());
        async move {
            let text = http.get(&metrics).send().await.ok()?.text().await.ok()?;
            text.lines()
                .any(|l| l == "sluice_ingest_connections_refused_total 1")
                .then_some(())
        }
    })
    .await;
    let js = jetstream(&nats.url()).await;
    assert_eq!(stored_count(&js).await, 0);
    ingest.stop().await.expect("ingest served without error");
}

/// With the slots and the waiting room full while JetStream holds the slots (a
/// publish waiting for its acknowledgement), a connection is accepted only to be
/// answered 503 at once: left in the kernel's listen backlog it would overflow the
/// accept queue in a spike, and a client whose handshake the kernel completed but
/// ingest never accepted sends its request into silence until the forge gives up.
/// (Slots held by slow clients instead leave new ones in the backlog: the test above.)
#[tokio::test]
async fn over_the_cap_and_the_waiting_room_while_the_store_is_slow_is_answered_503_at_once() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    // Two slots, a waiting room of one.
    config.max_connections = 2;
    config.header_timeout = Duration::from_secs(60);
    // Both longer than the client waits below: an answer after either fails the test.
    config.queue_wait = Duration::from_secs(8);
    config.publish_timeout = Duration::from_secs(8);
    let ingest = Ingest::start_with(config).await;
    let addr = ingest.addr;

    let body = fixture("github/pull_request.opened.json");
    let signed = |delivery: &str| {
        format!(
            "POST /webhooks/github HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             x-github-event: pull_request\r\nx-github-delivery: {delivery}\r\n\
             x-hub-signature-256: {}\r\ncontent-length: {}\r\n\r\n",
            sluice_tests::sign::github_sha256(sluice_tests::ingest::GITHUB_SECRET, &body),
            body.len()
        )
        .into_bytes()
        .into_iter()
        .chain(body.iter().copied())
        .collect::<Vec<u8>>()
    };
    // JetStream stops answering: a webhook's publish waits in its slot.
    nats.pause();
    let mut waiting = TcpStream::connect(addr).await.expect("connect");
    waiting
        .write_all(&signed("held-by-the-store"))
        .await
        .expect("a whole request");
    // The other slot, then the waiting room's place, held by half a request each.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"POST /webhooks/github HT")
            .await
            .expect("half a request line");
        holders.push(stream);
    }

    let sent = Instant::now();
    let mut over = TcpStream::connect(addr).await.expect("connect");
    over.write_all(&signed("over-the-room"))
        .await
        .expect("a whole request");
    let mut answer = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(4), over.read(&mut answer))
        .await
        .expect("answered at once, not after a slot or the room's place frees")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 10"),
        "{answer}"
    );
    assert!(answer.contains("--max-connections"), "{answer}");
    assert!(sent.elapsed() < Duration::from_secs(4));

    nats.resume();
    drop(holders);
    drop(waiting);
    ingest.stop().await.expect("ingest served without error");
}
