//! Everything the dispatcher publishes, with message ids that make retries harmless.

use std::time::Duration;

use async_nats::jetstream;
use serde::Serialize;
use sluice_core::run::{
    CancelRequest, ChildResult, DeadLetter, Decision, RunRequest, RunState, StatusUpdate,
};
use sluice_core::{subjects, Event};
use time::OffsetDateTime;

use crate::{Error, Result};

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
        let request = CancelRequest {
            run_id: run_id.to_owned(),
            reason: reason.to_owned(),
            at: OffsetDateTime::now_utc(),
        };
        self.publish(
            subjects::cancel(cluster),
            &subjects::cancel_id(run_id),
            &request,
        )
        .await?;
        tracing::info!(run_id, cluster, reason, "cancel requested");
        Ok(())
    }

    /// Relays a child run's end to its parent's cluster.
    pub async fn child_result(&self, parent_cluster: &str, result: &ChildResult) -> Result<()> {
        let id = match &result.child_run {
            Some(run) => subjects::child_result_id(run),
            None => subjects::child_result_id(&format!("{}-{}", result.parent_run, result.step)),
        };
        self.publish(
            subjects::child_result(parent_cluster, &result.parent_run),
            &id,
            result,
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
        let payload = serde_json::to_vec(decision).map_err(|source| Error::Encode {
            what: "a decision",
            source,
        })?;
        let ack = self
            .js
            .publish(subjects::decision(&decision.event_id), payload.into())
            .await
            .map_err(|e| Error::nats("publish a decision", e))?;
        ack.await.map_err(|e| Error::nats("ack of a decision", e))?;
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
