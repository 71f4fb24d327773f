//! Delivery guarantees: duplicates recognised across restarts, oversized bodies
//! stored by reference, a NATS crash never answered 2xx for an unstored event.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sluice_core::subjects;
use sluice_tests::ingest::{jetstream, stored_count, stored_events, Ingest};
use sluice_tests::nats::NatsServer;
use sluice_tests::{fixture, init_logs};
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn the_same_delivery_is_one_event_even_after_an_ingest_restart() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    let body = fixture("github/pull_request.synchronize.json");

    let ingest = Ingest::start(&nats.url()).await;
    let first: Value = ingest
        .post_github("pull_request", "dup-1", &body)
        .await
        .json()
        .await
        .expect("json");
    let second: Value = ingest
        .post_github("pull_request", "dup-1", &body)
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(first["duplicate"], false);
    assert_eq!(second["duplicate"], true);
    assert_eq!(second["event_id"], "github:dup-1");
    ingest.stop().await.expect("clean stop");

    // A new ingest process, and the stream settings re-applied at its start-up.
    let ingest = Ingest::start(&nats.url()).await;
    let r = ingest.post_github("pull_request", "dup-1", &body).await;
    assert_eq!(r.status().as_u16(), 202);
    let third: Value = r.json().await.expect("json");
    assert_eq!(third["duplicate"], true);
    assert_eq!(stored_count(&js).await, 1);

    // The window is the configured 72 h, not JetStream's 2 minute default.
    let mut stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("stream");
    let config = stream.info().await.expect("info").config.clone();
    assert_eq!(config.duplicate_window, Duration::from_secs(72 * 3600));
    let metrics = ingest.metrics().await;
    assert!(
        metrics.contains(r#"sluice_ingest_duplicates_total{provider="github"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_body_larger_than_a_nats_message_is_stored_by_reference() {
    init_logs();
    let nats = NatsServer::start().await;
    let ingest = Ingest::start(&nats.url()).await;
    let js = jetstream(&nats.url()).await;

    // A real push payload grown past NATS's 1 MiB message limit with extra commits.
    let mut push: Value =
        serde_json::from_slice(&fixture("github/push.with-new-branch.json")).expect("json");
    let commit = push["commits"][0].clone();
    let commits = push["commits"].as_array_mut().expect("commits");
    for i in 0..3000 {
        let mut c = commit.clone();
        c["added"] = serde_json::json!([format!("generated/file-{i:05}.txt")]);
        c["message"] = Value::String("x".repeat(400));
        commits.push(c);
    }
    let body = serde_json::to_vec(&push).expect("json");
    assert!(body.len() > 2 * 1024 * 1024, "{}", body.len());

    let r = ingest.post_github("push", "big-1", &body).await;
    assert_eq!(r.status().as_u16(), 202);
    let stored = stored_events(&js).await;
    assert_eq!(stored.len(), 1);
    let event = &stored[0].1;
    assert!(event.payload.is_none(), "the body is not inline");
    let reference = event.payload_ref.as_ref().expect("payload_ref");
    assert_eq!(reference.bucket, subjects::PAYLOADS_BUCKET);
    assert_eq!(reference.size, body.len() as u64);
    assert_eq!(reference.sha256, hex::encode(Sha256::digest(&body)));
    assert_eq!(event.changed_files.as_ref().map(Vec::len), Some(3001));

    let store = js
        .get_object_store(&reference.bucket)
        .await
        .expect("bucket");
    let mut object = store.get(&reference.key).await.expect("object");
    let mut fetched = Vec::new();
    object.read_to_end(&mut fetched).await.expect("read");
    assert_eq!(
        fetched, body,
        "the stored body is the posted body, byte for byte"
    );
}

#[tokio::test]
async fn nats_killed_mid_flight_never_yields_a_2xx_for_a_lost_event() {
    init_logs();
    let mut nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.publish_timeout = Duration::from_millis(1500);
    let ingest = Ingest::start_with(config).await;
    let js = jetstream(&nats.url()).await;
    let body = fixture("github/pull_request.opened.json");

    // Keep requests flowing from several clients while the server is killed.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let sender = {
        let ingest_url = ingest.url("/webhooks/github");
        let http = ingest.http.clone();
        let body = body.clone();
        tokio::spawn(async move {
            let requests = futures::stream::iter(0..400).map(|i| {
                let (http, url, body) = (http.clone(), ingest_url.clone(), body.clone());
                async move {
                    let r = http
                        .post(url)
                        .header("content-type", "application/json")
                        .header("x-github-event", "pull_request")
                        .header("x-github-delivery", format!("crash-{i}"))
                        .header(
                            "x-hub-signature-256",
                            sluice_tests::sign::github_sha256(
                                sluice_tests::ingest::GITHUB_SECRET,
                                &body,
                            ),
                        )
                        .body(body)
                        .send()
                        .await
                        .expect("ingest answers even while NATS is down");
                    (
                        i,
                        r.status().as_u16(),
                        r.headers().get("retry-after").is_some(),
                    )
                }
            });
            let mut answers = requests.buffer_unordered(8);
            while let Some(answer) = answers.next().await {
                if tx.send(answer).is_err() {
                    break;
                }
            }
        })
    };

    let mut answers = Vec::new();
    // Kill once some events have been accepted, so the crash lands mid-stream.
    while answers.len() < 40 {
        answers.push(rx.recv().await.expect("answer"));
    }
    nats.kill();
    // Wait until ingest has answered 503 at least once with NATS gone.
    while !answers.iter().any(|(_, s, _)| *s == 503) {
        answers.push(rx.recv().await.expect("answer"));
    }
    nats.restart().await;
    sender.await.expect("sender finished");
    while let Ok(a) = rx.try_recv() {
        answers.push(a);
    }
    assert_eq!(answers.len(), 400);

    let accepted: HashSet<String> = answers
        .iter()
        .filter(|(_, s, _)| *s == 202)
        .map(|(i, _, _)| format!("github:crash-{i}"))
        .collect();
    for (_, status, retry_after) in &answers {
        assert!(matches!(status, 202 | 503), "only 202 or 503, got {status}");
        if *status == 503 {
            assert!(retry_after, "503 carries Retry-After");
        }
    }
    assert!(!accepted.is_empty());
    let js = {
        drop(js);
        jetstream(&nats.url()).await
    };
    let stored: HashSet<String> = stored_events(&js)
        .await
        .into_iter()
        .map(|(_, e)| e.id)
        .collect();
    let lost: Vec<_> = accepted.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "events answered 202 but not stored: {lost:?}"
    );
}
