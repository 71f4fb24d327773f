//! Through a real nats-server: events in, run requests out on the right cluster
//! subjects, exactly once per match whatever is redelivered, crashed or doubled.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use sluice_core::run::{run_id, CancelRequest, RunState, StatusUpdate};
use sluice_core::{subjects, Event, Provider};
use sluice_tests::dispatcher::{
    all_messages, apply, count, decision, provision, publish_event, run_requests, Dispatcher,
};
use sluice_tests::ingest::{jetstream, Ingest};
use sluice_tests::nats::NatsServer;
use sluice_tests::{fixture, init_logs, wait_for};

const PIPELINES: &str = r#"
name: app-ci
triggers:
  - provider: github
    repos: ["codertocat/*"]
    kinds: [pull_request]
    actions: [opened, synchronize, reopened]
    branches: [master]
runtime: { cluster: eu-1 }
env: { CI: "true" }
steps:
  - { name: test, image: "rust:1.85", commands: ["cargo test"] }
  - { name: deploy, image: alpine, commands: ["./deploy"], when: "event.ref == 'refs/heads/master'" }
---
name: app-push
triggers:
  - kinds: [push]
    branches: [master]
runtime: { cluster: [us-1, eu-1] }
steps:
  - { name: build, image: alpine, commands: ["make"] }
---
name: docs
triggers:
  - repos: [codertocat/hello-world]
    paths: ["docs/**"]
    kinds: [push]
steps:
  - { name: build, image: alpine }
---
name: other-repo
triggers:
  - repos: [acme/else]
steps:
  - { name: x, image: alpine }
"#;

fn push_event(id: &str, repo: &str) -> Event {
    let mut e = Event::new(Provider::Github, id, "push");
    e.repo = Some(repo.into());
    e.git_ref = Some("refs/heads/master".into());
    e.sha = Some("abc".into());
    e.changed_files = Some(vec!["src/lib.rs".into()]);
    e.changed_files_complete = true;
    e
}

#[tokio::test]
async fn webhooks_become_run_requests_on_the_right_clusters() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(&js, PIPELINES).await;
    let ingest = Ingest::start(&nats.url()).await;
    let _dispatcher = Dispatcher::start(&nats.url()).await;

    let r = ingest
        .post_github(
            "pull_request",
            "pr-1",
            &fixture("github/pull_request.opened.json"),
        )
        .await;
    assert_eq!(r.status().as_u16(), 202);
    let r = ingest
        .post_github(
            "push",
            "push-1",
            &fixture("github/push.with-new-branch.json"),
        )
        .await;
    assert_eq!(r.status().as_u16(), 202);
    // Starts nothing: a ping.
    let r = ingest
        .post_github("ping", "ping-1", &fixture("github/ping.json"))
        .await;
    assert_eq!(r.status().as_u16(), 200);

    let ping = wait_for("the ping's decision", Duration::from_secs(20), || {
        decision(&js, "github:ping-1")
    })
    .await;
    assert!(ping.runs.is_empty());
    let pr = wait_for("the PR's decision", Duration::from_secs(20), || {
        decision(&js, "github:pr-1")
    })
    .await;
    let push = wait_for("the push's decision", Duration::from_secs(20), || {
        decision(&js, "github:push-1")
    })
    .await;

    let runs = run_requests(&js).await;
    let by_pipeline: HashMap<&str, (&str, &sluice_core::run::RunRequest)> = runs
        .iter()
        .map(|(s, r)| (r.pipeline.as_str(), (s.as_str(), r)))
        .collect();
    assert_eq!(runs.len(), 3, "{runs:?}");
    let (subject, ci) = by_pipeline["app-ci"];
    assert_eq!(subject, "sluice.runs.eu-1");
    assert_eq!(ci.run_id, run_id("github:pr-1", "app-ci", 0));
    assert_eq!(ci.event_id, "github:pr-1");
    assert_eq!(
        ci.sha.as_deref(),
        Some("ec26c3e57ca3a959ca5aad62de7213c562f8c821")
    );
    assert_eq!(ci.git_ref.as_deref(), Some("refs/pull/2/head"));
    assert_eq!(ci.env.get("CI").map(String::as_str), Some("true"));
    // `deploy`'s `when` is false for a pull request ref.
    assert_eq!(
        ci.steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["test"]
    );
    assert_eq!(ci.skipped_steps, ["deploy"]);
    let (subject, app_push) = by_pipeline["app-push"];
    assert_eq!(subject, "sluice.runs.us-1", "the first cluster of the list");
    assert_eq!(app_push.event_id, "github:push-1");
    // The push lists only README.md and is a new branch: docs' path filter cannot be
    // trusted to skip, so it fires and the decision says why.
    let (_, docs) = by_pipeline["docs"];
    assert_eq!(docs.event_id, "github:push-1");
    let docs_verdict = push
        .pipelines
        .iter()
        .find(|p| p.pipeline == "docs")
        .expect("docs considered");
    assert!(
        docs_verdict.triggers[0]
            .detail
            .contains("may be incomplete"),
        "{docs_verdict:?}"
    );

    // The PR's decision explains the pipelines that did not run.
    let push_pipeline = pr
        .pipelines
        .iter()
        .find(|p| p.pipeline == "app-push")
        .expect("considered");
    assert!(!push_pipeline.matched);
    assert_eq!(push_pipeline.triggers[0].failed.as_deref(), Some("kinds"));
    assert!(pr.pipelines.iter().all(|p| p.pipeline != "other-repo"));
    assert_eq!(pr.not_considered, 1);
    assert_eq!(pr.runs.len(), 1);
    assert_eq!(pr.runs[0].outcome, "published");
}

#[tokio::test]
async fn redeliveries_crashes_and_two_replicas_give_one_run_per_match() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(&js, PIPELINES).await;
    // Each push matches app-push only: its one changed file, src/lib.rs, is not under
    // docs/**, and the list is complete.
    let total = 300;
    for i in 0..total {
        publish_event(
            &js,
            &push_event(&format!("e-{i}"), "codertocat/hello-world"),
        )
        .await;
    }
    // The same deliveries again, as a forge redelivering: deduplicated at the stream.
    for i in 0..20 {
        publish_event(
            &js,
            &push_event(&format!("e-{i}"), "codertocat/hello-world"),
        )
        .await;
    }
    assert_eq!(count(&js, subjects::EVENTS_STREAM).await, total);

    // A dispatcher that dies mid-batch, without acknowledging what it had in hand
    // (one event at a time, so that it is surely killed before the end).
    let mut slow = Dispatcher::config(&nats.url());
    slow.concurrency = 1;
    let first = Dispatcher::start_with(slow).await;
    wait_for("the first runs", Duration::from_secs(20), || async {
        (count(&js, subjects::RUNS_STREAM).await >= 20).then_some(())
    })
    .await;
    first.kill();
    let at_kill = count(&js, subjects::DECISIONS_STREAM).await;
    assert!(
        at_kill < total,
        "killed mid-batch ({at_kill} of {total} decided)"
    );

    // Two replicas take over and race on the redelivered events.
    let a = Dispatcher::start(&nats.url()).await;
    let b = Dispatcher::start(&nats.url()).await;
    let decided = wait_for("every event decided", Duration::from_secs(60), || async {
        let stream_count = count(&js, subjects::DECISIONS_STREAM).await;
        (stream_count == total).then_some(stream_count)
    })
    .await;
    assert_eq!(decided, total);
    a.stop().await;
    b.stop().await;

    let runs = run_requests(&js).await;
    let ids: HashSet<&str> = runs.iter().map(|(_, r)| r.run_id.as_str()).collect();
    assert_eq!(
        runs.len() as u64,
        total,
        "one run request per event and matching pipeline"
    );
    assert_eq!(ids.len() as u64, total, "no run id twice");
    for i in 0..total {
        assert!(
            ids.contains(run_id(&format!("github:e-{i}"), "app-push", 0).as_str()),
            "e-{i}"
        );
    }
}

#[tokio::test]
async fn pipelines_change_live_and_bad_events_are_dead_lettered() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let _dispatcher = Dispatcher::start(&nats.url()).await;

    publish_event(&js, &push_event("before", "acme/live")).await;
    let d = wait_for("first decision", Duration::from_secs(20), || {
        decision(&js, "github:before")
    })
    .await;
    assert!(d.runs.is_empty());

    // Applied while the dispatcher runs: the next event sees it, no restart.
    apply(
        &js,
        "name: live\ntriggers:\n  - repos: [acme/live]\nsteps:\n  - {name: s, image: alpine}\n",
    )
    .await;
    let started = wait_for(
        "the new pipeline to be used",
        Duration::from_secs(20),
        || async {
            let id = format!("after-{}", count(&js, subjects::EVENTS_STREAM).await);
            publish_event(&js, &push_event(&id, "acme/live")).await;
            let event_id = format!("github:{id}");
            let d = wait_for("decision", Duration::from_secs(10), || {
                decision(&js, &event_id)
            })
            .await;
            (!d.runs.is_empty()).then_some(d)
        },
    )
    .await;
    assert_eq!(started.runs[0].pipeline, "live");

    // Not an envelope at all: dead-lettered at once with the reason; the events behind
    // it are not held up.
    js.publish("sluice.events.manual.push", "{not json".into())
        .await
        .expect("pub")
        .await
        .expect("ack");
    publish_event(&js, &push_event("behind", "acme/live")).await;
    wait_for(
        "the event behind to be dispatched",
        Duration::from_secs(20),
        || decision(&js, "github:behind"),
    )
    .await;
    let letters = wait_for("a dead letter", Duration::from_secs(20), || async {
        let m = all_messages(&js, subjects::DEADLETTER_STREAM).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    let letter: serde_json::Value = serde_json::from_slice(&letters[0].1).expect("json");
    assert_eq!(letter["subject"], "sluice.events.manual.push");
    assert!(
        letter["reason"]
            .as_str()
            .unwrap_or("")
            .contains("not an event envelope"),
        "{letter}"
    );
    assert_eq!(letter["message"], "{not json");
}

#[tokio::test]
async fn cancel_in_progress_and_max_running() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(
        &js,
        r#"
name: pr-ci
triggers:
  - kinds: [push]
    repos: [acme/cancel]
runtime: { cluster: eu-1 }
concurrency: { group: "${repo}/${branch}", cancel_in_progress: true }
steps:
  - { name: s, image: alpine }
---
name: deploy
triggers:
  - kinds: [push]
    repos: [acme/queue]
runtime: { cluster: eu-1 }
concurrency: { group: "deploy-${repo}", max_running: 1 }
steps:
  - { name: s, image: alpine }
"#,
    )
    .await;
    let config = Dispatcher::config(&nats.url());
    let metrics = config.metrics.clone();
    let _dispatcher = Dispatcher::start_with(config).await;

    // cancel_in_progress: the second run cancels the first.
    publish_event(&js, &push_event("c-1", "acme/cancel")).await;
    wait_for("c-1", Duration::from_secs(20), || {
        decision(&js, "github:c-1")
    })
    .await;
    publish_event(&js, &push_event("c-2", "acme/cancel")).await;
    wait_for("c-2", Duration::from_secs(20), || {
        decision(&js, "github:c-2")
    })
    .await;
    let cancels = all_messages(&js, subjects::CONTROL_STREAM).await;
    assert_eq!(cancels.len(), 1);
    assert_eq!(cancels[0].0, "sluice.control.eu-1.cancel");
    let cancel: CancelRequest = serde_json::from_slice(&cancels[0].1).expect("cancel");
    assert_eq!(cancel.run_id, run_id("github:c-1", "pr-ci", 0));
    assert!(cancel.reason.contains(&run_id("github:c-2", "pr-ci", 0)));

    // max_running 1: the second waits until the first finishes.
    publish_event(&js, &push_event("q-1", "acme/queue")).await;
    let d1 = wait_for("q-1", Duration::from_secs(20), || {
        decision(&js, "github:q-1")
    })
    .await;
    publish_event(&js, &push_event("q-2", "acme/queue")).await;
    let d2 = wait_for("q-2", Duration::from_secs(20), || {
        decision(&js, "github:q-2")
    })
    .await;
    assert_eq!(d1.runs[0].outcome, "published");
    assert_eq!(d2.runs[0].outcome, "queued");
    let second = run_id("github:q-2", "deploy", 0);
    let published = |id: String| {
        let js = js.clone();
        async move {
            run_requests(&js)
                .await
                .iter()
                .any(|(_, r)| r.run_id == id)
                .then_some(())
        }
    };
    assert!(
        published(second.clone()).await.is_none(),
        "queued, not published"
    );

    // The runner reports the first run finished: the queued one is published.
    let first = run_id("github:q-1", "deploy", 0);
    let done = StatusUpdate {
        run_id: first.clone(),
        pipeline: "deploy".into(),
        state: RunState::Succeeded,
        step: None,
        at: time::OffsetDateTime::now_utc(),
        cluster: Some("eu-1".into()),
        event_id: Some("github:q-1".into()),
        concurrency_group: Some("deploy-acme/queue".into()),
        exit_code: Some(0),
        message: None,
        runner: None,
        repo: None,
        sha: None,
        parent: None,
    };
    js.publish(
        done.subject(),
        serde_json::to_vec(&done).expect("json").into(),
    )
    .await
    .expect("pub")
    .await
    .expect("ack");
    wait_for(
        "the queued run to be published",
        Duration::from_secs(20),
        || published(second.clone()),
    )
    .await;

    // Counted as planned when stored: c-1, c-2 and q-1 at once, q-2 once released.
    let planned = || {
        metrics
            .runs_planned
            .get_or_create(&sluice_dispatcher::metrics::ClusterLabel {
                cluster: "eu-1".into(),
            })
            .get()
    };
    wait_for("four runs planned", Duration::from_secs(20), || async {
        (planned() == 4).then_some(())
    })
    .await;
    // Timed only for the events that stored a run request themselves.
    let timed = {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("d", "", metrics.dispatch_seconds.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encode");
        out
    };
    assert!(timed.contains("d_count 3\n"), "{timed}");
}

#[tokio::test]
async fn cluster_lists_fall_back_to_a_cluster_with_a_live_runner() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(&js, PIPELINES).await;
    let runners = sluice_core::streams::bucket(&js, subjects::RUNNERS_BUCKET)
        .await
        .expect("bucket");
    let _dispatcher = Dispatcher::start(&nats.url()).await;

    // No runner anywhere: the first cluster of [us-1, eu-1], where the run waits.
    publish_event(&js, &push_event("f-0", "codertocat/hello-world")).await;
    let d = wait_for("f-0", Duration::from_secs(20), || {
        decision(&js, "github:f-0")
    })
    .await;
    assert_eq!(d.runs[0].cluster, "us-1");

    // Only eu-1 has a runner: app-push falls back to it.
    runners
        .put("eu-1.runner-a", "{}".into())
        .await
        .expect("heartbeat");
    let n = std::sync::atomic::AtomicUsize::new(1);
    let routed = |want: &'static str| {
        let (js, n) = (&js, &n);
        move || async move {
            let id = format!("f-{}", n.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
            publish_event(js, &push_event(&id, "codertocat/hello-world")).await;
            let event_id = format!("github:{id}");
            let d = wait_for("decision", Duration::from_secs(10), || {
                decision(js, &event_id)
            })
            .await;
            (d.runs[0].cluster == want).then_some(())
        }
    };
    wait_for(
        "runs to go to eu-1",
        Duration::from_secs(20),
        routed("eu-1"),
    )
    .await;

    // us-1's runner comes back: it is first in the list again.
    runners
        .put("us-1.runner-b", "{}".into())
        .await
        .expect("heartbeat");
    wait_for(
        "runs to go to us-1",
        Duration::from_secs(20),
        routed("us-1"),
    )
    .await;
}

#[tokio::test]
async fn an_event_that_keeps_failing_is_dead_lettered_after_its_attempts() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(
        &js,
        "name: doomed\ntriggers:\n  - repos: [acme/doomed]\nruntime: { cluster: eu-1 }\nsteps:\n  - {name: s, image: alpine}\n",
    )
    .await;
    let mut config = Dispatcher::config(&nats.url());
    config.max_attempts = 2;
    config.publish_timeout = Duration::from_secs(1);
    let _dispatcher = Dispatcher::start_with(config).await;
    // Once it has provisioned the streams and joined: runs cannot be stored, so every
    // attempt to plan the event's run fails, as while JetStream is unavailable.
    wait_for(
        "the dispatcher to join",
        Duration::from_secs(20),
        || async {
            let stream = js.get_stream(subjects::EVENTS_STREAM).await.ok()?;
            stream
                .consumer_info("sluice-dispatcher")
                .await
                .ok()
                .map(|_| ())
        },
    )
    .await;
    js.delete_stream(subjects::RUNS_STREAM)
        .await
        .expect("delete the runs stream");

    publish_event(&js, &push_event("doomed", "acme/doomed")).await;
    let letters = wait_for("a dead letter", Duration::from_secs(30), || async {
        let m = all_messages(&js, subjects::DEADLETTER_STREAM).await;
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(letters.len(), 1, "dead-lettered once");
    let letter: serde_json::Value = serde_json::from_slice(&letters[0].1).expect("json");
    assert_eq!(letter["attempts"], 2, "{letter}");
    let original: Event =
        serde_json::from_str(letter["message"].as_str().expect("message")).expect("the event");
    assert_eq!(original.id, "github:doomed");
    assert!(
        !letter["reason"].as_str().unwrap_or("").is_empty(),
        "{letter}"
    );
    // Taken off the queue (terminated), not delivered again.
    wait_for(
        "the event to leave the queue",
        Duration::from_secs(10),
        || async {
            let info = js
                .get_stream(subjects::EVENTS_STREAM)
                .await
                .ok()?
                .consumer_info("sluice-dispatcher")
                .await
                .ok()?;
            (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
        },
    )
    .await;
    assert!(decision(&js, "github:doomed").await.is_none());
}
