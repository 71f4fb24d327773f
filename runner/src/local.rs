//! The local executor: each step is a shell process on this machine, in a per-run
//! workspace cloned with `git`. Steps' images are ignored and nothing is isolated — it
//! is for laptops and tests, like GitLab's shell executor.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sluice_core::run::{RunRequest, RunState, RunStep};
use tokio::io::{AsyncRead, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use crate::report::{Reporter, StepLog};
use crate::wait::sleep_until;
use crate::{Error, Result};

/// Runs steps as host processes.
#[derive(Debug, Clone)]
pub struct LocalExecutor {
    /// Where per-run workspaces are made.
    pub workdir: PathBuf,
    /// Keep workspaces after the run (for debugging).
    pub keep_workspaces: bool,
}

pub use crate::executor::Outcome;

/// The only variables of the runner's environment a step sees: what a shell needs to
/// find programs and behave.
const INHERITED_ENV: [&str; 7] = ["PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR"];

enum StepEnd {
    Exited(i32),
    TimedOut(Duration),
    Cancelled,
    RunDeadline,
    SpawnFailed(String),
}

impl LocalExecutor {
    pub async fn run(
        &self,
        req: &RunRequest,
        reporter: &Reporter,
        cancel: &CancellationToken,
    ) -> Outcome {
        let workspace = self.workdir.join(&req.run_id);
        // A redelivered run starts over in a clean workspace.
        let _ = tokio::fs::remove_dir_all(&workspace).await;
        if let Err(e) = tokio::fs::create_dir_all(&workspace).await {
            return Outcome {
                state: RunState::Error,
                message: Some(format!(
                    "cannot create the workspace {}: {e}",
                    workspace.display()
                )),
            };
        }
        reporter
            .status(
                None,
                RunState::Scheduled,
                None,
                Some("local executor".into()),
            )
            .await;
        let deadline = req
            .timeout_secs
            .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
        let outcome = self
            .run_in(req, reporter, cancel, &workspace, deadline)
            .await;
        if !self.keep_workspaces {
            let _ = tokio::fs::remove_dir_all(&workspace).await;
        }
        outcome
    }

    async fn run_in(
        &self,
        req: &RunRequest,
        reporter: &Reporter,
        cancel: &CancellationToken,
        workspace: &Path,
        deadline: Option<tokio::time::Instant>,
    ) -> Outcome {
        if let Some(url) = &req.clone_url {
            let log = reporter.step_log("clone");
            log.line(
                "sluice",
                "local executor: step images are ignored and steps run unisolated on this host",
            )
            .await;
            let cloned = clone(url, req, workspace, &log).await;
            log.finish().await;
            if let Err(e) = cloned {
                return Outcome {
                    state: RunState::Error,
                    message: Some(format!("cloning {url} failed: {e}")),
                };
            }
        }
        reporter.status(None, RunState::Running, None, None).await;
        for step in &req.steps {
            if step.pipeline.is_some() {
                match Box::pin(crate::executor::child_step(reporter, step, cancel)).await {
                    Some(outcome) => return outcome,
                    None => continue,
                }
            }
            reporter
                .status(Some(&step.name), RunState::Running, None, None)
                .await;
            let log = reporter.step_log(&step.name);
            let end = self
                .step(req, step, workspace, &log, cancel, deadline)
                .await;
            let (state, code, message) = match &end {
                StepEnd::Exited(0) => (RunState::Succeeded, Some(0), None),
                StepEnd::Exited(code) => (
                    RunState::Failed,
                    Some(*code),
                    Some(format!("exited with {code}")),
                ),
                StepEnd::TimedOut(after) => (
                    RunState::Failed,
                    None,
                    Some(format!("timed out after {after:?}")),
                ),
                StepEnd::RunDeadline => (
                    RunState::Failed,
                    None,
                    Some("the run's timeout was reached".to_owned()),
                ),
                StepEnd::Cancelled => (RunState::Cancelled, None, Some("cancelled".to_owned())),
                StepEnd::SpawnFailed(e) => (RunState::Error, None, Some(e.clone())),
            };
            if let Some(m) = &message {
                log.line("sluice", m.clone()).await;
            }
            log.finish().await;
            reporter
                .status(Some(&step.name), state, code, message.clone())
                .await;
            if state != RunState::Succeeded {
                let message = message.map(|m| format!("step {}: {m}", step.name));
                return Outcome { state, message };
            }
        }
        Outcome {
            state: RunState::Succeeded,
            message: None,
        }
    }

    async fn step(
        &self,
        req: &RunRequest,
        step: &RunStep,
        workspace: &Path,
        log: &StepLog,
        cancel: &CancellationToken,
        deadline: Option<tokio::time::Instant>,
    ) -> StepEnd {
        for secret in &step.secrets {
            log.line(
                "sluice",
                format!(
                    "secret {secret} is a Kubernetes Secret: not available to the local executor"
                ),
            )
            .await;
        }
        let script = format!("set -e\n{}\n", step.commands.join("\n"));
        let mut command = Command::new("sh");
        // Steps run the code under test, which may come from a fork: they get a clean
        // environment, never the runner's own (NATS credentials, forge tokens, webhook
        // secrets in `sluice dev`).
        command.env_clear();
        for key in INHERITED_ENV {
            if let Some(value) = std::env::var_os(key) {
                command.env(key, value);
            }
        }
        command
            .arg("-c")
            .arg(&script)
            .current_dir(workspace)
            .envs(&req.env)
            .envs(&step.env)
            .env("CI", "true")
            .env("SLUICE", "true")
            .env("SLUICE_RUN_ID", &req.run_id)
            .env("SLUICE_PIPELINE", &req.pipeline)
            .env("SLUICE_STEP", &step.name)
            .env("SLUICE_EVENT_ID", &req.event_id)
            .env("SLUICE_REPO", req.repo.as_deref().unwrap_or(""))
            .env("SLUICE_REF", req.git_ref.as_deref().unwrap_or(""))
            .env("SLUICE_SHA", req.sha.as_deref().unwrap_or(""))
            .env("SLUICE_WORKSPACE", workspace)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a cancel or timeout kills everything it started.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(c) => c,
            Err(e) => return StepEnd::SpawnFailed(format!("cannot start sh: {e}")),
        };
        // Killed on every way out of this function, including the runner being dropped.
        let _group = ProcessGroup(child.id());
        let readers = [
            child
                .stdout
                .take()
                .map(|o| tokio::spawn(forward(o, "stdout", log.sender()))),
            child
                .stderr
                .take()
                .map(|e| tokio::spawn(forward(e, "stderr", log.sender()))),
        ];
        let step_timeout = step.timeout_secs.map(Duration::from_secs);
        let step_deadline = step_timeout.map(|t| tokio::time::Instant::now() + t);
        let end = tokio::select! {
            status = child.wait() => match status {
                Ok(s) => StepEnd::Exited(s.code().unwrap_or(-1)),
                Err(e) => StepEnd::SpawnFailed(format!("waiting for the step failed: {e}")),
            },
            () = sleep_until(step_deadline) => StepEnd::TimedOut(step_timeout.unwrap_or_default()),
            () = sleep_until(deadline) => StepEnd::RunDeadline,
            () = cancel.cancelled() => StepEnd::Cancelled,
        };
        if !matches!(end, StepEnd::Exited(_)) {
            kill_group(child.id());
            let _ = child.wait().await;
        }
        // Whatever the step left running in the background would hold its output open.
        kill_group(_group.0);
        for reader in readers.into_iter().flatten() {
            let _ = reader.await;
        }
        end
    }
}

/// Kills a step's whole process group (the step runs as its group's leader).
fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Kills the step's process group when dropped.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        kill_group(self.0);
    }
}

async fn forward(
    reader: impl AsyncRead + Unpin,
    stream: &'static str,
    tx: tokio::sync::mpsc::Sender<sluice_core::run::LogLine>,
) {
    let mut lines = crate::lines::Lines::new(BufReader::new(reader));
    while let Ok(Some(text)) = lines.next_line().await {
        let line = sluice_core::run::LogLine {
            stream: stream.to_owned(),
            text,
        };
        if tx.send(line).await.is_err() {
            break;
        }
    }
}

/// Clones the repository and checks out the event's commit (or ref).
async fn clone(url: &str, req: &RunRequest, workspace: &Path, log: &StepLog) -> Result<()> {
    git(
        &["clone", "--quiet", "--no-checkout", url, "."],
        workspace,
        log,
    )
    .await?;
    let target = match (&req.sha, &req.git_ref) {
        (Some(sha), _) => sha.clone(),
        (None, Some(r)) => {
            git(&["fetch", "--quiet", "origin", r], workspace, log).await?;
            "FETCH_HEAD".to_owned()
        }
        (None, None) => "HEAD".to_owned(),
    };
    git(
        &["checkout", "--quiet", "--detach", &target],
        workspace,
        log,
    )
    .await?;
    log.line("sluice", format!("checked out {target}")).await;
    Ok(())
}

async fn git(args: &[&str], cwd: &Path, log: &StepLog) -> Result<()> {
    let out = Command::new("git")
        .args(args)
        .current_dir(cwd)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| Error::Spawn {
            program: "git",
            source,
        })?;
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        log.line("stderr", line).await;
    }
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Git {
            command: args[0].to_owned(),
            code: out.status.code().unwrap_or(-1),
        })
    }
}
