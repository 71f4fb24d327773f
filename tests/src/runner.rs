//! An in-process runner (local or Kubernetes executor), a local git repository to clone, and
//! helpers to read a run's states and logs.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use sluice_core::nats::NatsOptions;
use sluice_core::run::{LogChunk, RunRequest, RunState, RunStep, StatusUpdate};
use sluice_core::subjects;
use sluice_runner::kubernetes::{KubeExecutor, KubeSettings};
use sluice_runner::{Executor, RunnerConfig};
use tempfile::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::dispatcher::all_messages;
use crate::kubeapi::KubeApi;

/// A running runner.
#[derive(Debug)]
pub struct Runner {
    shutdown: CancellationToken,
    task: Option<JoinHandle<sluice_runner::Result<()>>>,
    _workdir: TempDir,
}

impl Runner {
    pub fn config(nats_url: &str, cluster: &str, id: &str, workdir: &Path) -> RunnerConfig {
        let mut c = RunnerConfig::new(
            NatsOptions::new(nats_url, "sluice-test-runner"),
            cluster,
            workdir.to_owned(),
        );
        c.runner_id = id.to_owned();
        // Short, so a killed runner's runs come back quickly.
        c.ack_wait = Duration::from_secs(2);
        c
    }

    pub async fn start(nats_url: &str, cluster: &str, id: &str) -> Runner {
        Self::start_with(nats_url, cluster, id, |_| {}).await
    }

    pub async fn start_with(
        nats_url: &str,
        cluster: &str,
        id: &str,
        tweak: impl FnOnce(&mut RunnerConfig),
    ) -> Runner {
        let workdir = tempfile::tempdir().expect("tmp");
        let mut config = Self::config(nats_url, cluster, id, workdir.path());
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sluice_runner::run(config, shutdown.clone()));
        Runner {
            shutdown,
            task: Some(task),
            _workdir: workdir,
        }
    }

    /// A runner with the Kubernetes executor, talking to `api` (the test double).
    /// Finished Pods are kept (`delete_after` one hour) so tests can inspect them.
    pub async fn start_kube(
        nats_url: &str,
        cluster: &str,
        id: &str,
        api: &KubeApi,
        tweak: impl FnOnce(&mut KubeSettings),
    ) -> Runner {
        Self::start_kube_with(nats_url, cluster, id, api, tweak, |_| {}).await
    }

    /// [`Runner::start_kube`], with the runner's own configuration tweaked too.
    pub async fn start_kube_with(
        nats_url: &str,
        cluster: &str,
        id: &str,
        api: &KubeApi,
        tweak: impl FnOnce(&mut KubeSettings),
        tweak_runner: impl FnOnce(&mut RunnerConfig),
    ) -> Runner {
        let mut settings = KubeSettings {
            delete_after: Duration::from_secs(3600),
            ..Default::default()
        };
        tweak(&mut settings);
        let executor = KubeExecutor::new(api.config(), settings).expect("kube client");
        Self::start_with(nats_url, cluster, id, |c| {
            c.executor = Executor::Kubernetes(executor);
            tweak_runner(c);
        })
        .await
    }

    /// A crash: dropped mid-run, nothing acknowledged.
    pub fn kill(mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .expect("runner stops")
                .expect("no panic")
                .expect("clean exit");
        }
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A git repository with one commit; returns it and the commit's SHA.
pub fn git_repo() -> (TempDir, String) {
    let dir = tempfile::tempdir().expect("tmp");
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir.path())
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "--quiet", "-b", "main"]);
    std::fs::write(dir.path().join("hello.txt"), "hello from the repository\n").expect("write");
    git(&["add", "."]);
    git(&["commit", "--quiet", "-m", "first"]);
    let sha = git(&["rev-parse", "HEAD"]);
    (dir, sha)
}

/// A run request as the dispatcher would publish it.
pub fn run_request(
    run_id: &str,
    cluster: &str,
    repo: &Path,
    sha: &str,
    steps: Vec<RunStep>,
) -> RunRequest {
    RunRequest {
        run_id: run_id.into(),
        pipeline: "p".into(),
        cluster: cluster.into(),
        event_id: format!("manual:{run_id}"),
        repo: Some("acme/app".into()),
        clone_url: Some(repo.display().to_string()),
        git_ref: Some("refs/heads/main".into()),
        sha: Some(sha.into()),
        pr: None,
        env: [("PIPELINE_VAR".to_owned(), "from-pipeline".to_owned())].into(),
        steps,
        skipped_steps: Vec::new(),
        runtime: Default::default(),
        timeout_secs: None,
        cache: None,
        concurrency_group: None,
        parent: None,
        attempt: 0,
        created_at: time::OffsetDateTime::now_utc(),
    }
}

/// A step running `commands`.
pub fn step(name: &str, commands: &[&str]) -> RunStep {
    RunStep {
        name: name.into(),
        image: Some("alpine".into()),
        commands: commands.iter().map(|c| (*c).to_owned()).collect(),
        env: Default::default(),
        secrets: Vec::new(),
        resources: None,
        timeout_secs: None,
        pipeline: None,
        runtime: None,
    }
}

/// Runs [`hostile_output_step`] on cluster `eu-1` (a runner must be there) and checks
/// its log is [`hostile_output_lines`].
pub async fn assert_hostile_output_kept(js: &jetstream::Context) {
    let (repo, sha) = git_repo();
    let req = run_request(
        "noisy-1",
        "eu-1",
        repo.path(),
        &sha,
        vec![hostile_output_step("noisy")],
    );
    publish_run(js, &req).await;
    let done = crate::wait_for("noisy-1", Duration::from_secs(30), || {
        final_state(js, "noisy-1")
    })
    .await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    let lines = log_lines(js, "noisy-1", "noisy").await;
    let lens: Vec<usize> = lines.iter().map(String::len).collect();
    let expected = hostile_output_lines();
    let expected_lens: Vec<usize> = expected.iter().map(String::len).collect();
    assert_eq!(lens, expected_lens);
    assert_eq!(lines, expected);
}

/// A step whose output is hostile to a line reader: bytes that are not UTF-8, and a
/// 200,000-byte line, 1.2 MB of 60,000-byte lines, then an ordinary line. See
/// [`hostile_output_lines`].
pub fn hostile_output_step(name: &str) -> RunStep {
    step(
        name,
        &[
            "printf 'bad \\377 byte\\n'",
            "head -c 200000 /dev/zero | tr '\\0' x; echo",
            // More than NATS takes in one message, in lines that each fit.
            "for i in $(seq 20); do head -c 60000 /dev/zero | tr '\\0' y; echo; done",
            "echo after",
        ],
    )
}

/// What the log of [`hostile_output_step`] must hold: the bad byte replaced, the long
/// line cut into pieces of at most 64 KiB, nothing after it lost.
pub fn hostile_output_lines() -> Vec<String> {
    const MAX_LINE: usize = 64 * 1024;
    let mut lines = vec!["bad \u{fffd} byte".to_owned()];
    let mut left = 200_000;
    while left > 0 {
        let n = left.min(MAX_LINE);
        lines.push("x".repeat(n));
        left -= n;
    }
    lines.extend(std::iter::repeat_n("y".repeat(60_000), 20));
    lines.push("after".to_owned());
    lines
}

pub async fn publish_run(js: &jetstream::Context, req: &RunRequest) {
    js.send_publish(
        subjects::runs(&req.cluster),
        PublishMessage::build()
            .payload(serde_json::to_vec(req).expect("json").into())
            .message_id(&req.run_id),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
}

/// Every status of a run, in order.
pub async fn statuses(js: &jetstream::Context, run_id: &str) -> Vec<StatusUpdate> {
    all_messages(js, subjects::STATUS_STREAM)
        .await
        .into_iter()
        .filter(|(s, _)| is_run_subject(s, "sluice.status.", run_id))
        .filter_map(|(s, p)| {
            let u: StatusUpdate = serde_json::from_slice(&p).ok()?;
            // The subject names the cluster the update says it is about.
            assert_eq!(
                Some(s),
                u.cluster.as_deref().map(|c| subjects::status(c, run_id)),
                "a state on another cluster's subject"
            );
            Some(u)
        })
        .collect()
}

/// The run's final state, once stored.
pub async fn final_state(js: &jetstream::Context, run_id: &str) -> Option<StatusUpdate> {
    statuses(js, run_id)
        .await
        .into_iter()
        .find(|u| u.step.is_none() && u.state.is_final())
}

/// A run's output lines of one step, in order.
pub async fn log_lines(js: &jetstream::Context, run_id: &str, step: &str) -> Vec<String> {
    all_messages(js, subjects::LOGS_STREAM)
        .await
        .into_iter()
        .filter(|(s, _)| is_run_subject(s, "sluice.logs.", run_id))
        .filter_map(|(_, p)| serde_json::from_slice::<LogChunk>(&p).ok())
        .filter(|c| c.step == step)
        .flat_map(|c| c.lines.into_iter().map(|l| l.text))
        .collect()
}

/// `<prefix><cluster>.<run_id>`, whatever the cluster.
fn is_run_subject(subject: &str, prefix: &str, run_id: &str) -> bool {
    subject
        .strip_prefix(prefix)
        .and_then(|rest| rest.split_once('.'))
        .is_some_and(|(_, run)| run == run_id)
}

/// Step states of a run, as (step, state) in order.
pub fn step_states(updates: &[StatusUpdate]) -> Vec<(String, RunState)> {
    updates
        .iter()
        .filter_map(|u| u.step.clone().map(|s| (s, u.state)))
        .collect()
}
