//! Health, readiness, graceful shutdown, and a 3-node JetStream cluster.

use std::time::{Duration, Instant};

use sluice_core::streams::StreamSettings;
use sluice_core::subjects;
use sluice_tests::ingest::{jetstream, stored_events, Ingest, GITHUB_SECRET};
use sluice_tests::nats::{NatsCluster, NatsServer};
use sluice_tests::{fixture, init_logs, sign, wait_for};

#[tokio::test]
async fn readiness_follows_the_streams() {
    init_logs();
    let mut nats = NatsServer::start().await;
    let ingest = Ingest::start(&nats.url()).await;
    let get = |path: &str| {
        let req = ingest.http.get(ingest.admin_url(path)).send();
        async move { req.await.expect("sent").status().as_u16() }
    };
    assert_eq!(get("/healthz").await, 200);
    assert_eq!(get("/readyz").await, 200);

    let js = jetstream(&nats.url()).await;
    js.delete_stream(subjects::EVENTS_STREAM)
        .await
        .expect("delete");
    assert_eq!(get("/readyz").await, 503);
    assert_eq!(get("/healthz").await, 200, "the process itself is fine");

    nats.kill();
    wait_for(
        "readyz to fail with NATS down",
        Duration::from_secs(10),
        || async { (get("/readyz").await == 503).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_stops_accepting() {
    init_logs();
    let nats = NatsServer::start().await;
    let ingest = Ingest::start(&nats.url()).await;
    let js = jetstream(&nats.url()).await;
    let body = fixture("github/pull_request.opened.json");
    let (head, tail) = body.split_at(100);

    // A request whose body is still arriving when shutdown starts.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    tx.send(Ok(head.to_vec())).await.expect("head");
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let request = ingest
        .http
        .post(ingest.url("/webhooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", "pull_request")
        .header("x-github-delivery", "in-flight-1")
        .header(
            "x-hub-signature-256",
            sign::github_sha256(GITHUB_SECRET, &body),
        )
        .body(reqwest::Body::wrap_stream(stream))
        .send();
    let in_flight = tokio::spawn(request);
    let (addr, metrics) = (ingest.addr, ingest.admin_url("/metrics"));
    // The request is in the server's hands once the connection is accepted.
    wait_for(
        "the request to reach ingest",
        Duration::from_secs(5),
        || async {
            let m = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
            m.contains("sluice_ingest_requests_in_flight 1")
                .then_some(())
        },
    )
    .await;

    let stopping = tokio::spawn(ingest.stop());
    // New connections are refused once shutdown has begun.
    wait_for(
        "ingest to stop accepting",
        Duration::from_secs(5),
        || async {
            tokio::net::TcpStream::connect(addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await;
    tx.send(Ok(tail.to_vec())).await.expect("tail");
    drop(tx);
    let answer = in_flight.await.expect("task").expect("answered");
    assert_eq!(
        answer.status().as_u16(),
        202,
        "the in-flight request was finished"
    );
    stopping.await.expect("task").expect("clean stop");
    let stored = stored_events(&js).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1.id, "github:in-flight-1");
}

#[tokio::test]
async fn shutdown_is_bounded_by_the_grace_period() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.shutdown_grace = Duration::from_millis(300);
    config.read_timeout = Duration::from_secs(60);
    let ingest = Ingest::start_with(config).await;
    // A client that never finishes its body.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    tx.send(Ok(b"{".to_vec())).await.expect("chunk");
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let _stuck = tokio::spawn(
        ingest
            .http
            .post(ingest.url("/webhooks/github"))
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(stream))
            .send(),
    );
    let metrics = ingest.admin_url("/metrics");
    wait_for(
        "the stuck request to reach ingest",
        Duration::from_secs(5),
        || async {
            let m = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
            m.contains("sluice_ingest_requests_in_flight 1")
                .then_some(())
        },
    )
    .await;
    let started = Instant::now();
    ingest.stop().await.expect("stop");
    // Bounded: well under the 60 s the stuck body would otherwise be allowed.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    drop(tx);
}

#[tokio::test]
async fn a_three_node_cluster_keeps_accepting_when_a_node_dies() {
    init_logs();
    let mut cluster = NatsCluster::start().await;
    let mut config = Ingest::config(&cluster.urls());
    config.streams = StreamSettings {
        replicas: 3,
        ..StreamSettings::default()
    };
    config.publish_timeout = Duration::from_secs(2);
    let ingest = Ingest::start_with(config).await;
    let js = jetstream(&cluster.nodes[1].url()).await;
    let mut stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("stream");
    assert_eq!(stream.info().await.expect("info").config.num_replicas, 3);

    let body = fixture("github/pull_request.opened.json");
    // Like a forge: retry the same delivery until it is answered 2xx.
    let deliver = |i: usize| {
        let ingest = &ingest;
        let body = &body;
        async move {
            wait_for(
                "a 202 for the delivery",
                Duration::from_secs(30),
                || async move {
                    let r = ingest
                        .post_github("pull_request", &format!("c-{i}"), body)
                        .await;
                    (r.status().as_u16() == 202).then_some(())
                },
            )
            .await
        }
    };
    for i in 0..10 {
        deliver(i).await;
    }
    cluster.nodes[0].kill();
    for i in 10..20 {
        deliver(i).await;
    }
    let ids: Vec<String> = wait_for(
        "all events readable from a survivor",
        Duration::from_secs(20),
        || {
            let js = js.clone();
            async move {
                let stream = js.get_stream(subjects::EVENTS_STREAM).await.ok()?;
                drop(stream);
                let events = stored_events(&js).await;
                (events.len() == 20).then(|| events.into_iter().map(|(_, e)| e.id).collect())
            }
        },
    )
    .await;
    let expected: Vec<String> = (0..20).map(|i| format!("github:c-{i}")).collect();
    assert_eq!(
        ids, expected,
        "each delivery stored once, in order, retries deduplicated"
    );
}

/// With two of three nodes gone, the events stream exists but cannot store a write:
/// `/readyz` says so (503 naming the events stream, where an existence check answered
/// 200 from the lone leader's stream info; the reason may be the quorum or a timeout)
/// while webhooks are answered 503, and is ready again once the nodes are back.
#[tokio::test]
async fn readiness_follows_the_events_streams_quorum() {
    init_logs();
    let mut cluster = NatsCluster::start().await;
    let mut config = Ingest::config(&cluster.urls());
    config.streams = StreamSettings {
        replicas: 3,
        ..StreamSettings::default()
    };
    config.publish_timeout = Duration::from_secs(2);
    let ingest = Ingest::start_with(config).await;
    let readyz = || {
        let req = ingest.http.get(ingest.admin_url("/readyz")).send();
        async move {
            let answer = req.await.ok()?;
            let code = answer.status().as_u16();
            let body: serde_json::Value = answer.json().await.ok()?;
            Some((code, body))
        }
    };
    wait_for(
        "ready on a healthy cluster",
        Duration::from_secs(30),
        || async {
            let (code, _) = readyz().await?;
            (code == 200).then_some(())
        },
    )
    .await;

    // The two nodes that are not the stream's leader: the leader, left alone, still
    // answers the stream's info for a while, so "the stream exists" would say ready.
    let js = jetstream(&cluster.nodes[0].url()).await;
    let mut stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("stream");
    let info = stream.info().await.expect("info");
    let leader = info
        .cluster
        .clone()
        .and_then(|c| c.leader)
        .expect("a leader");
    let others: Vec<usize> = (0..3).filter(|i| format!("n{i}") != leader).collect();
    for &i in &others {
        cluster.nodes[i].kill();
    }
    let verdict = wait_for(
        "a 503 naming the events stream",
        Duration::from_secs(40),
        || async {
            let (code, body) = readyz().await?;
            let names_stream = body["failed"]
                .as_array()?
                .iter()
                .any(|f| f["check"] == "events stream");
            (code == 503 && names_stream).then_some(body)
        },
    )
    .await;
    assert_eq!(verdict["ready"], false, "{verdict}");
    let body = fixture("github/pull_request.opened.json");
    let answer = ingest
        .post_github("pull_request", "no-quorum-1", &body)
        .await;
    assert_eq!(
        answer.status().as_u16(),
        503,
        "never 2xx for an unstored event"
    );

    for &i in &others {
        cluster.nodes[i].restart().await;
    }
    wait_for(
        "ready again once the nodes are back",
        Duration::from_secs(60),
        || async {
            let (code, _) = readyz().await?;
            (code == 200).then_some(())
        },
    )
    .await;
}
