//! What a run tells the world: state changes on `SLUICE_STATUS` and output on
//! `SLUICE_LOGS`, each with a message id so a restarted runner repeating itself is
//! stored once.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use sluice_core::run::{LogChunk, LogLine, RunRequest, RunState, StatusUpdate};
use sluice_core::{bus, subjects};
use tokio::sync::mpsc;

use crate::wait::Backoff;

/// Lines per log message, and how long a partial batch may wait.
const BATCH_LINES: usize = 100;
const BATCH_WAIT: Duration = Duration::from_millis(100);
/// Bytes of text per log message. JSON can write a control character in six bytes, so
/// this times six, or one longest line (64 KiB) times six, stays under NATS's default
/// `max_payload` of 1 MiB: a message over it is refused and its lines would be lost.
const BATCH_BYTES: usize = 128 * 1024;

/// Publishes one run's states and logs. Cheap to clone: each of a run's tasks (its
/// log followers among them) holds one, and thousands of runs may be in flight.
#[derive(Debug, Clone)]
pub struct Reporter(Arc<Shared>);

#[derive(Debug)]
struct Shared {
    js: jetstream::Context,
    req: RunRequest,
    runner: String,
}

impl Reporter {
    pub fn new(js: jetstream::Context, req: RunRequest, runner: String) -> Self {
        Reporter(Arc::new(Shared { js, req, runner }))
    }

    /// A run (`step` = None) or step state change, retried until stored: a state must
    /// not be lost to a NATS outage.
    pub async fn status(
        &self,
        step: Option<&str>,
        state: RunState,
        exit_code: Option<i32>,
        message: Option<String>,
    ) {
        let mut update = StatusUpdate::for_run(&self.0.req, state, message);
        update.step = step.map(str::to_owned);
        update.exit_code = exit_code;
        update.runner = Some(self.0.runner.clone());
        let body = match serde_json::to_vec(&update) {
            Ok(b) => b,
            Err(e) => return tracing::error!(error = %e, "cannot encode a status"),
        };
        Box::pin(publish_retrying(
            &self.0.js,
            update.subject(),
            update.message_id(),
            body,
        ))
        .await;
    }

    pub fn request(&self) -> &RunRequest {
        &self.0.req
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.0.js
    }

    /// A log writer for one step; lines are batched and shipped in order.
    pub fn step_log(&self, step: &str) -> StepLog {
        self.step_log_at(step, 0)
    }

    /// A log writer that continues a step's output at chunk `seq` (after a restart),
    /// with a task that ships what is sent to it.
    pub fn step_log_at(&self, step: &str, seq: u64) -> StepLog {
        let (tx, rx) = mpsc::channel::<LogLine>(1024);
        let shipper = tokio::spawn(ship(self.log_writer(step, seq), rx));
        StepLog { tx, shipper }
    }

    /// A log writer for a reader that ships its own batches, continuing at chunk `seq`.
    pub fn log_writer(&self, step: &str, seq: u64) -> LogWriter {
        LogWriter {
            js: self.0.js.clone(),
            subject: subjects::logs(&self.0.req.cluster, &self.0.req.run_id),
            run_id: self.0.req.run_id.clone(),
            step: step.to_owned(),
            seq,
            batch: Vec::new(),
            bytes: 0,
            due: None,
        }
    }

    /// How much of a step's output is already stored: lines, and the next chunk's
    /// position. A runner adopting a run resumes from there, so no line is shipped
    /// twice or lost.
    pub async fn stored_log(&self, step: &str) -> (u64, u64) {
        // Retried until read: guessing (0, 0) would ship every line again under new
        // chunk positions.
        let subject = subjects::logs(&self.0.req.cluster, &self.0.req.run_id);
        until_ok("read the stored log", &subject, || {
            self.read_stored_log(step)
        })
        .await
    }

    async fn read_stored_log(&self, step: &str) -> sluice_core::Result<(u64, u64)> {
        let (mut lines, mut next) = (0u64, 0u64);
        let req = &self.0.req;
        bus::read_subject(
            &self.0.js,
            subjects::LOGS_STREAM,
            subjects::logs(&req.cluster, &req.run_id),
            |m| {
                if let Ok(chunk) = serde_json::from_slice::<LogChunk>(&m.payload) {
                    if chunk.step == step {
                        lines += chunk.lines.len() as u64;
                        next = next.max(chunk.seq + 1);
                    }
                }
            },
        )
        .await?;
        Ok((lines, next))
    }
}

/// Sends a step's lines to its shipper; [`StepLog::finish`] flushes them all.
#[derive(Debug)]
pub struct StepLog {
    tx: mpsc::Sender<LogLine>,
    shipper: tokio::task::JoinHandle<()>,
}

impl StepLog {
    pub fn sender(&self) -> mpsc::Sender<LogLine> {
        self.tx.clone()
    }

    pub async fn line(&self, stream: &str, text: impl Into<String>) {
        let _ = self
            .tx
            .send(LogLine {
                stream: stream.to_owned(),
                text: text.into(),
            })
            .await;
    }

    /// Waits until every line sent so far is stored.
    pub async fn finish(self) {
        drop(self.tx);
        let _ = self.shipper.await;
    }
}

async fn ship(mut writer: LogWriter, mut rx: mpsc::Receiver<LogLine>) {
    loop {
        let next = tokio::select! {
            next = rx.recv() => next,
            () = crate::wait::sleep_until(writer.due()) => {
                writer.flush().await;
                continue;
            }
        };
        match next {
            Some(line) => writer.line(line).await,
            None => break,
        }
    }
    writer.flush().await;
}

/// A step's log, batched and shipped by whoever reads the output, without a task or a
/// channel of its own: a Kubernetes log follower writes through one, so thousands of
/// followed logs cost thousands of small buffers, not thousands of tasks. A batch is
/// shipped when it has [`BATCH_LINES`] lines, when the next line would take it past
/// [`BATCH_BYTES`], and [`BATCH_WAIT`] after its first line (the reader waits on
/// [`LogWriter::due`] for that).
#[derive(Debug)]
pub struct LogWriter {
    js: jetstream::Context,
    subject: String,
    run_id: String,
    step: String,
    seq: u64,
    batch: Vec<LogLine>,
    bytes: usize,
    due: Option<tokio::time::Instant>,
}

impl LogWriter {
    pub async fn line(&mut self, line: LogLine) {
        // A batch is shipped as soon as it has BATCH_LINES, so only bytes can be full.
        if !self.batch.is_empty() && self.bytes + line.text.len() > BATCH_BYTES {
            self.flush().await;
        }
        if self.batch.is_empty() {
            self.due = Some(tokio::time::Instant::now() + BATCH_WAIT);
        }
        self.bytes += line.text.len();
        self.batch.push(line);
        if self.batch.len() >= BATCH_LINES {
            self.flush().await;
        }
    }

    /// When the partial batch must be shipped; `None` when there is none.
    pub fn due(&self) -> Option<tokio::time::Instant> {
        self.due
    }

    /// Ships the lines batched so far, and returns once they are stored.
    pub async fn flush(&mut self) {
        self.due = None;
        self.bytes = 0;
        if self.batch.is_empty() {
            return;
        }
        let chunk = LogChunk {
            run_id: self.run_id.clone(),
            step: self.step.clone(),
            seq: self.seq,
            lines: std::mem::take(&mut self.batch),
        };
        if let Ok(body) = serde_json::to_vec(&chunk) {
            Box::pin(publish_retrying(
                &self.js,
                self.subject.clone(),
                subjects::log_chunk_id(&self.run_id, &self.step, self.seq),
                body,
            ))
            .await;
        }
        self.seq += 1;
    }
}

/// Publishes until stored: a state or a log line must not be lost to a NATS outage,
/// however long (a majority of the cluster down for a minute is a scenario of the
/// fault suite). A runner stopping meanwhile waits for its runs, and a run it never
/// acknowledged is handed to another runner, which publishes the same ids again.
pub(crate) async fn publish_retrying(
    js: &jetstream::Context,
    subject: String,
    id: String,
    body: Vec<u8>,
) {
    until_ok("publish", &subject, || {
        bus::publish(js, subject.clone(), &id, body.clone())
    })
    .await;
}

/// Tries `attempt` until it succeeds, backing off to 5 s between tries; logs each
/// failure, and once at error level when it has failed for a while.
async fn until_ok<T, E, F, Fut>(action: &'static str, subject: &str, mut attempt: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    const LOUD_AFTER: u32 = 10;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut failures = 0u32;
    loop {
        match attempt().await {
            Ok(done) => return done,
            Err(e) => {
                failures = failures.saturating_add(1);
                if failures == LOUD_AFTER {
                    tracing::error!(action, subject, failures, error = %e, "still failing; retrying until NATS takes it");
                } else {
                    tracing::warn!(action, subject, failures, error = %e, "failed; retrying");
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    // Past the ten attempts (about 26 s) after which publishing used to give up and
    // drop the state or the log lines.
    #[tokio::test(start_paused = true)]
    async fn a_publish_is_retried_through_a_long_outage_until_it_succeeds() {
        let tries = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let stored = until_ok("publish", "sluice.status.x", || async {
            let n = tries.fetch_add(1, Ordering::SeqCst) + 1;
            if n <= 30 {
                Err("NATS is down")
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(stored, 31);
        // The backoff is capped at 5 s: an outage is noticed soon after it ends.
        let waited = started.elapsed();
        assert!(waited > Duration::from_secs(60), "{waited:?}");
        assert!(waited < Duration::from_secs(31 * 5), "{waited:?}");
    }
}
