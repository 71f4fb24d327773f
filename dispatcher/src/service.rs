//! The two consumer loops: events in, runs and decisions out; and run states in, to
//! free concurrency slots.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::kv::Store;
use async_nats::jetstream::message::Message;
use async_nats::jetstream::AckKind;
use futures::StreamExt;
use sluice_core::pipeline::Pipeline;
use sluice_core::run::{Decision, PlannedRun, RunRequest, RunState, StatusUpdate};
use sluice_core::{subjects, Event, Provider};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::forge::ChangedFiles;
use crate::groups::{self, Admission};
use crate::matcher::{self, CelEvent};
use crate::plan;
use crate::registry::Registry;
use crate::{Error, Result};

/// What the event loop needs.
#[derive(Debug)]
pub struct Context {
    pub bus: Bus,
    pub registry: Arc<Registry>,
    pub groups: Store,
    pub default_cluster: String,
    pub max_attempts: i64,
    pub ack_wait: Duration,
    pub changed_files: ChangedFiles,
    pub liveness: Arc<crate::liveness::Liveness>,
}

/// Durable consumer names: every replica joins the same ones.
pub const EVENTS_CONSUMER: &str = "sluice-dispatcher";
pub const STATUS_CONSUMER: &str = "sluice-dispatcher-groups";

async fn consumer(
    ctx: &Context,
    stream: &str,
    name: &str,
    max_ack_pending: i64,
) -> Result<PullConsumer> {
    let stream = ctx
        .bus
        .js
        .get_stream(stream)
        .await
        .map_err(|e| Error::Nats(format!("stream {stream}: {e}")))?;
    stream
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.to_owned()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: ctx.ack_wait,
                max_ack_pending,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::Nats(format!("consumer {name}: {e}")))
}

/// Consumes `SLUICE_EVENTS` until `shutdown`, `concurrency` events at a time. On
/// shutdown it stops pulling and finishes the events in hand.
pub async fn consume_events(
    ctx: Arc<Context>,
    concurrency: usize,
    shutdown: CancellationToken,
) -> Result<()> {
    let consumer = consumer(
        &ctx,
        subjects::EVENTS_STREAM,
        EVENTS_CONSUMER,
        (concurrency * 4) as i64,
    )
    .await?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(concurrency)
        .messages()
        .await
        .map_err(|e| Error::Nats(format!("pull events: {e}")))?;
    messages
        .take_until(shutdown.cancelled_owned())
        .for_each_concurrent(concurrency, |message| {
            let ctx = ctx.clone();
            async move {
                match message {
                    Ok(message) => handle_event(&ctx, message).await,
                    Err(e) => tracing::warn!(error = %e, "pulling events failed; retrying"),
                }
            }
        })
        .await;
    Ok(())
}

async fn handle_event(ctx: &Context, message: Message) {
    let (delivered, sequence) = match message.info() {
        Ok(info) => (info.delivered, info.stream_sequence),
        Err(_) => (1, 0),
    };
    let subject = message.subject.to_string();
    let result = match read_event(&subject, sequence, &message.payload) {
        Ok(event) => dispatch(ctx, &event).await.map(|d| (event.id, d)),
        Err(e) => Err(e),
    };
    match result {
        Ok((event_id, runs)) => {
            tracing::info!(event_id = %event_id, runs, "event dispatched");
            ack(&message, AckKind::Ack).await;
        }
        Err(e) if !e.is_retryable() || delivered >= ctx.max_attempts => {
            tracing::error!(subject = %subject, sequence, attempts = delivered, error = %e, "event moved to the dead-letter subject");
            match ctx
                .bus
                .dead_letter(
                    &subject,
                    sequence,
                    &message.payload,
                    &e.to_string(),
                    delivered,
                )
                .await
            {
                Ok(()) => ack(&message, AckKind::Term).await,
                // Not acknowledged: it comes back and is dead-lettered then.
                Err(dl) => tracing::error!(error = %dl, "cannot dead-letter the event"),
            }
        }
        Err(e) => {
            let delay = Duration::from_secs(1 << delivered.clamp(0, 5));
            tracing::warn!(subject = %subject, sequence, attempt = delivered, error = %e, retry_in = ?delay, "event dispatch failed, will retry");
            ack(&message, AckKind::Nak(Some(delay))).await;
        }
    }
}

async fn ack(message: &Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::warn!(error = %e, "acknowledgement failed; the event will be redelivered");
    }
}

/// Reads an envelope, taking what a hand-written event leaves out from its subject
/// (`sluice.events.<provider>.<kind>`) and stream sequence.
pub fn read_event(subject: &str, sequence: u64, payload: &[u8]) -> Result<Event> {
    let mut event: Event =
        serde_json::from_slice(payload).map_err(|e| Error::Malformed(e.to_string()))?;
    let mut parts = subject.split('.').skip(2);
    let provider = parts.next().unwrap_or("manual");
    let kind = parts.next().unwrap_or("");
    if event.kind.is_empty() {
        event.kind = kind.to_owned();
    }
    if event.id.is_empty() {
        if event.provider != Provider::Manual || provider != "manual" {
            return Err(Error::Malformed("a forge event without an `id`".into()));
        }
        event.id = format!("manual:seq-{sequence}");
    }
    Ok(event)
}

/// Matches, plans and publishes the runs of one event, then its decision. Returns how
/// many runs it started or queued.
pub async fn dispatch(ctx: &Context, event: &Event) -> Result<usize> {
    let index = ctx.registry.current();
    let mut files_note = None;
    let mut with_files = None;
    if needs_changed_files(&index, event) {
        match ctx.changed_files.pull_request(event).await {
            Ok(list) => {
                let mut e = event.clone();
                e.changed_files = Some(list.files);
                e.changed_files_complete = list.complete;
                with_files = Some(e);
            }
            Err(why) => {
                tracing::warn!(event_id = %event.id, reason = %why, "changed files unknown; path filters will fire");
                files_note = Some(why);
            }
        }
    }
    let event = with_files.as_ref().unwrap_or(event);
    // CEL evaluation is synchronous; finish it before the first await.
    let (evaluation, planned): (matcher::Evaluation, Vec<(Arc<Pipeline>, RunRequest)>) = {
        let cel = CelEvent::new(event);
        let evaluation = matcher::evaluate(&index, event, &cel, files_note.as_deref());
        let planned = evaluation
            .matched
            .iter()
            .map(|p| {
                let cluster =
                    plan::cluster(p, event, &ctx.default_cluster, |c| ctx.liveness.is_alive(c));
                (p.clone(), plan::plan(p, event, &cel, cluster))
            })
            .collect();
        (evaluation, planned)
    };
    let mut runs = Vec::with_capacity(planned.len());
    for (pipeline, req) in planned {
        let admission = match (&pipeline.concurrency, &req.concurrency_group) {
            (Some(c), Some(group)) if c.cancel_in_progress || c.max_running.is_some() => {
                groups::admit(&ctx.bus, &ctx.groups, &req, c, group).await?
            }
            _ => Admission::Run,
        };
        let outcome = match admission {
            Admission::Run => {
                if ctx.bus.publish_run(&req).await? {
                    "duplicate"
                } else {
                    "published"
                }
            }
            Admission::Queued => {
                let group = req.concurrency_group.as_deref().unwrap_or_default();
                ctx.bus
                    .status(
                        &req,
                        RunState::Queued,
                        Some(format!("waiting for a slot in concurrency group {group}")),
                    )
                    .await?;
                "queued"
            }
        };
        runs.push(PlannedRun {
            run_id: req.run_id,
            pipeline: req.pipeline,
            cluster: req.cluster,
            outcome: outcome.into(),
        });
    }
    let count = runs.len();
    ctx.bus
        .decision(&Decision {
            event_id: event.id.clone(),
            provider: event.provider.as_str().into(),
            kind: event.kind.clone(),
            action: event.action.clone(),
            repo: event.repo.clone(),
            git_ref: event.git_ref.clone(),
            decided_at: OffsetDateTime::now_utc(),
            pipelines: evaluation.decisions,
            not_considered: evaluation.not_considered,
            runs,
        })
        .await?;
    Ok(count)
}

/// A pull request event without changed files, and a candidate pipeline that filters
/// on paths: worth asking the forge.
fn needs_changed_files(index: &crate::registry::Index, event: &Event) -> bool {
    use sluice_core::envelope::kind;
    if event.changed_files.is_some()
        || event.pr.is_none()
        || !matches!(event.kind.as_str(), kind::PULL_REQUEST | kind::COMMENT)
        || !matches!(event.provider, Provider::Github | Provider::Gitlab)
    {
        return false;
    }
    let repo = event.repo.as_deref().unwrap_or("").to_ascii_lowercase();
    index
        .candidates(&repo)
        .iter()
        .any(|p| p.triggers.iter().any(|t| !t.paths.is_empty()))
}

/// Consumes `SLUICE_STATUS` to free concurrency slots when runs finish.
pub async fn consume_statuses(ctx: Arc<Context>, shutdown: CancellationToken) -> Result<()> {
    let consumer = consumer(&ctx, subjects::STATUS_STREAM, STATUS_CONSUMER, 1024).await?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| Error::Nats(format!("pull statuses: {e}")))?;
    messages
        .take_until(shutdown.cancelled_owned())
        .for_each_concurrent(16, |message| {
            let ctx = ctx.clone();
            async move {
                let Ok(message) = message else { return };
                match release_slot(&ctx, &message.payload).await {
                    Ok(()) => ack(&message, AckKind::Ack).await,
                    Err(e) => {
                        tracing::warn!(error = %e, "freeing a concurrency slot failed, will retry");
                        ack(&message, AckKind::Nak(Some(Duration::from_secs(2)))).await;
                    }
                }
            }
        })
        .await;
    Ok(())
}

async fn release_slot(ctx: &Context, payload: &[u8]) -> Result<()> {
    let Ok(update) = serde_json::from_slice::<StatusUpdate>(payload) else {
        return Ok(());
    };
    if !update.state.is_final() || update.step.is_some() {
        return Ok(());
    }
    let Some(group) = &update.concurrency_group else {
        return Ok(());
    };
    let max_running = ctx
        .registry
        .current()
        .get(&update.pipeline)
        .and_then(|p| p.concurrency.as_ref())
        .and_then(|c| c.max_running);
    groups::release(&ctx.bus, &ctx.groups, group, &update.run_id, max_running).await
}
