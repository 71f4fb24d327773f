//! The cluster's consumer group: pull only what fits, keep pulled runs alive with
//! progress signals, acknowledge once the final state is stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::message::{Acker, Message};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
use async_nats::jetstream::{self, AckKind, ErrorCode};
use futures::StreamExt;
use sluice_core::run::{CancelRequest, Heartbeat, RunRequest, RunState};
use sluice_core::{bus, streams, subjects};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::cancels::Cancelled;
use crate::metrics::{ClusterLabel, Metrics, ResultLabel, RunResult};
use crate::report::Reporter;
use crate::resume::Follow;
use crate::wait::Backoff;
use crate::{Error, Result, RunnerConfig};

/// Runs in hand, by id, with the token that cancels each.
#[derive(Debug)]
struct Running {
    tokens: Mutex<HashMap<String, CancellationToken>>,
    /// Runs cancelled before (or while) this runner had them, while their requests
    /// could still be delivered.
    cancelled: Mutex<Cancelled>,
}

impl Running {
    /// `requests_kept`: how long a run request can wait in `SLUICE_RUNS`.
    fn new(requests_kept: Duration) -> Self {
        Running {
            tokens: Mutex::default(),
            cancelled: Mutex::new(Cancelled::new(requests_kept)),
        }
    }

    /// `run_id` was cancelled by a request stored at `at`.
    fn cancel(&self, run_id: &str, at: OffsetDateTime) {
        if let Ok(mut c) = self.cancelled.lock() {
            c.insert(run_id, at, OffsetDateTime::now_utc());
        }
        if let Some(token) = self.tokens.lock().ok().and_then(|t| t.get(run_id).cloned()) {
            token.cancel();
        }
    }

    fn is_cancelled(&self, run_id: &str) -> bool {
        self.cancelled
            .lock()
            .map(|c| c.contains(run_id, OffsetDateTime::now_utc()))
            .unwrap_or(false)
    }

    /// The run's final state is stored: a later delivery finds it first.
    fn finished(&self, run_id: &str) {
        if let Ok(mut c) = self.cancelled.lock() {
            c.forget(run_id);
        }
    }
}

pub async fn run(config: RunnerConfig, shutdown: CancellationToken) -> Result<()> {
    let client = sluice_core::nats::connect(&config.nats).await?;
    let js = jetstream::new(client.clone());
    let mut metrics = Metrics::default();
    if let Some(kube) = config.executor.kube_metrics() {
        metrics.kube = kube.clone();
    }
    let mut admin = sluice_core::admin::Admin::new(env!("CARGO_PKG_VERSION"));
    metrics.register(admin.registry("sluice_runner"));
    admin.nats(client.clone());
    // Not ready until the runner has joined its cluster's consumer group, and not while
    // its pulls fail.
    let consuming = admin.check("consumer", "not yet joined the cluster's consumer group");
    if let Some(listen) = config.admin_listen {
        admin.serve(listen, shutdown.clone()).await?;
    }
    let Some(mut consumer) = join_retrying(&js, &config, &shutdown).await else {
        return Ok(());
    };
    consuming.ready();
    // A handle on the one series, not the family's lock guard.
    let in_flight = metrics
        .runs_in_flight
        .get_or_create(&ClusterLabel {
            cluster: config.cluster.clone(),
        })
        .clone();
    in_flight.set(0);
    // The consumer's ack wait, not the flag's, decides how often progress is signalled.
    let mut ack_wait = consumer.cached_info().config.ack_wait;
    // The runs stream keeps a request at most its max age: a cancel older than that
    // has no run left to refuse.
    let running = Arc::new(Running::new(config.streams.runs().max_age));
    let cancels = tokio::spawn(follow_cancels(
        js.clone(),
        config.cluster.clone(),
        running.clone(),
        shutdown.clone(),
    ));
    let heartbeat = tokio::spawn(heartbeat(js.clone(), config.clone(), shutdown.clone()));
    let pod_watch = match &config.executor {
        crate::Executor::Kubernetes(kube) => {
            let watch = kube.start(&config.cluster, shutdown.clone());
            let stored = js.clone();
            let cluster = config.cluster.clone();
            kube.sweep(&config.cluster, move |run: String| {
                let (js, cluster) = (stored.clone(), cluster.clone());
                async move { matches!(bus::final_state(&js, &cluster, &run).await, Ok(Some(_))) }
            })
            .await;
            Some(watch)
        }
        crate::Executor::Local(_) => None,
    };

    tracing::info!(cluster = %config.cluster, runner = %config.runner_id, max_running = config.max_running, "runner pulling runs");

    let slots = Arc::new(Semaphore::new(config.max_running));
    let mut tasks = tokio::task::JoinSet::new();
    let mut backoff = Backoff::new(crate::resume::RETRY_FIRST, crate::resume::RETRY_MAX);
    loop {
        // Pull only for free slots: a burst waits in JetStream, where other replicas
        // (or replicas an autoscaler adds) can take it.
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let mut permits = vec![first];
        while permits.len() < 64 {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let pulled = pull(&consumer, &mut permits, &shutdown, |message, permit| {
            let (js, running) = (js.clone(), running.clone());
            let (executor, runner_id) = (config.executor.clone(), config.runner_id.clone());
            let metrics = metrics.clone();
            tasks.spawn(async move {
                handle(
                    js, running, executor, message, ack_wait, runner_id, &metrics,
                )
                .await;
                drop(permit);
            });
        })
        .await;
        drop(permits);
        while tasks.try_join_next().is_some() {}
        in_flight.set(i64::try_from(tasks.len()).unwrap_or(i64::MAX));
        match pulled {
            Pulled::Done => {
                backoff.reset();
                consuming.ready();
            }
            Pulled::Stopping => break,
            Pulled::Failed(e) => {
                consuming.failing(format!("pulling runs failed: {e}; recovering"));
                // Never idle on a dead consumer: wait, then join the group again, which
                // finds the consumer as it is now (or creates it when it is missing and
                // this credential may).
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "pulling runs failed; recovering the consumer");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(delay) => {}
                }
                match join(&js, &config).await {
                    Ok(c) => {
                        ack_wait = c.cached_info().config.ack_wait;
                        consumer = c;
                        consuming.ready();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot join the cluster's consumer group yet")
                    }
                }
            }
        }
    }
    tracing::info!(
        in_flight = tasks.len(),
        "runner stopping: waiting for the runs in hand"
    );
    while tasks.join_next().await.is_some() {}
    cancels.abort();
    heartbeat.abort();
    if let Some(w) = pod_watch {
        w.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
    Ok(())
}

/// Joins the consumer group, retrying until it works or the runner stops (`None`).
///
/// Joining is the one thing a runner cannot do without. It is retried, never fatal:
/// NATS may still be settling (a new leader, JetStream's "insufficient resources"
/// while a cluster forms), or the operator has yet to run the command the log line
/// names.
async fn join_retrying(
    js: &jetstream::Context,
    config: &RunnerConfig,
    shutdown: &CancellationToken,
) -> Option<jetstream::consumer::PullConsumer> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let delay = match join(js, config).await {
            Ok(c) => return Some(c),
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in = ?delay, "cannot join the cluster's consumer group yet");
                delay
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// How one pull ended.
#[derive(Debug)]
enum Pulled {
    /// Its batch was delivered, or the wait for one expired.
    Done,
    Stopping,
    /// The request or the batch failed: the consumer may be gone.
    Failed(Error),
}

/// Pulls at most one message per permit and hands each to `start` with its permit.
async fn pull(
    consumer: &jetstream::consumer::PullConsumer,
    permits: &mut Vec<tokio::sync::OwnedSemaphorePermit>,
    shutdown: &CancellationToken,
    mut start: impl FnMut(Message, tokio::sync::OwnedSemaphorePermit),
) -> Pulled {
    let failed = |source: async_nats::Error| {
        Pulled::Failed(Error::Consumer {
            consumer: consumer.cached_info().name.clone(),
            source,
        })
    };
    let batch = consumer
        .fetch()
        .max_messages(permits.len())
        .expires(Duration::from_secs(2))
        .messages()
        .await;
    let mut messages = match batch {
        Ok(m) => m,
        Err(e) => return failed(e.into()),
    };
    loop {
        let message = tokio::select! {
            // Whatever was pulled but not started is redelivered after its ack wait.
            () = shutdown.cancelled() => return Pulled::Stopping,
            message = messages.next() => message,
        };
        match message {
            None => return Pulled::Done,
            // A status other than "no messages" or "timed out" ends the batch: a
            // deleted consumer answers "no responders", a removed one 409.
            Some(Err(e)) => return failed(e),
            Some(Ok(message)) => {
                let Some(permit) = permits.pop() else {
                    return Pulled::Done;
                };
                start(message, permit);
            }
        }
    }
}

async fn handle(
    js: jetstream::Context,
    running: Arc<Running>,
    executor: crate::Executor,
    message: Message,
    ack_wait: Duration,
    runner_id: String,
    metrics: &Metrics,
) {
    // Only what acknowledging needs is kept while the run goes on, not the payload:
    // thousands of runs may be in flight.
    let reply = message.reply.clone();
    let (message, acker) = message.split();
    let req: RunRequest = match serde_json::from_slice(&message.payload) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, subject = %message.subject, "not a run request; dropping it");
            let _ = Box::pin(acker.ack_with(AckKind::Term)).await;
            return;
        }
    };
    drop(message);
    // The reporter keeps the one copy of the request.
    let reporter = Reporter::new(js.clone(), req, runner_id);
    let req = reporter.request();

    // A redelivery of a run that already finished (its final state was stored, the
    // ack was lost): acknowledge and do nothing. When that cannot be told, the run is
    // left for later rather than perhaps run twice.
    match Box::pin(bus::final_state(&js, &req.cluster, &req.run_id)).await {
        Ok(None) => {}
        Ok(Some(state)) => {
            tracing::info!(run_id = %req.run_id, state = state.as_str(), "run already finished; acknowledging");
            running.finished(&req.run_id);
            let _ = Box::pin(acker.double_ack()).await;
            return;
        }
        Err(e) => {
            tracing::warn!(run_id = %req.run_id, error = %e, retry_in = ?UNSURE_RETRY, "cannot tell whether the run already finished; leaving it for later");
            let _ = Box::pin(acker.ack_with(AckKind::Nak(Some(UNSURE_RETRY)))).await;
            return;
        }
    }
    if running.is_cancelled(&req.run_id) {
        Box::pin(reporter.status(
            None,
            RunState::Cancelled,
            None,
            Some("cancelled before it started".into()),
        ))
        .await;
        let _ = Box::pin(acker.double_ack()).await;
        return;
    }

    let token = CancellationToken::new();
    if let Ok(mut t) = running.tokens.lock() {
        t.insert(req.run_id.clone(), token.clone());
    }
    // Tell NATS the run is still in hand, well within its ack wait. Stopped when this
    // function ends or is dropped, so a run abandoned by a dying runner is redelivered.
    let progress = AbortOnDrop({
        let message_ack = Acker::new(js.clone(), reply);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ack_wait / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                if Box::pin(message_ack.ack_with(AckKind::Progress))
                    .await
                    .is_err()
                {
                    tracing::warn!("progress signal failed");
                }
            }
        })
    });
    tracing::info!(run_id = %req.run_id, pipeline = %req.pipeline, "run started");
    let started = std::time::Instant::now();
    let waited = OffsetDateTime::now_utc() - req.created_at;
    metrics
        .pickup_seconds
        .observe(waited.as_seconds_f64().max(0.0));
    let outcome = executor.run(req, &reporter, &token).await;
    if outcome.state == RunState::Queued {
        // Handed back by a stopping runner: redelivered at once to another replica,
        // which adopts the Pod.
        drop(progress);
        if let Ok(mut t) = running.tokens.lock() {
            t.remove(&req.run_id);
        }
        tracing::info!(run_id = %req.run_id, "run handed back to the queue");
        let _ = Box::pin(acker.ack_with(AckKind::Nak(None))).await;
        return;
    }
    Box::pin(reporter.status(None, outcome.state, None, outcome.message.clone())).await;
    let result = outcome.state.as_str();
    metrics
        .runs
        .get_or_create(&RunResult {
            cluster: req.cluster.clone(),
            result,
        })
        .inc();
    metrics
        .run_seconds
        .get_or_create(&ResultLabel { result })
        .observe(started.elapsed().as_secs_f64());
    drop(progress);
    executor.finished(req);
    if let Ok(mut t) = running.tokens.lock() {
        t.remove(&req.run_id);
    }
    tracing::info!(run_id = %req.run_id, state = outcome.state.as_str(), "run finished");
    if let Err(e) = Box::pin(acker.double_ack()).await {
        tracing::warn!(error = %e, "acknowledging the run failed; a redelivery will find its final state");
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long a run whose finished check failed waits before it is delivered again.
const UNSURE_RETRY: Duration = Duration::from_secs(5);

/// The cluster's consumer group, checked as it is: `sluice streams apply` creates and
/// sizes it. Only when it is missing does the runner try to create it (and what it
/// needs), which works for a first try against a bare server and fails, naming the
/// command, on a restricted credential.
async fn join(
    js: &jetstream::Context,
    config: &RunnerConfig,
) -> Result<jetstream::consumer::PullConsumer> {
    let wanted = streams::ClusterConsumer {
        ack_wait: config.ack_wait,
        ..streams::ClusterConsumer::new(&config.cluster)
    };
    let name = subjects::runner_consumer(&config.cluster);
    match js
        .get_consumer_from_stream::<pull::Config, _, _>(&name, subjects::RUNS_STREAM)
        .await
    {
        Ok(consumer) => {
            let have = &consumer.cached_info().config;
            if have.ack_wait != wanted.ack_wait {
                tracing::warn!(
                    consumer = %name,
                    have = ?have.ack_wait,
                    want = ?wanted.ack_wait,
                    "the consumer's ack wait differs from --ack-wait; using the consumer's (`{} --clusters {}:<ack wait>` changes it)",
                    streams::APPLY_COMMAND,
                    config.cluster,
                );
            }
            Ok(consumer)
        }
        Err(e) if missing(&e) => {
            let differences = streams::prepare(js, &config.streams, RUNNER_NEEDS).await?;
            streams::report("runner", &differences);
            let stream = js
                .get_stream_no_info(subjects::RUNS_STREAM)
                .await
                .map_err(|e| sluice_core::Error::bus("stream SLUICE_RUNS", e))?;
            stream.create_consumer(wanted.config()).await.map_err(|e| {
                Error::Core(sluice_core::Error::Provisioning {
                    what: format!("consumer {name}"),
                    problem: format!(
                        "it does not exist and cannot be created with this credential ({e})"
                    ),
                    fix: format!("{} --clusters {}", streams::APPLY_COMMAND, config.cluster),
                })
            })
        }
        Err(e) => Err(Error::Core(sluice_core::Error::bus(
            format!("consumer {name}"),
            e,
        ))),
    }
}

/// JetStream's "consumer not found" or "stream not found".
fn missing(e: &ConsumerError) -> bool {
    match e.kind() {
        ConsumerErrorKind::JetStream(e) => {
            let code = e.error_code();
            code == ErrorCode::CONSUMER_NOT_FOUND || code == ErrorCode::STREAM_NOT_FOUND
        }
        _ => false,
    }
}

/// What a runner uses; created only on a first try against a bare server.
const RUNNER_NEEDS: streams::Needs = streams::Needs {
    streams: &[
        subjects::RUNS_STREAM,
        subjects::STATUS_STREAM,
        subjects::LOGS_STREAM,
        subjects::CONTROL_STREAM,
        subjects::CHILDREN_STREAM,
    ],
    buckets: &[subjects::RUNNERS_BUCKET],
    object_stores: &[],
};

/// Follows cancel requests for this cluster, from the start of the control stream, so
/// a run cancelled while queued is never started; resumed after the last request seen
/// when the follow fails or ends.
async fn follow_cancels(
    js: jetstream::Context,
    cluster: String,
    running: Arc<Running>,
    shutdown: CancellationToken,
) {
    let mut cancels = Follow::new(&js, subjects::CONTROL_STREAM, subjects::cancel(&cluster));
    loop {
        let m = tokio::select! {
            () = shutdown.cancelled() => return,
            m = cancels.next() => m,
        };
        if let Ok(request) = serde_json::from_slice::<CancelRequest>(&m.payload) {
            tracing::info!(run_id = %request.run_id, reason = %request.reason, "cancel requested");
            // When it was stored, by the server's clock, as the stream's max age counts.
            let at = m.info().map(|i| i.published).unwrap_or(request.at);
            running.cancel(&request.run_id, at);
        }
    }
}

/// Renews this runner's key in `SLUICE_RUNNERS` so dispatchers know the cluster is
/// served.
async fn heartbeat(js: jetstream::Context, config: RunnerConfig, shutdown: CancellationToken) {
    let kv = loop {
        match streams::bucket(&js, subjects::RUNNERS_BUCKET).await {
            Ok(kv) => break kv,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the runners bucket yet; this runner is not advertised")
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    };
    let key = subjects::runner_key(&config.cluster, &config.runner_id);
    let mut tick = tokio::time::interval(streams::RUNNER_TTL / 3);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = kv.delete(&key).await;
                return;
            }
            _ = tick.tick() => {}
        }
        let beat = Heartbeat {
            cluster: config.cluster.clone(),
            runner: config.runner_id.clone(),
            max_running: config.max_running,
            at: OffsetDateTime::now_utc().unix_timestamp(),
        };
        let Ok(body) = serde_json::to_vec(&beat) else {
            continue;
        };
        if let Err(e) = kv.put(&key, body.into()).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jetstream_error(code: u64, description: &str) -> ConsumerError {
        let error: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 404,
            "err_code": code,
            "description": description,
        }))
        .expect("a JetStream API error");
        error.into()
    }

    #[test]
    fn only_a_missing_consumer_or_stream_is_created() {
        assert!(missing(&jetstream_error(10014, "consumer not found")));
        assert!(missing(&jetstream_error(10059, "stream not found")));
        // Said "not found" in its words, but not JetStream's code for a missing one.
        assert!(!missing(&jetstream_error(10076, "not found: account")));
        assert!(!missing(&ConsumerError::new(ConsumerErrorKind::TimedOut)));
    }
}
