//! Shutdown with events in hand: the dispatcher stops taking events, finishes what it
//! can within its grace period, hands back the rest, and exits in time; after a
//! restart every event has been dispatched exactly once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::json;
use sluice_core::run::run_id;
use sluice_core::{subjects, Event, Provider};
use sluice_dispatcher::forge::ForgeConfig;
use sluice_tests::dispatcher::{
    apply, decision, provision, publish_event, run_requests, Dispatcher,
};
use sluice_tests::ingest::jetstream;
use sluice_tests::nats::NatsServer;
use sluice_tests::{init_logs, wait_for};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

const PIPELINES: &str = r#"
name: docs
triggers:
  - kinds: [pull_request]
    paths: ["docs/**"]
steps:
  - { name: s, image: alpine }
---
name: build
triggers:
  - kinds: [push]
steps:
  - { name: s, image: alpine }
"#;

/// Pull requests: the dispatcher asks the forge for their files before it decides.
const PULL_REQUESTS: u64 = 6;
/// Pushes list their files: decided at once.
const PUSHES: u64 = 6;

fn pull_request(n: u64) -> Event {
    let mut e = Event::new(Provider::Github, &format!("pr-{n}"), "pull_request");
    e.repo = Some("acme/app".into());
    e.pr = Some(n);
    e.sha = Some(format!("{n:040}"));
    e.action = Some("opened".into());
    e.base_ref = Some("refs/heads/main".into());
    e
}

fn push(n: u64) -> Event {
    let mut e = Event::new(Provider::Github, &format!("push-{n}"), "push");
    e.repo = Some("acme/app".into());
    e.git_ref = Some("refs/heads/main".into());
    e.sha = Some(format!("{n:040}"));
    e.changed_files = Some(vec!["src/lib.rs".into()]);
    e.changed_files_complete = true;
    e
}

/// A GitHub double answering "list pull request files" after `delay`.
async fn github(delay: Duration) -> MockServer {
    let server = MockServer::start().await;
    let file = json!({
        "sha": "bbcd538c8e72b8c175046e27cc8f907076331401",
        "filename": "docs/guide.md",
        "status": "modified",
        "additions": 1,
        "deletions": 0,
        "changes": 1,
        "blob_url": "https://github.com/acme/app/blob/abc/docs/guide.md",
        "raw_url": "https://github.com/acme/app/raw/abc/docs/guide.md",
        "contents_url": "https://api.github.com/repos/acme/app/contents/docs/guide.md?ref=abc",
        "patch": "@@ -1 +1 @@"
    });
    Mock::given(method("GET"))
        .and(path_regex(r"^/repos/acme/app/pulls/\d+/files$"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!([file]))
                .set_delay(delay),
        )
        .mount(&server)
        .await;
    server
}

fn config(nats_url: &str, github: &MockServer) -> sluice_dispatcher::DispatcherConfig {
    sluice_dispatcher::DispatcherConfig {
        forge: ForgeConfig {
            github_token: Some(SecretString::from("gh-token")),
            github_api_url: github.uri(),
            // Longer than the slow double's delay: only the grace period ends the wait.
            timeout: Duration::from_secs(120),
            ..ForgeConfig::default()
        },
        shutdown_grace: Duration::from_secs(1),
        // Longer than the test: an event not handed back would not come back in time.
        ack_wait: Duration::from_secs(30),
        ..Dispatcher::config(nats_url)
    }
}

#[tokio::test]
async fn shutdown_hands_back_events_in_hand_and_each_is_dispatched_once_after_a_restart() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(&js, PIPELINES).await;

    // The first dispatcher's forge answers only after a minute: its pull requests are
    // in hand when it is told to stop.
    let slow = github(Duration::from_secs(60)).await;
    let first = Dispatcher::start_with(config(&nats.url(), &slow)).await;
    for n in 0..PUSHES {
        publish_event(&js, &push(n)).await;
    }
    for n in 0..PULL_REQUESTS {
        publish_event(&js, &pull_request(n)).await;
    }
    let asked = &slow;
    wait_for(
        "every pull request waiting on the forge",
        Duration::from_secs(20),
        || async move {
            let asked = asked.received_requests().await.map_or(0, |r| r.len());
            (asked as u64 >= PULL_REQUESTS).then_some(())
        },
    )
    .await;
    for n in 0..PUSHES {
        let id = format!("github:push-{n}");
        wait_for("the pushes decided", Duration::from_secs(20), || {
            decision(&js, &id)
        })
        .await;
    }

    // SIGTERM, as the token the signal trips.
    let stopping = Instant::now();
    first.stop().await;
    let took = stopping.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "stopped in {took:?}, past its 1 s grace period (+ handing back)"
    );
    for n in 0..PULL_REQUESTS {
        assert!(
            decision(&js, &format!("github:pr-{n}")).await.is_none(),
            "pr-{n} was not decided by the dispatcher that stopped"
        );
    }

    // A restarted dispatcher takes what was handed back at once (no ack wait).
    let fast = github(Duration::ZERO).await;
    let second = Dispatcher::start_with(config(&nats.url(), &fast)).await;
    for n in 0..PULL_REQUESTS {
        let id = format!("github:pr-{n}");
        wait_for("the pull requests decided", Duration::from_secs(10), || {
            decision(&js, &id)
        })
        .await;
    }
    second.stop().await;

    // Exactly once: one run per event, and each published for the first time (a second
    // dispatch of an event would find its run id stored and record a duplicate).
    let runs = run_requests(&js).await;
    let mut per_run: HashMap<String, usize> = HashMap::new();
    for (_, r) in &runs {
        *per_run.entry(r.run_id.clone()).or_default() += 1;
    }
    assert_eq!(runs.len() as u64, PUSHES + PULL_REQUESTS, "{runs:?}");
    for n in 0..PUSHES {
        let event = format!("github:push-{n}");
        assert_eq!(
            per_run.get(&run_id(&event, "build", 0)),
            Some(&1),
            "{event}"
        );
        let d = decision(&js, &event).await.expect("decided");
        assert_eq!(d.runs.len(), 1);
        assert_eq!(d.runs[0].outcome, "published", "{event}");
    }
    for n in 0..PULL_REQUESTS {
        let event = format!("github:pr-{n}");
        assert_eq!(per_run.get(&run_id(&event, "docs", 0)), Some(&1), "{event}");
        let d = decision(&js, &event).await.expect("decided");
        assert_eq!(d.runs.len(), 1);
        assert_eq!(d.runs[0].outcome, "published", "{event}");
    }
    // Nothing left in hand or waiting, nothing dead-lettered.
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("events stream")
        .get_consumer(subjects::DISPATCHER_CONSUMER)
        .await
        .expect("consumer");
    let info = consumer.info().await.expect("consumer info");
    assert_eq!((info.num_pending, info.num_ack_pending), (0, 0));
    assert_eq!(
        sluice_tests::dispatcher::count(&js, subjects::DEADLETTER_STREAM).await,
        0
    );
}
