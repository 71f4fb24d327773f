//! Reads of JetStream that one page needs: a decision, the pipelines, the runners and
//! their backlog, a run's output. Everything goes through `sluice_core::bus` and the
//! names in `sluice_core::subjects`, as the CLI's readers do.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::{StreamExt, TryStreamExt};
use sluice_core::pipeline::Pipeline;
use sluice_core::repo_pipelines::LastRead;
use sluice_core::run::{Decision, Heartbeat, LogChunk};
use sluice_core::{bus, streams, subjects};

use crate::ansi::{self, Segment};
use crate::groups::{self, Mark};
use crate::Result;

/// The decision recorded for `event_id` (what `sluice events why` prints).
pub async fn decision(js: &jetstream::Context, event_id: &str) -> Result<Option<Decision>> {
    Ok(bus::decision(js, event_id).await?)
}

/// A stored pipeline and its revision in the bucket.
#[derive(Debug, Clone)]
pub struct StoredPipeline {
    pub name: String,
    pub revision: u64,
    /// `None` when the stored value no longer parses (written by another version).
    pub pipeline: Option<Pipeline>,
}

pub async fn pipelines(js: &jetstream::Context) -> Result<Vec<StoredPipeline>> {
    let kv = streams::bucket(js, subjects::PIPELINES_BUCKET).await?;
    let keys: Vec<String> = match kv.keys().await {
        Ok(keys) => keys.try_collect().await.unwrap_or_default(),
        Err(e) => return Err(sluice_core::Error::bus("list the pipelines", e).into()),
    };
    let mut out = Vec::new();
    for key in keys {
        if let Some(p) = pipeline_in(&kv, &key).await? {
            out.push(p);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

pub async fn pipeline(js: &jetstream::Context, name: &str) -> Result<Option<StoredPipeline>> {
    let kv = streams::bucket(js, subjects::PIPELINES_BUCKET).await?;
    // A key holding a subject wildcard or separator is no pipeline name.
    if sluice_core::pipeline::Name::parse(name).is_err() {
        return Ok(None);
    }
    pipeline_in(&kv, name).await
}

async fn pipeline_in(kv: &jetstream::kv::Store, key: &str) -> Result<Option<StoredPipeline>> {
    let entry = kv
        .entry(key)
        .await
        .map_err(|e| sluice_core::Error::bus("read a pipeline", e))?;
    Ok(entry.map(|e| StoredPipeline {
        name: key.to_owned(),
        revision: e.revision,
        pipeline: serde_json::from_slice(&e.value).ok(),
    }))
}

/// What the dispatchers last read from each repository's `.sluice/` (the `last.`
/// records of `SLUICE_REPO_FILES`; its other keys are cached listings), by provider and
/// repository. None on an install from before repository pipelines, without the bucket.
pub async fn last_reads(js: &jetstream::Context) -> Result<Vec<LastRead>> {
    let kv = match js.get_key_value(subjects::REPO_FILES_BUCKET).await {
        Ok(kv) => kv,
        Err(e) if bucket_missing(&e) => return Ok(Vec::new()),
        Err(e) => {
            return Err(sluice_core::Error::bus("open the repository files bucket", e).into())
        }
    };
    let mut keys: Vec<String> = kv
        .keys()
        .await
        .map_err(|e| sluice_core::Error::bus("list the repository files bucket", e))?
        .try_filter(|k| std::future::ready(k.starts_with(subjects::REPO_LAST_READ_PREFIX)))
        .try_collect()
        .await
        .map_err(|e| sluice_core::Error::bus("list the repository files bucket", e))?;
    keys.sort();
    let mut out = Vec::new();
    for key in keys {
        let value = kv
            .get(&key)
            .await
            .map_err(|e| sluice_core::Error::bus("read a repository read record", e))?;
        // Expired since the listing, or written by another version.
        if let Some(r) = value.and_then(|v| serde_json::from_slice::<LastRead>(&v).ok()) {
            out.push(r);
        }
    }
    out.sort_by(|a, b| (a.provider.as_str(), &a.repo).cmp(&(b.provider.as_str(), &b.repo)));
    Ok(out)
}

/// JetStream answered that the bucket's stream does not exist; a timeout or a refused
/// permission is an error, not an old install.
fn bucket_missing(e: &jetstream::context::KeyValueError) -> bool {
    use jetstream::context::{GetStreamError, GetStreamErrorKind, KeyValueErrorKind};
    e.kind() == KeyValueErrorKind::GetBucket
        && std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<GetStreamError>())
            .is_some_and(|s| {
                matches!(s.kind(), GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
            })
}

/// One cluster as `/clusters` shows it.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub name: String,
    pub runners: Vec<RunnerView>,
    /// Run requests not yet taken by a runner; `None` when the cluster has no consumer.
    pub backlog: Option<u64>,
    pub in_flight: usize,
}

#[derive(Debug, Clone)]
pub struct RunnerView {
    pub id: String,
    pub max_running: usize,
    pub seen_seconds_ago: i64,
}

/// Every cluster with a live runner or a stored run.
pub async fn clusters(
    js: &jetstream::Context,
    in_flight: std::collections::HashMap<String, usize>,
) -> Result<Vec<ClusterView>> {
    let mut clusters: BTreeMap<String, ClusterView> = BTreeMap::new();
    let kv = streams::bucket(js, subjects::RUNNERS_BUCKET).await?;
    let keys: Vec<String> = match kv.keys().await {
        Ok(keys) => keys.try_collect().await.unwrap_or_default(),
        Err(e) => return Err(sluice_core::Error::bus("list the runners", e).into()),
    };
    let now = time::OffsetDateTime::now_utc();
    for key in keys {
        let Some((cluster, runner)) = subjects::parse_runner_key(&key) else {
            continue;
        };
        let Some(entry) = kv
            .entry(&key)
            .await
            .map_err(|e| sluice_core::Error::bus("read a runner", e))?
        else {
            continue;
        };
        let max_running = serde_json::from_slice::<Heartbeat>(&entry.value)
            .map(|h| h.max_running)
            .unwrap_or_default();
        let view = clusters.entry(cluster.to_owned()).or_default();
        view.runners.push(RunnerView {
            id: runner.to_owned(),
            max_running,
            seen_seconds_ago: (now - entry.created).whole_seconds(),
        });
    }
    for (cluster, n) in in_flight {
        if !cluster.is_empty() {
            clusters.entry(cluster).or_default().in_flight = n;
        }
    }
    let runs = js
        .get_stream_no_info(subjects::RUNS_STREAM)
        .await
        .map_err(|e| sluice_core::Error::bus("open the runs stream", e))?;
    for (name, view) in &mut clusters {
        view.name = name.clone();
        view.backlog = runs
            .consumer_info(subjects::runner_consumer(name))
            .await
            .ok()
            .map(|info| info.num_pending);
    }
    Ok(clusters.into_values().collect())
}

/// One line of a step's output, numbered from 1 within the step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Line {
    pub n: u64,
    pub segments: Vec<Segment>,
    /// The group marker the line is, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<Mark>,
}

impl Line {
    /// Line `n`, from its text as stored.
    pub fn new(n: u64, raw: &str) -> Line {
        Line {
            n,
            segments: ansi::segments(raw),
            group: groups::mark(raw),
        }
    }
}

/// A step's output as the run page opens it: the last lines, and how many there are.
#[derive(Debug, Clone, Default)]
pub struct StepLog {
    pub step: String,
    pub total: u64,
    pub tail: std::collections::VecDeque<Line>,
}

/// A chunk read only as far as its step and how many lines it has: the lines' text is
/// skipped, not unescaped or copied, so counting a step's lines costs little.
#[derive(serde::Deserialize)]
struct ChunkHead {
    step: String,
    lines: Vec<serde::de::IgnoredAny>,
}

/// Where each chunk of a run's log is, per step, in the order the steps first printed:
/// enough to number the lines and fetch only the chunks a page shows.
#[derive(Debug, Clone, Default)]
pub struct LogMap {
    /// The stream sequence of the last chunk mapped.
    last: u64,
    steps: Vec<StepMap>,
}

#[derive(Debug, Clone, Default)]
struct StepMap {
    step: String,
    total: u64,
    chunks: Vec<ChunkAt>,
}

#[derive(Debug, Clone, Copy)]
struct ChunkAt {
    sequence: u64,
    /// The number of its first line within the step.
    first: u64,
    count: u64,
}

impl StepMap {
    /// The chunks holding lines `from..=to`.
    fn chunks_for(&self, from: u64, to: u64) -> impl Iterator<Item = &ChunkAt> {
        self.chunks
            .iter()
            .filter(move |c| c.count > 0 && c.first <= to && c.first + c.count > from)
    }
}

/// How many runs' maps are kept; the least recently used goes first.
const KEPT_MAPS: usize = 64;

/// The maps of the runs opened last. A run's map is made by reading its whole log once
/// (counting lines, not parsing them), then only extended with the chunks stored since:
/// opening the page again, or paging back, reads only the new chunks and those shown.
#[derive(Debug, Default)]
pub struct LogMaps {
    maps: std::sync::Mutex<std::collections::HashMap<String, (u64, std::sync::Arc<LogMap>)>>,
    clock: std::sync::atomic::AtomicU64,
}

impl LogMaps {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (u64, std::sync::Arc<LogMap>)>>
    {
        // A map is replaced whole; a panic cannot leave half of one.
        self.maps.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The run's map, brought up to the chunks stored now.
    async fn current(&self, js: &jetstream::Context, run_id: &str) -> Result<LogMap> {
        let kept = self.lock().get(run_id).map(|(_, m)| m.clone());
        let mut map = kept.map(|m| (*m).clone()).unwrap_or_default();
        extend(js, run_id, &mut map).await?;
        let used = self
            .clock
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut maps = self.lock();
        maps.insert(run_id.to_owned(), (used, std::sync::Arc::new(map.clone())));
        if maps.len() > KEPT_MAPS {
            let oldest = maps
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                maps.remove(&id);
            }
        }
        Ok(map)
    }

    fn forget(&self, run_id: &str) {
        self.lock().remove(run_id);
    }
}

/// Adds to `map` the chunks of the run stored after the last one it has.
async fn extend(js: &jetstream::Context, run_id: &str, map: &mut LogMap) -> Result<()> {
    let policy = match map.last {
        0 => DeliverPolicy::All,
        n => DeliverPolicy::ByStartSequence {
            start_sequence: n + 1,
        },
    };
    let (consumer, pending) = bus::ordered(
        js,
        subjects::LOGS_STREAM,
        subjects::logs_of_run(run_id),
        policy,
    )
    .await?;
    if pending == 0 {
        return Ok(());
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| sluice_core::Error::bus("read the logs", e))?
        .take(pending as usize);
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| sluice_core::Error::bus("read the logs", e))?;
        let Ok(info) = m.info() else { continue };
        map.last = info.stream_sequence;
        let Ok(head) = serde_json::from_slice::<ChunkHead>(&m.payload) else {
            continue;
        };
        let i = match map.steps.iter().position(|s| s.step == head.step) {
            Some(i) => i,
            None => {
                map.steps.push(StepMap {
                    step: head.step,
                    ..StepMap::default()
                });
                map.steps.len() - 1
            }
        };
        let step = &mut map.steps[i];
        let count = head.lines.len() as u64;
        step.chunks.push(ChunkAt {
            sequence: map.last,
            first: step.total + 1,
            count,
        });
        step.total += count;
    }
    Ok(())
}

/// Lines `from..=to` of a step, fetched chunk by chunk from where `map` says they are.
async fn fetch_lines(
    js: &jetstream::Context,
    step: &StepMap,
    from: u64,
    to: u64,
) -> Result<Vec<Line>> {
    let stream = js
        .get_stream_no_info(subjects::LOGS_STREAM)
        .await
        .map_err(|e| sluice_core::Error::bus("open the logs stream", e))?;
    let fetches = step.chunks_for(from, to).map(|c| {
        let stream = &stream;
        async move {
            let m = stream
                .get_raw_message(c.sequence)
                .await
                .map_err(|e| sluice_core::Error::bus("read a log chunk", e))?;
            Ok::<_, sluice_core::Error>((c.first, m.payload))
        }
    });
    let mut out = Vec::new();
    for fetched in futures::future::join_all(fetches).await {
        let (first, body) = fetched?;
        let Ok(chunk) = serde_json::from_slice::<LogChunk>(&body) else {
            continue;
        };
        for (n, line) in (first..).zip(&chunk.lines) {
            if (from..=to).contains(&n) {
                out.push(Line::new(n, &line.text));
            }
        }
    }
    Ok(out)
}

/// A run's output per step, in the order the steps first printed, keeping only the last
/// `tail` lines of each (a log of a million lines opens on its end); and the stream
/// sequence of the last chunk read, from which the live stream goes on.
pub async fn run_logs(
    js: &jetstream::Context,
    maps: &LogMaps,
    run_id: &str,
    tail: usize,
) -> Result<(Vec<StepLog>, u64)> {
    let attempt = |map: LogMap| async move {
        let mut logs = Vec::new();
        for step in &map.steps {
            let from = step.total.saturating_sub(tail as u64) + 1;
            logs.push(StepLog {
                step: step.step.clone(),
                total: step.total,
                tail: fetch_lines(js, step, from, step.total).await?.into(),
            });
        }
        Ok::<_, crate::Error>((logs, map.last))
    };
    match attempt(maps.current(js, run_id).await?).await {
        Ok(found) => Ok(found),
        // A chunk the map names is gone (the stream's age limit): map the log again.
        Err(_) => {
            maps.forget(run_id);
            attempt(maps.current(js, run_id).await?).await
        }
    }
}

/// Lines `from..=to` (numbered from 1) of one step, for paging back through a log.
pub async fn step_lines(
    js: &jetstream::Context,
    maps: &LogMaps,
    run_id: &str,
    step: &str,
    from: u64,
    to: u64,
) -> Result<Vec<Line>> {
    let attempt = |map: LogMap| async move {
        match map.steps.iter().find(|s| s.step == step) {
            Some(s) => fetch_lines(js, s, from, to).await,
            None => Ok(Vec::new()),
        }
    };
    match attempt(maps.current(js, run_id).await?).await {
        Ok(found) => Ok(found),
        Err(_) => {
            maps.forget(run_id);
            attempt(maps.current(js, run_id).await?).await
        }
    }
}

/// The run's whole output as stored, one `── step ──` header before each step's lines.
pub async fn raw_log(js: &jetstream::Context, run_id: &str) -> Result<String> {
    let mut out = String::new();
    let mut current = String::new();
    bus::read_subject(
        js,
        subjects::LOGS_STREAM,
        subjects::logs_of_run(run_id),
        |m| {
            let Ok(chunk) = serde_json::from_slice::<LogChunk>(&m.payload) else {
                return;
            };
            if chunk.step != current {
                out.push_str(&format!("── {} ──\n", chunk.step));
                current = chunk.step.clone();
            }
            for line in &chunk.lines {
                out.push_str(&line.text);
                out.push('\n');
            }
        },
    )
    .await?;
    Ok(out)
}
