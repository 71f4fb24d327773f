//! One owner for streams: `sluice streams apply` sets them; services started with
//! their defaults afterwards leave them as they are and report what differs.

use std::time::Duration;

use sluice_core::run::RunState;
use sluice_core::streams::{self, ClusterConsumer, StreamSettings};
use sluice_core::subjects;
use sluice_tests::dispatcher::{apply, publish_event, Dispatcher};
use sluice_tests::ingest::{jetstream, Ingest};
use sluice_tests::nats::NatsCluster;
use sluice_tests::runner::{final_state, git_repo, Runner};
use sluice_tests::{init_logs, wait_for};

const PIPELINE: &str = r#"
name: owner-ci
triggers:
  - provider: manual
    kinds: [push]
runtime:
  cluster: eu-1
steps:
  - name: hello
    image: alpine
    commands: ["echo hi"]
"#;

#[tokio::test]
async fn services_started_with_defaults_never_change_what_streams_apply_set() {
    init_logs();
    let cluster = NatsCluster::start().await;
    let url = cluster.urls();
    let js = jetstream(&cluster.nodes[0].url()).await;
    let owner = StreamSettings {
        replicas: 3,
        dedup_window: Duration::from_secs(96 * 3600),
        clusters: vec![ClusterConsumer::parse("eu-1:45s").expect("cluster")],
        ..StreamSettings::default()
    };
    // JetStream may still be electing its meta leader when the servers answer.
    wait_for(
        "streams apply on the 3-node cluster",
        Duration::from_secs(60),
        || async { streams::apply(&js, &owner, false).await.ok() },
    )
    .await;
    let before = snapshot(&js).await;
    assert_eq!(before[0].1, 3, "applied as R3");

    // Every service on its defaults (R1, a 72 h window, a 30 s ack wait).
    let differences = streams::prepare(
        &js,
        &StreamSettings::default(),
        streams::Needs {
            streams: &subjects::STREAMS,
            buckets: &subjects::BUCKETS,
            object_stores: &subjects::OBJECT_STORES,
        },
    )
    .await
    .expect("prepare");
    let seen: Vec<String> = differences.iter().map(ToString::to_string).collect();
    assert!(
        seen.contains(&"SLUICE_EVENTS replicas: have 3, want 1".to_owned()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"SLUICE_EVENTS duplicate_window: have 345600s, want 259200s".to_owned()),
        "{seen:?}"
    );
    assert!(
        seen.contains(&"SLUICE_PIPELINES replicas: have 3, want 1".to_owned()),
        "{seen:?}"
    );

    let ingest = Ingest::start(&url).await;
    let dispatcher = Dispatcher::start(&url).await;
    let runner = Runner::start(&url, "eu-1", "owner-1").await;
    apply(&js, PIPELINE).await;
    // The services work on the cluster as the owner left it: a run goes end to end.
    let (repo, sha) = git_repo();
    let mut event = sluice_core::Event::new(sluice_core::Provider::Manual, "owner-1", "push");
    event.clone_url = Some(repo.path().display().to_string());
    event.sha = Some(sha);
    publish_event(&js, &event).await;
    let run = sluice_core::run::run_id(&event.id, "owner-ci", 0);
    let done = wait_for("the run", Duration::from_secs(60), || {
        final_state(&js, &run)
    })
    .await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");

    assert_eq!(
        snapshot(&js).await,
        before,
        "no service changed a stream or consumer"
    );
    runner.stop().await;
    dispatcher.stop().await;
    drop(ingest);
}

/// Replicas, duplicate window and max age of every stream, and the runner consumer's
/// ack wait.
async fn snapshot(js: &async_nats::jetstream::Context) -> Vec<(String, usize, Duration, Duration)> {
    let mut out = Vec::new();
    let names = subjects::STREAMS
        .iter()
        .map(|s| s.to_string())
        .chain(subjects::BUCKETS.iter().map(|b| format!("KV_{b}")));
    for name in names {
        let mut stream = js.get_stream(&name).await.expect("stream");
        let config = stream.info().await.expect("info").config.clone();
        out.push((
            name,
            config.num_replicas,
            config.duplicate_window,
            config.max_age,
        ));
    }
    let mut consumer = js
        .get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
            subjects::runner_consumer("eu-1"),
            subjects::RUNS_STREAM,
        )
        .await
        .expect("runner consumer");
    let wait = consumer.info().await.expect("info").config.ack_wait;
    out.push(("consumer".into(), 0, wait, Duration::ZERO));
    out
}

#[tokio::test]
async fn data_of_the_old_layout_is_refused_with_the_command_to_run_never_misread() {
    use sluice_tests::nats::NatsServer;
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    // A stream an older Sluice made: no contract version in its metadata.
    let mut old = StreamSettings::default().events();
    old.metadata.clear();
    js.create_stream(old).await.expect("old stream");
    let refused = streams::prepare(
        &js,
        &StreamSettings::default(),
        streams::Needs {
            streams: &[subjects::EVENTS_STREAM],
            ..Default::default()
        },
    )
    .await
    .expect_err("a service refuses a stream of another layout");
    let message = refused.to_string();
    assert!(message.contains("contract version 1"), "{message}");
    assert!(message.contains("run `sluice streams apply`"), "{message}");

    // A run state on the old subject (`sluice.status.<run_id>`, no cluster).
    streams::apply(&js, &StreamSettings::default(), false)
        .await
        .expect("apply");
    js.publish("sluice.status.oldrun", "{}".into())
        .await
        .expect("publish")
        .await
        .expect("ack");
    let plan = streams::plan(&js, &StreamSettings::default())
        .await
        .expect("plan");
    assert_eq!(plan.old_layout, [(subjects::STATUS_STREAM.to_owned(), 1)]);
    let refused = streams::apply(&js, &StreamSettings::default(), false)
        .await
        .expect_err("apply refuses to leave old data unreadable");
    assert!(
        refused
            .to_string()
            .contains("sluice streams apply --purge-old-layout"),
        "{refused}"
    );
    streams::apply(&js, &StreamSettings::default(), true)
        .await
        .expect("apply with the purge");
    let plan = streams::plan(&js, &StreamSettings::default())
        .await
        .expect("plan");
    assert!(plan.old_layout.is_empty() && plan.is_empty(), "{plan}");
}
