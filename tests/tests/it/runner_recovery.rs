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

/// Stores a state of `run_id` on cluster `c1` (of one of its steps with `step`).
async fn store_state(
    js: &async_nats::jetstream::Context,
    run_id: &str,
    state: RunState,
    step: Option<&str>,
) {
    let update = serde_json::json!({
        "run_id": run_id, "pipeline": "p", "state": state, "step": step,
        "at": "2026-12-04T12:00:00Z", "cluster": "c1",
    });
    js.publish(
        subjects::status("c1", run_id),
        serde_json::to_vec(&update).expect("json").into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
}

/// Before each run it takes, a runner checks whether the run already finished (its
/// final state stored, the ack lost). The check reads the run's last state directly:
/// no consumer is created on SLUICE_STATUS for a new run or a finished one — on a
/// 3-node cluster each such consumer cost a clustered create, and hundreds lingered
/// under load. Where the last state does not settle it, or direct gets are off (a
/// status stream from before `allow_direct`), the full read answers the same.
#[tokio::test]
async fn the_already_finished_check_reads_the_last_state_without_a_consumer() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let check = |run: &'static str| {
        let js = js.clone();
        async move {
            sluice_core::bus::final_state(&js, "c1", run)
                .await
                .expect("read the run's states")
        }
    };
    let consumers = || async {
        js.get_stream(subjects::STATUS_STREAM)
            .await
            .expect("status stream")
            .info()
            .await
            .expect("info")
            .state
            .consumer_count
    };

    assert_eq!(check("new").await, None);
    store_state(&js, "done", RunState::Running, None).await;
    store_state(&js, "done", RunState::Succeeded, None).await;
    assert_eq!(check("done").await, Some(RunState::Succeeded));
    assert_eq!(consumers().await, 0, "the check created a consumer");

    // A step's update stored after the run's final state: the full read finds it.
    store_state(&js, "late", RunState::Cancelled, None).await;
    store_state(&js, "late", RunState::Running, Some("test")).await;
    assert_eq!(check("late").await, Some(RunState::Cancelled));
    store_state(&js, "going", RunState::Running, None).await;
    assert_eq!(check("going").await, None);

    let mut config = sluice_core::streams::StreamSettings::default().status();
    config.allow_direct = false;
    js.update_stream(config).await.expect("direct gets off");
    assert_eq!(check("done").await, Some(RunState::Succeeded));
    assert_eq!(check("late").await, Some(RunState::Cancelled));
    assert_eq!(check("new").await, None);
}

/// Answers every direct get on SLUICE_STATUS as a replica still catching up after a
/// restart does for what it has not yet stored: "404 No Messages". Raw protocol,
/// because a status line is not something a client library sends; the server itself
/// answers none of these while the stream has direct gets off.
async fn replica_without_the_run(port: u16) -> tokio::task::JoinHandle<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = String::new();
    read.read_line(&mut line).await.expect("INFO");
    write
        .write_all(
            b"CONNECT {\"verbose\":false,\"headers\":true}\r\n\
              SUB $JS.API.DIRECT.GET.SLUICE_STATUS.> 1\r\nPING\r\n",
        )
        .await
        .expect("subscribe");
    // Subscribed once the server answers the PING after the SUB.
    loop {
        line.clear();
        read.read_line(&mut line).await.expect("PONG");
        if line.starts_with("PONG") {
            break;
        }
    }
    tokio::spawn(async move {
        loop {
            line.clear();
            if read.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first() {
                Some(&"PING") => {
                    let _ = write.write_all(b"PONG\r\n").await;
                }
                // MSG <subject> <sid> <reply> <size>
                Some(&"MSG") if words.len() == 5 => {
                    let size: usize = words[4].parse().expect("size");
                    let mut body = vec![0; size + 2];
                    read.read_exact(&mut body).await.expect("body");
                    let header = "NATS/1.0 404 No Messages\r\n\r\n";
                    let reply = format!(
                        "HPUB {} {} {}\r\n{header}\r\n",
                        words[3],
                        header.len(),
                        header.len()
                    );
                    let _ = write.write_all(reply.as_bytes()).await;
                }
                _ => {}
            }
        }
    })
}

/// The finished check asks the stream leader for the run's last sequence before it
/// trusts a read: a replica catching up answers "no message" for a final state it has
/// not stored yet, and the check once took that for "not finished" — running a
/// redelivered run, whose Pod was already deleted, a second time.
#[tokio::test]
async fn the_already_finished_check_does_not_trust_a_replica_behind_the_leader() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let mut config = sluice_core::streams::StreamSettings::default().status();
    config.allow_direct = false;
    js.update_stream(config).await.expect("direct gets off");
    let replica = replica_without_the_run(nats.port()).await;

    store_state(&js, "done", RunState::Running, None).await;
    store_state(&js, "done", RunState::Failed, None).await;
    // The double answers the direct get (the server would not): the check saw it.
    let stream = js
        .get_stream(subjects::STATUS_STREAM)
        .await
        .expect("stream");
    let stale = stream
        .direct_get_last_for_subject(subjects::status("c1", "done"))
        .await
        .expect_err("the double answers 404");
    assert_eq!(
        stale.kind(),
        async_nats::jetstream::stream::DirectGetErrorKind::NotFound
    );

    let check = sluice_core::bus::final_state(&js, "c1", "done").await;
    assert_eq!(check.expect("checked"), Some(RunState::Failed));
    assert_eq!(
        sluice_core::bus::final_state(&js, "c1", "new")
            .await
            .expect("checked"),
        None
    );
    replica.abort();
}

/// A run whose finished check cannot be answered — here the status stream is gone, so
/// the stream leader cannot be asked — is handed back for later, never run blind: it
/// might have finished already. Once the stream is back, it runs, once.
#[tokio::test]
async fn a_run_whose_finished_check_cannot_be_answered_waits_and_then_runs_once() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let _runner = Runner::start(&nats.url(), "eu-1", "r1").await;
    assert_eq!(run_to_the_end(&js, "before-1").await, RunState::Succeeded);

    js.delete_stream(subjects::STATUS_STREAM)
        .await
        .expect("delete the status stream");
    let marker_dir = tempfile::tempdir().expect("tmp");
    let marker = marker_dir.path().join("ran");
    let (repo, sha) = git_repo();
    let command = format!("echo ran >> {}", marker.display());
    let req = run_request(
        "unsure-1",
        "eu-1",
        repo.path(),
        &sha,
        vec![step("mark", &[command.as_str()])],
    );
    publish_run(&js, &req).await;

    // Taken, handed back, and taken again (after the 5 s it is left for): not run.
    let runs = js.get_stream(subjects::RUNS_STREAM).await.expect("runs");
    wait_for(
        "the run to be delivered a second time",
        DEADLINE,
        || async {
            let info = runs
                .consumer_info(subjects::runner_consumer("eu-1"))
                .await
                .ok()?;
            (info.delivered.consumer_sequence >= 3).then_some(())
        },
    )
    .await;
    assert!(
        !marker.exists(),
        "the run ran while its finished check could not be answered"
    );

    provision(&js).await;
    let done = wait_for("the run, once the stream is back", DEADLINE, || {
        final_state(&js, "unsure-1")
    })
    .await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(std::fs::read_to_string(&marker).expect("marker"), "ran\n");
}
