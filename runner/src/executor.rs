//! What both executors share: how a run ended, the split of a run at its
//! child-pipeline steps, and running such a step.

use std::time::Duration;

use async_nats::jetstream;
use sluice_core::run::{ChildAction, ChildRequest, ChildResult, RunRequest, RunState, RunStep};
use sluice_core::{bus, subjects};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::report::Reporter;
use crate::resume::Follow;
use crate::wait::sleep_until;
use crate::Error;

/// How a run ended, with a message for its final status.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// How a child step ended, short of its result.
#[derive(Debug)]
enum ChildEnd {
    Finished(ChildResult),
    Cancelled,
    TimedOut,
    Failed(Error),
}

/// Asks the dispatcher to start the child pipeline of `step` and waits for the final
/// state it relays back; `None` when the child succeeded.
///
/// A runner can reach only its own cluster's subjects, so it never starts or follows
/// the child itself: it publishes a [`ChildRequest`] on its cluster's children
/// subject, the dispatcher checks it against the parent's decision and pipeline, plans
/// the child wherever its `runtime` says, and relays the child's final state on this
/// cluster's control subject. The child's ids derive from this run and step, so a
/// redelivered parent converges on the same child run instead of starting another.
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
    let child_run = sluice_core::run::child_run_id(&req.run_id, &step.name, child);

    let end = async {
        // Read from the start of the control stream, so a result relayed before the
        // follow began is not missed; a follow that fails is resumed, so the step
        // waits through a NATS outage instead of failing.
        let mut results = Follow::new(
            js,
            subjects::CONTROL_STREAM,
            subjects::child_result(&req.cluster, &req.run_id),
        );
        if let Err(source) = ask(js, req, &step.name, ChildAction::Start, None).await {
            return ChildEnd::Failed(Error::Bus {
                doing: "ask for the child run",
                source,
            });
        }
        log.line(
            "sluice",
            format!("asked for pipeline {child} as run {child_run}"),
        )
        .await;
        let deadline = step
            .timeout_secs
            .map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
        let waited = async {
            loop {
                let message = results.next().await;
                match serde_json::from_slice::<ChildResult>(&message.payload) {
                    Ok(result) if result.step == step.name => return ChildEnd::Finished(result),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "unreadable child result"),
                }
            }
        };
        let why = tokio::select! {
            end = waited => return end,
            () = cancel.cancelled() => ChildEnd::Cancelled,
            () = sleep_until(deadline) => ChildEnd::TimedOut,
        };
        let reason = match &why {
            ChildEnd::Cancelled => "cancelled",
            _ => "timed out",
        };
        let reason = format!("its parent run {} was {reason}", req.run_id);
        if let Err(e) = ask(js, req, &step.name, ChildAction::Cancel, Some(reason)).await {
            tracing::warn!(run_id = %req.run_id, error = %e, "cannot ask for the child's cancel");
        }
        why
    }
    .await;
    let (state, message) = match end {
        ChildEnd::Finished(r) if r.state == RunState::Succeeded => {
            let on = r.cluster.as_deref().unwrap_or("?");
            log.line(
                "sluice",
                format!("run {child_run} succeeded on cluster {on}"),
            )
            .await;
            (RunState::Succeeded, None)
        }
        ChildEnd::Finished(r) => (
            RunState::Failed,
            Some(match (&r.child_run, r.message) {
                (Some(run), Some(m)) => {
                    format!("child run {run} of {child} ended {}: {m}", r.state.as_str())
                }
                (Some(run), None) => {
                    format!("child run {run} of {child} ended {}", r.state.as_str())
                }
                (None, m) => m.unwrap_or_else(|| format!("no run of {child} was started")),
            }),
        ),
        ChildEnd::Cancelled => (RunState::Cancelled, Some("cancelled".to_owned())),
        ChildEnd::TimedOut => (RunState::Failed, Some("timed out".to_owned())),
        ChildEnd::Failed(why) => (RunState::Failed, Some(why.to_string())),
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

/// Publishes a child request on this cluster's children subject.
async fn ask(
    js: &jetstream::Context,
    req: &RunRequest,
    step: &str,
    action: ChildAction,
    reason: Option<String>,
) -> sluice_core::Result<()> {
    let request = ChildRequest {
        parent_run: req.run_id.clone(),
        parent_event: req.event_id.clone(),
        step: step.to_owned(),
        action,
        reason,
        at: OffsetDateTime::now_utc(),
    };
    bus::publish_json(
        js,
        subjects::child_request(&req.cluster, &req.run_id),
        &subjects::child_request_id(&req.run_id, step, action.as_str()),
        &request,
    )
    .await?;
    Ok(())
}
