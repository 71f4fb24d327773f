//! The cluster's consumer group: pull only what fits, keep pulled runs alive with
//! progress signals, acknowledge once the final state is stored.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::{Acker, Message};
use async_nats::jetstream::{self, AckKind};
use futures::StreamExt;
use sluice_core::run::{CancelRequest, RunRequest, RunState, StatusUpdate};
use sluice_core::{streams, subjects};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::report::Reporter;
use crate::{Error, Result, RunnerConfig};

/// Runs in hand, by id, with the token that cancels each.
#[derive(Debug, Default)]
struct Running {
    tokens: Mutex<HashMap<String, CancellationToken>>,
    /// Runs cancelled before (or while) this runner had them.
    cancelled: Mutex<HashSet<String>>,
}

impl Running {
    fn cancel(&self, run_id: &str) {
        if let Ok(mut c) = self.cancelled.lock() {
            c.insert(run_id.to_owned());
        }
        if let Some(token) = self.tokens.lock().ok().and_then(|t| t.get(run_id).cloned()) {
            token.cancel();
        }
    }

    fn is_cancelled(&self, run_id: &str) -> bool {
        self.cancelled
            .lock()
            .map(|c| c.contains(run_id))
            .unwrap_or(false)
    }
}

pub async fn run(config: RunnerConfig, shutdown: CancellationToken) -> Result<()> {
    let client = sluice_core::nats::connect(&config.nats).await?;
    let js = jetstream::new(client.clone());
    let mut delay = Duration::from_millis(100);
    loop {
        match streams::ensure(&js, &config.streams).await {
            Ok(()) => break,
            Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "cannot reach the streams yet"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    let running = Arc::new(Running::default());
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
            kube.sweep(&config.cluster, move |run: String| {
                let js = stored.clone();
                async move { final_state(&js, &run).await.is_some() }
            })
            .await;
            Some(watch)
        }
        crate::Executor::Local(_) => None,
    };

    let name = format!("sluice-runner-{}", config.cluster);
    let stream = js
        .get_stream(subjects::RUNS_STREAM)
        .await
        .map_err(|e| Error::Nats(format!("runs stream: {e}")))?;
    // Created or updated, so a changed setting reaches a consumer that exists.
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            filter_subject: subjects::runs(&config.cluster),
            ack_policy: AckPolicy::Explicit,
            ack_wait: config.ack_wait,
            // Replicas bound their own work with --max-running; JetStream's default of
            // 1,000 unacknowledged runs per consumer would silently cap the whole
            // cluster (20 replicas of 50 already reach it).
            max_ack_pending: -1,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::Nats(format!("consumer {name}: {e}")))?;
    tracing::info!(cluster = %config.cluster, runner = %config.runner_id, max_running = config.max_running, "runner pulling runs");

    let slots = Arc::new(Semaphore::new(config.max_running));
    let mut tasks = tokio::task::JoinSet::new();
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
        let batch = consumer
            .fetch()
            .max_messages(permits.len())
            .expires(Duration::from_secs(2))
            .messages()
            .await;
        let mut messages = match batch {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "pulling runs failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let message = tokio::select! {
                // Whatever was pulled but not started is redelivered after its ack wait.
                () = shutdown.cancelled() => break,
                message = messages.next() => message,
            };
            let Some(message) = message else { break };
            let Ok(message) = message else { continue };
            let Some(permit) = permits.pop() else { break };
            let (js, running, ack_wait) = (js.clone(), running.clone(), config.ack_wait);
            let (executor, runner_id) = (config.executor.clone(), config.runner_id.clone());
            tasks.spawn(async move {
                handle(js, running, executor, message, ack_wait, runner_id).await;
                drop(permit);
            });
        }
        while tasks.try_join_next().is_some() {}
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

async fn handle(
    js: jetstream::Context,
    running: Arc<Running>,
    executor: crate::Executor,
    message: Message,
    ack_wait: Duration,
    runner_id: String,
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
    // ack was lost): acknowledge and do nothing.
    if let Some(state) = Box::pin(final_state(&js, &req.run_id)).await {
        tracing::info!(run_id = %req.run_id, state = state.as_str(), "run already finished; acknowledging");
        let _ = Box::pin(acker.double_ack()).await;
        return;
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

/// The run's final state, when one is already stored.
async fn final_state(js: &jetstream::Context, run_id: &str) -> Option<RunState> {
    let mut last = None;
    crate::report::read_subject(
        js,
        subjects::STATUS_STREAM,
        subjects::status(run_id),
        |payload| {
            if let Ok(update) = serde_json::from_slice::<StatusUpdate>(payload) {
                if update.step.is_none() && update.state.is_final() {
                    last = Some(update.state);
                }
            }
        },
    )
    .await
    .ok()?;
    last
}

/// Follows cancel requests for this cluster, from the start of the control stream, so
/// a run cancelled while queued is never started.
async fn follow_cancels(
    js: jetstream::Context,
    cluster: String,
    running: Arc<Running>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = match js.get_stream(subjects::CONTROL_STREAM).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read cancel requests yet");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(2)) => continue,
                }
            }
        };
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: subjects::cancel(&cluster),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow cancel requests; retrying");
                    continue;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow cancel requests; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(2)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                () = shutdown.cancelled() => return,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(m)) => {
                    if let Ok(request) = serde_json::from_slice::<CancelRequest>(&m.payload) {
                        tracing::info!(run_id = %request.run_id, reason = %request.reason, "cancel requested");
                        running.cancel(&request.run_id);
                    }
                }
                Some(Err(e)) => tracing::warn!(error = %e, "cancel stream error"),
                None => break,
            }
        }
    }
}

/// Renews this runner's key in `SLUICE_RUNNERS` so dispatchers know the cluster is
/// served.
async fn heartbeat(js: jetstream::Context, config: RunnerConfig, shutdown: CancellationToken) {
    let Ok(kv) = streams::runners_bucket(&js, &config.streams).await else {
        tracing::warn!("cannot open the runners bucket; this runner is not advertised");
        return;
    };
    let key = format!("{}.{}", config.cluster, config.runner_id);
    let mut tick = tokio::time::interval(streams::RUNNER_TTL / 3);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let _ = kv.delete(&key).await;
                return;
            }
            _ = tick.tick() => {}
        }
        let beat = serde_json::json!({
            "cluster": config.cluster,
            "runner": config.runner_id,
            "max_running": config.max_running,
            "at": OffsetDateTime::now_utc().unix_timestamp(),
        });
        if let Err(e) = kv.put(&key, beat.to_string().into()).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}
