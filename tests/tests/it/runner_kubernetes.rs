//! The runner with the Kubernetes executor: the real kube-rs client against the HTTP
//! test double of the Kubernetes API (which runs containers as local processes), and a
//! real nats-server. Run requests in, Pods with the right spec out, states and logs
//! in the streams: success, a failing step, step and run timeouts, a cancel, secrets,
//! caches, a Pod that never gets a node, API faults and a NATS restart mid-run.

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use sluice_core::run::{CancelRequest, RunCache, RunState};
use sluice_core::subjects;
use sluice_tests::dispatcher::{count, provision};
use sluice_tests::ingest::jetstream;
use sluice_tests::kubeapi::KubeApi;
use sluice_tests::nats::NatsServer;
use sluice_tests::runner::{
    assert_hostile_output_kept, final_state, git_repo, log_lines, publish_run, run_request,
    statuses, step, step_states, Runner,
};
use sluice_tests::{init_logs, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);

fn containers(pod: &Pod) -> (Vec<String>, Vec<String>) {
    let spec = pod.spec.as_ref().expect("spec");
    (
        spec.init_containers
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect(),
        spec.containers.iter().map(|c| c.name.clone()).collect(),
    )
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

#[tokio::test]
async fn pods_states_and_logs_for_success_failure_timeouts_and_cancel() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    api.put_secret("crates-token", &[("TOKEN", "s3cret-value")]);
    let (repo, sha) = git_repo();
    let _runner = Runner::start_kube(&nats.url(), "eu-1", "r1", &api, |_| {}).await;

    // Success: cloned at the commit by the built-in step, env and Secrets reach the
    // steps, each step's log in order.
    let mut with_secret = step(
        "secret",
        &[
            "test \"$TOKEN\" = s3cret-value",
            "cat /var/run/secrets/sluice/crates-token/TOKEN",
        ],
    );
    with_secret.secrets = vec!["crates-token".into()];
    let mut ok = run_request(
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
                ],
            ),
            with_secret,
            step("last", &["git rev-parse HEAD"]),
        ],
    );
    ok.timeout_secs = Some(600);
    publish_run(&js, &ok).await;
    let done = wait_for("ok-1 to finish", DEADLINE, || final_state(&js, "ok-1")).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(
        log_lines(&js, "ok-1", "read").await,
        ["hello from the repository", "var=from-pipeline run=ok-1"]
    );
    // The value reached the step (the `test` passed) and is masked in its log.
    assert_eq!(log_lines(&js, "ok-1", "secret").await, ["***"]);
    assert_eq!(log_lines(&js, "ok-1", "last").await, [sha.as_str()]);
    assert_eq!(
        log_lines(&js, "ok-1", "clone").await,
        [format!("checked out {sha}")]
    );
    let updates = statuses(&js, "ok-1").await;
    let run_states: Vec<RunState> = updates
        .iter()
        .filter(|u| u.step.is_none())
        .map(|u| u.state)
        .collect();
    assert_eq!(
        run_states,
        [RunState::Scheduled, RunState::Running, RunState::Succeeded]
    );
    assert_eq!(
        step_states(&updates),
        [
            ("read".to_owned(), RunState::Running),
            ("read".to_owned(), RunState::Succeeded),
            ("secret".to_owned(), RunState::Running),
            ("secret".to_owned(), RunState::Succeeded),
            ("last".to_owned(), RunState::Running),
            ("last".to_owned(), RunState::Succeeded),
        ]
    );
    // The Pod: named from the run id, steps in order after the clone, locked down.
    let pod = api.pod("sluice-ok-1").expect("the run's Pod is kept");
    assert_eq!(
        containers(&pod),
        (
            vec!["sluice-clone".into(), "read".into(), "secret".into()],
            vec!["last".into()]
        )
    );
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels["sluice.dev/run"], "ok-1");
    assert_eq!(labels["sluice.dev/cluster"], "eu-1");
    assert_eq!(labels["sluice.dev/pipeline"], "p");
    assert_eq!(labels["sluice.dev/repo"], "acme.app");
    let spec = pod.spec.as_ref().expect("spec");
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(spec.active_deadline_seconds, Some(600));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let security = spec.security_context.as_ref().expect("security context");
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(api.created(), ["sluice-ok-1"]);

    // A failing step: the run fails with its exit code; later steps never start.
    publish_run(
        &js,
        &run_request(
            "fail-1",
            "eu-1",
            repo.path(),
            &sha,
            vec![
                step("test", &["echo failing on purpose", "exit 3"]),
                step("never", &["echo should not run"]),
            ],
        ),
    )
    .await;
    // A step over its own timeout: the runner deletes the Pod.
    let mut slow = step("slow", &["echo starting", "sleep 30"]);
    slow.timeout_secs = Some(1);
    publish_run(
        &js,
        &run_request("step-timeout-1", "eu-1", repo.path(), &sha, vec![slow]),
    )
    .await;
    // A run over the pipeline's timeout: Kubernetes' activeDeadlineSeconds.
    let mut deadline = run_request(
        "run-timeout-1",
        "eu-1",
        repo.path(),
        &sha,
        vec![step("forever", &["sleep 30"])],
    );
    deadline.timeout_secs = Some(1);
    publish_run(&js, &deadline).await;
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

    let failed = wait_for("fail-1", DEADLINE, || final_state(&js, "fail-1")).await;
    assert_eq!(failed.state, RunState::Failed);
    assert_eq!(
        failed.message.as_deref(),
        Some("step test: exited with 3"),
        "{failed:?}"
    );
    assert_eq!(
        log_lines(&js, "fail-1", "test").await,
        ["failing on purpose"]
    );
    let fail_steps = step_states(&statuses(&js, "fail-1").await);
    assert!(fail_steps.contains(&("test".into(), RunState::Failed)));
    assert!(
        !fail_steps.iter().any(|(s, _)| s == "never"),
        "{fail_steps:?}"
    );
    let exit = statuses(&js, "fail-1")
        .await
        .into_iter()
        .find(|u| u.step.as_deref() == Some("test") && u.state == RunState::Failed)
        .and_then(|u| u.exit_code);
    assert_eq!(exit, Some(3));

    let timed = wait_for("step-timeout-1", DEADLINE, || {
        final_state(&js, "step-timeout-1")
    })
    .await;
    assert_eq!(timed.state, RunState::Failed);
    assert_eq!(
        timed.message.as_deref(),
        Some("step slow: timed out after 1s"),
        "{timed:?}"
    );
    assert_eq!(log_lines(&js, "step-timeout-1", "slow").await, ["starting"]);
    assert!(
        api.pod("sluice-step-timeout-1").is_none(),
        "the Pod is deleted"
    );

    let over = wait_for("run-timeout-1", DEADLINE, || {
        final_state(&js, "run-timeout-1")
    })
    .await;
    assert_eq!(over.state, RunState::Failed);
    assert_eq!(
        over.message.as_deref(),
        Some("the run's timeout was reached"),
        "{over:?}"
    );

    wait_for("cancel-1 to be running", DEADLINE, || async {
        (log_lines(&js, "cancel-1", "long").await == ["started"]).then_some(())
    })
    .await;
    cancel(&js, "eu-1", "cancel-1").await;
    let cancelled = wait_for("cancel-1", DEADLINE, || final_state(&js, "cancel-1")).await;
    assert_eq!(cancelled.state, RunState::Cancelled);
    assert!(api.pod("sluice-cancel-1").is_none(), "the Pod is deleted");

    // Finished runs leave the work queue; every run made exactly one Pod.
    wait_for("the queue to drain", DEADLINE, || async {
        (count(&js, subjects::RUNS_STREAM).await == 0).then_some(())
    })
    .await;
    let created = api.created();
    let unique: HashSet<&String> = created.iter().collect();
    assert_eq!(created.len(), 5, "{created:?}");
    assert_eq!(unique.len(), 5, "{created:?}");
}

#[tokio::test]
async fn caches_are_claims_per_branch_seeded_from_the_default_branch() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    let (repo, sha) = git_repo();
    let _runner = Runner::start_kube(&nats.url(), "eu-1", "r1", &api, |_| {}).await;

    // The default branch fills its cache.
    let mut main = run_request(
        "cache-main",
        "eu-1",
        repo.path(),
        &sha,
        vec![step(
            "fill",
            &["echo built-on-main > .cache/artifact", "ls .cache"],
        )],
    );
    main.cache = Some(RunCache {
        key: "acme/app/main".into(),
        fallback_key: Some("acme/app/main".into()),
        paths: vec![".cache".into()],
    });
    publish_run(&js, &main).await;
    let done = wait_for("cache-main", DEADLINE, || final_state(&js, "cache-main")).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");

    // A new branch starts from a copy of it, and writes only its own.
    let mut feature = run_request(
        "cache-feature",
        "eu-1",
        repo.path(),
        &sha,
        vec![step(
            "use",
            &["cat .cache/artifact", "echo feature-only > .cache/mine"],
        )],
    );
    feature.cache = Some(RunCache {
        key: "acme/app/feature".into(),
        fallback_key: Some("acme/app/main".into()),
        paths: vec![".cache".into()],
    });
    publish_run(&js, &feature).await;
    let done = wait_for("cache-feature", DEADLINE, || {
        final_state(&js, "cache-feature")
    })
    .await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(
        log_lines(&js, "cache-feature", "use").await,
        ["built-on-main"]
    );

    let claims = api.claims();
    assert_eq!(claims.len(), 2, "one claim per branch");
    let main_claim = sluice_runner::kubernetes::pod::cache_claim_name("acme/app/main");
    let feature_claim = sluice_runner::kubernetes::pod::cache_claim_name("acme/app/feature");
    let cloned_from = claims
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(feature_claim.as_str()))
        .and_then(|c| c.spec.as_ref()?.data_source.as_ref())
        .map(|s| s.name.clone());
    assert_eq!(cloned_from.as_deref(), Some(main_claim.as_str()));
    assert!(!api.claim_dir(&main_claim).join("_cache/mine").exists());
    assert!(api.claim_dir(&feature_claim).join("_cache/mine").exists());
}

#[tokio::test]
async fn a_pod_that_never_gets_a_node_fails_after_the_pending_limit() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    api.set_unschedulable(true);
    let (repo, sha) = git_repo();
    let _runner = Runner::start_kube(&nats.url(), "eu-1", "r1", &api, |s| {
        s.pending_timeout = Duration::from_secs(1);
    })
    .await;
    publish_run(
        &js,
        &run_request(
            "stuck-1",
            "eu-1",
            repo.path(),
            &sha,
            vec![step("s", &["true"])],
        ),
    )
    .await;
    let done = wait_for("stuck-1", DEADLINE, || final_state(&js, "stuck-1")).await;
    assert_eq!(done.state, RunState::Error);
    let message = done.message.unwrap_or_default();
    assert!(
        message.contains("pending timeout") && message.contains("Unschedulable"),
        "{message}"
    );
    assert!(api.pod("sluice-stuck-1").is_none(), "the Pod is deleted");
}

#[tokio::test]
async fn api_throttling_watch_drops_and_a_nats_restart_lose_nothing() {
    init_logs();
    let mut nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    let (repo, sha) = git_repo();
    let _runner = Runner::start_kube(&nats.url(), "eu-1", "r1", &api, |_| {}).await;

    // A 429 storm and server errors on the very first Pod creates.
    api.fail_next(12, 429, "/pods");
    api.fail_next(3, 503, "/pods");
    api.fail_next(2, 500, "/pods");
    let runs: Vec<String> = (0..6).map(|i| format!("faults-{i}")).collect();
    for id in &runs {
        publish_run(
            &js,
            &run_request(
                id,
                "eu-1",
                repo.path(),
                &sha,
                vec![step(
                    "count",
                    &["for i in 1 2 3 4 5 6 7 8 9 10; do echo line $i; sleep 0.2; done"],
                )],
            ),
        )
        .await;
    }
    wait_for("every run to be running", DEADLINE, || async {
        for id in &runs {
            if log_lines(&js, id, "count").await.is_empty() {
                return None;
            }
        }
        Some(())
    })
    .await;
    // Watches drop, history is compacted (the watcher's resume gets 410 Gone and it
    // must list again), and NATS restarts while the steps write.
    api.drop_watches();
    api.compact();
    api.drop_watches();
    nats.restart().await;

    let expected: Vec<String> = (1..=10).map(|i| format!("line {i}")).collect();
    for id in &runs {
        let done = wait_for(id, Duration::from_secs(60), || final_state(&js, id)).await;
        assert_eq!(done.state, RunState::Succeeded, "{done:?}");
        assert_eq!(log_lines(&js, id, "count").await, expected, "{id}");
    }
    let created = api.created();
    assert_eq!(created.len(), runs.len(), "one Pod per run: {created:?}");
    // Every injected fault was answered, and retried past.
    let requests = api.requests();
    let answered = |code: u16| requests.iter().filter(|r| r.status == code).count();
    assert_eq!(
        (answered(429), answered(503), answered(500)),
        (12, 3, 2),
        "the faults were hit"
    );
}

/// A log follow the API server ends cleanly while the container runs on is opened
/// again, whether the container runs on for longer than the runner waits for an exit
/// (first drop) or exits soon after (second drop: the exit must not be taken for the
/// stream's end), and the reopened stream (from the container's first line) stores no
/// line twice and loses none.
#[tokio::test]
async fn a_log_stream_dropped_mid_step_is_reopened_without_a_line_twice() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    let (repo, sha) = git_repo();
    let _runner = Runner::start_kube(&nats.url(), "eu-1", "r1", &api, |_| {}).await;
    publish_run(
        &js,
        &run_request(
            "dropped-log",
            "eu-1",
            repo.path(),
            &sha,
            vec![step(
                "count",
                &["for i in $(seq 1 40); do echo line $i; sleep 0.3; done"],
            )],
        ),
    )
    .await;
    // About 12 s of output: dropped after 2 lines (the exit more than 5 s away: the
    // runner's wait for it ends first) and after 25 (the exit about 4 s away: it comes
    // within that wait, more than a second after the stream ended). A drop within a
    // second of the exit is the case the runner cannot tell from the exit itself.
    for after in [2, 25] {
        wait_for(&format!("{after} lines stored"), DEADLINE, || async {
            (log_lines(&js, "dropped-log", "count").await.len() >= after).then_some(())
        })
        .await;
        api.drop_log_streams();
    }
    let done = wait_for("the run", Duration::from_secs(60), || {
        final_state(&js, "dropped-log")
    })
    .await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    let expected: Vec<String> = (1..=40).map(|i| format!("line {i}")).collect();
    assert_eq!(log_lines(&js, "dropped-log", "count").await, expected);
    let follows = api
        .requests()
        .iter()
        .filter(|r| r.uri.contains("/log?") && r.uri.contains("follow=true"))
        .count();
    assert!(
        follows >= 3,
        "the log was opened again after each drop: {follows}"
    );
}

const FAMILY: &str = r#"
name: parent
triggers: [{ kinds: [push] }]
runtime: { cluster: eu-1 }
steps:
  - { name: build, image: alpine, commands: ["echo building"] }
  - { name: ship, pipeline: deploy, runtime: { cluster: us-1 } }
  - { name: after, image: alpine, commands: ["echo after the child", "cat hello.txt"] }
---
name: deploy
triggers: [{ kinds: [deploy] }]
runtime: { cluster: eu-1 }
steps:
  - { name: release, image: alpine, commands: ["echo releasing $SLUICE_SHA"] }
---
name: parent-of-failure
triggers: [{ kinds: [push] }]
runtime: { cluster: eu-1 }
steps:
  - { name: ship, pipeline: broken, runtime: { cluster: us-1 } }
  - { name: never, image: alpine, commands: ["echo should not run"] }
---
name: broken
triggers: [{ kinds: [deploy] }]
steps:
  - { name: oops, image: alpine, commands: ["exit 7"] }
"#;

#[tokio::test]
async fn a_child_pipeline_runs_on_a_second_cluster_and_its_result_decides_the_step() {
    use sluice_core::envelope::{Event, Provider};
    use sluice_core::run::run_id;
    use sluice_tests::dispatcher::{apply, decision, publish_event, Dispatcher};

    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(&js, FAMILY).await;
    let api = KubeApi::start().await;
    let (repo, sha) = git_repo();
    let _dispatcher = Dispatcher::start(&nats.url()).await;
    let _eu = Runner::start_kube(&nats.url(), "eu-1", "r-eu", &api, |_| {}).await;
    let _us = Runner::start_kube(&nats.url(), "us-1", "r-us", &api, |_| {}).await;

    let start = |delivery: &str, pipeline: &str| {
        let mut e = Event::new(Provider::Manual, delivery, "push");
        e.pipeline = Some(pipeline.into());
        e.repo = Some("acme/app".into());
        e.clone_url = Some(repo.path().display().to_string());
        e.git_ref = Some("refs/heads/main".into());
        e.sha = Some(sha.clone());
        e
    };
    publish_event(&js, &start("fam-1", "parent")).await;
    publish_event(&js, &start("fam-2", "parent-of-failure")).await;

    let parent = run_id("manual:fam-1", "parent", 0);
    let child_event = format!("manual:{parent}-ship");
    let child = run_id(&child_event, "deploy", 0);
    let done = wait_for("the parent", DEADLINE, || final_state(&js, &parent)).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    let child_done = final_state(&js, &child)
        .await
        .expect("the child finished first");
    assert_eq!(child_done.state, RunState::Succeeded);
    assert_eq!(
        child_done.cluster.as_deref(),
        Some("us-1"),
        "the step's runtime wins"
    );
    assert_eq!(child_done.runner.as_deref(), Some("r-us"));
    assert_eq!(
        log_lines(&js, &child, "release").await,
        [format!("releasing {sha}")]
    );
    assert_eq!(
        log_lines(&js, &parent, "after").await,
        ["after the child", "hello from the repository"]
    );
    let planned = decision(&js, &child_event)
        .await
        .expect("the child's decision");
    assert_eq!(planned.runs.len(), 1);
    assert_eq!(planned.runs[0].cluster, "us-1");
    // The parent's steps before and after the child are two Pods on eu-1; the child
    // is one Pod on us-1.
    let cluster_of = |name: &str| {
        api.pod(name)
            .and_then(|p| p.metadata.labels?.get("sluice.dev/cluster").cloned())
    };
    assert_eq!(
        cluster_of(&format!("sluice-{parent}")).as_deref(),
        Some("eu-1")
    );
    assert_eq!(
        cluster_of(&format!("sluice-{parent}-2")).as_deref(),
        Some("eu-1")
    );
    assert_eq!(
        cluster_of(&format!("sluice-{child}")).as_deref(),
        Some("us-1")
    );
    assert!(step_states(&statuses(&js, &parent).await)
        .contains(&("ship".to_owned(), RunState::Succeeded)));

    // A failing child fails its step and the parent; later steps never run.
    let parent = run_id("manual:fam-2", "parent-of-failure", 0);
    let child = run_id(&format!("manual:{parent}-ship"), "broken", 0);
    let done = wait_for("the failing parent", DEADLINE, || final_state(&js, &parent)).await;
    assert_eq!(done.state, RunState::Failed, "{done:?}");
    assert_eq!(
        done.message,
        Some(format!(
            "step ship: child run {child} of broken ended failed: step oops: exited with 7"
        ))
    );
    assert!(!step_states(&statuses(&js, &parent).await)
        .iter()
        .any(|(s, _)| s == "never"));
}

#[tokio::test]
async fn replicas_share_a_cluster_and_other_clusters_never_see_it() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    let (repo, sha) = git_repo();
    let two = |c: &mut sluice_runner::RunnerConfig| c.max_running = 2;
    let _a = Runner::start_kube_with(&nats.url(), "eu-1", "replica-a", &api, |_| {}, two).await;
    let _b = Runner::start_kube_with(&nats.url(), "eu-1", "replica-b", &api, |_| {}, two).await;
    let _other = Runner::start_kube(&nats.url(), "us-1", "other-cluster", &api, |_| {}).await;
    let ids: Vec<String> = (0..8).map(|i| format!("share-{i}")).collect();
    for id in &ids {
        publish_run(
            &js,
            &run_request(
                id,
                "eu-1",
                repo.path(),
                &sha,
                vec![step("s", &["sleep 0.5"])],
            ),
        )
        .await;
    }
    let mut runners = HashSet::new();
    for id in &ids {
        let done = wait_for("a shared run", DEADLINE, || final_state(&js, id)).await;
        assert_eq!(done.state, RunState::Succeeded);
        runners.insert(done.runner.expect("runner named"));
    }
    assert_eq!(
        runners,
        HashSet::from(["replica-a".to_owned(), "replica-b".to_owned()]),
        "both replicas took work, the other cluster none"
    );
    assert_eq!(api.created().len(), ids.len(), "one Pod per run");
}

#[tokio::test]
async fn a_stopping_runner_hands_its_runs_to_another_without_waiting_for_them() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    let (repo, sha) = git_repo();
    let first = Runner::start_kube(&nats.url(), "eu-1", "first", &api, |_| {}).await;
    let count = "i=1; while [ $i -le 40 ]; do echo line $i; i=$((i+1)); sleep 0.2; done";
    publish_run(
        &js,
        &run_request(
            "handoff-1",
            "eu-1",
            repo.path(),
            &sha,
            vec![step("count", &[count])],
        ),
    )
    .await;
    wait_for("the run to be writing", DEADLINE, || async {
        (log_lines(&js, "handoff-1", "count").await.len() >= 3).then_some(())
    })
    .await;
    let second = Runner::start_kube(&nats.url(), "eu-1", "second", &api, |_| {}).await;
    // A graceful stop returns while the step (8 s of output) still runs.
    first.stop().await;
    assert!(
        final_state(&js, "handoff-1").await.is_none(),
        "the stopping runner did not wait for the run"
    );
    assert!(
        api.pod("sluice-handoff-1").is_some(),
        "the Pod keeps running"
    );

    let done = wait_for("handoff-1", DEADLINE, || final_state(&js, "handoff-1")).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(done.runner.as_deref(), Some("second"));
    let expected: Vec<String> = (1..=40).map(|i| format!("line {i}")).collect();
    assert_eq!(log_lines(&js, "handoff-1", "count").await, expected);
    assert_eq!(api.created(), ["sluice-handoff-1"]);
    second.stop().await;
}

#[tokio::test]
async fn finished_pods_are_deleted_after_the_delay_and_swept_at_start_up() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    let (repo, sha) = git_repo();

    // A runner that keeps finished Pods for an hour leaves one behind.
    let keeper = Runner::start_kube(&nats.url(), "eu-1", "keeper", &api, |_| {}).await;
    publish_run(
        &js,
        &run_request(
            "kept-1",
            "eu-1",
            repo.path(),
            &sha,
            vec![step("s", &["true"])],
        ),
    )
    .await;
    let done = wait_for("kept-1", DEADLINE, || final_state(&js, "kept-1")).await;
    assert_eq!(done.state, RunState::Succeeded);
    keeper.stop().await;
    assert!(api.pod("sluice-kept-1").is_some());

    // A runner with no delay removes it at start-up (its final state is stored), and
    // its own runs' Pods once they finish.
    let _sweeper = Runner::start_kube(&nats.url(), "eu-1", "sweeper", &api, |s| {
        s.delete_after = Duration::ZERO;
    })
    .await;
    wait_for("the old Pod to be swept", DEADLINE, || async {
        api.pod("sluice-kept-1").is_none().then_some(())
    })
    .await;
    publish_run(
        &js,
        &run_request(
            "gone-1",
            "eu-1",
            repo.path(),
            &sha,
            vec![step("s", &["echo done"])],
        ),
    )
    .await;
    let done = wait_for("gone-1", DEADLINE, || final_state(&js, "gone-1")).await;
    assert_eq!(done.state, RunState::Succeeded);
    wait_for("the finished Pod to be deleted", DEADLINE, || async {
        api.pod("sluice-gone-1").is_none().then_some(())
    })
    .await;
    // Its logs outlive it.
    assert_eq!(log_lines(&js, "gone-1", "s").await, ["done"]);
    assert_eq!(api.created(), ["sluice-kept-1", "sluice-gone-1"]);
}

#[tokio::test]
async fn hostile_output_is_cut_and_cleaned_and_nothing_after_it_is_lost() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    let _runner = Runner::start_kube(&nats.url(), "eu-1", "r1", &api, |_| {}).await;
    assert_hostile_output_kept(&js).await;
}

/// The log requests the double has received.
fn log_requests(api: &KubeApi) -> Vec<sluice_tests::kubeapi::Recorded> {
    api.requests()
        .into_iter()
        .filter(|r| r.uri.contains("/log"))
        .collect()
}

/// Waits until `runs` logs are followed, opens `gate`, and checks every gated run
/// succeeded with its whole log.
async fn release_gated_runs(
    js: &async_nats::jetstream::Context,
    api: &KubeApi,
    runs: usize,
    gate: &std::path::Path,
    check_while_open: impl FnOnce(),
) {
    wait_for("every gated run's log followed", DEADLINE, || async {
        (log_requests(api).len() == runs).then_some(())
    })
    .await;
    check_while_open();
    std::fs::write(gate, "").expect("gate");
    for i in 0..runs {
        let run = format!("h2-{i}");
        let done = wait_for(&run, DEADLINE, || final_state(js, &run)).await;
        assert_eq!(done.state, RunState::Succeeded, "{done:?}");
        assert_eq!(log_lines(js, &run, "wait").await, ["waiting", "released"]);
    }
}

/// Holds `runs` runs' steps running at once, each waiting for `gate` to exist; every
/// run has one container (no clone), so one followed log each.
async fn gated_runs(js: &async_nats::jetstream::Context, runs: usize, gate: &std::path::Path) {
    let (repo, sha) = git_repo();
    for i in 0..runs {
        let wait = format!(
            "echo waiting; while [ ! -e {} ]; do sleep 0.05; done; echo released",
            gate.display()
        );
        let mut req = run_request(
            &format!("h2-{i}"),
            "eu-1",
            repo.path(),
            &sha,
            vec![step("wait", &[wait.as_str()])],
        );
        req.clone_url = None;
        publish_run(js, &req).await;
    }
}

#[tokio::test]
async fn logs_are_followed_over_http2_a_few_streams_per_connection() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    let _runner = Runner::start_kube(&nats.url(), "eu-1", "r1", &api, |s| {
        s.log_streams_per_connection = 2;
    })
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = dir.path().join("go");
    gated_runs(&js, 5, &gate).await;
    // All five logs open at once: five streams, two per connection, is three
    // HTTP/2 connections.
    release_gated_runs(&js, &api, 5, &gate, || {
        let logs = log_requests(&api);
        assert!(
            logs.iter().all(|r| r.version == http::Version::HTTP_2),
            "{logs:?}"
        );
        let h2 = |open_only: bool| {
            api.connections()
                .iter()
                .filter(|(v, open)| *v == http::Version::HTTP_2 && (*open || !open_only))
                .count()
        };
        assert_eq!(h2(false), 3, "{:?}", api.connections());
        assert_eq!(h2(true), 3);
    })
    .await;
}

#[tokio::test]
async fn logs_fall_back_to_http1_where_http2_is_not_offered() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start_http1_only().await;
    let _runner = Runner::start_kube(&nats.url(), "eu-1", "r1", &api, |_| {}).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let gate = dir.path().join("go");
    gated_runs(&js, 3, &gate).await;
    release_gated_runs(&js, &api, 3, &gate, || {}).await;
    assert!(api
        .connections()
        .iter()
        .all(|(v, _)| *v == http::Version::HTTP_11));
    assert!(api
        .requests()
        .iter()
        .all(|r| r.version == http::Version::HTTP_11));
}

/// The runner's `/metrics` counts its API requests by verb and answer, the throttled
/// ones too, and a Pod create the API refuses by its reason.
#[tokio::test]
async fn api_requests_and_refused_pod_creates_are_counted() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    let (repo, sha) = git_repo();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", sluice_tests::nats::reserve_port())
        .parse()
        .unwrap();
    let _runner = Runner::start_kube_with(
        &nats.url(),
        "eu-1",
        "r1",
        &api,
        |_| {},
        |c| {
            c.admin_listen = Some(admin);
        },
    )
    .await;

    // One request on Pods is throttled (and retried), a later create refused outright.
    api.fail_next(1, 429, "/pods");
    publish_run(
        &js,
        &run_request(
            "counted-1",
            "eu-1",
            repo.path(),
            &sha,
            vec![step("s", &["true"])],
        ),
    )
    .await;
    let done = wait_for("the first run", DEADLINE, || final_state(&js, "counted-1")).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    api.fail_next(1, 403, "/pods");
    publish_run(
        &js,
        &run_request(
            "counted-2",
            "eu-1",
            repo.path(),
            &sha,
            vec![step("s", &["true"])],
        ),
    )
    .await;
    let done = wait_for("the refused run", DEADLINE, || {
        final_state(&js, "counted-2")
    })
    .await;
    assert_eq!(done.state, RunState::Error, "{done:?}");

    let wanted = [
        "sluice_runner_kube_requests_total{verb=\"create\",code=\"201\"} 1",
        "sluice_runner_kube_requests_total{verb=\"create\",code=\"403\"} 1",
        "sluice_runner_pod_create_errors_total{reason=\"forbidden\"} 1",
    ];
    let scrape = || async {
        reqwest::get(format!("http://{admin}/metrics"))
            .await
            .ok()?
            .text()
            .await
            .ok()
    };
    let counted = tokio::time::timeout(DEADLINE, async {
        loop {
            if let Some(m) = scrape().await {
                if wanted.iter().all(|w| m.contains(w)) {
                    return m;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let metrics = match counted {
        Ok(m) => m,
        Err(_) => panic!("not every count in: {:?}", scrape().await),
    };
    // Whichever request on Pods came first (the start-up sweep's list or the first
    // create) was throttled once, and counted as such.
    let throttled: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("sluice_runner_kube_requests_total{") && l.contains("code=\"429\"")
        })
        .collect();
    assert!(
        throttled == ["sluice_runner_kube_requests_total{verb=\"list\",code=\"429\"} 1"]
            || throttled == ["sluice_runner_kube_requests_total{verb=\"create\",code=\"429\"} 1"],
        "{metrics}"
    );
    // The watch and the log streams are counted under their verbs.
    for verb in ["watch", "log"] {
        assert!(
            metrics.contains(&format!(
                "sluice_runner_kube_requests_total{{verb=\"{verb}\",code=\"200\"}}"
            )),
            "{verb}: {metrics}"
        );
    }
}
