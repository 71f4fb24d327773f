//! The runner with the local executor, through a real nats-server: run requests in,
//! states and logs out, for success, a failing step, a timeout, a cancel; replicas
//! sharing a cluster's work, another cluster never seeing it; a killed runner's run
//! finished by another.

use std::collections::HashSet;
use std::time::Duration;

use sluice_core::run::{CancelRequest, RunState};
use sluice_core::subjects;
use sluice_tests::dispatcher::{count, provision};
use sluice_tests::ingest::jetstream;
use sluice_tests::nats::NatsServer;
use sluice_tests::runner::{
    assert_hostile_output_kept, final_state, git_repo, log_lines, publish_run, run_request,
    statuses, step, step_states, Runner,
};
use sluice_tests::{init_logs, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn success_failure_timeout_and_cancel() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let (repo, sha) = git_repo();
    let _runner = Runner::start(&nats.url(), "eu-1", "r1").await;

    // Success: the repository is cloned at the commit, env reaches the steps.
    assert!(
        std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
        "the isolation check below needs a variable set in the runner's environment"
    );
    let ok = run_request(
        "ok-1",
        "eu-1",
        repo.path(),
        &sha,
        vec![
            step(
                "read",
                &[
                    "cat hello.txt",
                    "echo \"var=$PIPELINE_VAR run=$SLUICE_RUN_ID\"",
                    "echo to-stderr >&2",
                ],
            ),
            step("second", &["git rev-parse HEAD"]),
            // The runner's own environment (here cargo's) never reaches a step.
            step(
                "isolated",
                &["test -z \"$CARGO_MANIFEST_DIR\" && echo clean"],
            ),
        ],
    );
    publish_run(&js, &ok).await;
    let done = wait_for("ok-1 to finish", DEADLINE, || final_state(&js, "ok-1")).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(done.runner.as_deref(), Some("r1"));
    let all = statuses(&js, "ok-1").await;
    let run_states: Vec<RunState> = all
        .iter()
        .filter(|u| u.step.is_none())
        .map(|u| u.state)
        .collect();
    assert_eq!(
        run_states,
        [RunState::Scheduled, RunState::Running, RunState::Succeeded]
    );
    assert_eq!(
        step_states(&all),
        [
            ("read".into(), RunState::Running),
            ("read".into(), RunState::Succeeded),
            ("second".into(), RunState::Running),
            ("second".into(), RunState::Succeeded),
            ("isolated".into(), RunState::Running),
            ("isolated".into(), RunState::Succeeded),
        ]
    );
    assert_eq!(
        log_lines(&js, "ok-1", "read").await,
        [
            "hello from the repository",
            "var=from-pipeline run=ok-1",
            "to-stderr"
        ]
    );
    assert_eq!(log_lines(&js, "ok-1", "second").await, vec![sha.clone()]);
    assert_eq!(log_lines(&js, "ok-1", "isolated").await, ["clean"]);

    // A failing step: its exit code, and the steps after it never run.
    let failing = run_request(
        "fail-1",
        "eu-1",
        repo.path(),
        &sha,
        vec![
            step("boom", &["echo before", "exit 3", "echo never"]),
            step("after", &["echo no"]),
        ],
    );
    publish_run(&js, &failing).await;
    let done = wait_for("fail-1", DEADLINE, || final_state(&js, "fail-1")).await;
    assert_eq!(done.state, RunState::Failed);
    assert!(
        done.message
            .as_deref()
            .unwrap_or("")
            .contains("step boom: exited with 3"),
        "{done:?}"
    );
    let all = statuses(&js, "fail-1").await;
    let boom = all
        .iter()
        .find(|u| u.step.as_deref() == Some("boom") && u.state == RunState::Failed)
        .expect("boom failed");
    assert_eq!(boom.exit_code, Some(3));
    assert!(all.iter().all(|u| u.step.as_deref() != Some("after")));
    assert_eq!(
        log_lines(&js, "fail-1", "boom").await,
        ["before", "exited with 3"]
    );

    // A step timeout.
    let mut slow = step("slow", &["sleep 30"]);
    slow.timeout_secs = Some(1);
    publish_run(
        &js,
        &run_request("timeout-1", "eu-1", repo.path(), &sha, vec![slow]),
    )
    .await;
    let done = wait_for("timeout-1", DEADLINE, || final_state(&js, "timeout-1")).await;
    assert_eq!(done.state, RunState::Failed);
    assert!(
        done.message
            .as_deref()
            .unwrap_or("")
            .contains("timed out after 1s"),
        "{done:?}"
    );

    // A cancel while the step runs.
    publish_run(
        &js,
        &run_request(
            "cancel-1",
            "eu-1",
            repo.path(),
            &sha,
            vec![step("long", &["echo started", "sleep 30"])],
        ),
    )
    .await;
    wait_for("cancel-1 to be running", DEADLINE, || async {
        (log_lines(&js, "cancel-1", "long").await == ["started"]).then_some(())
    })
    .await;
    let cancel = CancelRequest {
        run_id: "cancel-1".into(),
        reason: "superseded".into(),
        at: time::OffsetDateTime::now_utc(),
    };
    js.publish(
        subjects::cancel("eu-1"),
        serde_json::to_vec(&cancel).expect("json").into(),
    )
    .await
    .expect("pub")
    .await
    .expect("ack");
    let done = wait_for("cancel-1", DEADLINE, || final_state(&js, "cancel-1")).await;
    assert_eq!(done.state, RunState::Cancelled);
    // Finished runs leave the work queue.
    wait_for("the queue to drain", DEADLINE, || async {
        (count(&js, subjects::RUNS_STREAM).await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn replicas_share_a_cluster_and_other_clusters_never_see_it() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let (repo, sha) = git_repo();
    let a = Runner::start_with(&nats.url(), "eu-1", "replica-a", |c| c.max_running = 2).await;
    let b = Runner::start_with(&nats.url(), "eu-1", "replica-b", |c| c.max_running = 2).await;
    let other = Runner::start(&nats.url(), "us-1", "other-cluster").await;
    for i in 0..8 {
        publish_run(
            &js,
            &run_request(
                &format!("share-{i}"),
                "eu-1",
                repo.path(),
                &sha,
                vec![step("s", &["sleep 0.5"])],
            ),
        )
        .await;
    }
    let mut runners = HashSet::new();
    for i in 0..8 {
        let id = format!("share-{i}");
        let done = wait_for("a shared run", DEADLINE, || final_state(&js, &id)).await;
        assert_eq!(done.state, RunState::Succeeded);
        runners.insert(done.runner.expect("runner named"));
    }
    assert_eq!(
        runners,
        HashSet::from(["replica-a".to_owned(), "replica-b".to_owned()]),
        "both replicas took work, the other cluster none"
    );
    // The replicas' --max-running bounds the work in hand, not JetStream's default
    // cap of 1,000 unacknowledged runs per consumer.
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(subjects::RUNS_STREAM)
        .await
        .expect("stream")
        .get_consumer("sluice-runner-eu-1")
        .await
        .expect("consumer");
    let info = consumer.info().await.expect("info");
    assert_eq!(info.config.max_ack_pending, -1);
    a.stop().await;
    b.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn a_killed_runners_run_is_finished_by_another() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let (repo, sha) = git_repo();
    let first = Runner::start(&nats.url(), "eu-1", "doomed").await;
    publish_run(
        &js,
        &run_request(
            "crash-1",
            "eu-1",
            repo.path(),
            &sha,
            vec![step("s", &["echo started", "sleep 3", "echo finished"])],
        ),
    )
    .await;
    wait_for("the run to start", DEADLINE, || async {
        (log_lines(&js, "crash-1", "s")
            .await
            .first()
            .map(String::as_str)
            == Some("started"))
        .then_some(())
    })
    .await;
    first.kill();
    let _second = Runner::start(&nats.url(), "eu-1", "survivor").await;
    let done = wait_for(
        "crash-1 to finish on the survivor",
        Duration::from_secs(60),
        || final_state(&js, "crash-1"),
    )
    .await;
    assert_eq!(done.state, RunState::Succeeded);
    assert_eq!(done.runner.as_deref(), Some("survivor"));
    let finals: Vec<_> = statuses(&js, "crash-1")
        .await
        .into_iter()
        .filter(|u| u.step.is_none() && u.state.is_final())
        .collect();
    assert_eq!(finals.len(), 1, "one final state");
    wait_for("the queue to drain", DEADLINE, || async {
        (count(&js, subjects::RUNS_STREAM).await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn hostile_output_is_cut_and_cleaned_and_nothing_after_it_is_lost() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let _runner = Runner::start(&nats.url(), "eu-1", "r1").await;
    assert_hostile_output_kept(&js).await;
}
