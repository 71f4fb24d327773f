//! Everything the dispatcher publishes, with message ids that make retries harmless.

use std::time::Duration;

use async_nats::jetstream;
use serde::Serialize;
use sluice_core::run::{ChildResult, DeadLetter, Decision, RunRequest, RunState, StatusUpdate};
use sluice_core::{subjects, Event};
use time::OffsetDateTime;

use crate::Result;

/// How a parent's `pipeline:` step ended, as its runner is told.
#[derive(Debug, Clone, Copy)]
pub enum ChildEnd<'a> {
    /// The child run stored this final state.
    Finished(&'a StatusUpdate),
    /// No child run was started, for this reason.
    NotStarted(&'a str),
}

/// The one place a [`ChildResult`] is written: a finished child's run, cluster, state
/// and message, or a failure saying why no child started.
pub(crate) fn child_result(parent_run: &str, step: &str, end: ChildEnd<'_>) -> ChildResult {
    let (child_run, cluster, state, message) = match end {
        ChildEnd::Finished(u) => (
            Some(u.run_id.clone()),
            u.cluster.clone(),
            u.state,
            u.message.clone(),
        ),
        ChildEnd::NotStarted(why) => (None, None, RunState::Failed, Some(why.to_owned())),
    };
    ChildResult {
        parent_run: parent_run.to_owned(),
        step: step.to_owned(),
        child_run,
        cluster,
        state,
        message,
        at: OffsetDateTime::now_utc(),
    }
}

/// A JetStream context with the dispatcher's publish helpers.
#[derive(Debug, Clone)]
pub struct Bus {
    pub js: jetstream::Context,
}

impl Bus {
    pub fn new(client: async_nats::Client, timeout: Duration) -> Self {
        Bus {
            js: jetstream::ContextBuilder::new()
                .timeout(timeout)
                .backpressure_on_inflight(true)
                .build(client),
        }
    }

    /// Publishes and waits for the ack; true when JetStream already had the message id.
    async fn publish(&self, subject: String, msg_id: &str, body: &impl Serialize) -> Result<bool> {
        let ack = sluice_core::bus::publish_json(&self.js, subject, msg_id, body).await?;
        Ok(ack.duplicate)
    }

    /// The run request on `sluice.runs.<cluster>`.
    pub async fn publish_run(&self, req: &RunRequest) -> Result<bool> {
        self.publish(
            subjects::runs(&req.cluster),
            &subjects::run_request_id(&req.run_id),
            req,
        )
        .await
    }

    /// A run-level state change on `sluice.status.<cluster>.<run_id>`.
    pub async fn status(
        &self,
        req: &RunRequest,
        state: RunState,
        message: Option<String>,
    ) -> Result<()> {
        let update = StatusUpdate::for_run(req, state, message);
        self.publish(update.subject(), &update.message_id(), &update)
            .await?;
        Ok(())
    }

    /// Asks `cluster`'s runners to cancel `run_id`.
    pub async fn cancel(&self, cluster: &str, run_id: &str, reason: &str) -> Result<()> {
        sluice_core::bus::cancel(&self.js, cluster, run_id, reason).await?;
        tracing::info!(run_id, cluster, reason, "cancel requested");
        Ok(())
    }

    /// Tells the parent run's cluster how its `pipeline:` step's child ended.
    pub async fn child_ended(
        &self,
        parent_cluster: &str,
        parent_run: &str,
        step: &str,
        end: ChildEnd<'_>,
    ) -> Result<()> {
        let result = child_result(parent_run, step, end);
        let id = match &result.child_run {
            Some(run) => subjects::child_result_id(run),
            None => subjects::child_result_id(&subjects::child_delivery_id(parent_run, step)),
        };
        self.publish(
            subjects::child_result(parent_cluster, parent_run),
            &id,
            &result,
        )
        .await?;
        Ok(())
    }

    /// Publishes an event the dispatcher itself starts (a child run's).
    pub async fn event(&self, event: &Event) -> Result<bool> {
        self.publish(event.subject(), &event.id, event).await
    }

    /// A queued run that never started is cancelled by the dispatcher itself.
    pub async fn cancelled_while_queued(&self, req: &RunRequest, reason: &str) -> Result<()> {
        self.status(req, RunState::Cancelled, Some(reason.to_owned()))
            .await
    }

    /// The decision for an event; only the latest per event is kept, so a redelivered
    /// event's new decision replaces the old one (no message id).
    pub async fn decision(&self, decision: &Decision) -> Result<()> {
        sluice_core::bus::publish_json_replacing(
            &self.js,
            subjects::decision(&decision.event_id),
            decision,
        )
        .await?;
        Ok(())
    }

    /// Moves an event to the dead-letter subject with the reason.
    pub async fn dead_letter(
        &self,
        event_subject: &str,
        sequence: u64,
        payload: &[u8],
        reason: &str,
        attempts: i64,
    ) -> Result<()> {
        let letter = DeadLetter {
            subject: event_subject.to_owned(),
            stream_sequence: sequence,
            reason: reason.to_owned(),
            attempts,
            at: OffsetDateTime::now_utc(),
            message: String::from_utf8_lossy(payload).into_owned(),
        };
        self.publish(
            subjects::DEADLETTER_EVENTS.to_owned(),
            &subjects::dead_letter_id(sequence),
            &letter,
        )
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use sluice_core::run::RunRequest;

    use super::*;

    #[test]
    fn a_child_result_carries_the_childs_end_or_why_none_started() {
        let req: RunRequest = serde_json::from_value(serde_json::json!({
            "run_id": "child-1",
            "pipeline": "deploy",
            "cluster": "eu-1",
            "event_id": "manual:parent-1-deploy",
            "steps": [],
            "created_at": "2026-12-01T00:00:00Z",
        }))
        .expect("a run request");
        let update = StatusUpdate::for_run(&req, RunState::Succeeded, Some("done".into()));
        let finished = child_result("parent-1", "deploy", ChildEnd::Finished(&update));
        assert_eq!(finished.parent_run, "parent-1");
        assert_eq!(finished.step, "deploy");
        assert_eq!(finished.child_run.as_deref(), Some("child-1"));
        assert_eq!(finished.cluster.as_deref(), Some("eu-1"));
        assert_eq!(finished.state, RunState::Succeeded);
        assert_eq!(finished.message.as_deref(), Some("done"));

        let refused = child_result("parent-1", "deploy", ChildEnd::NotStarted("refused"));
        assert_eq!(refused.child_run, None);
        assert_eq!(refused.cluster, None);
        assert_eq!(refused.state, RunState::Failed);
        assert_eq!(refused.message.as_deref(), Some("refused"));
    }
}
