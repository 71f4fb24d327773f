//! What both executors share: how a run ended, the split of a run at its
//! child-pipeline steps, and running such a step.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy, message::PublishMessage};
use futures::StreamExt;
use sluice_core::envelope::{Event, Provider};
use sluice_core::run::{CancelRequest, Decision, RunState, RunStep, StatusUpdate};
use sluice_core::subjects;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::report::Reporter;

/// How a run ended, with a message for its final status.
#[derive(Debug)]
pub struct Outcome {
    pub state: RunState,
    pub message: Option<String>,
}

/// Consecutive container steps, or one step that starts a child pipeline.
#[derive(Debug)]
pub enum Segment<'a> {
    Pods(&'a [RunStep]),
    Child(&'a RunStep),
}

/// Splits `steps` at child-pipeline steps, keeping their order.
pub fn segments(steps: &[RunStep]) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, step) in steps.iter().enumerate() {
        if step.pipeline.is_some() {
            if start < i {
                out.push(Segment::Pods(&steps[start..i]));
            }
            out.push(Segment::Child(step));
            start = i + 1;
        }
    }
    if start < steps.len() {
        out.push(Segment::Pods(&steps[start..]));
    }
    out
}

/// Starts the child pipeline of `step` through the dispatcher (as a manual event that
/// names it, so it runs on whatever cluster its own `runtime` says) and waits for its
/// final state. `None` when the child succeeded.
///
/// The child's event id derives from this run and step, so a redelivered parent
/// converges on the same child run instead of starting another.
pub async fn child_step(
    reporter: &Reporter,
    step: &RunStep,
    cancel: &CancellationToken,
) -> Option<Outcome> {
    let child = step.pipeline.as_deref().unwrap_or_default();
    let req = reporter.request();
    let js = reporter.jetstream();
    reporter
        .status(Some(&step.name), RunState::Running, None, None)
        .await;
    let log = reporter.step_log(&step.name);
    let mut event = Event::new(
        Provider::Manual,
        &format!("{}-{}", req.run_id, step.name),
        "pipeline",
    );
    event.pipeline = Some(child.to_owned());
    event.parent_run = Some(req.run_id.clone());
    event.repo = req.repo.clone();
    event.clone_url = req.clone_url.clone();
    event.git_ref = req.git_ref.clone();
    event.sha = req.sha.clone();
    event.pr = req.pr;
    if let Some(runtime) = &step.runtime {
        event.clusters = runtime.cluster.0.iter().map(|c| c.to_string()).collect();
    }
    let child_run = sluice_core::run::run_id(&event.id, child, 0);

    let end = async {
        let body = serde_json::to_vec(&event).map_err(|e| e.to_string())?;
        let stored = async {
            js.send_publish(
                event.subject(),
                PublishMessage::build()
                    .payload(body.into())
                    .message_id(&event.id),
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
        };
        stored
            .await
            .map_err(|e| format!("cannot publish the child's event: {e}"))?;
        log.line(
            "sluice",
            format!("started pipeline {child} as run {child_run}"),
        )
        .await;
        let deadline = step
            .timeout_secs
            .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
        // A cancel or timeout before the dispatcher has decided leaves the child's
        // cluster unknown, so it cannot be cancelled; it is after that.
        let decision = tokio::select! {
            decision = wait_decision(js, &event.id) => decision?,
            () = cancel.cancelled() => return Err("cancelled".to_owned()),
            () = sleep_until(deadline) => return Err("timed out".to_owned()),
        };
        let Some(planned) = decision.runs.iter().find(|r| r.pipeline == child) else {
            let why = decision
                .pipelines
                .iter()
                .find(|p| p.pipeline == child)
                .and_then(|p| p.note.clone())
                .unwrap_or_else(|| format!("the dispatcher started no run of `{child}`"));
            return Err(why);
        };
        let cluster = planned.cluster.clone();
        log.line("sluice", format!("run {child_run} is on cluster {cluster}"))
            .await;
        let waited = tokio::select! {
            state = wait_final(js, &child_run) => state,
            () = cancel.cancelled() => Err("cancelled"),
            () = sleep_until(deadline) => Err("timed out"),
        };
        match waited {
            Ok(state) => Ok(state),
            Err(why) => {
                let request = CancelRequest {
                    run_id: child_run.clone(),
                    reason: format!("its parent run {} was {why}", req.run_id),
                    at: OffsetDateTime::now_utc(),
                };
                if let Ok(body) = serde_json::to_vec(&request) {
                    let _ = js.publish(subjects::cancel(&cluster), body.into()).await;
                }
                Err(why.to_owned())
            }
        }
    }
    .await;
    let (state, message) = match end {
        Ok(RunState::Succeeded) => (RunState::Succeeded, None),
        Ok(other) => (
            RunState::Failed,
            Some(format!(
                "child run {child_run} of {child} ended {}",
                other.as_str()
            )),
        ),
        Err(why) if why == "cancelled" => (RunState::Cancelled, Some("cancelled".to_owned())),
        Err(why) => (RunState::Failed, Some(why)),
    };
    if let Some(m) = &message {
        log.line("sluice", m.clone()).await;
    }
    log.finish().await;
    reporter
        .status(Some(&step.name), state, None, message.clone())
        .await;
    (state != RunState::Succeeded).then(|| Outcome {
        state,
        message: message.map(|m| format!("step {}: {m}", step.name)),
    })
}

/// Sleeps until `deadline`; forever without one.
pub(crate) async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The first message on `subject` (from the start of `stream`), however late it comes.
async fn first_on(
    js: &jetstream::Context,
    stream: &str,
    subject: String,
) -> Result<jetstream::Message, String> {
    let stream = js
        .get_stream(stream)
        .await
        .map_err(|e| format!("stream {stream}: {e}"))?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    match messages.next().await {
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("the stream ended".into()),
    }
}

async fn wait_decision(js: &jetstream::Context, event_id: &str) -> Result<Decision, String> {
    let message = first_on(js, subjects::DECISIONS_STREAM, subjects::decision(event_id)).await?;
    serde_json::from_slice(&message.payload).map_err(|e| format!("unreadable decision: {e}"))
}

/// Waits for the run's final state on `SLUICE_STATUS`.
async fn wait_final(js: &jetstream::Context, run_id: &str) -> Result<RunState, &'static str> {
    let stream = js
        .get_stream(subjects::STATUS_STREAM)
        .await
        .map_err(|_| "the status stream is unavailable")?;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subjects::status(run_id),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|_| "cannot follow the child's states")?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|_| "cannot follow the child's states")?;
    while let Some(message) = messages.next().await {
        let Ok(message) = message else { continue };
        if let Ok(update) = serde_json::from_slice::<StatusUpdate>(&message.payload) {
            if update.step.is_none() && update.state.is_final() {
                return Ok(update.state);
            }
        }
    }
    Err("the status stream ended")
}
