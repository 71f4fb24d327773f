//! Every stored run, folded from the status stream as it grows: what `/runs` pages
//! through and what its live updates come from. Each replica builds its own from
//! JetStream at start, so the dashboard keeps no state of its own.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use sluice_core::admin::Check;
use sluice_core::run::{RunView, StatusUpdate};
use sluice_core::{bus, subjects};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

/// One run as the list shows it.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub view: RunView,
    pub sha: Option<String>,
}

/// What `/runs` may be narrowed to; an empty field matches everything.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub struct RunFilter {
    pub repo: String,
    pub pipeline: String,
    pub state: String,
    pub cluster: String,
}

impl RunFilter {
    pub fn matches(&self, r: &RunSummary) -> bool {
        let v = &r.view;
        (self.repo.is_empty() || v.repo.as_deref() == Some(self.repo.as_str()))
            && (self.pipeline.is_empty() || v.pipeline == self.pipeline)
            && (self.state.is_empty() || v.state.as_str() == self.state)
            && (self.cluster.is_empty() || v.cluster.as_deref() == Some(self.cluster.as_str()))
    }
}

#[derive(Debug, Default)]
struct Runs {
    by_id: HashMap<String, RunSummary>,
    /// Run ids in the order their first state was stored: newest last.
    order: Vec<String>,
    /// The last status stream sequence folded in.
    last_sequence: u64,
}

/// The shared index and the channel its changes are announced on (the run's id).
#[derive(Debug)]
pub struct RunIndex {
    runs: RwLock<Runs>,
    changes: broadcast::Sender<String>,
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
            match runs.by_id.get_mut(&u.run_id) {
                Some(r) => {
                    r.view.apply(u);
                    r.sha = u.sha.clone().or(r.sha.take());
                }
                None => {
                    let mut view = RunView::new(u);
                    view.apply(u);
                    runs.order.push(u.run_id.clone());
                    runs.by_id.insert(
                        u.run_id.clone(),
                        RunSummary {
                            view,
                            sha: u.sha.clone(),
                        },
                    );
                }
            }
        }
        // No subscriber is not an error: nobody is watching the list.
        let _ = self.changes.send(u.run_id.clone());
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

    /// The ids of runs as they change, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Runs> {
        // Each write is complete before the guard drops; a panic cannot leave half a run.
        self.runs.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Runs> {
        self.runs.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Follows the status stream from where the index stands until `shutdown`,
    /// reconnecting after errors. `ready` passes once the stored updates are all in.
    pub async fn follow(&self, js: &jetstream::Context, ready: Check, shutdown: CancellationToken) {
        while !shutdown.is_cancelled() {
            let next = self.read().last_sequence + 1;
            let result = tokio::select! {
                r = self.follow_once(js, next, &ready) => r,
                () = shutdown.cancelled() => return,
            };
            if let Err(error) = result {
                ready.failing(format!("reading {}: {error}", subjects::STATUS_STREAM));
                tracing::warn!(%error, "the run index stopped reading; retrying");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    async fn follow_once(
        &self,
        js: &jetstream::Context,
        start_sequence: u64,
        ready: &Check,
    ) -> sluice_core::Result<()> {
        let (consumer, pending) = bus::ordered(
            js,
            subjects::STATUS_STREAM,
            subjects::ALL_STATUS.into(),
            DeliverPolicy::ByStartSequence { start_sequence },
        )
        .await?;
        if pending == 0 {
            ready.ready();
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| sluice_core::Error::bus("follow the status stream", e))?;
        while let Some(m) = messages.next().await {
            let m = m.map_err(|e| sluice_core::Error::bus("follow the status stream", e))?;
            let Ok(info) = m.info() else { continue };
            let (sequence, left) = (info.stream_sequence, info.pending);
            if let Ok(u) = serde_json::from_slice::<StatusUpdate>(&m.payload) {
                self.apply(sequence, &u);
            }
            if left == 0 {
                ready.ready();
            }
        }
        Err(sluice_core::Error::bus(
            "follow the status stream",
            "the consumer ended",
        ))
    }
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
}
