//! A runner never sits idle on a dead consumer: when its pull consumer is deleted
//! under it, or NATS restarts, it recovers (with backoff) and the runs submitted
//! afterwards still run to completion, and cancels still reach it.

use std::time::Duration;

use sluice_core::run::{CancelRequest, RunState};
use sluice_core::subjects;
use sluice_tests::dispatcher::provision;
use sluice_tests::ingest::jetstream;
use sluice_tests::nats::NatsServer;
use sluice_tests::runner::{
    final_state, git_repo, publish_run, run_request, statuses, step, Runner,
};
use sluice_tests::{init_logs, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

async fn consumer_exists(js: &async_nats::jetstream::Context, cluster: &str) -> bool {
    let Ok(stream) = js.get_stream(subjects::RUNS_STREAM).await else {
        return false;
    };
    stream
        .consumer_info(subjects::runner_consumer(cluster))
        .await
        .is_ok()
}

async fn cancel(js: &async_nats::jetstream::Context, cluster: &str, run_id: &str) {
    let request = CancelRequest {
        run_id: run_id.into(),
        reason: "superseded".into(),
        at: time::OffsetDateTime::now_utc(),
    };
    js.publish(
        subjects::cancel(cluster),
        serde_json::to_vec(&request).expect("json").into(),
    )
    .await
    .expect("pub")
    .await
    .expect("ack");
}

async fn run_to_the_end(js: &async_nats::jetstream::Context, run_id: &str) -> RunState {
    let (repo, sha) = git_repo();
    let req = run_request(
        run_id,
        "eu-1",
        repo.path(),
        &sha,
        vec![step("hello", &["echo hello"])],
    );
    publish_run(js, &req).await;
    wait_for(run_id, DEADLINE, || final_state(js, run_id))
        .await
        .state
}

#[tokio::test]
async fn a_runner_whose_consumer_is_deleted_joins_again_and_runs_what_comes_next() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let _runner = Runner::start(&nats.url(), "eu-1", "r1").await;
    assert_eq!(run_to_the_end(&js, "before-1").await, RunState::Succeeded);

    // Deleted while the runner pulls from it: its pulls now find no one to answer.
    js.get_stream(subjects::RUNS_STREAM)
        .await
        .expect("stream")
        .delete_consumer(&subjects::runner_consumer("eu-1"))
        .await
        .expect("delete the consumer");

    // The request waits in the work queue until a consumer exists again; the runner
    // makes it (this credential may) and takes it.
    assert_eq!(run_to_the_end(&js, "after-1").await, RunState::Succeeded);
    assert!(consumer_exists(&js, "eu-1").await, "the consumer is back");
}

#[tokio::test]
async fn after_a_nats_restart_and_a_lost_control_consumer_runs_still_run_and_cancels_still_arrive()
{
    init_logs();
    let mut nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let _runner = Runner::start(&nats.url(), "eu-1", "r1").await;
    assert_eq!(run_to_the_end(&js, "before-1").await, RunState::Succeeded);

    // A crash and a restart on the same port and store.
    nats.restart().await;
    let js = jetstream(&nats.url()).await;
    assert_eq!(
        run_to_the_end(&js, "after-restart-1").await,
        RunState::Succeeded
    );

    // The runner's follower of cancel requests (its consumer, kept in memory, went
    // with the restart and is made again) loses its consumer once more.
    let control = js
        .get_stream(subjects::CONTROL_STREAM)
        .await
        .expect("control stream");
    let names = wait_for("the runner to follow cancel requests", DEADLINE, || async {
        use futures::TryStreamExt;
        let names: Vec<String> = control.consumer_names().try_collect().await.ok()?;
        (!names.is_empty()).then_some(names)
    })
    .await;
    for name in &names {
        control.delete_consumer(name).await.expect("delete");
    }

    // A long run is cancelled: the request reaches the runner all the same.
    let (repo, sha) = git_repo();
    let req = run_request(
        "long-1",
        "eu-1",
        repo.path(),
        &sha,
        vec![step("wait", &["sleep 60"])],
    );
    publish_run(&js, &req).await;
    wait_for("the long run to run", DEADLINE, || async {
        statuses(&js, "long-1")
            .await
            .iter()
            .any(|u| u.step.as_deref() == Some("wait") && u.state == RunState::Running)
            .then_some(())
    })
    .await;
    cancel(&js, "eu-1", "long-1").await;
    let done = wait_for("the cancel", DEADLINE, || final_state(&js, "long-1")).await;
    assert_eq!(done.state, RunState::Cancelled, "{done:?}");
}
