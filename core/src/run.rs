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

/// The event id of the child run a parent's `pipeline:` step starts: derived from the
/// parent run and the step, so a redelivered parent converges on the same child.
pub fn child_event_id(parent_run: &str, step: &str) -> String {
    format!(
        "{}:{}",
        crate::Provider::Manual.as_str(),
        crate::subjects::child_delivery_id(parent_run, step)
    )
}

/// The child run a parent's `pipeline:` step starts.
pub fn child_run_id(parent_run: &str, step: &str, child_pipeline: &str) -> String {
    run_id(&child_event_id(parent_run, step), child_pipeline, 0)
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
    /// The run whose `pipeline:` step started this one.
    #[serde(default)]
    pub parent: Option<ParentRef>,
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

/// A state change of a run, or of one of its steps, on `sluice.status.<cluster>.<run_id>`.
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
    /// Set on a child run's states: where to relay its final state.
    #[serde(default)]
    pub parent: Option<ParentRef>,
}

impl StatusUpdate {
    /// The subject this update is published on.
    pub fn subject(&self) -> String {
        crate::subjects::status(self.cluster.as_deref().unwrap_or_default(), &self.run_id)
    }

    /// Its message id (see [`crate::subjects::status_id`]).
    pub fn message_id(&self) -> String {
        crate::subjects::status_id(&self.run_id, self.step.as_deref(), self.state.as_str())
    }

    /// A run-level update (`step` = None) for `req`, as both the dispatcher and the
    /// runners report it.
    pub fn for_run(req: &RunRequest, state: RunState, message: Option<String>) -> Self {
        StatusUpdate {
            run_id: req.run_id.clone(),
            pipeline: req.pipeline.clone(),
            state,
            step: None,
            at: OffsetDateTime::now_utc(),
            cluster: Some(req.cluster.clone()),
            event_id: Some(req.event_id.clone()),
            concurrency_group: req.concurrency_group.clone(),
            exit_code: None,
            message,
            runner: None,
            repo: req.repo.clone(),
            sha: req.sha.clone(),
            parent: req.parent.clone(),
        }
    }
}

/// The run (and its step) that started a child run, and the parent's cluster, to which
/// the child's final state is relayed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ParentRef {
    pub run_id: String,
    pub cluster: String,
    pub step: String,
}

/// A batch of output lines of one step, on `sluice.logs.<cluster>.<run_id>`, in order.
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
    /// The commit the runs build.
    #[serde(default)]
    pub sha: Option<String>,
    #[serde(default)]
    pub clone_url: Option<String>,
    #[serde(default)]
    pub pr: Option<u64>,
    #[serde(with = "time::serde::rfc3339")]
    pub decided_at: OffsetDateTime,
    /// Pipelines that watch this event's repository (or all repositories), each with
    /// the verdict of every trigger.
    pub pipelines: Vec<PipelineDecision>,
    /// Pipelines not considered because none of their triggers names this repository
    /// or provider.
    pub not_considered: usize,
    pub runs: Vec<PlannedRun>,
    /// The repository's own pipelines (`.sluice/`) when the repository is opted in:
    /// which definitions were read, where, and what was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_pipelines: Option<RepoPipelinesRead>,
}

/// What a decision read from the repository's `.sluice/`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RepoPipelinesRead {
    /// `head` (the event's commit) or `base` (a pull request's target branch); `None`
    /// when nothing was read, and `reason` says why.
    #[serde(default)]
    pub side: Option<crate::repo_pipelines::Side>,
    /// The commit, or branch, read.
    #[serde(default)]
    pub git_ref: Option<String>,
    /// Why these definitions (or none).
    pub reason: String,
    /// The pipelines accepted (`<repo>:<name>`).
    #[serde(default)]
    pub pipelines: Vec<String>,
    /// Files or pipelines refused: `file:line:column: message`.
    #[serde(default)]
    pub errors: Vec<String>,
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

/// What a runner asks of the dispatcher for a `pipeline:` step, on
/// `sluice.children.<its cluster>.<parent run id>`. The dispatcher checks the claim
/// against its own records (the parent's decision and pipeline) before acting: a
/// runner can only start the children its own runs declare.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChildRequest {
    pub parent_run: String,
    /// The event that started the parent run (to find its decision).
    pub parent_event: String,
    pub step: String,
    pub action: ChildAction,
    /// Why, for a cancel.
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Start or cancel a child run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChildAction {
    Start,
    Cancel,
}

impl ChildAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ChildAction::Start => "start",
            ChildAction::Cancel => "cancel",
        }
    }
}

/// A child run's final state (or why it never started), relayed by the dispatcher to
/// the parent's cluster on `sluice.control.<parent cluster>.child.<parent run>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChildResult {
    pub parent_run: String,
    pub step: String,
    /// `None` when no child run was started.
    pub child_run: Option<String>,
    /// Where the child ran.
    pub cluster: Option<String>,
    pub state: RunState,
    pub message: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// A runner's heartbeat, the value of its key in `SLUICE_RUNNERS`
/// ([`crate::subjects::runner_key`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Heartbeat {
    pub cluster: String,
    pub runner: String,
    pub max_running: usize,
    /// Unix seconds.
    pub at: i64,
}

/// An event the dispatcher gave up on, on `sluice.deadletter.events`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DeadLetter {
    /// The event's subject.
    pub subject: String,
    pub stream_sequence: u64,
    pub reason: String,
    pub attempts: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The original message, as text when it is UTF-8.
    pub message: String,
}

// === The run projection ===

/// A run as its state changes tell it: what `sluice runs get` prints, and how runners
/// and tests find a run's final state. Built by [`RunView::apply`] over the run's
/// updates in stream order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunView {
    pub run_id: String,
    pub pipeline: String,
    pub state: RunState,
    pub repo: Option<String>,
    pub cluster: Option<String>,
    pub event_id: Option<String>,
    pub runner: Option<String>,
    pub message: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    /// When the first state change was seen (to find the run's event).
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    pub steps: Vec<StepView>,
}

/// One step of a [`RunView`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepView {
    pub name: String,
    pub state: RunState,
    pub exit_code: Option<i32>,
    pub message: Option<String>,
}

impl RunView {
    /// A view of the run `u` is about, before `u` is applied.
    pub fn new(u: &StatusUpdate) -> Self {
        RunView {
            run_id: u.run_id.clone(),
            pipeline: u.pipeline.clone(),
            state: RunState::Queued,
            repo: None,
            cluster: None,
            event_id: None,
            runner: None,
            message: None,
            updated_at: u.at,
            first_seen: u.at,
            steps: Vec::new(),
        }
    }

    /// Folds one update in. A late non-final state (a retried publish stored after the
    /// end) never overwrites a final one.
    pub fn apply(&mut self, u: &StatusUpdate) {
        self.updated_at = u.at;
        self.repo = u.repo.clone().or(self.repo.take());
        self.cluster = u.cluster.clone().or(self.cluster.take());
        self.event_id = u.event_id.clone().or(self.event_id.take());
        self.runner = u.runner.clone().or(self.runner.take());
        match &u.step {
            None => {
                if !self.state.is_final() || u.state.is_final() {
                    self.state = u.state;
                    self.message = u.message.clone();
                }
            }
            Some(name) => match self.steps.iter_mut().find(|s| &s.name == name) {
                Some(step) => {
                    step.state = u.state;
                    step.exit_code = u.exit_code.or(step.exit_code);
                    step.message = u.message.clone();
                }
                None => self.steps.push(StepView {
                    name: name.clone(),
                    state: u.state,
                    exit_code: u.exit_code,
                    message: u.message.clone(),
                }),
            },
        }
    }

    /// The view after `updates`, or `None` when there are none.
    pub fn fold<'a>(updates: impl IntoIterator<Item = &'a StatusUpdate>) -> Option<RunView> {
        let mut view: Option<RunView> = None;
        for u in updates {
            view.get_or_insert_with(|| RunView::new(u)).apply(u);
        }
        view
    }

    /// The run's final state, once it has one.
    pub fn final_state(&self) -> Option<RunState> {
        self.state.is_final().then_some(self.state)
    }
}

// === Reruns ===

/// The event that reruns `pipeline` for `original`: the same event under a new id (so
/// it is not taken for a duplicate delivery), naming the pipeline, with the attempt
/// counted up. `now_millis` makes the id unique; a repeated publish of the same rerun
/// converges on one run.
pub fn rerun_event(original: &crate::Event, pipeline: &str, now: OffsetDateTime) -> crate::Event {
    let mut event = original.clone();
    let base = original
        .id
        .split(RERUN_MARK)
        .next()
        .unwrap_or(&original.id)
        .to_owned();
    event.id = format!(
        "{base}{RERUN_MARK}{}",
        now.unix_timestamp_nanos() / 1_000_000
    );
    event.pipeline = Some(pipeline.to_owned());
    event.attempt = original.attempt + 1;
    event.received_at = now;
    event
}

/// A request to rerun a run's pipeline for the event that started it, on
/// [`crate::subjects::RERUN`]: the dashboard asks, a dispatcher (whose credential may
/// store events) answers with a [`RerunAnswer`]. Not stored: a click is answered, or
/// fails where the user sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RerunRequest {
    /// The run to repeat. The dispatcher reads its pipeline and event from the stored
    /// states itself: a request naming them could start any pipeline on any event.
    pub run_id: String,
    /// Who asked (`user:<name>` from the dashboard's proxy, or `token`), for the log.
    pub by: String,
}

/// A dispatcher's answer to a [`RerunRequest`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum RerunAnswer {
    /// The rerun's event is stored; this run will start.
    Started { run_id: String },
    /// Why not (safe to show: no secret, no internal detail).
    Refused { reason: String },
}

/// What separates an event id from its rerun counter.
const RERUN_MARK: &str = "~rerun";

/// The run a [`rerun_event`] starts.
pub fn rerun_id(event: &crate::Event, pipeline: &str) -> String {
    run_id(&event.id, pipeline, event.attempt)
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

    fn update(step: Option<&str>, state: RunState) -> StatusUpdate {
        StatusUpdate {
            run_id: "r1".into(),
            pipeline: "ci".into(),
            state,
            step: step.map(str::to_owned),
            at: OffsetDateTime::UNIX_EPOCH,
            cluster: Some("eu-1".into()),
            event_id: Some("github:1".into()),
            concurrency_group: None,
            exit_code: None,
            message: None,
            runner: None,
            repo: None,
            sha: None,
            parent: None,
        }
    }

    #[test]
    fn the_projection_keeps_a_final_state_against_late_updates() {
        let updates = [
            update(None, RunState::Scheduled),
            update(Some("build"), RunState::Running),
            update(None, RunState::Running),
            update(Some("build"), RunState::Failed),
            update(None, RunState::Failed),
            // A retried publish of an earlier state, stored late.
            update(None, RunState::Running),
        ];
        let view = RunView::fold(&updates).expect("a view");
        assert_eq!(view.final_state(), Some(RunState::Failed));
        assert_eq!(view.steps.len(), 1);
        assert_eq!(view.steps[0].state, RunState::Failed);
        assert_eq!(view.cluster.as_deref(), Some("eu-1"));
        assert!(RunView::fold(&[]).is_none());
    }

    #[test]
    fn status_updates_know_their_subject_and_id() {
        let u = update(Some("build"), RunState::Running);
        assert_eq!(u.subject(), "sluice.status.eu-1.r1");
        assert_eq!(u.message_id(), "r1:build:running");
        let json = serde_json::to_string(&u).expect("encode");
        let back: StatusUpdate = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, u);
    }

    #[test]
    fn reruns_count_up_and_keep_the_original_id() {
        let mut e = crate::Event::new(crate::Provider::Github, "d1", "push");
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
        let first = rerun_event(&e, "ci", at);
        assert_eq!(first.id, "github:d1~rerun1700000000000");
        assert_eq!(first.attempt, 1);
        assert_eq!(first.pipeline.as_deref(), Some("ci"));
        let second = rerun_event(&first, "ci", at + time::Duration::seconds(1));
        assert_eq!(second.id, "github:d1~rerun1700000001000");
        assert_eq!(second.attempt, 2);
        assert_ne!(rerun_id(&first, "ci"), rerun_id(&second, "ci"));
        e.attempt = 0;
        assert_eq!(rerun_id(&e, "ci"), run_id("github:d1", "ci", 0));
    }

    #[test]
    fn contract_messages_round_trip() {
        let at = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
        let req = ChildRequest {
            parent_run: "p".into(),
            parent_event: "github:1".into(),
            step: "deploy".into(),
            action: ChildAction::Cancel,
            reason: Some("parent cancelled".into()),
            at,
        };
        let json = serde_json::to_value(&req).expect("encode");
        assert_eq!(json["action"], "cancel");
        assert_eq!(
            serde_json::from_value::<ChildRequest>(json).expect("decode"),
            req
        );
        let result = ChildResult {
            parent_run: "p".into(),
            step: "deploy".into(),
            child_run: Some("c".into()),
            cluster: Some("b".into()),
            state: RunState::Succeeded,
            message: None,
            at,
        };
        let json = serde_json::to_value(&result).expect("encode");
        assert_eq!(json["state"], "succeeded");
        assert_eq!(
            serde_json::from_value::<ChildResult>(json).expect("decode"),
            result
        );
        let beat = Heartbeat {
            cluster: "a".into(),
            runner: "r".into(),
            max_running: 5,
            at: 1,
        };
        let json = serde_json::to_string(&beat).expect("encode");
        assert_eq!(
            serde_json::from_str::<Heartbeat>(&json).expect("decode"),
            beat
        );
        let letter = DeadLetter {
            subject: "sluice.events.github.push".into(),
            stream_sequence: 3,
            reason: "bad".into(),
            attempts: 1,
            at,
            message: "{}".into(),
        };
        let json = serde_json::to_string(&letter).expect("encode");
        assert_eq!(
            serde_json::from_str::<DeadLetter>(&json).expect("decode"),
            letter
        );
    }
}
