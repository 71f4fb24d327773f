//! Everything the dispatcher publishes, with message ids that make retries harmless.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use serde::Serialize;
use sluice_core::run::{CancelRequest, Decision, RunRequest, RunState, StatusUpdate};
use sluice_core::subjects;
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
    async fn publish(
        &self,
        subject: String,
        msg_id: Option<&str>,
        body: &impl Serialize,
    ) -> Result<bool> {
        let payload = serde_json::to_vec(body).map_err(|e| Error::Nats(format!("encode: {e}")))?;
        let mut message = PublishMessage::build().payload(payload.into());
        if let Some(id) = msg_id {
            message = message.message_id(id);
        }
        let ack = self
            .js
            .send_publish(subject, message)
            .await
            .map_err(|e| Error::Nats(format!("publish: {e}")))?
            .await
            .map_err(|e| Error::Nats(format!("publish ack: {e}")))?;
        Ok(ack.duplicate)
    }

    /// The run request on `sluice.runs.<cluster>`, `Nats-Msg-Id` = run id.
    pub async fn publish_run(&self, req: &RunRequest) -> Result<bool> {
        self.publish(subjects::runs(&req.cluster), Some(&req.run_id), req)
            .await
    }

    /// A state change on `sluice.status.<run_id>`.
    pub async fn status(
        &self,
        req: &RunRequest,
        state: RunState,
        message: Option<String>,
    ) -> Result<()> {
        let update = StatusUpdate {
            run_id: req.run_id.clone(),
            pipeline: req.pipeline.clone(),
            state,
            step: None,
            at: OffsetDateTime::now_utc(),
            cluster: Some(req.cluster.clone()),
            event_id: Some(req.event_id.clone()),
            concurrency_group: req.concurrency_group.clone(),
            exit_code: None,
            message,
            runner: None,
            repo: req.repo.clone(),
            sha: req.sha.clone(),
        };
        let id = format!("{}:{}", req.run_id, state.as_str());
        self.publish(subjects::status(&req.run_id), Some(&id), &update)
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
            Some(&format!("cancel:{run_id}")),
            &request,
        )
        .await?;
        tracing::info!(run_id, cluster, reason, "cancel requested");
        Ok(())
    }

    /// A queued run that never started is cancelled by the dispatcher itself.
    pub async fn cancelled_while_queued(&self, req: &RunRequest, reason: &str) -> Result<()> {
        self.status(req, RunState::Cancelled, Some(reason.to_owned()))
            .await
    }

    /// The decision for an event; only the latest per event is kept.
    pub async fn decision(&self, decision: &Decision) -> Result<()> {
        self.publish(subjects::decision(&decision.event_id), None, decision)
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
        #[derive(Serialize)]
        struct DeadLetter<'a> {
            subject: &'a str,
            stream_sequence: u64,
            reason: &'a str,
            attempts: i64,
            #[serde(with = "time::serde::rfc3339")]
            at: OffsetDateTime,
            /// The original message, as text when it is UTF-8.
            message: String,
        }
        let letter = DeadLetter {
            subject: event_subject,
            stream_sequence: sequence,
            reason,
            attempts,
            at: OffsetDateTime::now_utc(),
            message: String::from_utf8_lossy(payload).into_owned(),
        };
        let id = format!("dead:{sequence}");
        self.publish(subjects::DEADLETTER_EVENTS.to_owned(), Some(&id), &letter)
            .await?;
        Ok(())
    }
}
