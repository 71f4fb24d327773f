//! Run requests, status messages, cancel requests and dispatch decisions: what the
//! dispatcher, the runners and users exchange on the bus.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::pipeline::{Resources, Runtime};

/// A run's deterministic id: the same event and pipeline always give the same id, so
/// a redelivered event, a crashed dispatcher or two replicas converge on one run.
/// `attempt` 0 is the first run; a rerun counts up.
pub fn run_id(event_id: &str, pipeline: &str, attempt: u32) -> String {
    let mut h = Sha256::new();
    h.update(event_id.as_bytes());
    h.update([0]);
    h.update(pipeline.as_bytes());
    if attempt > 0 {
        h.update([0]);
        h.update(attempt.to_be_bytes());
    }
    // 20 hex digits (80 bits): short enough for Pod names, far from any collision.
    hex::encode(&h.finalize()[..10])
}

/// A short, subject-safe digest of an id (event ids may contain `.`).
pub fn id_digest(id: &str) -> String {
    hex::encode(&Sha256::digest(id.as_bytes())[..12])
}

/// One run of one pipeline for one event, published on `sluice.runs.<cluster>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunRequest {
    pub run_id: String,
    pub pipeline: String,
    pub cluster: String,
    pub event_id: String,
    pub repo: Option<String>,
    pub clone_url: Option<String>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub sha: Option<String>,
    pub pr: Option<u64>,
    /// Pipeline-wide environment; each step's own env is applied over it.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The steps to run, in order, with `when` already decided.
    pub steps: Vec<RunStep>,
    /// Steps whose `when` was false for this event.
    #[serde(default)]
    pub skipped_steps: Vec<String>,
    #[serde(default)]
    pub runtime: Runtime,
    /// Whole-run limit in seconds.
    pub timeout_secs: Option<u64>,
    pub cache: Option<RunCache>,
    /// The resolved concurrency group, if the pipeline has one.
    pub concurrency_group: Option<String>,
    /// The run that started this one through a `pipeline:` step.
    pub parent_run: Option<String>,
    #[serde(default)]
    pub attempt: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// A step as a runner executes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunStep {
    pub name: String,
    pub image: Option<String>,
    #[serde(default)]
    pub commands: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub secrets: Vec<String>,
    pub resources: Option<Resources>,
    pub timeout_secs: Option<u64>,
    /// A child pipeline to start and wait for, instead of commands.
    pub pipeline: Option<String>,
    pub runtime: Option<Runtime>,
}

/// The cache a run mounts: `key`, else `fallback_key` (the default branch's).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunCache {
    pub key: String,
    pub fallback_key: Option<String>,
    pub paths: Vec<String>,
}

/// A run's lifecycle. `queued` → `scheduled` (Pod created) → `running` → one final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    Queued,
    Scheduled,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Infrastructure failed, not the user's code.
    Error,
}

impl RunState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled | RunState::Error
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Scheduled => "scheduled",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
            RunState::Error => "error",
        }
    }
}

/// A state change of a run, or of one of its steps, on `sluice.status.<run_id>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatusUpdate {
    pub run_id: String,
    pub pipeline: String,
    pub state: RunState,
    /// Set when the change is about one step.
    pub step: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(default)]
    pub cluster: Option<String>,
    #[serde(default)]
    pub event_id: Option<String>,
    #[serde(default)]
    pub concurrency_group: Option<String>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub message: Option<String>,
    /// The runner replica that reported it.
    #[serde(default)]
    pub runner: Option<String>,
    /// The repository the run builds.
    #[serde(default)]
    pub repo: Option<String>,
    /// The commit the run builds.
    #[serde(default)]
    pub sha: Option<String>,
}

/// A batch of output lines of one step, on `sluice.logs.<run_id>`, in order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogChunk {
    pub run_id: String,
    pub step: String,
    /// Position of this chunk in the step's output, from 0: with the run id and step,
    /// it is the chunk's message id, so output shipped twice is stored once.
    pub seq: u64,
    pub lines: Vec<LogLine>,
}

/// One line of output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    /// `stdout`, `stderr`, or `sluice` for the runner's own notes.
    pub stream: String,
    pub text: String,
}

/// Asks the runners of a cluster to cancel a run, on `sluice.control.<cluster>.cancel`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CancelRequest {
    pub run_id: String,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Why an event started the runs it did, on `sluice.decisions.<digest of event id>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Decision {
    pub event_id: String,
    pub provider: String,
    pub kind: String,
    pub action: Option<String>,
    pub repo: Option<String>,
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub decided_at: OffsetDateTime,
    /// Pipelines that watch this event's repository (or all repositories), each with
    /// the verdict of every trigger.
    pub pipelines: Vec<PipelineDecision>,
    /// Pipelines not considered because none of their triggers names this repository
    /// or provider.
    pub not_considered: usize,
    pub runs: Vec<PlannedRun>,
}

/// The verdict on one pipeline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PipelineDecision {
    pub pipeline: String,
    pub matched: bool,
    pub triggers: Vec<TriggerVerdict>,
    /// Set when the pipeline was started directly (a manual event naming it).
    #[serde(default)]
    pub note: Option<String>,
}

/// The verdict on one trigger: the first filter that failed, or a match.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TriggerVerdict {
    pub index: usize,
    pub matched: bool,
    /// The filter that failed (`provider`, `repos`, `kinds`, `actions`, `branches`,
    /// `tags`, `paths`, `command`, `command_authors`, `when`).
    pub failed: Option<String>,
    /// Human explanation: what the event had and what the filter wanted, the CEL
    /// result or error, or a caveat on a match (changed files unknown).
    pub detail: String,
}

/// A run the decision started.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlannedRun {
    pub run_id: String,
    pub pipeline: String,
    pub cluster: String,
    /// `published`, `queued` (waiting in its concurrency group) or `duplicate`.
    pub outcome: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_ids_are_deterministic_and_distinct() {
        let a = run_id("github:1", "ci", 0);
        assert_eq!(a, run_id("github:1", "ci", 0));
        assert_eq!(a.len(), 20);
        assert_ne!(a, run_id("github:1", "cd", 0));
        assert_ne!(a, run_id("github:2", "ci", 0));
        assert_ne!(a, run_id("github:1", "ci", 1));
        // No ambiguity from concatenation.
        assert_ne!(run_id("a", "bc", 0), run_id("ab", "c", 0));
    }
}
