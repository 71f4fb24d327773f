//! Concurrency groups, shared by every dispatcher replica through the `SLUICE_GROUPS`
//! bucket and updated with compare-and-set, so two replicas never both admit past
//! `max_running` or lose a queued run.
//!
//! Side effects are published *before* the state that records them is written: a crash
//! in between repeats them on redelivery, and every one of them is idempotent (run
//! requests and cancels carry message ids).

use async_nats::jetstream::kv::Store;
use serde::{Deserialize, Serialize};
use sluice_core::pipeline::Concurrency;
use sluice_core::run::{id_digest, RunRequest};

use crate::bus::Bus;
use crate::{Error, Result};

#[derive(Debug, Default, Serialize, Deserialize)]
struct GroupState {
    group: String,
    running: Vec<Member>,
    queued: Vec<RunRequest>,
    /// The limit the last admission applied: what a release uses when the pipeline is
    /// not in the registry (a repository pipeline, read per event).
    #[serde(default)]
    max_running: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Member {
    run_id: String,
    pipeline: String,
    cluster: String,
}

/// What admission decided for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Publish the run request now.
    Run,
    /// The group is full: the run waits and is published when a slot frees.
    Queued,
}

/// How many times a compare-and-set is retried before the event is retried whole.
const CAS_ATTEMPTS: usize = 20;

/// Admits `req` into its group: cancels older runs when the pipeline asks for it, then
/// runs or queues it under `max_running`.
pub async fn admit(
    bus: &Bus,
    kv: &Store,
    req: &RunRequest,
    conc: &Concurrency,
    group: &str,
) -> Result<Admission> {
    let key = id_digest(group);
    for _ in 0..CAS_ATTEMPTS {
        let (mut state, revision) = load(kv, &key).await?;
        state.group = group.to_owned();
        state.max_running = conc.max_running;
        if state.running.iter().any(|m| m.run_id == req.run_id) {
            // Admitted before (a redelivery): publish again, the id deduplicates.
            return Ok(Admission::Run);
        }
        if state.queued.iter().any(|q| q.run_id == req.run_id) {
            return Ok(Admission::Queued);
        }
        if conc.cancel_in_progress {
            for old in state.running.drain(..) {
                bus.cancel(
                    &old.cluster,
                    &old.run_id,
                    &format!("superseded by run {} in group {group}", req.run_id),
                )
                .await?;
            }
            for old in state.queued.drain(..) {
                bus.cancelled_while_queued(
                    &old,
                    &format!("superseded by run {} in group {group}", req.run_id),
                )
                .await?;
            }
        }
        let admission = match conc.max_running {
            Some(max) if state.running.len() >= max as usize => {
                state.queued.push(req.clone());
                Admission::Queued
            }
            _ => {
                state.running.push(Member {
                    run_id: req.run_id.clone(),
                    pipeline: req.pipeline.clone(),
                    cluster: req.cluster.clone(),
                });
                Admission::Run
            }
        };
        if store(kv, &key, &state, revision).await? {
            return Ok(admission);
        }
    }
    Err(Error::Contention(group.to_owned()))
}

/// Frees `run_id`'s slot in `group` and publishes the queued runs that now fit.
/// Returns the cluster of each run request this call stored (not one a retry found
/// already stored). `max_running` is the pipeline's limit as the registry has it
/// now, or `None` for a pipeline it does not hold (a repository pipeline): then the
/// limit of the group's last admission.
pub async fn release(
    bus: &Bus,
    kv: &Store,
    group: &str,
    run_id: &str,
    max_running: Option<Option<u32>>,
) -> Result<Vec<String>> {
    let key = id_digest(group);
    let mut stored = Vec::new();
    for _ in 0..CAS_ATTEMPTS {
        let (mut state, revision) = load(kv, &key).await?;
        if revision.is_none() {
            return Ok(stored);
        }
        let before = state.running.len() + state.queued.len();
        state.running.retain(|m| m.run_id != run_id);
        state.queued.retain(|q| q.run_id != run_id);
        let limit = max_running
            .unwrap_or(state.max_running)
            .map_or(usize::MAX, |m| m as usize);
        let mut started = Vec::new();
        while state.running.len() < limit && !state.queued.is_empty() {
            let next = state.queued.remove(0);
            state.running.push(Member {
                run_id: next.run_id.clone(),
                pipeline: next.pipeline.clone(),
                cluster: next.cluster.clone(),
            });
            started.push(next);
        }
        if before == state.running.len() + state.queued.len() && started.is_empty() {
            return Ok(stored);
        }
        for next in &started {
            if !bus.publish_run(next).await? {
                stored.push(next.cluster.clone());
            }
        }
        if store(kv, &key, &state, revision).await? {
            for next in &started {
                tracing::info!(run_id = %next.run_id, group, "queued run started");
            }
            return Ok(stored);
        }
    }
    Err(Error::Contention(group.to_owned()))
}

async fn load(kv: &Store, key: &str) -> Result<(GroupState, Option<u64>)> {
    match kv
        .entry(key)
        .await
        .map_err(|e| Error::nats("read concurrency group", e))?
    {
        Some(entry) if entry.operation == async_nats::jetstream::kv::Operation::Put => {
            let state =
                serde_json::from_slice(&entry.value).map_err(|source| Error::GroupState {
                    key: key.to_owned(),
                    source,
                })?;
            Ok((state, Some(entry.revision)))
        }
        Some(entry) => Ok((GroupState::default(), Some(entry.revision))),
        None => Ok((GroupState::default(), None)),
    }
}

/// Writes the state if nobody else did since `revision`; false on a conflict.
async fn store(kv: &Store, key: &str, state: &GroupState, revision: Option<u64>) -> Result<bool> {
    let value = serde_json::to_vec(state).map_err(|source| Error::Encode {
        what: "a concurrency group",
        source,
    })?;
    let written = match revision {
        None => kv.create(key, value.into()).await.is_ok(),
        Some(rev) => kv.update(key, value.into(), rev).await.is_ok(),
    };
    Ok(written)
}
