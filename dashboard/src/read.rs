//! Reads of JetStream that one page needs: a decision, the pipelines, the runners and
//! their backlog, a run's output. Everything goes through `sluice_core::bus` and the
//! names in `sluice_core::subjects`, as the CLI's readers do.

use std::collections::BTreeMap;

use async_nats::jetstream::{self, stream::LastRawMessageErrorKind};
use futures::TryStreamExt;
use sluice_core::pipeline::Pipeline;
use sluice_core::run::{Decision, Heartbeat, LogChunk};
use sluice_core::{bus, streams, subjects};

use crate::ansi::{self, Segment};
use crate::groups::{self, Mark};
use crate::Result;

/// The decision recorded for `event_id` (what `sluice events why` prints).
pub async fn decision(js: &jetstream::Context, event_id: &str) -> Result<Option<Decision>> {
    let stream = js
        .get_stream_no_info(subjects::DECISIONS_STREAM)
        .await
        .map_err(|e| sluice_core::Error::bus("open the decisions stream", e))?;
    match stream
        .get_last_raw_message_by_subject(subjects::decision(event_id).as_str())
        .await
    {
        Ok(msg) => Ok(serde_json::from_slice(&msg.payload).ok()),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(sluice_core::Error::bus("read a decision", e).into()),
    }
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

/// A step's chunks that may hold its last lines, while its log is read.
#[derive(Default)]
struct Kept {
    step: String,
    total: u64,
    /// Each kept chunk: the number of its first line, its line count and its body.
    chunks: std::collections::VecDeque<(u64, u64, axum::body::Bytes)>,
    lines: u64,
}

/// A run's output per step, in the order the steps first printed, keeping only the last
/// `tail` lines of each (a log of a million lines opens on its end); and the stream
/// sequence of the last chunk read, from which the live stream goes on. Every chunk is
/// read, to number the lines, but only the last ones of each step are parsed whole.
pub async fn run_logs(
    js: &jetstream::Context,
    run_id: &str,
    tail: usize,
) -> Result<(Vec<StepLog>, u64)> {
    let mut steps: Vec<Kept> = Vec::new();
    let mut last = 0;
    let tail_lines = tail as u64;
    bus::read_subject(
        js,
        subjects::LOGS_STREAM,
        subjects::logs_of_run(run_id),
        |m| {
            if let Ok(info) = m.info() {
                last = info.stream_sequence;
            }
            let Ok(head) = serde_json::from_slice::<ChunkHead>(&m.payload) else {
                return;
            };
            let i = match steps.iter().position(|s| s.step == head.step) {
                Some(i) => i,
                None => {
                    steps.push(Kept {
                        step: head.step,
                        ..Kept::default()
                    });
                    steps.len() - 1
                }
            };
            let kept = &mut steps[i];
            let count = head.lines.len() as u64;
            kept.chunks
                .push_back((kept.total + 1, count, m.payload.clone()));
            kept.total += count;
            kept.lines += count;
            // Drop the oldest chunk while the others still hold `tail` lines.
            while let Some(&(_, oldest, _)) = kept.chunks.front() {
                if kept.chunks.len() > 1 && kept.lines - oldest >= tail_lines {
                    kept.chunks.pop_front();
                    kept.lines -= oldest;
                } else {
                    break;
                }
            }
        },
    )
    .await?;
    let logs = steps
        .into_iter()
        .map(|kept| {
            let mut log = StepLog {
                step: kept.step,
                total: kept.total,
                tail: std::collections::VecDeque::new(),
            };
            let skip_before = kept.total.saturating_sub(tail_lines) + 1;
            for (first, _, body) in kept.chunks {
                let Ok(chunk) = serde_json::from_slice::<LogChunk>(&body) else {
                    continue;
                };
                for (n, line) in (first..).zip(&chunk.lines) {
                    if n >= skip_before {
                        log.tail.push_back(Line::new(n, &line.text));
                    }
                }
            }
            log
        })
        .collect();
    Ok((logs, last))
}

/// Lines `from..=to` (numbered from 1) of one step, for paging back through a log.
/// Only the chunks that hold them are parsed whole.
pub async fn step_lines(
    js: &jetstream::Context,
    run_id: &str,
    step: &str,
    from: u64,
    to: u64,
) -> Result<Vec<Line>> {
    let mut out = Vec::new();
    let mut n = 0u64;
    bus::read_subject(
        js,
        subjects::LOGS_STREAM,
        subjects::logs_of_run(run_id),
        |m| {
            let Ok(head) = serde_json::from_slice::<ChunkHead>(&m.payload) else {
                return;
            };
            if head.step != step {
                return;
            }
            let first = n + 1;
            n += head.lines.len() as u64;
            if n < from || first > to {
                return;
            }
            let Ok(chunk) = serde_json::from_slice::<LogChunk>(&m.payload) else {
                return;
            };
            for (i, line) in (first..).zip(&chunk.lines) {
                if (from..=to).contains(&i) {
                    out.push(Line::new(i, &line.text));
                }
            }
        },
    )
    .await?;
    Ok(out)
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
