//! The delivery reconciler against a double of GitHub's deliveries API that delivers to
//! a real ingest on a real nats-server: an outage's deliveries become exactly one event
//! each after the next pass, deliveries that arrived are left alone, two reconcilers
//! never redeliver one delivery twice, rate limits and the budget are held, and a
//! delivery that keeps failing is reported lost.

use std::time::Duration;

use async_nats::jetstream;
use sluice_core::subjects;
use sluice_dispatcher::forge::ForgeConfig;
use sluice_dispatcher::metrics::{ForgeLabel, Metrics, Unrecoverable};
use sluice_dispatcher::recover::decide::{Reason, Record, State};
use sluice_dispatcher::recover::{Hook, Reconciler, RecoverConfig};
use sluice_tests::deliveries::GitHubHooks;
use sluice_tests::dispatcher::provision;
use sluice_tests::ingest::{jetstream as connect, Ingest};
use sluice_tests::nats::NatsServer;
use sluice_tests::recover::{events_by_id, ingest_ready, pass};
use sluice_tests::{fixture, init_logs, wait_for};
use time::OffsetDateTime;

/// A throwaway GitHub App key, made for this run only.
fn app_key() -> String {
    use rsa::pkcs1::{EncodeRsaPrivateKey, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("an RSA key");
    key.to_pkcs1_pem(LineEnding::LF).expect("PEM").to_string()
}

fn forge(api: &str, key: &str) -> ForgeConfig {
    ForgeConfig {
        github_app: Some(sluice_dispatcher::github::GitHubApp {
            id: 12345,
            private_key: secrecy::SecretString::from(key.to_owned()),
        }),
        github_api_url: api.to_owned(),
        ..ForgeConfig::default()
    }
}

fn config(holder: &str) -> RecoverConfig {
    RecoverConfig {
        hooks: vec![Hook::App],
        holder: holder.into(),
        interval: Duration::from_secs(60),
        requests_per_hour: 36_000,
        ..RecoverConfig::default()
    }
}

async fn reconciler(
    js: &jetstream::Context,
    hooks: &GitHubHooks,
    key: &str,
    config: RecoverConfig,
    metrics: &Metrics,
) -> Reconciler {
    Reconciler::new(
        js.clone(),
        &forge(&hooks.uri(), key),
        config,
        metrics.clone(),
    )
    .await
    .expect("reconciler")
}

async fn record(js: &jetstream::Context, guid: &str) -> Option<Record> {
    sluice_tests::recover::record(js, "github", guid).await
}

struct World {
    nats: NatsServer,
    js: jetstream::Context,
    ingest: Ingest,
    hooks: GitHubHooks,
    key: String,
}

async fn world(page_size: usize) -> World {
    init_logs();
    let nats = NatsServer::start().await;
    let js = connect(&nats.url()).await;
    provision(&js).await;
    let ingest = Ingest::start(&nats.url()).await;
    let hooks = GitHubHooks::start(&ingest.url("/webhooks/github"), page_size).await;
    World {
        nats,
        js,
        ingest,
        hooks,
        key: app_key(),
    }
}

#[tokio::test]
async fn an_outages_deliveries_become_exactly_one_event_each_after_the_next_pass() {
    let mut w = world(3).await;
    let body = fixture("github/push.json");
    for guid in ["before-1", "before-2"] {
        assert_eq!(w.hooks.deliver(guid, "push", &body).await, 202);
    }
    // Stored, but GitHub saw a timeout: the 2xx was lost on its way back.
    assert_eq!(
        w.hooks
            .deliver_answer_lost("answer-lost", "push", &body, 504)
            .await,
        202
    );
    // Older than the horizon: left alone.
    w.hooks.failed_at(
        "too-old",
        "push",
        &body,
        OffsetDateTime::now_utc() - time::Duration::hours(7),
    );

    w.nats.stop();
    let outage: Vec<String> = (1..=5).map(|i| format!("outage-{i}")).collect();
    for guid in &outage {
        let status = w.hooks.deliver(guid, "push", &body).await;
        assert_eq!(status, 503, "ingest refuses what it cannot store");
    }
    w.nats.restart().await;
    ingest_ready(&w.ingest).await;
    let js = connect(&w.nats.url()).await;
    let before = events_by_id(&js).await;
    assert_eq!(before.len(), 3, "{before:?}");

    let metrics = Metrics::default();
    let r = reconciler(&js, &w.hooks, &w.key, config("a"), &metrics).await;
    let now = OffsetDateTime::now_utc();
    let first = pass(&r, now).await;
    assert_eq!(first.redelivered, 5, "{first:?}");
    assert!(first.errors.is_empty(), "{first:?}");
    let redelivered = w.hooks.redeliveries();
    let mut guids: Vec<&String> = redelivered.keys().collect();
    guids.sort();
    assert_eq!(
        guids,
        outage.iter().collect::<Vec<_>>(),
        "only the outage's"
    );
    assert!(redelivered.values().all(|n| *n == 1));
    // The listing was read page by page with the cursor.
    let cursors: Vec<String> = w
        .hooks
        .received()
        .into_iter()
        .filter(|r| r.method == "GET")
        .map(|r| r.target)
        .collect();
    assert!(cursors.len() >= 3 && cursors[1] == "o3", "{cursors:?}");

    let after = events_by_id(&js).await;
    for guid in &outage {
        assert_eq!(after.get(&format!("github:{guid}")), Some(&1), "{after:?}");
    }
    assert_eq!(after.len(), 8, "{after:?}");
    assert!(after.values().all(|n| *n == 1), "one event each: {after:?}");

    // The next pass sees them stored: recovered, counted once, nothing redelivered.
    let second = pass(&r, now + time::Duration::minutes(2)).await;
    assert_eq!((second.recovered, second.redelivered), (5, 0), "{second:?}");
    let third = pass(&r, now + time::Duration::minutes(4)).await;
    assert_eq!((third.recovered, third.redelivered), (0, 0), "{third:?}");
    let recovered = metrics
        .deliveries_recovered
        .get_or_create(&ForgeLabel { forge: "github" })
        .get();
    assert_eq!(recovered, 5);
    assert_eq!(
        record(&js, "outage-1").await.map(|r| (r.state, r.attempts)),
        Some((State::Recovered, 1))
    );
    assert_eq!(record(&js, "answer-lost").await, None, "never acted on");
    assert_eq!(events_by_id(&js).await, after, "nothing more stored");
}

#[tokio::test]
async fn two_reconcilers_never_redeliver_one_delivery_twice_in_a_pass() {
    let w = world(4).await;
    let body = fixture("github/push.json");
    let now = OffsetDateTime::now_utc();
    let failed: Vec<String> = (1..=8).map(|i| format!("missed-{i}")).collect();
    for (i, guid) in failed.iter().enumerate() {
        w.hooks.failed_at(
            guid,
            "push",
            &body,
            now - time::Duration::minutes(i as i64 + 1),
        );
    }
    let metrics = Metrics::default();
    let a = reconciler(&w.js, &w.hooks, &w.key, config("a"), &metrics).await;
    let b = reconciler(&w.js, &w.hooks, &w.key, config("b"), &metrics).await;
    // Both at once, neither holding a lease: the claim alone keeps them apart.
    let (sa, sb) = tokio::join!(pass(&a, now), pass(&b, now));
    assert_eq!(sa.redelivered + sb.redelivered, 8, "{sa:?} {sb:?}");
    let redelivered = w.hooks.redeliveries();
    assert_eq!(redelivered.len(), 8);
    assert!(redelivered.values().all(|n| *n == 1), "{redelivered:?}");
    let posts = w
        .hooks
        .received()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 8, "no redelivery was even asked for twice");
    let stored = events_by_id(&w.js).await;
    assert_eq!(stored.len(), 8);
    assert!(stored.values().all(|n| *n == 1));
}

#[tokio::test]
async fn retry_after_and_the_budget_are_held() {
    let w = world(10).await;
    let body = fixture("github/push.json");
    let now = OffsetDateTime::now_utc();
    for i in 1..=3 {
        w.hooks.failed_at(
            &format!("limited-{i}"),
            "push",
            &body,
            now - time::Duration::minutes(i),
        );
    }
    w.hooks.rate_limit(1);
    let metrics = Metrics::default();
    let r = reconciler(&w.js, &w.hooks, &w.key, config("a"), &metrics).await;
    let first = pass(&r, now).await;
    assert_eq!(first.redelivered, 0, "{first:?}");
    assert!(first.deferred >= 1, "{first:?}");
    let after_limit = w.hooks.received();
    let limited_at = after_limit
        .iter()
        .find(|r| r.answered == 403)
        .expect("the rate limit was hit")
        .at;
    assert_eq!(
        after_limit.iter().filter(|r| r.method == "POST").count(),
        1,
        "the pass stops at the rate limit"
    );
    // Within Retry-After not one request is made; after it, all are redelivered.
    let mut later = now;
    let (hooks, r) = (&w.hooks, &r);
    wait_for(
        "every delivery redelivered",
        Duration::from_secs(20),
        || {
            later += time::Duration::minutes(2);
            async move {
                pass(r, later).await;
                (hooks.redeliveries().len() == 3).then_some(())
            }
        },
    )
    .await;
    let after = w.hooks.received();
    let next = after
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

    // A budget of 100 an hour allows a burst of 2: one page and one redelivery.
    for i in 1..=3 {
        w.hooks.failed_at(
            &format!("budget-{i}"),
            "push",
            &body,
            OffsetDateTime::now_utc(),
        );
    }
    let small = reconciler(
        &w.js,
        &w.hooks,
        &w.key,
        RecoverConfig {
            requests_per_hour: 100,
            ..config("small")
        },
        &metrics,
    )
    .await;
    let before = w.hooks.received().len();
    let s = pass(&small, OffsetDateTime::now_utc() + time::Duration::hours(1)).await;
    // The rest wait for the next pass.
    assert_eq!((s.redelivered, s.deferred), (1, 2), "{s:?}");
    assert_eq!(w.hooks.received().len() - before, 2);
}

#[tokio::test]
async fn a_delivery_that_keeps_failing_is_reported_lost_after_max_attempts() {
    let w = world(10).await;
    let body = fixture("github/push.json");
    let now = OffsetDateTime::now_utc();
    w.hooks.unreachable("broken");
    w.hooks
        .failed_at("broken", "push", &body, now - time::Duration::minutes(5));
    w.hooks.refuse("refused");
    w.hooks
        .failed_at("refused", "push", &body, now - time::Duration::minutes(5));
    let metrics = Metrics::default();
    let r = reconciler(
        &w.js,
        &w.hooks,
        &w.key,
        RecoverConfig {
            max_attempts: 2,
            ..config("a")
        },
        &metrics,
    )
    .await;
    let lost = |reason: &'static str| {
        metrics
            .deliveries_unrecoverable
            .get_or_create(&Unrecoverable {
                forge: "github",
                reason,
            })
            .get()
    };
    let s1 = pass(&r, now).await;
    assert_eq!((s1.redelivered, s1.lost), (1, 1), "{s1:?}");
    assert_eq!(lost("refused"), 1);
    // Spaced by the interval: a pass within it asks for nothing.
    let s = pass(&r, now + time::Duration::seconds(30)).await;
    assert_eq!((s.redelivered, s.lost), (0, 0), "{s:?}");
    let s2 = pass(&r, now + time::Duration::minutes(2)).await;
    assert_eq!((s2.redelivered, s2.lost), (1, 0), "{s2:?}");
    let s3 = pass(&r, now + time::Duration::minutes(4)).await;
    assert_eq!((s3.redelivered, s3.lost), (0, 1), "{s3:?}");
    assert_eq!(lost("attempts_exhausted"), 1);
    let s4 = pass(&r, now + time::Duration::minutes(6)).await;
    assert_eq!((s4.redelivered, s4.lost), (0, 0), "reported once: {s4:?}");
    assert_eq!(w.hooks.redeliveries().get("broken"), Some(&2));

    let broken = record(&w.js, "broken").await.expect("a record");
    assert_eq!(
        (broken.state, broken.reason, broken.attempts),
        (State::Lost, Some(Reason::AttemptsExhausted), 2)
    );
    let refused = record(&w.js, "refused").await.expect("a record");
    assert_eq!(
        (refused.state, refused.reason),
        (State::Lost, Some(Reason::Refused))
    );
    assert!(events_by_id(&w.js).await.is_empty());
}

#[tokio::test]
async fn one_replica_holds_the_lease_until_it_expires_or_is_given_up() {
    use sluice_dispatcher::recover::lease;
    init_logs();
    let nats = NatsServer::start().await;
    let js = connect(&nats.url()).await;
    provision(&js).await;
    let kv = js
        .get_key_value(subjects::DELIVERIES_BUCKET)
        .await
        .expect("bucket");
    let now = OffsetDateTime::now_utc();
    let ttl = Duration::from_secs(60);
    let take = |holder: &'static str, at: OffsetDateTime| {
        let kv = kv.clone();
        async move { lease::acquire(&kv, holder, at, ttl).await.expect("lease") }
    };
    // Both at once: exactly one wins.
    let (a, b) = tokio::join!(take("a", now), take("b", now));
    assert!(a ^ b, "a: {a}, b: {b}");
    let (holder, other) = if a { ("a", "b") } else { ("b", "a") };
    assert!(
        take(holder, now + time::Duration::seconds(30)).await,
        "renewed"
    );
    assert!(
        !take(other, now + time::Duration::seconds(80)).await,
        "renewal extended it"
    );
    assert!(
        take(other, now + time::Duration::seconds(91)).await,
        "expired: taken over"
    );
    assert!(!take(holder, now + time::Duration::seconds(92)).await);
    lease::release(&kv, other).await;
    assert!(
        take(holder, now + time::Duration::seconds(93)).await,
        "given up"
    );
}

#[tokio::test]
async fn the_budget_shared_with_the_commit_status_reporter_is_held_both_ways() {
    use sluice_core::Provider;
    use sluice_dispatcher::budget::ForgeBudget;
    use std::time::Instant;

    let w = world(10).await;
    let body = fixture("github/push.json");
    let now = OffsetDateTime::now_utc();
    w.hooks
        .failed_at("shared-1", "push", &body, now - time::Duration::minutes(1));
    let metrics = Metrics::default();
    // The reporter spent the shared budget (100 an hour: a burst of 2).
    let spent = ForgeBudget::new(100);
    for _ in 0..2 {
        assert_eq!(spent.take(Provider::Github, Instant::now()), Ok(()));
    }
    let r = reconciler(&w.js, &w.hooks, &w.key, config("a"), &metrics)
        .await
        .sharing(spent);
    let s = pass(&r, now).await;
    assert_eq!((s.listed, s.redelivered), (0, 0), "{s:?}");
    assert!(w.hooks.received().is_empty(), "not one request");

    // GitHub's rate limit met by the reconciler holds the reporter back too.
    let shared = ForgeBudget::new(36_000);
    w.hooks.rate_limit(1);
    let r = reconciler(&w.js, &w.hooks, &w.key, config("b"), &metrics)
        .await
        .sharing(shared.clone());
    let s = pass(&r, now).await;
    assert_eq!(s.redelivered, 0, "{s:?}");
    assert!(w.hooks.received().iter().any(|r| r.answered == 403));
    assert_eq!(
        shared.take(Provider::Github, Instant::now()),
        Err(None),
        "the reporter waits out Retry-After too"
    );
    assert_eq!(shared.take(Provider::Gitlab, Instant::now()), Ok(()));
}

#[tokio::test]
async fn two_dispatchers_with_recover_deliveries_redeliver_each_missed_delivery_once() {
    use sluice_tests::dispatcher::Dispatcher;

    let w = world(2).await;
    let body = fixture("github/push.json");
    let now = OffsetDateTime::now_utc();
    let missed: Vec<String> = (1..=4).map(|i| format!("missed-{i}")).collect();
    for guid in &missed {
        w.hooks
            .failed_at(guid, "push", &body, now - time::Duration::minutes(3));
    }
    assert_eq!(w.hooks.deliver("arrived", "push", &body).await, 202);
    let start = |holder: &str| {
        let mut config = Dispatcher::config(&w.nats.url());
        config.forge = forge(&w.hooks.uri(), &w.key);
        config.recover = Some(RecoverConfig {
            interval: Duration::from_millis(200),
            ..self::config(holder)
        });
        Dispatcher::start_with(config)
    };
    let (a, b) = (start("d-1").await, start("d-2").await);
    let js = &w.js;
    wait_for(
        "every missed delivery stored",
        Duration::from_secs(30),
        || async {
            let stored = events_by_id(js).await;
            missed
                .iter()
                .all(|g| stored.contains_key(&format!("github:{g}")))
                .then_some(stored)
        },
    )
    .await;
    // Until every record says recovered: no redelivery is still in flight.
    wait_for(
        "every record recovered",
        Duration::from_secs(30),
        || async {
            for guid in &missed {
                if record(js, guid).await.map(|r| r.state) != Some(State::Recovered) {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    a.stop().await;
    b.stop().await;
    let redelivered = w.hooks.redeliveries();
    assert_eq!(redelivered.len(), 4, "{redelivered:?}");
    assert!(redelivered.values().all(|n| *n == 1), "{redelivered:?}");
    let stored = events_by_id(js).await;
    assert_eq!(stored.len(), 5, "{stored:?}");
    assert!(stored.values().all(|n| *n == 1), "{stored:?}");
    let kv = js
        .get_key_value(subjects::DELIVERIES_BUCKET)
        .await
        .expect("bucket");
    let lease = kv
        .get(sluice_dispatcher::recover::LEASE_KEY)
        .await
        .expect("read");
    assert!(
        lease.is_none_or(|v| v.is_empty()),
        "the holder gave the lease up on shutdown"
    );
}
