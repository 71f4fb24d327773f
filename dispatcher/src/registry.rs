//! The live set of pipelines, loaded from the `SLUICE_PIPELINES` bucket and kept
//! current by watching it: an applied or deleted pipeline takes effect without a restart.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::kv::{Operation, Store};
use futures::StreamExt;
use sluice_core::pipeline::Pipeline;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// An immutable snapshot of the pipelines, indexed by the repositories they watch.
#[derive(Debug, Default)]
pub struct Index {
    by_name: HashMap<String, Arc<Pipeline>>,
    /// Lower-case literal repository → pipelines naming it in a trigger.
    by_repo: HashMap<String, Vec<Arc<Pipeline>>>,
    /// Pipelines with a trigger that names no repository, or uses a glob: always
    /// candidates.
    wide: Vec<Arc<Pipeline>>,
}

impl Index {
    pub fn new(pipelines: impl IntoIterator<Item = Arc<Pipeline>>) -> Self {
        let mut index = Index::default();
        for p in pipelines {
            index.by_name.insert(p.name.to_string(), p.clone());
            if p.triggers.is_empty() {
                continue;
            }
            let wide = p.triggers.iter().any(|t| {
                !t.repos.iter().any(|g| !g.is_negated())
                    || t.repos.iter().any(|g| !g.is_literal() && !g.is_negated())
            });
            if wide {
                index.wide.push(p);
                continue;
            }
            let mut repos: Vec<&str> = p
                .triggers
                .iter()
                .flat_map(|t| {
                    t.repos
                        .iter()
                        .filter(|g| !g.is_negated())
                        .map(|g| g.as_str())
                })
                .collect();
            repos.sort_unstable();
            repos.dedup();
            for r in repos {
                index
                    .by_repo
                    .entry(r.to_owned())
                    .or_default()
                    .push(p.clone());
            }
        }
        // Decisions list pipelines in a stable order.
        index.wide.sort_by(|a, b| a.name.cmp(&b.name));
        index
    }

    /// Pipelines that may match an event of this (lower-case) repository.
    pub fn candidates(&self, repo_lower: &str) -> Vec<Arc<Pipeline>> {
        let mut out: Vec<Arc<Pipeline>> = self.wide.clone();
        if let Some(ps) = self.by_repo.get(repo_lower) {
            out.extend(ps.iter().cloned());
        }
        out
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pipeline>> {
        self.by_name.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The current [`Index`], swapped whole on every change.
#[derive(Debug, Default)]
pub struct Registry {
    current: RwLock<Arc<Index>>,
}

impl Registry {
    pub fn current(&self) -> Arc<Index> {
        self.current.read().map(|g| g.clone()).unwrap_or_default()
    }

    fn replace(&self, index: Index) {
        if let Ok(mut g) = self.current.write() {
            *g = Arc::new(index);
        }
    }
}

/// Loads every pipeline, then keeps `registry` current until `shutdown`. Returns once
/// the initial load is complete, with the watching task running in the background.
pub async fn load_and_watch(
    kv: Store,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut watch = kv
        .watch_with_history(">")
        .await
        .map_err(|e| Error::nats("watch pipelines", e))?;
    let mut pipelines: HashMap<String, Arc<Pipeline>> = HashMap::new();
    let initial = kv
        .status()
        .await
        .map_err(|e| Error::nats("pipelines bucket", e))?
        .values();
    // Read the history the watcher replays before serving: an event dispatched against
    // a half-loaded registry would silently start nothing.
    if initial > 0 {
        while let Some(entry) = watch.next().await {
            let entry = entry.map_err(|e| Error::nats("watch pipelines", e))?;
            let done = entry.delta == 0;
            apply(&mut pipelines, entry);
            if done {
                break;
            }
        }
    }
    registry.replace(Index::new(pipelines.values().cloned()));
    tracing::info!(pipelines = pipelines.len(), "pipelines loaded");

    Ok(tokio::spawn(async move {
        loop {
            let entry = tokio::select! {
                () = shutdown.cancelled() => return,
                entry = watch.next() => entry,
            };
            match entry {
                Some(Ok(entry)) => {
                    let caught_up = entry.delta == 0;
                    apply(&mut pipelines, entry);
                    if caught_up {
                        registry.replace(Index::new(pipelines.values().cloned()));
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "pipeline watch error; continuing"),
                None => {
                    tracing::error!("pipeline watch ended; pipeline changes are no longer seen");
                    return;
                }
            }
        }
    }))
}

fn apply(pipelines: &mut HashMap<String, Arc<Pipeline>>, entry: async_nats::jetstream::kv::Entry) {
    match entry.operation {
        Operation::Put => match serde_json::from_slice::<Pipeline>(&entry.value) {
            Ok(p) => {
                tracing::info!(pipeline = %entry.key, revision = entry.revision, "pipeline updated");
                pipelines.insert(entry.key, Arc::new(p));
            }
            // Only `sluice pipelines apply` writes here, after validating; a value that
            // does not parse was written by something else and is ignored, loudly.
            Err(e) => {
                tracing::error!(pipeline = %entry.key, error = %e, "ignoring an invalid pipeline in the bucket")
            }
        },
        Operation::Delete | Operation::Purge => {
            tracing::info!(pipeline = %entry.key, "pipeline deleted");
            pipelines.remove(&entry.key);
        }
    }
}
