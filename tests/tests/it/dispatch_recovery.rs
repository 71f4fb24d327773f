//! A dispatcher whose pull ends — its consumer deleted, nats-server restarted — starts
//! consuming again instead of running on and dispatching nothing, and says which of its
//! consumers stopped meanwhile.

use std::time::Duration;

use sluice_core::run::run_id;
use sluice_core::subjects;
use sluice_tests::dispatcher::{apply, provision, run_requests, Dispatcher};
use sluice_tests::ingest::{jetstream, Ingest};
use sluice_tests::nats::NatsServer;
use sluice_tests::{fixture, init_logs, wait_for};

const PIPELINE: &str = r#"
name: build
triggers:
  - kinds: [push]
steps:
  - { name: make, image: alpine, commands: ["make"] }
"#;

/// Waits until the run `event_id` starts of `build` is stored.
async fn wait_for_run(js: &async_nats::jetstream::Context, event_id: &str, deadline: Duration) {
    let want = run_id(event_id, "build", 0);
    wait_for(&format!("the run of {event_id}"), deadline, || {
        let want = want.clone();
        async move {
            run_requests(js)
                .await
                .into_iter()
                .any(|(_, r)| r.run_id == want)
                .then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn a_webhook_after_the_events_consumer_was_deleted_is_still_dispatched() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(&js, PIPELINE).await;
    let ingest = Ingest::start(&nats.url()).await;
    let dispatcher = Dispatcher::start(&nats.url()).await;

    let r = ingest
        .post_github(
            "push",
            "before",
            &fixture("github/push.with-new-branch.json"),
        )
        .await;
    assert_eq!(r.status().as_u16(), 202);
    wait_for_run(&js, "github:before", Duration::from_secs(20)).await;

    // The durable consumer goes away under the running dispatcher (an operator's
    // mistake, JetStream state lost): its pull ends.
    js.get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("events stream")
        .delete_consumer(subjects::DISPATCHER_CONSUMER)
        .await
        .expect("delete the consumer");

    let r = ingest
        .post_github(
            "push",
            "after",
            &fixture("github/push.with-new-branch.json"),
        )
        .await;
    assert_eq!(r.status().as_u16(), 202);
    wait_for_run(&js, "github:after", Duration::from_secs(30)).await;

    // The recreated consumer reads the stream again from its start: the first event is
    // dispatched again, and its run id is stored once.
    let runs = run_requests(&js).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    dispatcher.stop().await;
}

#[tokio::test]
async fn consumers_report_stopping_while_nats_is_down_and_consume_again_after_a_restart() {
    init_logs();
    let mut nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(&js, PIPELINE).await;
    let ingest = Ingest::start(&nats.url()).await;
    let dispatcher = Dispatcher::start(&nats.url()).await;
    wait_for("every consumer consuming", Duration::from_secs(20), || {
        let stopped = dispatcher.consumers().stopped();
        async move { stopped.is_empty().then_some(()) }
    })
    .await;

    nats.stop();
    // Two missed heartbeats end each pull; while NATS is away no new one opens.
    wait_for(
        "every consumer reported stopped",
        Duration::from_secs(40),
        || {
            let stopped = dispatcher.consumers().stopped();
            async move { (stopped.len() == 3).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        dispatcher.consumers().stopped(),
        [
            subjects::DISPATCHER_CONSUMER,
            subjects::DISPATCHER_STATUS_CONSUMER,
            subjects::DISPATCHER_CHILDREN_CONSUMER,
        ]
    );

    nats.restart().await;
    wait_for(
        "every consumer consuming again",
        Duration::from_secs(60),
        || {
            let stopped = dispatcher.consumers().stopped();
            async move { stopped.is_empty().then_some(()) }
        },
    )
    .await;
    let ingest = &ingest;
    wait_for(
        "ingest to store again",
        Duration::from_secs(30),
        || async move {
            let r = ingest
                .post_github(
                    "push",
                    "after-restart",
                    &fixture("github/push.with-new-branch.json"),
                )
                .await;
            (r.status().as_u16() == 202).then_some(())
        },
    )
    .await;
    wait_for_run(&js, "github:after-restart", Duration::from_secs(30)).await;
    dispatcher.stop().await;
}

/// The pipelines the dispatcher matches follow the bucket across a nats-server restart:
/// a pipeline applied after it is dispatched to, one deleted is not.
#[tokio::test]
async fn pipeline_changes_after_a_nats_restart_are_seen() {
    init_logs();
    let mut nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(&js, PIPELINE).await;
    let dispatcher = Dispatcher::start(&nats.url()).await;
    wait_for("every consumer consuming", Duration::from_secs(20), || {
        let stopped = dispatcher.consumers().stopped();
        async move { stopped.is_empty().then_some(()) }
    })
    .await;

    nats.stop();
    wait_for("the consumers to notice", Duration::from_secs(40), || {
        let stopped = dispatcher.consumers().stopped();
        async move { (stopped.len() == 3).then_some(()) }
    })
    .await;
    nats.restart().await;
    wait_for("consuming again", Duration::from_secs(60), || {
        let stopped = dispatcher.consumers().stopped();
        async move { stopped.is_empty().then_some(()) }
    })
    .await;

    let js = jetstream(&nats.url()).await;
    apply(&js, &PIPELINE.replace("name: build", "name: lint")).await;
    let kv = js
        .get_key_value(subjects::PIPELINES_BUCKET)
        .await
        .expect("bucket");
    kv.delete("build").await.expect("delete");
    // Each try is a new event: the first ones may be matched before the change is seen.
    let mut i = 0;
    wait_for(
        "an event matched against the changed pipelines",
        Duration::from_secs(30),
        || {
            i += 1;
            let id = format!("changed-{i}");
            let js = js.clone();
            async move {
                let mut event = sluice_core::Event::new(sluice_core::Provider::Github, &id, "push");
                event.repo = Some("acme/app".into());
                event.git_ref = Some("refs/heads/main".into());
                event.sha = Some("abc".into());
                sluice_tests::dispatcher::publish_event(&js, &event).await;
                let event_id = format!("github:{id}");
                let decision = wait_for("its decision", Duration::from_secs(10), || {
                    sluice_tests::dispatcher::decision(&js, &event_id)
                })
                .await;
                let pipelines: Vec<String> =
                    decision.runs.iter().map(|r| r.pipeline.clone()).collect();
                (pipelines == ["lint"]).then_some(())
            }
        },
    )
    .await;
    dispatcher.stop().await;
}
