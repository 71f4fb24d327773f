//! The delivery reconciler for a GitLab project hook, against a double of GitLab's hook
//! events API that delivers to a real ingest on a real nats-server: an outage's
//! deliveries become exactly one event each after the next pass (under the event id
//! ingest gives them, from `Idempotency-Key`), deliveries that arrived are left alone,
//! GitLab's resend rate limit is waited out, and a delivery that keeps failing is
//! reported lost.

use std::time::Duration;

use async_nats::jetstream;
use secrecy::SecretString;
use sluice_dispatcher::forge::ForgeConfig;
use sluice_dispatcher::metrics::{ForgeLabel, Metrics, Unrecoverable};
use sluice_dispatcher::recover::decide::{Reason, Record, State};
use sluice_dispatcher::recover::{Hook, Reconciler, RecoverConfig};
use sluice_tests::dispatcher::provision;
use sluice_tests::gitlab_hooks::{GitLabHooks, API_TOKEN, HOOK_ID, PROJECT};
use sluice_tests::ingest::{jetstream as connect, Ingest};
use sluice_tests::nats::NatsServer;
use sluice_tests::recover::{events_by_id, ingest_ready, pass};
use sluice_tests::{fixture, init_logs, wait_for};
use time::OffsetDateTime;

const PUSH: &str = "Push Hook";

fn forge(api: &str, token: &str) -> ForgeConfig {
    ForgeConfig {
        gitlab_token: Some(SecretString::from(token.to_owned())),
        gitlab_api_url: api.to_owned(),
        ..ForgeConfig::default()
    }
}

fn config(holder: &str) -> RecoverConfig {
    RecoverConfig {
        // As the flag takes it.
        hooks: vec![Hook::parse(&format!("gitlab:{PROJECT}:{HOOK_ID}")).expect("a hook")],
        holder: holder.into(),
        interval: Duration::from_secs(60),
        requests_per_hour: 36_000,
        ..RecoverConfig::default()
    }
}

async fn reconciler(
    js: &jetstream::Context,
    hooks: &GitLabHooks,
    config: RecoverConfig,
    metrics: &Metrics,
) -> Reconciler {
    Reconciler::new(
        js.clone(),
        &forge(&hooks.uri(), API_TOKEN),
        config,
        metrics.clone(),
    )
    .await
    .expect("reconciler")
}

async fn record(js: &jetstream::Context, key: &str) -> Option<Record> {
    sluice_tests::recover::record(js, "gitlab", key).await
}

struct World {
    nats: NatsServer,
    js: jetstream::Context,
    ingest: Ingest,
    hooks: GitLabHooks,
}

async fn world(page_size: usize) -> World {
    init_logs();
    let nats = NatsServer::start().await;
    let js = connect(&nats.url()).await;
    provision(&js).await;
    let ingest = Ingest::start(&nats.url()).await;
    let hooks = GitLabHooks::start(&ingest.url("/webhooks/gitlab"), page_size).await;
    World {
        nats,
        js,
        ingest,
        hooks,
    }
}

#[tokio::test]
async fn an_outages_gitlab_deliveries_become_exactly_one_event_each_after_the_next_pass() {
    let mut w = world(3).await;
    let body = fixture("gitlab/push-event.json");
    for key in ["before-1", "before-2"] {
        assert_eq!(w.hooks.deliver(key, PUSH, &body).await, 202);
    }
    // Stored, but GitLab saw no answer in time (it logs `internal error`).
    assert_eq!(
        w.hooks
            .deliver_answer_lost("answer-lost", PUSH, &body, 0)
            .await,
        202
    );
    // Older than the horizon: left alone, and the listing reads no further.
    w.hooks.failed_at(
        "too-old",
        PUSH,
        &body,
        OffsetDateTime::now_utc() - time::Duration::hours(7),
    );

    w.nats.stop();
    let outage: Vec<String> = (1..=5).map(|i| format!("outage-{i}")).collect();
    for key in &outage {
        let status = w.hooks.deliver(key, PUSH, &body).await;
        assert_eq!(status, 503, "ingest refuses what it cannot store");
    }
    w.nats.restart().await;
    ingest_ready(&w.ingest).await;
    let js = connect(&w.nats.url()).await;
    let before = events_by_id(&js).await;
    assert_eq!(before.len(), 3, "{before:?}");

    let metrics = Metrics::default();
    let r = reconciler(&js, &w.hooks, config("a"), &metrics).await;
    let now = OffsetDateTime::now_utc();
    let first = pass(&r, now).await;
    assert!(first.errors.is_empty(), "{first:?}");
    assert_eq!((first.listed, first.redelivered), (9, 5), "{first:?}");
    let resent = w.hooks.resends();
    let mut keys: Vec<&String> = resent.keys().collect();
    keys.sort();
    assert_eq!(keys, outage.iter().collect::<Vec<_>>(), "only the outage's");
    assert!(resent.values().all(|n| *n == 1), "{resent:?}");
    // Read page by page (x-next-page), up to the page that reaches past the horizon.
    let pages: Vec<String> = w
        .hooks
        .received()
        .into_iter()
        .filter(|r| r.method == "GET")
        .map(|r| r.target)
        .collect();
    assert_eq!(pages, ["1", "2", "3"]);

    let after = events_by_id(&js).await;
    for key in &outage {
        assert_eq!(after.get(&format!("gitlab:{key}")), Some(&1), "{after:?}");
    }
    assert_eq!(after.len(), 8, "{after:?}");
    assert!(after.values().all(|n| *n == 1), "one event each: {after:?}");
    assert!(
        after.keys().all(|id| !id.starts_with("gitlab:uuid-")),
        "stored under the Idempotency-Key, as the listing maps it: {after:?}"
    );

    // The next pass sees them stored: recovered, counted once, nothing resent.
    let second = pass(&r, now + time::Duration::minutes(2)).await;
    assert_eq!((second.recovered, second.redelivered), (5, 0), "{second:?}");
    let third = pass(&r, now + time::Duration::minutes(4)).await;
    assert_eq!((third.recovered, third.redelivered), (0, 0), "{third:?}");
    let recovered = |forge| {
        metrics
            .deliveries_recovered
            .get_or_create(&ForgeLabel { forge })
            .get()
    };
    assert_eq!((recovered("gitlab"), recovered("github")), (5, 0));
    assert_eq!(
        record(&js, "outage-1")
            .await
            .map(|r| (r.state, r.attempts, r.hook)),
        Some((State::Recovered, 1, format!("gitlab:{PROJECT}:{HOOK_ID}")))
    );
    assert_eq!(record(&js, "answer-lost").await, None, "never acted on");
    assert_eq!(record(&js, "before-1").await, None);
    assert_eq!(events_by_id(&js).await, after, "nothing more stored");
}

#[tokio::test]
async fn a_gitlab_delivery_that_keeps_failing_is_reported_lost_after_max_attempts() {
    let w = world(10).await;
    let body = fixture("gitlab/push-event.json");
    let now = OffsetDateTime::now_utc();
    w.hooks.unreachable("broken");
    w.hooks
        .failed_at("broken", PUSH, &body, now - time::Duration::minutes(5));
    let metrics = Metrics::default();
    let r = reconciler(
        &w.js,
        &w.hooks,
        RecoverConfig {
            max_attempts: 2,
            ..config("a")
        },
        &metrics,
    )
    .await;
    let lost = || {
        metrics
            .deliveries_unrecoverable
            .get_or_create(&Unrecoverable {
                forge: "gitlab",
                reason: "attempts_exhausted",
            })
            .get()
    };
    let s1 = pass(&r, now).await;
    assert_eq!((s1.redelivered, s1.lost), (1, 0), "{s1:?}");
    // Spaced by the interval: a pass within it asks for nothing.
    let s = pass(&r, now + time::Duration::seconds(30)).await;
    assert_eq!((s.redelivered, s.lost), (0, 0), "{s:?}");
    let s2 = pass(&r, now + time::Duration::minutes(2)).await;
    assert_eq!((s2.redelivered, s2.lost), (1, 0), "{s2:?}");
    assert_eq!(lost(), 0);
    let s3 = pass(&r, now + time::Duration::minutes(4)).await;
    assert_eq!((s3.redelivered, s3.lost), (0, 1), "{s3:?}");
    assert_eq!(lost(), 1);
    let s4 = pass(&r, now + time::Duration::minutes(6)).await;
    assert_eq!((s4.redelivered, s4.lost), (0, 0), "reported once: {s4:?}");
    assert_eq!(w.hooks.resends().get("broken"), Some(&2));

    let broken = record(&w.js, "broken").await.expect("a record");
    assert_eq!(
        (broken.state, broken.reason, broken.attempts),
        (State::Lost, Some(Reason::AttemptsExhausted), 2)
    );
    // What `sluice events lost` reads.
    let report = sluice_dispatcher::recover::lost(&w.js)
        .await
        .expect("report");
    let ids: Vec<String> = report
        .lost
        .iter()
        .map(|r| format!("{}:{}", r.forge, r.guid))
        .collect();
    assert_eq!(ids, ["gitlab:broken"]);
    assert!(events_by_id(&w.js).await.is_empty());
}

#[tokio::test]
async fn gitlabs_resend_rate_limit_is_waited_out() {
    let w = world(10).await;
    let body = fixture("gitlab/push-event.json");
    let now = OffsetDateTime::now_utc();
    for i in 1..=3 {
        w.hooks.failed_at(
            &format!("limited-{i}"),
            PUSH,
            &body,
            now - time::Duration::minutes(i),
        );
    }
    w.hooks.rate_limit(1);
    let metrics = Metrics::default();
    let r = reconciler(&w.js, &w.hooks, config("a"), &metrics).await;
    let first = pass(&r, now).await;
    assert_eq!(first.redelivered, 0, "{first:?}");
    assert!(first.deferred >= 1, "{first:?}");
    let after_limit = w.hooks.received();
    let limited_at = after_limit
        .iter()
        .find(|r| r.answered == 429)
        .expect("the rate limit was hit")
        .at;
    assert_eq!(
        after_limit.iter().filter(|r| r.method == "POST").count(),
        1,
        "the pass stops at the rate limit"
    );
    let mut later = now;
    let (hooks, r) = (&w.hooks, &r);
    wait_for("every delivery resent", Duration::from_secs(20), || {
        later += time::Duration::minutes(2);
        async move {
            pass(r, later).await;
            (hooks.resends().len() == 3).then_some(())
        }
    })
    .await;
    let next = w
        .hooks
        .received()
        .iter()
        .filter(|r| r.at > limited_at)
        .map(|r| r.at)
        .min()
        .expect("requests after the limit");
    assert!(
        next.duration_since(limited_at) >= Duration::from_secs(1),
        "a request {:?} after Retry-After: 1",
        next.duration_since(limited_at)
    );
    let stored = events_by_id(&w.js).await;
    assert_eq!(stored.len(), 3, "{stored:?}");
    assert!(stored.values().all(|n| *n == 1));
}

#[tokio::test]
async fn a_gitlab_hook_needs_the_token_and_a_wrong_one_is_reported() {
    let w = world(10).await;
    let metrics = Metrics::default();
    let none = Reconciler::new(
        w.js.clone(),
        &ForgeConfig {
            gitlab_api_url: w.hooks.uri(),
            ..ForgeConfig::default()
        },
        config("a"),
        metrics.clone(),
    )
    .await;
    let err = none.expect_err("no token").to_string();
    assert!(err.contains("GitLab"), "{err}");

    let wrong = Reconciler::new(
        w.js.clone(),
        &forge(&w.hooks.uri(), "glpat-wrong"),
        config("a"),
        metrics.clone(),
    )
    .await
    .expect("reconciler");
    let s = pass(&wrong, OffsetDateTime::now_utc()).await;
    assert_eq!(s.errors.len(), 1, "{s:?}");
    assert!(s.errors[0].contains("401"), "{s:?}");
    assert!(
        !s.errors[0].contains("glpat-wrong"),
        "no secret in errors: {s:?}"
    );
}
