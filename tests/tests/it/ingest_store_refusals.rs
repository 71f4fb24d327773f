//! What the forge is told when JetStream refuses an event for good: a retry cannot
//! succeed, so the answer says so (413) instead of asking for one (503).

use sluice_core::subjects;
use sluice_tests::dispatcher::provision;
use sluice_tests::ingest::{jetstream, stored_count, Ingest};
use sluice_tests::nats::NatsServer;
use sluice_tests::{fixture, init_logs};

#[tokio::test]
async fn an_event_larger_than_the_events_stream_takes_is_answered_413_without_retry_after() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    // An operator's stream that takes smaller messages than the server does: ingest
    // does not store such an event by reference, and JetStream refuses it.
    let mut stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("events stream");
    let mut config = stream.info().await.expect("info").config.clone();
    config.max_message_size = 6 * 1024;
    js.update_stream(config).await.expect("update the stream");
    let ingest = Ingest::start(&nats.url()).await;

    let big = fixture("github/push.with-new-branch.json");
    assert!(big.len() > 6 * 1024);
    let r = ingest.post_github("push", "big-1", &big).await;
    assert_eq!(r.status().as_u16(), 413);
    assert!(
        r.headers().get("retry-after").is_none(),
        "no retry asked for"
    );
    let body: serde_json::Value = r.json().await.expect("JSON body");
    assert_eq!(
        body["error"], "the event is larger than the events stream accepts",
        "{body}"
    );

    // A delivery that fits is stored as ever.
    let small = br#"{"ref": "refs/heads/main", "after": "0123456789abcdef0123456789abcdef01234567", "repository": {"full_name": "acme/app", "clone_url": "https://github.com/acme/app.git"}, "commits": []}"#;
    let r = ingest.post_github("push", "small-1", small).await;
    assert_eq!(r.status().as_u16(), 202);
    assert_eq!(stored_count(&js).await, 1);

    let metrics = ingest.metrics().await;
    assert!(
        metrics
            .contains(r#"sluice_ingest_requests_total{provider="github",outcome="too_large"} 1"#),
        "{metrics}"
    );
}
