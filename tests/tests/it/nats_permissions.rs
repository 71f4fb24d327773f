//! The permission lists of `sluice nats init` against a real `nats-server` started from
//! the files it writes: with each role's seed, a plain NATS client attempts what the
//! role may do (it works, with no permission violation) and what it may not (the server
//! refuses it: a permission violation naming the subject, or a JetStream error, and
//! nothing changes). Then `cluster add/remove` and rotation take effect on a reload.

use std::future::{Future, IntoFuture};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, Consumer, PullConsumer};
use async_nats::jetstream::{self, stream::Config};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use sluice_core::roles::Role;
use sluice_core::streams::{ClusterConsumer, StreamSettings};
use sluice_core::subjects;
use sluice_tests::auth::{nats_admin, AuthNats, Probe, REFUSED_WITHIN};
use sluice_tests::{init_logs, wait_for};
use tokio::io::AsyncReadExt;

fn runner(cluster: &str) -> Role {
    Role::Runner(cluster.into())
}

/// A server for clusters `a` and `b`, provisioned with the admin seed the way
/// `sluice streams apply --clusters a,b` does.
async fn provisioned() -> (AuthNats, Probe) {
    init_logs();
    let server = AuthNats::start(&["a", "b"]).await;
    let admin = Probe::connect(&server, &Role::Admin).await;
    let settings = StreamSettings {
        clusters: vec![ClusterConsumer::new("a"), ClusterConsumer::new("b")],
        ..Default::default()
    };
    sluice_core::streams::apply(&admin.js, &settings, false)
        .await
        .expect("streams apply with the admin seed");
    (server, admin)
}

async fn publish_acked(js: &jetstream::Context, subject: String, body: &'static str) -> u64 {
    js.publish(subject.clone(), body.into())
        .await
        .unwrap_or_else(|e| panic!("publish {subject}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("ack of {subject}: {e}"))
        .sequence
}

/// A named ordered consumer, as readers of a run's states and logs create them.
fn ordered(name: Option<&str>, filter: &str) -> pull::OrderedConfig {
    pull::OrderedConfig {
        name: name.map(str::to_owned),
        filter_subject: filter.to_owned(),
        ..Default::default()
    }
}

/// The payloads of the first `n` messages of an ordered consumer.
async fn read(consumer: Consumer<pull::OrderedConfig>, n: usize) -> Vec<String> {
    let messages = consumer
        .messages()
        .await
        .expect("ordered consumer messages");
    tokio::time::timeout(Duration::from_secs(5), messages.take(n).collect::<Vec<_>>())
        .await
        .expect("messages within 5s")
        .into_iter()
        .map(|m| String::from_utf8_lossy(&m.expect("message").payload).into_owned())
        .collect()
}

/// One operation the role may not do, and the publish subject the server should name in
/// its permission violation (none when the server answers with a JetStream error).
struct Attempt<'a> {
    what: String,
    violation: Option<String>,
    run: BoxFuture<'a, Result<(), String>>,
}

fn attempt<'a, T, E, F>(what: impl Into<String>, violation: Option<String>, f: F) -> Attempt<'a>
where
    E: std::fmt::Display,
    F: Future<Output = Result<T, E>> + Send + 'a,
{
    Attempt {
        what: what.into(),
        violation,
        // A refused publish gets no reply: the wait is bounded by the probe's request
        // timeout, and by this one for calls that make several requests.
        run: async move {
            match tokio::time::timeout(REFUSED_WITHIN * 3, f).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer".into()),
            }
        }
        .boxed(),
    }
}

/// A raw request with a deadline (a refused one is never answered).
async fn request(probe: &Probe, subject: String, body: String) -> Result<String, String> {
    match tokio::time::timeout(REFUSED_WITHIN, probe.client.request(subject, body.into())).await {
        Ok(Ok(reply)) => {
            let text = String::from_utf8_lossy(&reply.payload).into_owned();
            // JetStream answers refusals of the request itself with an error body.
            if text.contains("\"error\"") {
                Err(text)
            } else {
                Ok(text)
            }
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

/// Runs every attempt at once and fails naming each one the server allowed, then checks
/// that each expected violation was reported.
async fn all_refused(probe: &Probe, attempts: Vec<Attempt<'_>>) {
    let (names, runs): (Vec<_>, Vec<_>) = attempts
        .into_iter()
        .map(|a| ((a.what, a.violation), a.run))
        .unzip();
    let results = futures::future::join_all(runs).await;
    let allowed: Vec<&String> = names
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_ok())
        .map(|((what, _), _)| what)
        .collect();
    assert!(
        allowed.is_empty(),
        "allowed but should be refused: {allowed:?}"
    );
    for (what, violation) in &names {
        if let Some(subject) = violation {
            tokio::time::timeout(Duration::from_secs(6), probe.publish_refused(subject))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{what}: no violation for {subject}; errors: {:?}",
                        probe.errors()
                    )
                });
        }
    }
}

/// Publishes (core NATS, no ack) to each subject and waits for the server's violation.
async fn publishes_refused(probe: &Probe, subjects: &[String]) {
    for subject in subjects {
        probe
            .client
            .publish(subject.clone(), "forbidden".into())
            .await
            .expect("publish is sent");
    }
    probe.client.flush().await.expect("flush");
    for subject in subjects {
        probe.publish_refused(subject).await;
    }
}

fn violations(probe: &Probe) -> Vec<String> {
    probe
        .errors()
        .into_iter()
        .filter(|e| e.contains("Permissions Violation"))
        .collect()
}

#[tokio::test]
async fn a_runner_does_its_own_clusters_work() {
    let (server, admin) = provisioned().await;
    let run_a = publish_acked(&admin.js, subjects::runs("a"), "run for a").await;
    publish_acked(&admin.js, subjects::cancel("a"), "cancel r1").await;
    let probe = Probe::connect(&server, &runner("a")).await;
    let js = &probe.js;

    js.query_account().await.expect("account info");
    // States, logs and child requests of its own cluster, with JetStream's ack.
    publish_acked(js, subjects::status("a", "r1"), "running").await;
    publish_acked(js, subjects::logs("a", "r1"), "line 1").await;
    publish_acked(js, subjects::child_request("a", "r1"), "start child").await;

    // Its own runs: consumer info, pull, ack (double ack: the server confirms it).
    let consumer: PullConsumer = js
        .get_consumer_from_stream(subjects::runner_consumer("a"), subjects::RUNS_STREAM)
        .await
        .expect("info of its own consumer");
    let mut batch = consumer
        .fetch()
        .max_messages(1)
        .messages()
        .await
        .expect("pull from its own consumer");
    let message = batch.next().await.expect("one run").expect("run message");
    assert_eq!(&message.payload[..], b"run for a");
    assert_eq!(message.info().expect("metadata").stream_sequence, run_a);
    message
        .ack_with(jetstream::AckKind::Progress)
        .await
        .expect("progress");
    message
        .double_ack()
        .await
        .expect("ack confirmed by the server");

    // Heartbeats in its own cluster's keys.
    let runners = js
        .get_key_value(subjects::RUNNERS_BUCKET)
        .await
        .expect("open the runners bucket");
    runners
        .put(subjects::runner_key("a", "runner-1"), "alive".into())
        .await
        .expect("heartbeat");

    // Its own runs' stored states and logs, and its control messages, through named
    // ordered consumers on streams opened without STREAM.INFO.
    for (i, (stream, filter, want)) in [
        (
            subjects::STATUS_STREAM,
            subjects::status("a", "r1"),
            "running",
        ),
        (
            subjects::STATUS_STREAM,
            subjects::status("a", ">"),
            "running",
        ),
        (subjects::LOGS_STREAM, subjects::logs("a", "r1"), "line 1"),
        (
            subjects::CONTROL_STREAM,
            subjects::control("a"),
            "cancel r1",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let stream = js.get_stream_no_info(stream).await.expect("stream handle");
        let name = format!("read-{i}");
        let consumer = stream
            .create_consumer(ordered(Some(&name), &filter))
            .await
            .unwrap_or_else(|e| panic!("ordered consumer on {filter}: {e}"));
        assert_eq!(consumer.cached_info().num_pending, 1, "{filter}");
        assert_eq!(read(consumer, 1).await, [want], "{filter}");
    }
    // A run's last state by subject, as it checks before starting the run.
    let status = js
        .get_stream_no_info(subjects::STATUS_STREAM)
        .await
        .expect("stream handle");
    let last = status
        .direct_get_last_for_subject(subjects::status("a", "r1"))
        .await
        .expect("direct get of its own run's last state");
    assert_eq!(&last.payload[..], b"running");
    assert!(violations(&probe).is_empty(), "{:?}", violations(&probe));
}

#[tokio::test]
async fn a_runner_is_refused_everything_outside_its_cluster() {
    let (server, admin) = provisioned().await;
    publish_acked(&admin.js, subjects::runs("b"), "run for b").await;
    publish_acked(&admin.js, subjects::status("b", "r2"), "b's state").await;
    admin
        .js
        .get_key_value(subjects::PIPELINES_BUCKET)
        .await
        .expect("pipelines")
        .put("app", "name: app".into())
        .await
        .expect("pipeline");
    let probe = Probe::connect(&server, &runner("a")).await;
    let js = &probe.js;
    let api = |path: &str| format!("$JS.API.{path}");

    publishes_refused(
        &probe,
        &[
            subjects::status("b", "r2"),
            subjects::logs("b", "r2"),
            subjects::child_request("b", "r2"),
            subjects::event("github", "push"),
            subjects::event("manual", "push"),
            subjects::runs("a"),
            subjects::runs("b"),
            subjects::cancel("a"),
            subjects::cancel("b"),
            subjects::decision("github:1"),
            subjects::DEADLETTER_EVENTS.to_owned(),
            format!(
                "$KV.{}.{}",
                subjects::RUNNERS_BUCKET,
                subjects::runner_key("b", "r")
            ),
            format!("$KV.{}.app", subjects::PIPELINES_BUCKET),
            format!("$O.{}.M.x", subjects::PAYLOADS_BUCKET),
            "$JS.ACK.SLUICE_RUNS.sluice-runner-b.1.1.1.1.0".into(),
            "$JS.ACK._.HASH.SLUICE_RUNS.sluice-runner-b.1.1.1.1.0.token".into(),
        ],
    )
    .await;

    let status = js
        .get_stream_no_info(subjects::STATUS_STREAM)
        .await
        .expect("handle");
    let logs = js
        .get_stream_no_info(subjects::LOGS_STREAM)
        .await
        .expect("handle");
    let events = js
        .get_stream_no_info(subjects::EVENTS_STREAM)
        .await
        .expect("handle");
    let runs = js
        .get_stream_no_info(subjects::RUNS_STREAM)
        .await
        .expect("handle");
    let mut changed_status = StreamSettings::default().status();
    changed_status.max_age = Duration::from_secs(60);
    let mut changed_consumer = ClusterConsumer::new("a").config();
    changed_consumer.ack_wait = Duration::from_secs(3600);
    let pull_body = r#"{"batch":1,"expires":1000000000}"#.to_owned();
    let create = |stream: &str, name: &str, filter: &str| {
        serde_json::json!({"stream_name": stream, "action": "create", "config": {
            "name": name, "filter_subject": filter, "ack_policy": "none", "deliver_policy": "all"}})
        .to_string()
    };
    let attempts = vec![
        attempt(
            "pull from cluster b's consumer",
            Some(api("CONSUMER.MSG.NEXT.SLUICE_RUNS.sluice-runner-b")),
            request(
                &probe,
                api("CONSUMER.MSG.NEXT.SLUICE_RUNS.sluice-runner-b"),
                pull_body.clone(),
            ),
        ),
        attempt(
            "info of cluster b's consumer",
            Some(api("CONSUMER.INFO.SLUICE_RUNS.sluice-runner-b")),
            js.get_consumer_from_stream::<pull::Config, _, _>("sluice-runner-b", "SLUICE_RUNS"),
        ),
        attempt(
            "info of SLUICE_RUNS (every cluster's backlog)",
            Some(api("STREAM.INFO.SLUICE_RUNS")),
            js.get_stream(subjects::RUNS_STREAM),
        ),
        attempt(
            "open SLUICE_PIPELINES",
            Some(api("STREAM.INFO.KV_SLUICE_PIPELINES")),
            js.get_key_value(subjects::PIPELINES_BUCKET),
        ),
        attempt(
            "read a pipeline directly",
            Some(api(
                "DIRECT.GET.KV_SLUICE_PIPELINES.$KV.SLUICE_PIPELINES.app",
            )),
            request(
                &probe,
                api("DIRECT.GET.KV_SLUICE_PIPELINES.$KV.SLUICE_PIPELINES.app"),
                String::new(),
            ),
        ),
        attempt(
            "read cluster b's run state directly",
            Some(api("DIRECT.GET.SLUICE_STATUS.sluice.status.b.r2")),
            status.direct_get_last_for_subject(subjects::status("b", "r2")),
        ),
        attempt(
            "read any run's state directly, by a body naming the subject",
            Some(api("DIRECT.GET.SLUICE_STATUS")),
            request(
                &probe,
                api("DIRECT.GET.SLUICE_STATUS"),
                r#"{"last_by_subj":"sluice.status.b.r2"}"#.to_owned(),
            ),
        ),
        attempt(
            "info of SLUICE_EVENTS",
            Some(api("STREAM.INFO.SLUICE_EVENTS")),
            js.get_stream(subjects::EVENTS_STREAM),
        ),
        attempt(
            "read events",
            Some(api("CONSUMER.CREATE.SLUICE_EVENTS.ev.sluice.events.>")),
            events.create_consumer(ordered(Some("ev"), "sluice.events.>")),
        ),
        attempt(
            "read cluster b's states",
            Some(api("CONSUMER.CREATE.SLUICE_STATUS.rb.sluice.status.b.>")),
            status.create_consumer(ordered(Some("rb"), "sluice.status.b.>")),
        ),
        attempt(
            "read every cluster's states",
            Some(api("CONSUMER.CREATE.SLUICE_STATUS.rall.sluice.status.>")),
            status.create_consumer(ordered(Some("rall"), "sluice.status.>")),
        ),
        attempt(
            "read one run's states whatever its cluster",
            Some(api("CONSUMER.CREATE.SLUICE_STATUS.rany.sluice.status.*.r2")),
            status.create_consumer(ordered(Some("rany"), &subjects::status_of_run("r2"))),
        ),
        attempt(
            "an unnamed consumer (its filter is only in the body)",
            Some(api("CONSUMER.CREATE.SLUICE_STATUS")),
            status.create_consumer(ordered(None, "sluice.status.a.>")),
        ),
        attempt(
            "read cluster b's logs",
            Some(api("CONSUMER.CREATE.SLUICE_LOGS.lb.sluice.logs.b.>")),
            logs.create_consumer(ordered(Some("lb"), "sluice.logs.b.>")),
        ),
        attempt(
            "re-filter the reporter's durable",
            Some(api(
                "CONSUMER.CREATE.SLUICE_STATUS.sluice-reporter.sluice.status.a.>",
            )),
            status.create_consumer(ordered(
                Some(subjects::REPORTER_CONSUMER),
                "sluice.status.a.>",
            )),
        ),
        attempt(
            "re-filter the dispatcher's status durable",
            Some(api(
                "CONSUMER.CREATE.SLUICE_STATUS.sluice-dispatcher-groups.sluice.status.a.>",
            )),
            status.create_consumer(ordered(
                Some(subjects::DISPATCHER_STATUS_CONSUMER),
                "sluice.status.a.>",
            )),
        ),
        attempt(
            "pull from the reporter's durable",
            Some(api("CONSUMER.MSG.NEXT.SLUICE_STATUS.sluice-reporter")),
            request(
                &probe,
                api("CONSUMER.MSG.NEXT.SLUICE_STATUS.sluice-reporter"),
                pull_body.clone(),
            ),
        ),
        attempt(
            "pull from the dispatcher's status durable",
            Some(api(
                "CONSUMER.MSG.NEXT.SLUICE_STATUS.sluice-dispatcher-groups",
            )),
            request(
                &probe,
                api("CONSUMER.MSG.NEXT.SLUICE_STATUS.sluice-dispatcher-groups"),
                pull_body.clone(),
            ),
        ),
        attempt(
            "a filter in the body other than the subject's",
            None,
            request(
                &probe,
                api("CONSUMER.CREATE.SLUICE_STATUS.mm.sluice.status.a.>"),
                create("SLUICE_STATUS", "mm", "sluice.status.b.>"),
            ),
        ),
        attempt(
            "several filters in the body",
            None,
            request(
                &probe,
                api("CONSUMER.CREATE.SLUICE_STATUS.mf.sluice.status.a.>"),
                serde_json::json!({"stream_name": "SLUICE_STATUS", "action": "create", "config": {
                    "name": "mf", "filter_subjects": ["sluice.status.b.>"], "ack_policy": "none"}})
                .to_string(),
            ),
        ),
        attempt(
            "create a stream",
            Some(api("STREAM.CREATE.EVIL")),
            js.create_stream(Config {
                name: "EVIL".into(),
                subjects: vec!["evil.>".into()],
                ..Default::default()
            }),
        ),
        attempt(
            "update a stream",
            Some(api("STREAM.UPDATE.SLUICE_STATUS")),
            js.update_stream(changed_status),
        ),
        attempt(
            "purge a stream",
            Some(api("STREAM.PURGE.SLUICE_STATUS")),
            status.purge().into_future(),
        ),
        attempt(
            "delete a stream",
            Some(api("STREAM.DELETE.SLUICE_STATUS")),
            js.delete_stream(subjects::STATUS_STREAM),
        ),
        attempt(
            "create a bucket",
            Some(api("STREAM.CREATE.KV_EVIL")),
            js.create_key_value(jetstream::kv::Config {
                bucket: "EVIL".into(),
                ..Default::default()
            }),
        ),
        attempt(
            "delete the runners bucket",
            Some(api("STREAM.DELETE.KV_SLUICE_RUNNERS")),
            js.delete_key_value(subjects::RUNNERS_BUCKET),
        ),
        attempt(
            "delete its own consumer",
            Some(api("CONSUMER.DELETE.SLUICE_RUNS.sluice-runner-a")),
            js.delete_consumer_from_stream("sluice-runner-a", subjects::RUNS_STREAM),
        ),
        attempt(
            "update its own consumer",
            Some(api(
                "CONSUMER.CREATE.SLUICE_RUNS.sluice-runner-a.sluice.runs.a",
            )),
            js.update_consumer_on_stream(changed_consumer.clone(), subjects::RUNS_STREAM),
        ),
        attempt(
            "re-filter its own consumer to cluster b's runs",
            Some(api(
                "CONSUMER.CREATE.SLUICE_RUNS.sluice-runner-a.sluice.runs.b",
            )),
            runs.create_consumer(pull::Config {
                filter_subject: subjects::runs("b"),
                ..changed_consumer
            }),
        ),
    ];
    all_refused(&probe, attempts).await;

    for subject in ["_INBOX.>", "_INBOX_b.>", "sluice.>", ">", "$JS.ACK.>"] {
        let _sub = probe.client.subscribe(subject).await.expect("sent");
        probe.subscribe_refused(subject).await;
    }

    // Nothing changed: b's run is still waiting for b, the durables and streams are as
    // `streams apply` left them, and no consumer was created.
    let mut b: PullConsumer = admin
        .js
        .get_consumer_from_stream("sluice-runner-b", subjects::RUNS_STREAM)
        .await
        .expect("b's consumer");
    let info = b.info().await.expect("info");
    assert_eq!((info.num_pending, info.num_ack_pending), (1, 0));
    let mut a: PullConsumer = admin
        .js
        .get_consumer_from_stream("sluice-runner-a", subjects::RUNS_STREAM)
        .await
        .expect("a's consumer");
    let config = a.info().await.expect("info").config.clone();
    assert_eq!(
        (config.filter_subject.as_str(), config.ack_wait),
        ("sluice.runs.a", ClusterConsumer::new("a").ack_wait)
    );
    let mut status = admin
        .js
        .get_stream(subjects::STATUS_STREAM)
        .await
        .expect("status");
    let info = status.info().await.expect("info");
    assert_eq!(
        info.config.max_age,
        StreamSettings::default().status().max_age
    );
    assert_eq!(info.state.messages, 1);
    for stream in [
        subjects::STATUS_STREAM,
        subjects::LOGS_STREAM,
        subjects::EVENTS_STREAM,
    ] {
        let names: Vec<String> = admin
            .js
            .get_stream_no_info(stream)
            .await
            .expect("handle")
            .consumer_names()
            .map(|n| n.expect("name"))
            .collect()
            .await;
        assert!(names.is_empty(), "{stream} got consumers {names:?}");
    }
    assert!(admin.js.get_stream("EVIL").await.is_err());
}

#[tokio::test]
async fn no_role_may_subscribe_to_what_streams_store() {
    // Why: see `roles::NO_CORE_SUBSCRIPTIONS` and the next test.
    let (server, _admin) = provisioned().await;
    for role in Role::all_for(&["a"]) {
        let probe = Probe::connect(&server, &role).await;
        for subject in [
            "sluice.runs.b",
            "sluice.events.>",
            "$KV.SLUICE_PIPELINES.>",
            "$O.SLUICE_PAYLOADS.>",
            "$JS.API.>",
            "$JS.ACK.>",
        ] {
            let _sub = probe.client.subscribe(subject).await.expect("sent");
            probe.subscribe_refused(subject).await;
        }
    }
}

#[tokio::test]
async fn a_core_subscriber_on_a_stored_subject_lets_any_consumer_push_into_that_stream() {
    // The server behaviour `roles::NO_CORE_SUBSCRIPTIONS` guards against, pinned: a user
    // allowed to subscribe to everything (as a user without permissions, added by hand
    // beside the generated ones, would be) gives a runner's push consumer the interest
    // it needs, and SLUICE_EVENTS then stores a message the runner wrote. It keeps its
    // original subject, so a consumer filtered on `sluice.events.>` would not see it.
    let (server, admin) = provisioned().await;
    let observer = nkeys::KeyPair::new_user();
    let config = server.dir.join(nats_admin::CONFIG_FILE);
    let text = std::fs::read_to_string(&config).expect("config").replace(
        &format!("{}\n", sluice_core::roles::USERS_END),
        &format!(
            "{}\n      {{ nkey: \"{}\" }}\n",
            sluice_core::roles::USERS_END,
            observer.public_key()
        ),
    );
    std::fs::write(&config, text).expect("add a user without permissions");
    let seed = server.dir.join("observer.seed");
    std::fs::write(&seed, observer.seed().expect("seed")).expect("seed file");
    server.reload();
    wait_for(
        "the hand-added user to be accepted",
        Duration::from_secs(10),
        || async { try_connect(&server, &seed).await.ok() },
    )
    .await;
    let watcher = Probe::connect_with(&server.url(), &seed, &Role::Admin).await;
    let mut pushed = watcher
        .client
        .subscribe(subjects::event("manual", "push"))
        .await
        .expect("subscribe");
    watcher.client.flush().await.expect("flush");

    let probe = Probe::connect(&server, &runner("a")).await;
    publish_acked(
        &probe.js,
        subjects::status("a", "forged"),
        r#"{"pipeline":"x"}"#,
    )
    .await;
    let created = request(
        &probe,
        "$JS.API.CONSUMER.CREATE.SLUICE_STATUS.push.sluice.status.a.forged".into(),
        serde_json::json!({"stream_name": "SLUICE_STATUS", "action": "create", "config": {
            "name": "push", "filter_subject": "sluice.status.a.forged",
            "deliver_subject": subjects::event("manual", "push"),
            "ack_policy": "none", "deliver_policy": "all"}})
        .to_string(),
    )
    .await;
    assert!(
        created.is_ok(),
        "the server allows a push consumer: {created:?}"
    );
    let message = tokio::time::timeout(Duration::from_secs(5), pushed.next())
        .await
        .expect("the push reaches the subscriber")
        .expect("message");
    assert_eq!(message.subject.as_str(), "sluice.status.a.forged");
    // Stored in the order received: once the sentinel is acknowledged the pushed
    // message, received before it, is stored too.
    let sentinel = publish_acked(&admin.js, subjects::event("github", "push"), "{}").await;
    let events = admin
        .js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("events");
    let forged = events
        .get_raw_message(sentinel - 1)
        .await
        .expect("stored before the sentinel");
    assert_eq!(forged.subject.as_str(), "sluice.status.a.forged");
    assert_eq!(&forged.payload[..], br#"{"pipeline":"x"}"#);
}

#[tokio::test]
async fn ingest_publishes_forge_events_and_large_payloads_only() {
    let (server, admin) = provisioned().await;
    let probe = Probe::connect(&server, &Role::Ingest).await;
    let js = &probe.js;
    js.get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("readiness: events stream");
    for provider in ["github", "gitlab", "generic"] {
        publish_acked(js, subjects::event(provider, "push"), "{}").await;
    }
    // A body too large for a message goes to the object store; a redelivery replaces
    // it. Both within a fraction of the time a refused request takes.
    let store = js
        .get_object_store(subjects::PAYLOADS_BUCKET)
        .await
        .expect("open payloads");
    let body = vec![b'x'; 300_000];
    for _ in 0..2 {
        let started = std::time::Instant::now();
        store
            .put("github:big", &mut body.as_slice())
            .await
            .expect("put payload");
        assert!(
            started.elapsed() < REFUSED_WITHIN / 2,
            "{:?}",
            started.elapsed()
        );
    }
    let mut stored = Vec::new();
    admin
        .js
        .get_object_store(subjects::PAYLOADS_BUCKET)
        .await
        .expect("payloads")
        .get("github:big")
        .await
        .expect("stored")
        .read_to_end(&mut stored)
        .await
        .expect("read");
    assert_eq!(stored, body);
    assert!(violations(&probe).is_empty(), "{:?}", violations(&probe));

    publishes_refused(
        &probe,
        &[
            subjects::event("manual", "push"),
            subjects::runs("a"),
            subjects::status("a", "r"),
            subjects::cancel("a"),
            format!("$KV.{}.app", subjects::PIPELINES_BUCKET),
        ],
    )
    .await;
    let events = js
        .get_stream_no_info(subjects::EVENTS_STREAM)
        .await
        .expect("handle");
    let attempts = vec![
        attempt(
            "read events back",
            Some("$JS.API.CONSUMER.CREATE.SLUICE_EVENTS.ev.sluice.events.>".into()),
            events.create_consumer(ordered(Some("ev"), "sluice.events.>")),
        ),
        attempt(
            "purge events",
            Some("$JS.API.STREAM.PURGE.SLUICE_EVENTS".into()),
            events.purge().into_future(),
        ),
        attempt(
            "delete the events stream",
            Some("$JS.API.STREAM.DELETE.SLUICE_EVENTS".into()),
            js.delete_stream(subjects::EVENTS_STREAM),
        ),
        attempt(
            "delete the payload store",
            Some("$JS.API.STREAM.DELETE.OBJ_SLUICE_PAYLOADS".into()),
            js.delete_object_store(subjects::PAYLOADS_BUCKET),
        ),
        attempt(
            "read pipelines",
            Some("$JS.API.STREAM.INFO.KV_SLUICE_PIPELINES".into()),
            js.get_key_value(subjects::PIPELINES_BUCKET),
        ),
    ];
    all_refused(&probe, attempts).await;
    let _sub = probe.client.subscribe("sluice.>").await.expect("sent");
    probe.subscribe_refused("sluice.>").await;
}

#[tokio::test]
async fn the_dispatcher_may_not_create_change_or_delete_streams() {
    let (server, _admin) = provisioned().await;
    let probe = Probe::connect(&server, &Role::Dispatcher).await;
    let js = &probe.js;
    publish_acked(js, subjects::runs("a"), "run").await;
    publish_acked(js, subjects::cancel("b"), "cancel").await;
    let events = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("events");
    events
        .create_consumer(pull::Config {
            durable_name: Some(subjects::DISPATCHER_CONSUMER.into()),
            ..Default::default()
        })
        .await
        .expect("its own durable");
    js.get_key_value(subjects::GROUPS_BUCKET)
        .await
        .expect("groups")
        .put("g", "state".into())
        .await
        .expect("group state");

    let mut changed = StreamSettings::default().events();
    changed.max_age = Duration::from_secs(60);
    let attempts = vec![
        attempt(
            "create a stream",
            Some("$JS.API.STREAM.CREATE.EVIL".into()),
            js.create_stream(Config {
                name: "EVIL".into(),
                subjects: vec!["evil".into()],
                ..Default::default()
            }),
        ),
        attempt(
            "update a stream",
            Some("$JS.API.STREAM.UPDATE.SLUICE_EVENTS".into()),
            js.update_stream(changed),
        ),
        attempt(
            "purge a stream",
            Some("$JS.API.STREAM.PURGE.SLUICE_EVENTS".into()),
            events.purge().into_future(),
        ),
        attempt(
            "delete a stream",
            Some("$JS.API.STREAM.DELETE.SLUICE_RUNS".into()),
            js.delete_stream(subjects::RUNS_STREAM),
        ),
        attempt(
            "delete a bucket",
            Some("$JS.API.STREAM.DELETE.KV_SLUICE_PIPELINES".into()),
            js.delete_key_value(subjects::PIPELINES_BUCKET),
        ),
    ];
    all_refused(&probe, attempts).await;
}

/// The delivery reconciler with only the dispatcher's seed: it reads the stored event
/// ids (an ordered, headers-only consumer on `SLUICE_EVENTS`), creates and updates its
/// records, its pass summary and its lease in `SLUICE_DELIVERIES`, with no permission
/// violation; the streams stay out of its reach as above.
#[tokio::test]
async fn the_dispatcher_reconciles_deliveries_with_its_own_seed() {
    use sluice_dispatcher::recover::{lease, Hook, Reconciler, RecoverConfig};
    use sluice_tests::deliveries::GitHubHooks;

    let (server, admin) = provisioned().await;
    let stored = async_nats::jetstream::message::PublishMessage::build()
        .payload("{}".into())
        .message_id("github:arrived");
    admin
        .js
        .send_publish(subjects::event("github", "push"), stored)
        .await
        .expect("publish")
        .await
        .expect("stored");
    // Redeliveries go nowhere: only the bus side is under test here.
    let hooks = GitHubHooks::start("http://127.0.0.1:1/webhooks/github", 10).await;
    let at = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    hooks.failed_at("arrived", "push", b"{}", at);
    hooks.failed_at("missed", "push", b"{}", at);
    let probe = Probe::connect(&server, &Role::Dispatcher).await;
    let key = {
        use rsa::pkcs1::{EncodeRsaPrivateKey, LineEnding};
        let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("RSA key");
        key.to_pkcs1_pem(LineEnding::LF).expect("PEM").to_string()
    };
    let forge = sluice_dispatcher::forge::ForgeConfig {
        github_app: Some(sluice_dispatcher::github::GitHubApp {
            id: 1,
            private_key: secrecy::SecretString::from(key),
        }),
        github_api_url: hooks.uri(),
        ..Default::default()
    };
    let config = RecoverConfig {
        hooks: vec![Hook::App],
        holder: "d-0".into(),
        ..RecoverConfig::default()
    };
    let reconciler = Reconciler::new(
        probe.js.clone(),
        &forge,
        config,
        sluice_dispatcher::metrics::Metrics::default(),
    )
    .await
    .expect("reconciler");
    let now = time::OffsetDateTime::now_utc();
    let summary = reconciler
        .reconcile(now, &tokio_util::sync::CancellationToken::new())
        .await
        .expect("a pass with the dispatcher's seed");
    assert_eq!(summary.redelivered, 1, "{summary:?}");
    assert_eq!(hooks.redeliveries().keys().collect::<Vec<_>>(), ["missed"]);
    let kv = probe
        .js
        .get_key_value(subjects::DELIVERIES_BUCKET)
        .await
        .expect("bucket");
    assert!(lease::acquire(&kv, "d-0", now, Duration::from_secs(60))
        .await
        .expect("lease"));
    lease::release(&kv, "d-0").await;
    let report = sluice_dispatcher::recover::lost(&probe.js)
        .await
        .expect("events lost reads with the dispatcher's seed");
    assert_eq!(report.last_pass.map(|p| p.redelivered), Some(1));
    assert!(violations(&probe).is_empty(), "{:?}", violations(&probe));
}

#[tokio::test]
async fn the_dashboard_only_reads() {
    let (server, admin) = provisioned().await;
    publish_acked(&admin.js, subjects::status("b", "r2"), "b's state").await;
    admin
        .js
        .get_key_value(subjects::PIPELINES_BUCKET)
        .await
        .expect("pipelines")
        .put("app", "name: app".into())
        .await
        .expect("pipeline");
    let probe = Probe::connect(&server, &Role::Dashboard).await;
    let js = &probe.js;
    js.get_stream(subjects::RUNS_STREAM)
        .await
        .expect("stream info");
    let status = js
        .get_stream_no_info(subjects::STATUS_STREAM)
        .await
        .expect("handle");
    let consumer = status
        .create_consumer(ordered(Some("view-1"), &subjects::status_of_run("r2")))
        .await
        .expect("a run's states, whatever its cluster");
    assert_eq!(read(consumer, 1).await, ["b's state"]);
    let pipelines = js
        .get_key_value(subjects::PIPELINES_BUCKET)
        .await
        .expect("open");
    let entry = pipelines.get("app").await.expect("get").expect("stored");
    assert_eq!(&entry[..], b"name: app");
    let keys: Vec<String> = pipelines
        .keys()
        .await
        .expect("keys")
        .map(|k| k.expect("key"))
        .collect()
        .await;
    assert_eq!(keys, ["app"]);
    assert!(violations(&probe).is_empty(), "{:?}", violations(&probe));

    publishes_refused(
        &probe,
        &[
            subjects::status("a", "r"),
            subjects::event("manual", "push"),
            subjects::runs("a"),
            // A read-only dashboard's seed may not ask for a cancel or a rerun either:
            // that is the dashboard-actions role's (below).
            subjects::cancel("a"),
            subjects::RERUN.to_owned(),
            subjects::child_result("a", "r"),
            format!("$KV.{}.app", subjects::PIPELINES_BUCKET),
        ],
    )
    .await;
    let attempts = vec![
        attempt(
            "re-filter the reporter's durable",
            Some("$JS.API.CONSUMER.CREATE.SLUICE_STATUS.sluice-reporter.sluice.status.>".into()),
            status.create_consumer(ordered(
                Some(subjects::REPORTER_CONSUMER),
                "sluice.status.>",
            )),
        ),
        attempt(
            "pull from the dispatcher's durable",
            Some("$JS.API.CONSUMER.MSG.NEXT.SLUICE_EVENTS.sluice-dispatcher".into()),
            request(
                &probe,
                "$JS.API.CONSUMER.MSG.NEXT.SLUICE_EVENTS.sluice-dispatcher".into(),
                r#"{"batch":1}"#.into(),
            ),
        ),
        attempt(
            "re-filter a runner's durable",
            Some("$JS.API.CONSUMER.CREATE.SLUICE_RUNS.sluice-runner-a.sluice.runs.b".into()),
            js.get_stream_no_info(subjects::RUNS_STREAM)
                .then(|runs| async move {
                    runs.expect("handle")
                        .create_consumer(pull::Config {
                            filter_subject: subjects::runs("b"),
                            ..ClusterConsumer::new("a").config()
                        })
                        .await
                }),
        ),
        attempt(
            "an unnamed consumer",
            Some("$JS.API.CONSUMER.CREATE.SLUICE_STATUS".into()),
            status.create_consumer(ordered(None, "sluice.status.>")),
        ),
        attempt(
            "delete a consumer",
            Some("$JS.API.CONSUMER.DELETE.SLUICE_RUNS.sluice-runner-a".into()),
            js.delete_consumer_from_stream("sluice-runner-a", subjects::RUNS_STREAM),
        ),
        attempt(
            "purge a stream",
            Some("$JS.API.STREAM.PURGE.SLUICE_STATUS".into()),
            status.purge().into_future(),
        ),
    ];
    all_refused(&probe, attempts).await;
}

/// Connects once with a seed file; the error when the server refuses it.
async fn try_connect(server: &AuthNats, seed: &std::path::Path) -> Result<(), String> {
    let seed = std::fs::read_to_string(seed).map_err(|e| e.to_string())?;
    async_nats::ConnectOptions::new()
        .nkey(seed.trim().to_owned())
        .connection_timeout(Duration::from_millis(500))
        .connect(server.url())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn cluster_add_remove_and_rotation_take_effect_on_reload() {
    let (server, _admin) = provisioned().await;
    let dir = server.dir.clone();
    let c = runner("c");

    nats_admin::add_cluster(&dir, "c", false).expect("cluster add c");
    let refused = try_connect(&server, &server.seed(&c)).await;
    assert!(refused.is_err(), "c's seed works before the reload");
    server.reload();
    wait_for(
        "c's seed to work after the reload",
        Duration::from_secs(10),
        || async { try_connect(&server, &server.seed(&c)).await.ok() },
    )
    .await;
    let probe_c = Probe::connect(&server, &c).await;
    probe_c
        .client
        .publish(subjects::status("c", "r"), "x".into())
        .await
        .expect("sent");
    publishes_refused(&probe_c, &[subjects::status("a", "r")]).await;

    // Rotation: a new seed for a; the old one stops working, a connection made with it
    // is closed by the reload.
    let old_seed = std::fs::read(server.seed(&runner("a"))).expect("old seed");
    let old_seed_file = dir.join("old-a.seed");
    std::fs::write(&old_seed_file, &old_seed).expect("keep the old seed");
    let old_a = Probe::connect_with(&server.url(), &old_seed_file, &runner("a")).await;
    nats_admin::add_cluster(&dir, "a", true).expect("rotate a");
    server.reload();
    wait_for(
        "the old seed of a to be refused",
        Duration::from_secs(10),
        || async { try_connect(&server, &old_seed_file).await.err() },
    )
    .await;
    try_connect(&server, &server.seed(&runner("a")))
        .await
        .expect("the new seed of a works");
    wait_for(
        "the old seed's connection to be closed",
        Duration::from_secs(10),
        || async {
            (old_a.client.connection_state() != async_nats::connection::State::Connected)
                .then_some(())
        },
    )
    .await;

    // Revocation.
    let old_c_file = dir.join("old-c.seed");
    std::fs::copy(server.seed(&c), &old_c_file).expect("keep c's seed");
    nats_admin::remove_cluster(&dir, "c").expect("cluster remove c");
    server.reload();
    wait_for(
        "c's connection to be closed",
        Duration::from_secs(10),
        || async {
            (probe_c.client.connection_state() != async_nats::connection::State::Connected)
                .then_some(())
        },
    )
    .await;
    let refused = try_connect(&server, &old_c_file).await;
    assert!(
        refused.is_err(),
        "c's seed still works after cluster remove"
    );
    assert!(!server.seed(&c).exists());
    assert!(
        server.log().contains("Reloaded server configuration"),
        "{}",
        server.log()
    );
}

#[tokio::test]
async fn the_runner_runs_and_cancels_its_clusters_runs_with_only_its_seed() {
    use sluice_core::run::{CancelRequest, RunState};
    use sluice_tests::runner::{
        final_state, git_repo, log_lines, publish_run, run_request, step, Runner,
    };
    let (server, admin) = provisioned().await;
    let seed = server.options(&runner("a"));
    let a = Runner::start_with(&server.url(), "a", "runner-1", |c| c.nats = seed).await;
    let (repo, sha) = git_repo();
    let js = &admin.js;
    publish_run(
        js,
        &run_request(
            "ok-1",
            "a",
            repo.path(),
            &sha,
            vec![step("s", &["echo hi"])],
        ),
    )
    .await;
    publish_run(
        js,
        &run_request(
            "long-1",
            "a",
            repo.path(),
            &sha,
            vec![step("long", &["echo started", "sleep 30"])],
        ),
    )
    .await;
    let deadline = Duration::from_secs(30);
    let done = wait_for("ok-1 to end", deadline, || final_state(js, "ok-1")).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(log_lines(js, "ok-1", "s").await, ["hi"]);
    wait_for("long-1 to be running", deadline, || async {
        (log_lines(js, "long-1", "long").await == ["started"]).then_some(())
    })
    .await;
    let cancel = CancelRequest {
        run_id: "long-1".into(),
        reason: "superseded".into(),
        at: time::OffsetDateTime::now_utc(),
    };
    js.publish(
        subjects::cancel("a"),
        serde_json::to_vec(&cancel).expect("json").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
    let done = wait_for("long-1 to be cancelled", deadline, || {
        final_state(js, "long-1")
    })
    .await;
    assert_eq!(done.state, RunState::Cancelled, "{done:?}");
    a.stop().await;
    // The server logs every refused publish and subscription: the runner stayed inside
    // its lists (a call outside them would have failed, or waited out a timeout).
    let refused: Vec<String> = server
        .log()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect();
    assert!(refused.is_empty(), "the runner was refused: {refused:#?}");
}

#[tokio::test]
async fn a_child_on_another_cluster_runs_and_is_cancelled_with_every_service_on_its_own_seed() {
    use sluice_core::run::{child_run_id, run_id, RunState};
    use sluice_tests::dispatcher::{apply, publish_event, Dispatcher};
    use sluice_tests::runner::{final_state, git_repo, Runner};
    let (server, admin) = provisioned().await;
    let js = &admin.js;
    apply(
        js,
        r#"
name: parent
triggers: [{ provider: manual, kinds: [push] }]
runtime: { cluster: a }
steps:
  - name: ship
    pipeline: child
    runtime: { cluster: b }
---
name: child
triggers: [{ provider: manual, kinds: [never] }]
runtime: { cluster: b }
steps:
  - name: build
    image: alpine
    commands: ["echo child says hi"]
---
name: slow-parent
triggers: [{ provider: manual, kinds: [push] }]
runtime: { cluster: a }
steps:
  - name: ship
    pipeline: slow-child
    runtime: { cluster: b }
---
name: slow-child
triggers: [{ provider: manual, kinds: [never] }]
runtime: { cluster: b }
steps:
  - name: build
    image: alpine
    commands: ["echo started", "sleep 60"]
"#,
    )
    .await;
    let mut dispatcher_config = Dispatcher::config(&server.url());
    dispatcher_config.nats = server.options(&Role::Dispatcher);
    let dispatcher = Dispatcher::start_with(dispatcher_config).await;
    let seed_a = server.options(&runner("a"));
    let seed_b = server.options(&runner("b"));
    let a = Runner::start_with(&server.url(), "a", "runner-a", |c| c.nats = seed_a).await;
    let b = Runner::start_with(&server.url(), "b", "runner-b", |c| c.nats = seed_b).await;
    let (repo, sha) = git_repo();
    let start = |id: &str, pipeline: &str| {
        let mut event = sluice_core::Event::new(sluice_core::Provider::Manual, id, "push");
        event.pipeline = Some(pipeline.to_owned());
        event.clone_url = Some(repo.path().display().to_string());
        event.sha = Some(sha.clone());
        event
    };
    let deadline = Duration::from_secs(60);

    // The child runs on b; its success is the parent's step's, on a.
    publish_event(js, &start("fam-1", "parent")).await;
    let parent = run_id("manual:fam-1", "parent", 0);
    let child = child_run_id(&parent, "ship", "child");
    let done = wait_for("the parent", deadline, || final_state(js, &parent)).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(done.cluster.as_deref(), Some("a"));
    let child_done = final_state(js, &child).await.expect("the child ended");
    assert_eq!(child_done.state, RunState::Succeeded, "{child_done:?}");
    assert_eq!(
        child_done.cluster.as_deref(),
        Some("b"),
        "the child ran on b"
    );

    // Cancelling the parent cancels its child on the other cluster.
    publish_event(js, &start("fam-2", "slow-parent")).await;
    let parent = run_id("manual:fam-2", "slow-parent", 0);
    let child = child_run_id(&parent, "ship", "slow-child");
    wait_for("the slow child to print", deadline, || async {
        (sluice_tests::runner::log_lines(js, &child, "build").await == ["started"]).then_some(())
    })
    .await;
    let cancel = sluice_core::run::CancelRequest {
        run_id: parent.clone(),
        reason: "superseded".into(),
        at: time::OffsetDateTime::now_utc(),
    };
    sluice_core::bus::publish_json(
        js,
        subjects::cancel("a"),
        &subjects::cancel_id(&parent),
        &cancel,
    )
    .await
    .expect("cancel");
    let done = wait_for("the parent to be cancelled", deadline, || {
        final_state(js, &parent)
    })
    .await;
    assert_eq!(done.state, RunState::Cancelled, "{done:?}");
    let child_done = wait_for("the child to be cancelled", deadline, || {
        final_state(js, &child)
    })
    .await;
    assert_eq!(child_done.state, RunState::Cancelled, "{child_done:?}");

    a.stop().await;
    b.stop().await;
    dispatcher.stop().await;
    let refused: Vec<String> = server
        .log()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect();
    assert!(refused.is_empty(), "a service was refused: {refused:#?}");
}

#[tokio::test]
async fn a_kubernetes_runner_on_its_own_seed_adopts_a_crashed_runners_pod_and_cancels() {
    use sluice_core::run::{CancelRequest, RunState};
    use sluice_tests::kubeapi::KubeApi;
    use sluice_tests::runner::{
        final_state, git_repo, log_lines, publish_run, run_request, statuses, step, Runner,
    };
    init_logs();
    let server = AuthNats::start(&["a", "b"]).await;
    let admin = Probe::connect(&server, &Role::Admin).await;
    let js = &admin.js;
    // A short ack wait, so the crashed runner's run is redelivered within the test.
    let settings = StreamSettings {
        clusters: vec![ClusterConsumer::parse("a:3s").expect("cluster")],
        ..Default::default()
    };
    sluice_core::streams::apply(js, &settings, false)
        .await
        .expect("streams apply");
    let api = KubeApi::start().await;
    let url = server.url();
    let seed = || server.options(&runner("a"));
    let doomed =
        Runner::start_kube_with(&url, "a", "doomed", &api, |_| {}, |c| c.nats = seed()).await;
    let (repo, sha) = git_repo();
    publish_run(
        js,
        &run_request(
            "adopt-1",
            "a",
            repo.path(),
            &sha,
            vec![step("s", &["echo started", "sleep 4", "echo finished"])],
        ),
    )
    .await;
    let deadline = Duration::from_secs(60);
    wait_for("adopt-1 to start", deadline, || async {
        (log_lines(js, "adopt-1", "s")
            .await
            .first()
            .map(String::as_str)
            == Some("started"))
        .then_some(())
    })
    .await;
    // A crash: nothing acknowledged, the Pod keeps running.
    doomed.kill();
    let survivor =
        Runner::start_kube_with(&url, "a", "survivor", &api, |_| {}, |c| c.nats = seed()).await;
    let done = wait_for("adopt-1 to finish on the survivor", deadline, || {
        final_state(js, "adopt-1")
    })
    .await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(
        log_lines(js, "adopt-1", "s").await,
        ["started", "finished"],
        "each line once"
    );
    let finals = statuses(js, "adopt-1")
        .await
        .into_iter()
        .filter(|u| u.step.is_none() && u.state.is_final())
        .count();
    assert_eq!(finals, 1, "one final state");
    assert_eq!(
        api.created()
            .iter()
            .filter(|p| p.contains("adopt-1"))
            .count(),
        1,
        "one Pod: the survivor adopted it"
    );

    publish_run(
        js,
        &run_request(
            "cancel-1",
            "a",
            repo.path(),
            &sha,
            vec![step("long", &["echo started", "sleep 60"])],
        ),
    )
    .await;
    wait_for("cancel-1 to start", deadline, || async {
        (log_lines(js, "cancel-1", "long").await == ["started"]).then_some(())
    })
    .await;
    let cancel = CancelRequest {
        run_id: "cancel-1".into(),
        reason: "superseded".into(),
        at: time::OffsetDateTime::now_utc(),
    };
    sluice_core::bus::publish_json(
        js,
        subjects::cancel("a"),
        &subjects::cancel_id("cancel-1"),
        &cancel,
    )
    .await
    .expect("cancel");
    let done = wait_for("cancel-1 to be cancelled", deadline, || {
        final_state(js, "cancel-1")
    })
    .await;
    assert_eq!(done.state, RunState::Cancelled, "{done:?}");
    survivor.stop().await;
    let refused: Vec<String> = server
        .log()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect();
    assert!(refused.is_empty(), "the runner was refused: {refused:#?}");
}

/// The acting dashboard's seed reads as the read-only one does and may, in addition,
/// ask for a cancel or a rerun — and nothing else of the control subjects.
#[tokio::test]
async fn the_acting_dashboard_may_also_ask_for_cancels_and_reruns() {
    let (server, admin) = provisioned().await;
    publish_acked(&admin.js, subjects::status("b", "r2"), "b's state").await;
    let probe = Probe::connect(&server, &Role::DashboardActions).await;
    let status = probe
        .js
        .get_stream_no_info(subjects::STATUS_STREAM)
        .await
        .expect("handle");
    let consumer = status
        .create_consumer(ordered(Some("view-1"), &subjects::status_of_run("r2")))
        .await
        .expect("a run's states");
    assert_eq!(read(consumer, 1).await, ["b's state"]);
    for allowed in [subjects::cancel("a"), subjects::RERUN.to_owned()] {
        probe
            .client
            .publish(allowed, "asked".into())
            .await
            .expect("sent");
    }
    // The server answers in order: once the refusals after them are reported, any
    // refusal of the two actions would have been too.
    publishes_refused(
        &probe,
        &[
            subjects::child_result("a", "r"),
            subjects::event("manual", "push"),
            subjects::status("a", "r"),
        ],
    )
    .await;
    let refused = violations(&probe);
    assert_eq!(refused.len(), 3, "{refused:?}");
    for action in [subjects::cancel("a"), subjects::RERUN.to_owned()] {
        assert!(
            !refused.iter().any(|v| v.contains(&format!("\"{action}\""))),
            "{action}: {refused:?}"
        );
    }
}
