//! Every stored run, folded from the status stream as it grows, with the kind and ref
//! of its event folded from the decisions stream: what `/runs` pages through and what
//! its live updates come from, and each run's children. Each replica builds its own
//! from JetStream at start, so the dashboard keeps no state of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use sluice_core::admin::Check;
use sluice_core::run::{Decision, ParentRef, RunView, StatusUpdate};
use sluice_core::{bus, subjects};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// One run as the list shows it.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub view: RunView,
    pub sha: Option<String>,
    /// The run and step that started it, for a child run.
    pub parent: Option<ParentRef>,
    /// Its event's kind and ref, once the event's decision is read.
    pub event: Option<EventFacts>,
    /// Where the index stood when this run last changed.
    pub changed: Position,
}

/// How far the index has read the status and decisions streams. Both are stream
/// sequences, so a position means the same on every replica: a page one replica
/// rendered can be followed live from another.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub status: u64,
    pub decisions: u64,
}

impl Position {
    /// Whether everything read up to `other` was read up to `self` too.
    pub fn covers(self, other: Position) -> bool {
        other.status <= self.status && other.decisions <= self.decisions
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.status, self.decisions)
    }
}

impl std::str::FromStr for Position {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Position, Self::Err> {
        let (status, decisions) = s.split_once('-').unwrap_or((s, ""));
        Ok(Position {
            status: status.parse()?,
            decisions: decisions.parse()?,
        })
    }
}

/// What the decision of a run's event says about it: the kind (`push`,
/// `pull_request`, `comment`, `tag`, `pipeline` for a child run, …) and the ref.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventFacts {
    pub kind: String,
    pub git_ref: Option<String>,
}

impl EventFacts {
    /// The branch the ref names (`refs/heads/` left off); a tag or other ref as it is.
    pub fn branch(&self) -> &str {
        branch_of(self.git_ref.as_deref().unwrap_or_default())
    }
}

/// `refs/heads/main` → `main`; any other ref unchanged.
pub fn branch_of(git_ref: &str) -> &str {
    git_ref.strip_prefix("refs/heads/").unwrap_or(git_ref)
}

/// What `/runs` may be narrowed to; an empty field matches everything.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct RunFilter {
    pub repo: String,
    pub pipeline: String,
    pub state: String,
    pub cluster: String,
    /// A branch name (`main`) or a whole ref (`refs/tags/v1`).
    pub branch: String,
    /// The event's kind: `push`, `pull_request`, `comment`, …
    pub kind: String,
}

impl RunFilter {
    pub fn matches(&self, r: &RunSummary) -> bool {
        let v = &r.view;
        let git_ref = r
            .event
            .as_ref()
            .and_then(|e| e.git_ref.as_deref())
            .unwrap_or_default();
        (self.repo.is_empty() || v.repo.as_deref() == Some(self.repo.as_str()))
            && (self.pipeline.is_empty() || v.pipeline == self.pipeline)
            && (self.state.is_empty() || v.state.as_str() == self.state)
            && (self.cluster.is_empty() || v.cluster.as_deref() == Some(self.cluster.as_str()))
            && (self.branch.is_empty()
                || git_ref == self.branch
                || branch_of(git_ref) == self.branch)
            && (self.kind.is_empty() || r.event.as_ref().is_some_and(|e| e.kind == self.kind))
    }
}

#[derive(Debug, Default)]
struct Runs {
    by_id: HashMap<String, RunSummary>,
    /// Run ids in the order their first state was stored: newest last.
    order: Vec<String>,
    /// The last status stream sequence folded in.
    last_sequence: u64,
    /// Each event's facts, by event id, from the decisions stream.
    events: HashMap<String, EventFacts>,
    /// The last decisions stream sequence folded in.
    last_decision: u64,
    /// Child run ids by parent run id, in the order they were first seen.
    children: HashMap<String, Vec<String>>,
}

impl Runs {
    fn position(&self) -> Position {
        Position {
            status: self.last_sequence,
            decisions: self.last_decision,
        }
    }

    /// Stamps `run_id` as changed at the current position, which it returns.
    fn changed(&mut self, run_id: &str) -> Position {
        let at = self.position();
        if let Some(r) = self.by_id.get_mut(run_id) {
            r.changed = at;
        }
        at
    }
}

/// A change of the index: where it stood after it, and the run that changed.
pub type Change = (Position, String);

/// At most this many runs are replayed to a list that reconnects; past it, the list
/// reloads (cheaper than thousands of rows, one event each).
pub const MAX_REPLAY: usize = 500;

/// The shared index and the channel its changes are announced on (the run's id).
#[derive(Debug)]
pub struct RunIndex {
    runs: RwLock<Runs>,
    changes: broadcast::Sender<Change>,
}

impl Default for RunIndex {
    fn default() -> Self {
        RunIndex {
            runs: RwLock::default(),
            changes: broadcast::channel(1024).0,
        }
    }
}

impl RunIndex {
    /// Folds one stored update in and announces the run.
    pub fn apply(&self, sequence: u64, u: &StatusUpdate) {
        {
            let mut runs = self.write();
            if sequence <= runs.last_sequence {
                return;
            }
            runs.last_sequence = sequence;
            let runs = &mut *runs;
            let new_parent = match runs.by_id.get_mut(&u.run_id) {
                Some(r) => {
                    r.view.apply(u);
                    r.sha = u.sha.clone().or(r.sha.take());
                    if r.event.is_none() {
                        r.event = r
                            .view
                            .event_id
                            .as_ref()
                            .and_then(|e| runs.events.get(e))
                            .cloned();
                    }
                    match (&r.parent, &u.parent) {
                        (None, Some(p)) => {
                            r.parent = Some(p.clone());
                            Some(p.run_id.clone())
                        }
                        _ => None,
                    }
                }
                None => {
                    let mut view = RunView::new(u);
                    view.apply(u);
                    let event = view
                        .event_id
                        .as_ref()
                        .and_then(|e| runs.events.get(e))
                        .cloned();
                    runs.order.push(u.run_id.clone());
                    runs.by_id.insert(
                        u.run_id.clone(),
                        RunSummary {
                            view,
                            sha: u.sha.clone(),
                            parent: u.parent.clone(),
                            event,
                            changed: Position::default(),
                        },
                    );
                    u.parent.as_ref().map(|p| p.run_id.clone())
                }
            };
            if let Some(parent) = new_parent {
                runs.children
                    .entry(parent)
                    .or_default()
                    .push(u.run_id.clone());
            }
            let change = runs.changed(&u.run_id);
            // Sent under the lock, so changes are received in the order of their
            // positions. No subscriber is not an error: nobody is watching the list.
            let _ = self.changes.send((change, u.run_id.clone()));
        }
    }

    /// Folds one stored decision in: its event's kind and ref, for the runs it started
    /// (and any later run of the same event), each of which is announced again so a
    /// filtered live list sees it once its event is known.
    pub fn apply_decision(&self, sequence: u64, d: &Decision) {
        {
            let mut runs = self.write();
            if sequence <= runs.last_decision {
                return;
            }
            runs.last_decision = sequence;
            let facts = EventFacts {
                kind: d.kind.clone(),
                git_ref: d.git_ref.clone(),
            };
            runs.events.insert(d.event_id.clone(), facts.clone());
            for planned in &d.runs {
                if let Some(r) = runs.by_id.get_mut(&planned.run_id) {
                    if r.event.as_ref() != Some(&facts) {
                        r.event = Some(facts.clone());
                        let v = runs.changed(&planned.run_id);
                        // Under the lock, as in `apply`.
                        let _ = self.changes.send((v, planned.run_id.clone()));
                    }
                }
            }
        }
    }

    /// The runs `run_id` started, in the order they were first seen.
    pub fn children(&self, run_id: &str) -> Vec<RunSummary> {
        let runs = self.read();
        runs.children
            .get(run_id)
            .into_iter()
            .flatten()
            .filter_map(|id| runs.by_id.get(id).cloned())
            .collect()
    }

    /// The event kinds of the stored runs, sorted: what the filter form offers.
    pub fn kinds(&self) -> Vec<String> {
        let runs = self.read();
        let mut kinds: Vec<String> = runs.events.values().map(|e| e.kind.clone()).collect();
        kinds.sort();
        kinds.dedup();
        kinds
    }

    /// One page of matching runs, newest first, skipping `offset` of them; and whether
    /// more follow.
    pub fn page(&self, filter: &RunFilter, offset: usize, limit: usize) -> (Vec<RunSummary>, bool) {
        let runs = self.read();
        let mut matching = runs
            .order
            .iter()
            .rev()
            .filter_map(|id| runs.by_id.get(id))
            .filter(|r| filter.matches(r))
            .skip(offset);
        let page: Vec<RunSummary> = matching.by_ref().take(limit).cloned().collect();
        let more = matching.next().is_some();
        (page, more)
    }

    pub fn get(&self, run_id: &str) -> Option<RunSummary> {
        self.read().by_id.get(run_id).cloned()
    }

    /// Runs not yet final, per cluster, for every cluster any stored run names.
    pub fn in_flight(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for r in self.read().by_id.values() {
            let cluster = r.view.cluster.clone().unwrap_or_default();
            let n = counts.entry(cluster).or_insert(0);
            if !r.view.state.is_final() {
                *n += 1;
            }
        }
        counts
    }

    pub fn len(&self) -> usize {
        self.read().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the index stands. A page rendered after reading it shows at least every
    /// change up to it, so a live list that starts from it misses none.
    pub fn position(&self) -> Position {
        self.read().position()
    }

    /// The runs as they change, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// The runs matching `filter` that changed after `after`, in the order of their
    /// last change, and the position they are read at; `None` when more than
    /// `MAX_REPLAY` did. Taken after `subscribe`, a change the subscription also
    /// delivers is already in here when the returned position covers it.
    pub fn changed_since(
        &self,
        after: Position,
        filter: &RunFilter,
    ) -> Option<(Vec<RunSummary>, Position)> {
        let runs = self.read();
        let mut changed: Vec<&RunSummary> = Vec::new();
        if !after.covers(runs.position()) {
            for r in runs.by_id.values() {
                if !after.covers(r.changed) && filter.matches(r) {
                    if changed.len() == MAX_REPLAY {
                        return None;
                    }
                    changed.push(r);
                }
            }
        }
        changed.sort_by_key(|r| r.changed);
        Some((changed.into_iter().cloned().collect(), runs.position()))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Runs> {
        // Each write is complete before the guard drops; a panic cannot leave half a run.
        self.runs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Runs> {
        self.runs.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows the status and decisions streams from where the index stands until
    /// `shutdown`, reconnecting after errors. `ready` passes once the stored states
    /// and decisions are all in.
    pub async fn follow(&self, js: &jetstream::Context, ready: Check, shutdown: CancellationToken) {
        let statuses = Stream {
            name: subjects::STATUS_STREAM,
            subject: subjects::ALL_STATUS,
        };
        let decisions = Stream {
            name: subjects::DECISIONS_STREAM,
            subject: "sluice.decisions.>",
        };
        let readiness = Readiness {
            check: ready,
            caught: [AtomicBool::new(false), AtomicBool::new(false)],
        };
        tokio::join!(
            self.follow_stream(
                js,
                statuses,
                || self.read().last_sequence,
                |seq, body| {
                    if let Ok(u) = serde_json::from_slice::<StatusUpdate>(body) {
                        self.apply(seq, &u);
                    }
                },
                (&readiness, 0),
                &shutdown,
            ),
            self.follow_stream(
                js,
                decisions,
                || self.read().last_decision,
                |seq, body| {
                    if let Ok(d) = serde_json::from_slice::<Decision>(body) {
                        self.apply_decision(seq, &d);
                    }
                },
                (&readiness, 1),
                &shutdown,
            ),
        );
    }

    /// Folds `stream` from after `last()` with `apply`, reconnecting after errors;
    /// `which` is its slot in `readiness`.
    async fn follow_stream(
        &self,
        js: &jetstream::Context,
        stream: Stream,
        last: impl Fn() -> u64,
        apply: impl Fn(u64, &[u8]),
        (readiness, which): (&Readiness, usize),
        shutdown: &CancellationToken,
    ) {
        let caught_up = || readiness.caught_up(which);
        while !shutdown.is_cancelled() {
            let next = last() + 1;
            let result = tokio::select! {
                r = follow_once(js, &stream, next, &apply, &caught_up) => r,
                () = shutdown.cancelled() => return,
            };
            if let Err(error) = result {
                readiness.failing(which, format!("reading {}: {error}", stream.name));
                tracing::warn!(%error, stream = stream.name, "the run index stopped reading; retrying");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }
}

/// Ready once every followed stream has been read to its end, and not while one of
/// them is failing.
struct Readiness {
    check: Check,
    caught: [AtomicBool; 2],
}

impl Readiness {
    fn caught_up(&self, which: usize) {
        self.caught[which].store(true, Ordering::Relaxed);
        if self.caught.iter().all(|c| c.load(Ordering::Relaxed)) {
            self.check.ready();
        }
    }

    fn failing(&self, which: usize, why: String) {
        self.caught[which].store(false, Ordering::Relaxed);
        self.check.failing(why);
    }
}

/// A stream the index folds, and the subjects of it that it reads.
#[derive(Debug, Clone, Copy)]
struct Stream {
    name: &'static str,
    subject: &'static str,
}

async fn follow_once(
    js: &jetstream::Context,
    stream: &Stream,
    start_sequence: u64,
    apply: &impl Fn(u64, &[u8]),
    caught_up: &impl Fn(),
) -> sluice_core::Result<()> {
    let what = format!("follow {}", stream.name);
    let (consumer, pending) = bus::ordered(
        js,
        stream.name,
        stream.subject.into(),
        DeliverPolicy::ByStartSequence { start_sequence },
    )
    .await?;
    if pending == 0 {
        caught_up();
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| sluice_core::Error::bus(what.clone(), e))?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| sluice_core::Error::bus(what.clone(), e))?;
        let Ok(info) = m.info() else { continue };
        let (sequence, left) = (info.stream_sequence, info.pending);
        apply(sequence, &m.payload);
        if left == 0 {
            caught_up();
        }
    }
    Err(sluice_core::Error::bus(what, "the consumer ended"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::run::RunState;
    use time::OffsetDateTime;

    fn update(run: &str, pipeline: &str, state: RunState) -> StatusUpdate {
        StatusUpdate {
            run_id: run.into(),
            pipeline: pipeline.into(),
            state,
            step: None,
            at: OffsetDateTime::UNIX_EPOCH,
            cluster: Some("eu-1".into()),
            event_id: None,
            concurrency_group: None,
            exit_code: None,
            message: None,
            runner: None,
            repo: Some("acme/app".into()),
            sha: None,
            parent: None,
        }
    }

    #[test]
    fn pages_are_newest_first_filtered_and_say_when_more_follow() {
        let index = RunIndex::default();
        for i in 0..5u64 {
            let pipeline = if i % 2 == 0 { "ci" } else { "cd" };
            index.apply(i + 1, &update(&format!("r{i}"), pipeline, RunState::Queued));
        }
        // A later state of an old run keeps its place; a repeated sequence is ignored.
        index.apply(6, &update("r0", "ci", RunState::Succeeded));
        index.apply(6, &update("r0", "ci", RunState::Failed));
        let all = RunFilter::default();
        let (page, more) = index.page(&all, 0, 2);
        let ids: Vec<_> = page.iter().map(|r| r.view.run_id.as_str()).collect();
        assert_eq!(ids, ["r4", "r3"]);
        assert!(more);
        let (page, more) = index.page(&all, 4, 2);
        assert_eq!(page[0].view.run_id, "r0");
        assert_eq!(page[0].view.state, RunState::Succeeded);
        assert!(!more);
        let ci = RunFilter {
            pipeline: "ci".into(),
            ..RunFilter::default()
        };
        let (page, _) = index.page(&ci, 0, 10);
        assert_eq!(page.len(), 3);
        let done = RunFilter {
            state: "succeeded".into(),
            ..RunFilter::default()
        };
        assert_eq!(index.page(&done, 0, 10).0.len(), 1);
        assert_eq!(index.in_flight().get("eu-1"), Some(&4));
    }

    fn decision(event: &str, kind: &str, git_ref: &str, runs: &[&str]) -> Decision {
        serde_json::from_value(serde_json::json!({
            "event_id": event, "provider": "github", "kind": kind, "action": null,
            "repo": "acme/app", "ref": git_ref, "sha": null, "clone_url": null,
            "decided_at": "2024-01-01T00:00:00Z", "pipelines": [], "not_considered": 0,
            "runs": runs.iter().map(|r| serde_json::json!({
                "run_id": r, "pipeline": "ci", "cluster": "eu-1", "outcome": "published"
            })).collect::<Vec<_>>()
        }))
        .expect("decision")
    }

    #[test]
    fn a_list_that_starts_late_gets_every_run_changed_since_its_page_once() {
        let index = RunIndex::default();
        index.apply(1, &update("r0", "ci", RunState::Queued));
        index.apply(2, &update("r1", "cd", RunState::Queued));
        // The page is rendered here; three changes happen before its live list connects.
        let rendered = index.position();
        index.apply(3, &update("r2", "ci", RunState::Queued));
        index.apply(4, &update("r0", "ci", RunState::Running));
        index.apply(5, &update("r3", "cd", RunState::Queued));
        let ci = RunFilter {
            pipeline: "ci".into(),
            ..RunFilter::default()
        };
        let (runs, upto) = index.changed_since(rendered, &ci).expect("few changes");
        let ids: Vec<_> = runs.iter().map(|r| r.view.run_id.as_str()).collect();
        assert_eq!(
            ids,
            ["r2", "r0"],
            "in the order of their last change, filtered"
        );
        assert_eq!(runs[1].view.state, RunState::Running, "as they are now");
        assert_eq!(upto, index.position());
        assert!(index.changed_since(upto, &ci).expect("none").0.is_empty());
        // Its position as a page names it and a browser sends it back.
        assert_eq!(upto.to_string().parse(), Ok(upto));
        assert!("5".parse::<Position>().is_err() && "a-1".parse::<Position>().is_err());
        // Too many to replay: the list is told to reload instead.
        for i in 0..=MAX_REPLAY as u64 {
            index.apply(10 + i, &update(&format!("n{i}"), "ci", RunState::Queued));
        }
        assert!(index.changed_since(upto, &ci).is_none());
    }

    #[test]
    fn a_page_from_one_replica_is_followed_from_another() {
        // Two replicas read the same streams, the decision before or after the state.
        let (a, b) = (RunIndex::default(), RunIndex::default());
        let mut r1 = update("r1", "ci", RunState::Queued);
        r1.event_id = Some("e1".into());
        let d = decision("e1", "push", "refs/heads/main", &["r1"]);
        a.apply(1, &r1);
        a.apply_decision(1, &d);
        b.apply_decision(1, &d);
        b.apply(1, &r1);
        let rendered = a.position();
        b.apply(2, &update("r1", "ci", RunState::Running));
        let (runs, _) = b
            .changed_since(rendered, &RunFilter::default())
            .expect("few");
        let ids: Vec<_> = runs.iter().map(|r| r.view.run_id.as_str()).collect();
        assert_eq!(ids, ["r1"], "the change after the page is sent");
    }

    fn ids(page: (Vec<RunSummary>, bool)) -> Vec<String> {
        page.0.into_iter().map(|r| r.view.run_id).collect()
    }

    #[test]
    fn branch_and_kind_come_from_the_decision_whichever_is_read_first() {
        let index = RunIndex::default();
        let mut changes = index.subscribe();
        // The decision of e1 is read before its run's state; that of e2 after.
        index.apply_decision(1, &decision("e1", "push", "refs/heads/main", &["r1"]));
        let mut r1 = update("r1", "ci", RunState::Queued);
        r1.event_id = Some("e1".into());
        index.apply(1, &r1);
        let mut r2 = update("r2", "ci", RunState::Queued);
        r2.event_id = Some("e2".into());
        index.apply(2, &r2);
        let mut r3 = update("r3", "ci", RunState::Queued);
        r3.event_id = Some("e3".into());
        index.apply(3, &r3);
        while changes.try_recv().is_ok() {}
        index.apply_decision(
            2,
            &decision("e2", "pull_request", "refs/heads/fix/a b", &["r2"]),
        );
        assert_eq!(
            changes.try_recv().ok().map(|(_, id)| id).as_deref(),
            Some("r2"),
            "announced again"
        );
        // A repeated decision sequence is ignored.
        index.apply_decision(2, &decision("e2", "comment", "refs/heads/x", &["r2"]));

        let filter = |branch: &str, kind: &str| RunFilter {
            branch: branch.into(),
            kind: kind.into(),
            ..RunFilter::default()
        };
        assert_eq!(ids(index.page(&filter("main", ""), 0, 10)), ["r1"]);
        assert_eq!(
            ids(index.page(&filter("refs/heads/main", ""), 0, 10)),
            ["r1"]
        );
        assert_eq!(
            ids(index.page(&filter("fix/a b", "pull_request"), 0, 10)),
            ["r2"]
        );
        assert_eq!(ids(index.page(&filter("", "push"), 0, 10)), ["r1"]);
        assert!(ids(index.page(&filter("main", "pull_request"), 0, 10)).is_empty());
        assert_eq!(ids(index.page(&filter("", ""), 0, 10)), ["r3", "r2", "r1"]);
        assert_eq!(index.kinds(), ["pull_request", "push"]);
        assert_eq!(
            index
                .get("r2")
                .and_then(|r| r.event)
                .map(|e| e.branch().to_owned()),
            Some("fix/a b".into())
        );
    }

    #[test]
    fn children_are_listed_by_parent_in_the_order_first_seen() {
        let index = RunIndex::default();
        index.apply(1, &update("p", "ci", RunState::Running));
        let child = |run: &str, step: &str| {
            let mut u = update(run, "deploy", RunState::Queued);
            u.parent = Some(ParentRef {
                run_id: "p".into(),
                cluster: "eu-1".into(),
                step: step.into(),
            });
            u
        };
        index.apply(2, &child("c1", "a"));
        index.apply(3, &child("c2", "b"));
        // A later state naming the parent again adds no second entry.
        index.apply(4, &child("c1", "a"));
        let children: Vec<_> = index
            .children("p")
            .into_iter()
            .map(|c| (c.view.run_id, c.parent.map(|p| p.step)))
            .collect();
        assert_eq!(
            children,
            [
                ("c1".into(), Some("a".into())),
                ("c2".into(), Some("b".into()))
            ]
        );
        assert!(index.children("c1").is_empty());
    }
}
