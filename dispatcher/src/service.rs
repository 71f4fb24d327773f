//! The consumer loops: events in, runs and decisions out; run states in, to free
//! concurrency slots and relay child results; and runners' child requests. Each is a
//! session that [`crate::consume::keep_consuming`] starts again whenever it ends.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::kv::Store;
use async_nats::jetstream::message::Message;
use async_nats::jetstream::AckKind;
use futures::StreamExt;
use sluice_core::pipeline::Pipeline;
use sluice_core::run::{
    ChildAction, ChildRequest, Decision, ParentRef, PlannedRun, RunRequest, RunState, StatusUpdate,
};
use sluice_core::{subjects, Event, Provider};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, ChildEnd};
use crate::consume::{self, keep_consuming, Consuming};
use crate::forge::ChangedFiles;
use crate::groups::{self, Admission};
use crate::matcher::{self, CelEvent};
use crate::metrics::{ClusterLabel, EventOutcome};
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
    /// Repositories' own pipelines; `None` unless `--repo-pipelines` names some.
    pub repo_pipelines: Option<Arc<crate::repo_pipelines::RepoPipelines>>,
    /// GitLab commenters' project membership, for comment commands; `None` without a
    /// GitLab token.
    pub members: Option<Arc<crate::members::Members>>,
    pub metrics: crate::metrics::Metrics,
    /// Tripped when the shutdown grace period ends: messages still in hand are handed
    /// back instead of finished.
    pub hand_back: CancellationToken,
}

/// Durable consumer names: every replica joins the same ones.
pub const EVENTS_CONSUMER: &str = subjects::DISPATCHER_CONSUMER;
pub const STATUS_CONSUMER: &str = subjects::DISPATCHER_STATUS_CONSUMER;
pub const CHILDREN_CONSUMER: &str = subjects::DISPATCHER_CHILDREN_CONSUMER;

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
        .map_err(|e| Error::nats(format!("stream {stream}"), e))?;
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
        .map_err(|e| Error::nats(format!("consumer {name}"), e))
}

/// Consumes `SLUICE_EVENTS` until `shutdown`, `concurrency` events at a time, starting
/// again whenever the pull ends. On shutdown it stops pulling and finishes the events
/// in hand.
pub async fn consume_events(
    ctx: Arc<Context>,
    concurrency: usize,
    consuming: Consuming,
    shutdown: CancellationToken,
) {
    keep_consuming(EVENTS_CONSUMER, &consuming, &shutdown, || {
        events_session(&ctx, concurrency, &consuming, &shutdown)
    })
    .await;
}

async fn events_session(
    ctx: &Arc<Context>,
    concurrency: usize,
    consuming: &Consuming,
    shutdown: &CancellationToken,
) -> Result<()> {
    let consumer = consumer(
        ctx,
        subjects::EVENTS_STREAM,
        EVENTS_CONSUMER,
        (concurrency * 4) as i64,
    )
    .await?;
    let messages = consume::open(&consumer, concurrency, EVENTS_CONSUMER).await?;
    consuming.start();
    consume::pulled(messages, EVENTS_CONSUMER, shutdown.clone())
        .for_each_concurrent(concurrency, |message| {
            let ctx = ctx.clone();
            async move { in_hand(&ctx, &message, handle_event(&ctx, &message)).await }
        })
        .await;
    Ok(())
}

/// Runs `handle` for `message` unless the shutdown grace period ends first: the message
/// is then handed back (a nak without delay) for another replica, or this one
/// restarted, to take at once. What the handler had already published is published
/// again then, and dropped as a duplicate by its message id.
async fn in_hand(ctx: &Context, message: &Message, handle: impl Future<Output = ()>) {
    tokio::select! {
        () = handle => {}
        () = ctx.hand_back.cancelled() => {
            tracing::info!(subject = %message.subject, "shutdown grace period over; handing the message back");
            ack(message, AckKind::Nak(None)).await;
        }
    }
}

async fn handle_event(ctx: &Context, message: &Message) {
    let (delivered, sequence, stored) = match message.info() {
        Ok(info) => (info.delivered, info.stream_sequence, Some(info.published)),
        Err(_) => (1, 0, None),
    };
    let subject = message.subject.to_string();
    // `sluice.events.<provider>.<kind>`: the label even when the body is unreadable.
    let provider = subject.split('.').nth(2).unwrap_or("");
    let result = match read_event(&subject, sequence, &message.payload) {
        Ok(event) => dispatch(ctx, &event).await.map(|d| (event.id, d)),
        Err(e) => Err(e),
    };
    match result {
        Ok((event_id, dispatched)) => {
            tracing::info!(event_id = %event_id, runs = dispatched.runs, "event dispatched");
            if let (Some(stored), Some(last)) = (stored, dispatched.last_stored) {
                let took = last - stored;
                ctx.metrics
                    .dispatch_seconds
                    .observe(took.as_seconds_f64().max(0.0));
            }
            if dispatched.planned > 0 {
                ctx.metrics.event(provider, EventOutcome::DISPATCHED);
            } else {
                ctx.metrics.event(provider, EventOutcome::NO_RUN);
            }
            ack(message, AckKind::Ack).await;
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
                Ok(()) => {
                    ctx.metrics.dead_letters.inc();
                    ctx.metrics.event(provider, EventOutcome::DEAD_LETTERED);
                    ack(message, AckKind::Term).await;
                }
                // Not acknowledged: it comes back and is dead-lettered then.
                Err(dl) => tracing::error!(error = %dl, "cannot dead-letter the event"),
            }
        }
        Err(e) => {
            let delay = Duration::from_secs(1 << delivered.clamp(0, 5));
            tracing::warn!(subject = %subject, sequence, attempt = delivered, error = %e, retry_in = ?delay, "event dispatch failed, will retry");
            ctx.metrics.event(provider, EventOutcome::RETRIED);
            ack(message, AckKind::Nak(Some(delay))).await;
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
    let mut event: Event = serde_json::from_slice(payload).map_err(Error::Malformed)?;
    let mut parts = subject.split('.').skip(2);
    let provider = parts.next().unwrap_or("manual");
    let kind = parts.next().unwrap_or("");
    if event.kind.is_empty() {
        event.kind = kind.to_owned();
    }
    if event.id.is_empty() {
        if event.provider != Provider::Manual || provider != "manual" {
            return Err(Error::MissingEventId);
        }
        event.id = format!("manual:seq-{sequence}");
    }
    Ok(event)
}

/// What [`dispatch`] did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatched {
    /// Runs its decision lists: stored, queued, or already stored before (a redelivery).
    pub runs: usize,
    /// Of those, the runs this delivery stored or queued.
    pub planned: usize,
    /// When the last run request this delivery stored was acknowledged; `None` when it
    /// stored none.
    pub last_stored: Option<OffsetDateTime>,
}

/// Matches, plans and publishes the runs of one event, then its decision.
pub async fn dispatch(ctx: &Context, event: &Event) -> Result<Dispatched> {
    let index = ctx.registry.current();
    // A GitLab comment command carries no association: the commenter's membership
    // gives it one, for `command_authors` and `/ok-to-test`.
    let mut with_association = None;
    let command_in_use = |word: &str| {
        word == sluice_core::repo_pipelines::OK_TO_TEST
            || index
                .candidates(&event.repo.as_deref().unwrap_or("").to_ascii_lowercase())
                .iter()
                .any(|p| {
                    p.triggers
                        .iter()
                        .any(|t| t.command.as_deref() == Some(word))
                })
    };
    if let (Some(members), Some((project, user_id))) =
        (&ctx.members, asks_membership(event, command_in_use))
    {
        if let Some(association) = members.association(project, user_id).await? {
            let mut e = event.clone();
            e.actor_association = Some(association.to_owned());
            with_association = Some(e);
        }
    }
    let event = with_association.as_ref().unwrap_or(event);
    let from_repo = match &ctx.repo_pipelines {
        Some(r) => r.load(event).await?,
        None => None,
    };
    // An approved `/ok-to-test` matches the proposed pipelines against the pull
    // request's head, not against the comment the applied pipelines see.
    let (repo_pipelines, approved) = match &from_repo {
        Some(l) => match &l.as_event {
            Some(head) => (&[][..], Some((head, &l.pipelines[..]))),
            None => (&l.pipelines[..], None),
        },
        None => (&[][..], None),
    };
    let mut files_note = None;
    let mut with_files = None;
    if needs_changed_files(&index, repo_pipelines, event) {
        match ctx.changed_files.pull_request(event).await {
            Ok(list) => {
                let mut e = event.clone();
                e.changed_files = Some(list.files);
                e.changed_files_complete = list.complete;
                with_files = Some(e);
            }
            Err(why) => {
                tracing::warn!(event_id = %event.id, reason = %why, "changed files unknown; path filters will fire");
                files_note = Some(why.to_string());
            }
        }
    }
    let event = with_files.as_ref().unwrap_or(event);
    // CEL evaluation is synchronous; finish it before the first await.
    let (evaluation, planned): (matcher::Evaluation, Vec<(Arc<Pipeline>, RunRequest)>) = {
        let cel = CelEvent::new(event);
        let mut evaluation =
            matcher::evaluate_with(&index, repo_pipelines, event, &cel, files_note.as_deref());
        let mut planned: Vec<(Arc<Pipeline>, RunRequest)> = evaluation
            .matched
            .iter()
            .map(|p| {
                let cluster =
                    plan::cluster(p, event, &ctx.default_cluster, |c| ctx.liveness.is_alive(c));
                (p.clone(), plan::plan(p, event, &cel, cluster))
            })
            .collect();
        if let Some((head, pipelines)) = approved {
            let cel = CelEvent::new(head);
            let approved = matcher::evaluate_with(
                &crate::registry::Index::default(),
                pipelines,
                head,
                &cel,
                None,
            );
            for p in &approved.matched {
                let cluster =
                    plan::cluster(p, head, &ctx.default_cluster, |c| ctx.liveness.is_alive(c));
                let mut req = plan::plan(p, head, &cel, cluster);
                // Run ids come from the head commit (one run per approved commit);
                // the runs belong to the comment's decision.
                req.event_id = event.id.clone();
                planned.push((p.clone(), req));
            }
            evaluation.decisions.extend(approved.decisions);
            evaluation.matched.extend(approved.matched);
        }
        (evaluation, planned)
    };
    let mut runs = Vec::with_capacity(planned.len());
    let (to_plan, mut planned, mut last_stored) = (planned, 0, None);
    for (pipeline, req) in to_plan {
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
                    ctx.metrics
                        .runs_planned
                        .get_or_create(&ClusterLabel {
                            cluster: req.cluster.clone(),
                        })
                        .inc();
                    planned += 1;
                    last_stored = Some(OffsetDateTime::now_utc());
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
                planned += 1;
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
    let count = Dispatched {
        runs: runs.len(),
        planned,
        last_stored,
    };
    let decision_runs: Vec<(String, String)> = runs
        .iter()
        .map(|r| (r.pipeline.clone(), r.run_id.clone()))
        .collect();
    ctx.bus
        .decision(&Decision {
            event_id: event.id.clone(),
            provider: event.provider.as_str().into(),
            kind: event.kind.clone(),
            action: event.action.clone(),
            repo: event.repo.clone(),
            git_ref: event.git_ref.clone(),
            sha: event.sha.clone(),
            clone_url: event.clone_url.clone(),
            pr: event.pr,
            decided_at: OffsetDateTime::now_utc(),
            pipelines: evaluation.decisions,
            not_considered: evaluation.not_considered,
            runs,
            repo_pipelines: from_repo.map(|l| l.record),
        })
        .await?;
    if let Some((parent, why)) = unstarted_child(event, &decision_runs) {
        ctx.bus
            .child_ended(
                &parent.cluster,
                &parent.run_id,
                &parent.step,
                ChildEnd::NotStarted(&why),
            )
            .await?;
    }
    Ok(count)
}

/// A child event that started no run of its pipeline: the parent is told at once, with
/// the decision's reason, instead of waiting for a result that never comes.
fn unstarted_child<'e>(
    event: &'e Event,
    runs: &[(String, String)],
) -> Option<(&'e ParentRef, String)> {
    let parent = event
        .parent
        .as_ref()
        .filter(|_| event.provider == Provider::Manual)?;
    let child = event.pipeline.as_deref()?;
    if runs.iter().any(|(pipeline, _)| pipeline == child) {
        return None;
    }
    let why = format!(
        "the dispatcher started no run of `{child}` (see `sluice events why {}`)",
        event.id
    );
    Some((parent, why))
}

/// The GitLab project and user whose membership `event` needs: a comment that carries
/// no association and starts with a command something acts on (`in_use`: a candidate
/// pipeline's `command`, or `/ok-to-test`) — not every quick action (`/assign`).
fn asks_membership(event: &Event, in_use: impl Fn(&str) -> bool) -> Option<(&str, u64)> {
    use sluice_core::envelope::kind;
    let command = event
        .comment
        .as_deref()
        .and_then(|c| c.split_whitespace().next())
        .is_some_and(|word| word.starts_with('/') && in_use(word));
    if event.provider != Provider::Gitlab
        || event.kind != kind::COMMENT
        || !command
        || event.actor_association.is_some()
    {
        return None;
    }
    Some((event.repo.as_deref()?, event.actor_id?))
}

/// A pull request event without changed files, and a candidate pipeline that filters
/// on paths: worth asking the forge.
fn needs_changed_files(
    index: &crate::registry::Index,
    repo_pipelines: &[Arc<Pipeline>],
    event: &Event,
) -> bool {
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
        .chain(repo_pipelines)
        .any(|p| p.triggers.iter().any(|t| !t.paths.is_empty()))
}

/// Consumes `SLUICE_STATUS` to free concurrency slots when runs finish (and relay
/// child runs' ends), starting again whenever the pull ends.
pub async fn consume_statuses(
    ctx: Arc<Context>,
    consuming: Consuming,
    shutdown: CancellationToken,
) {
    keep_consuming(STATUS_CONSUMER, &consuming, &shutdown, || {
        statuses_session(&ctx, &consuming, &shutdown)
    })
    .await;
}

async fn statuses_session(
    ctx: &Arc<Context>,
    consuming: &Consuming,
    shutdown: &CancellationToken,
) -> Result<()> {
    let consumer = consumer(ctx, subjects::STATUS_STREAM, STATUS_CONSUMER, 1024).await?;
    let messages = consume::open(&consumer, 200, STATUS_CONSUMER).await?;
    consuming.start();
    consume::pulled(messages, STATUS_CONSUMER, shutdown.clone())
        .for_each_concurrent(16, |message| {
            let ctx = ctx.clone();
            async move { in_hand(&ctx, &message, handle_status(&ctx, &message)).await }
        })
        .await;
    Ok(())
}

async fn handle_status(ctx: &Context, message: &Message) {
    match release_slot(ctx, &message.payload).await {
        Ok(()) => ack(message, AckKind::Ack).await,
        Err(e) => {
            tracing::warn!(error = %e, "freeing a concurrency slot failed, will retry");
            ack(message, AckKind::Nak(Some(Duration::from_secs(2)))).await;
        }
    }
}

async fn release_slot(ctx: &Context, payload: &[u8]) -> Result<()> {
    let Ok(update) = serde_json::from_slice::<StatusUpdate>(payload) else {
        return Ok(());
    };
    if !update.state.is_final() || update.step.is_some() {
        return Ok(());
    }
    if let Some(parent) = &update.parent {
        // The parent's runner cannot read the child's cluster: relay its end.
        ctx.bus
            .child_ended(
                &parent.cluster,
                &parent.run_id,
                &parent.step,
                ChildEnd::Finished(&update),
            )
            .await?;
    }
    let Some(group) = &update.concurrency_group else {
        return Ok(());
    };
    let max_running = ctx
        .registry
        .current()
        .get(&update.pipeline)
        .map(|p| p.concurrency.as_ref().and_then(|c| c.max_running));
    let started =
        groups::release(&ctx.bus, &ctx.groups, group, &update.run_id, max_running).await?;
    for cluster in started {
        ctx.metrics
            .runs_planned
            .get_or_create(&ClusterLabel { cluster })
            .inc();
    }
    Ok(())
}

// === Child pipelines ===

/// Consumes runners' child requests (`SLUICE_CHILDREN`): checks each against the
/// dispatcher's own records and starts or cancels the child run. Starts again whenever
/// the pull ends.
pub async fn consume_children(
    ctx: Arc<Context>,
    consuming: Consuming,
    shutdown: CancellationToken,
) {
    keep_consuming(CHILDREN_CONSUMER, &consuming, &shutdown, || {
        children_session(&ctx, &consuming, &shutdown)
    })
    .await;
}

async fn children_session(
    ctx: &Arc<Context>,
    consuming: &Consuming,
    shutdown: &CancellationToken,
) -> Result<()> {
    let consumer = consumer(ctx, subjects::CHILDREN_STREAM, CHILDREN_CONSUMER, 256).await?;
    let messages = consume::open(&consumer, 200, CHILDREN_CONSUMER).await?;
    consuming.start();
    consume::pulled(messages, CHILDREN_CONSUMER, shutdown.clone())
        .for_each_concurrent(16, |message| {
            let ctx = ctx.clone();
            async move { in_hand(&ctx, &message, handle_child(&ctx, &message)).await }
        })
        .await;
    Ok(())
}

async fn handle_child(ctx: &Context, message: &Message) {
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    match child_request(ctx, &message.subject, &message.payload).await {
        Ok(()) => ack(message, AckKind::Ack).await,
        Err(why) if why.is_retryable() && delivered < ctx.max_attempts => {
            tracing::info!(reason = %why, attempt = delivered, "child request not ready yet, will retry");
            ack(message, AckKind::Nak(Some(Duration::from_secs(1)))).await;
        }
        Err(why) => {
            tracing::warn!(subject = %message.subject, reason = %why, "child request refused");
            refuse(ctx, &message.subject, &message.payload, &why).await;
            ack(message, AckKind::Term).await;
        }
    }
}

/// Starts or cancels the child a runner asks for, after checking that the parent run
/// exists, runs on the cluster whose subject the request came on, and belongs to a
/// pipeline that declares that child step: a runner can reach only the children its
/// own runs declare, whatever it writes in the request. A retryable error means what
/// it needs is not stored yet; any other, that it claims what the records do not show.
async fn child_request(ctx: &Context, subject: &str, payload: &[u8]) -> Result<()> {
    let cluster =
        subjects::cluster_of(subject).ok_or_else(|| Error::ChildSubject(subject.to_owned()))?;
    let req: ChildRequest = serde_json::from_slice(payload).map_err(Error::ChildRequestFormat)?;
    if subjects::child_request(cluster, &req.parent_run) != subject {
        return Err(Error::ChildOtherSubject(req.parent_run));
    }
    let decision = crate::decisions::get(&ctx.bus.js, &req.parent_event)
        .await?
        .ok_or_else(|| Error::NoDecisionYet(req.parent_event.clone()))?;
    let parent = decision
        .runs
        .iter()
        .find(|r| r.run_id == req.parent_run)
        .ok_or_else(|| Error::NoSuchRun {
            event: req.parent_event.clone(),
            run: req.parent_run.clone(),
        })?;
    if parent.cluster != cluster {
        return Err(Error::OtherCluster {
            run: req.parent_run,
            cluster: parent.cluster.clone(),
            asked: cluster.to_owned(),
        });
    }
    let index = ctx.registry.current();
    let pipeline = index
        .get(&parent.pipeline)
        .ok_or_else(|| Error::PipelineGone(parent.pipeline.clone()))?;
    let step = pipeline
        .steps
        .iter()
        .find(|s| s.name.as_str() == req.step)
        .ok_or_else(|| Error::NoSuchStep {
            pipeline: parent.pipeline.clone(),
            step: req.step.clone(),
        })?;
    let child = step.pipeline.as_ref().ok_or_else(|| Error::NotAChildStep {
        pipeline: parent.pipeline.clone(),
        step: req.step.clone(),
    })?;
    let child_event = sluice_core::run::child_event_id(&req.parent_run, &req.step);
    match req.action {
        ChildAction::Start => {
            let mut event = Event::new(
                Provider::Manual,
                &subjects::child_delivery_id(&req.parent_run, &req.step),
                "pipeline",
            );
            debug_assert_eq!(event.id, child_event);
            event.pipeline = Some(child.to_string());
            event.parent = Some(ParentRef {
                run_id: req.parent_run.clone(),
                cluster: cluster.to_owned(),
                step: req.step.clone(),
            });
            event.repo = decision.repo.clone();
            event.clone_url = decision.clone_url.clone();
            event.git_ref = decision.git_ref.clone();
            event.sha = decision.sha.clone();
            event.pr = decision.pr;
            if let Some(runtime) = &step.runtime {
                event.clusters = runtime.cluster.0.iter().map(|c| c.to_string()).collect();
            }
            ctx.bus.event(&event).await?;
            tracing::info!(parent_run = %req.parent_run, step = %req.step, child = %child, "child run requested");
        }
        ChildAction::Cancel => {
            let child_run =
                sluice_core::run::child_run_id(&req.parent_run, &req.step, child.as_str());
            let planned = crate::decisions::get(&ctx.bus.js, &child_event)
                .await?
                .and_then(|d| d.runs.into_iter().find(|r| r.run_id == child_run));
            match planned {
                Some(run) => {
                    let reason = req.reason.unwrap_or_else(|| {
                        format!("its parent run {} was cancelled", req.parent_run)
                    });
                    ctx.bus.cancel(&run.cluster, &child_run, &reason).await?;
                }
                None => return Err(Error::ChildNotPlanned(child_run)),
            }
        }
    }
    Ok(())
}

/// Tells the parent's runner that its child request was refused, so its step ends with
/// the reason instead of waiting.
async fn refuse(ctx: &Context, subject: &str, payload: &[u8], why: &Error) {
    let (Some(cluster), Ok(req)) = (
        subjects::cluster_of(subject),
        serde_json::from_slice::<ChildRequest>(payload),
    ) else {
        return;
    };
    if req.action != ChildAction::Start
        || subjects::child_request(cluster, &req.parent_run) != subject
    {
        return;
    }
    let why = format!("child run refused: {why}");
    let end = ChildEnd::NotStarted(&why);
    if let Err(e) = ctx
        .bus
        .child_ended(cluster, &req.parent_run, &req.step, end)
        .await
    {
        tracing::warn!(error = %e, "cannot tell the parent its child request was refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_gitlab_comment_commands_without_an_association_ask_for_membership() {
        let mut e = Event::new(Provider::Gitlab, "n1", "comment");
        e.repo = Some("group/app".into());
        e.actor_id = Some(7);
        e.comment = Some("/retest please".into());
        let in_use = |word: &str| word == "/retest";
        assert_eq!(asks_membership(&e, in_use), Some(("group/app", 7)));
        let ask = |edit: &dyn Fn(&mut Event)| {
            let mut other = e.clone();
            edit(&mut other);
            asks_membership(&other, in_use).map(|(p, u)| (p.to_owned(), u))
        };
        // A quick action nothing acts on asks nothing.
        assert_eq!(ask(&|e| e.comment = Some("/assign @me".into())), None);
        assert_eq!(ask(&|e| e.comment = Some("looks good".into())), None);
        assert_eq!(ask(&|e| e.comment = None), None);
        assert_eq!(ask(&|e| e.actor_id = None), None);
        assert_eq!(ask(&|e| e.repo = None), None);
        assert_eq!(ask(&|e| e.actor_association = Some("OWNER".into())), None);
        assert_eq!(ask(&|e| e.kind = "pull_request".into()), None);
        assert_eq!(ask(&|e| e.provider = Provider::Github), None);
    }

    #[test]
    fn unreadable_events_are_permanent_errors_with_their_cause() {
        let e = read_event("sluice.events.github.push", 7, b"{not json").expect_err("refused");
        assert!(matches!(e, Error::Malformed(_)));
        assert!(!e.is_retryable());
        assert_eq!(e.metric_label(), "malformed");
        assert!(
            std::error::Error::source(&e).is_some(),
            "the JSON error is kept"
        );

        let e = read_event("sluice.events.github.push", 7, br#"{"provider": "github"}"#)
            .expect_err("a forge event needs its id");
        assert!(matches!(e, Error::MissingEventId));
        assert!(!e.is_retryable());

        let manual = read_event("sluice.events.manual.push", 7, br#"{"provider": "manual"}"#)
            .expect("a manual event may leave its id out");
        assert_eq!(manual.id, "manual:seq-7");
        assert_eq!(manual.kind, "push");
    }
}
