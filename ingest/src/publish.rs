//! Stores events in JetStream and waits for the acknowledgement.

use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::{self, message::PublishMessage, object_store::ObjectStore};
use sha2::{Digest, Sha256};
use sluice_core::streams;
use sluice_core::{subjects, Event, PayloadRef};
use tokio::sync::OnceCell;

pub use crate::error::PublishError;

/// Room left for the message's headers and protocol line inside NATS's payload limit.
const HEADER_ROOM: usize = 4 * 1024;
/// NATS's default `max_payload`, used while the server's own is not yet known.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// What JetStream said about a stored event.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    /// The delivery id was already in the stream's duplicate window.
    pub duplicate: bool,
    /// The body went to the object store and the event carries a reference.
    pub by_reference: bool,
}

/// Publishes envelopes to `SLUICE_EVENTS` with `Nats-Msg-Id` = event id.
pub struct Publisher {
    client: async_nats::Client,
    js: jetstream::Context,
    payloads: OnceCell<ObjectStore>,
    timeout: Duration,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    pub fn new(client: async_nats::Client, timeout: Duration) -> Self {
        // Waiting for an in-flight slot (rather than failing) is bounded by `timeout`.
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Publisher {
            client,
            js,
            payloads: OnceCell::new(),
            timeout,
        }
    }

    /// The JetStream context, for provisioning and readiness checks.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Stores `event` with `raw` (the validated original payload) and returns once
    /// JetStream has acknowledged it, or fails within the publish timeout.
    pub async fn publish(
        &self,
        mut event: Event,
        raw: &[u8],
    ) -> Result<(Stored, Duration), PublishError> {
        // Fail fast while disconnected: the client would otherwise buffer the message
        // and make the forge wait the whole timeout for a 503.
        if self.client.connection_state() != State::Connected {
            return Err(PublishError::Disconnected);
        }
        let started = Instant::now();
        let deadline = tokio::time::timeout(self.timeout, self.store(&mut event, raw)).await;
        let stored = deadline.map_err(|_| PublishError::Timeout(self.timeout))??;
        Ok((stored, started.elapsed()))
    }

    async fn store(&self, event: &mut Event, raw: &[u8]) -> Result<Stored, PublishError> {
        let mut body = event
            .to_json_with_payload(raw)
            .map_err(PublishError::Encode)?;
        let by_reference = body.len() + HEADER_ROOM > self.max_payload();
        if by_reference {
            event.payload_ref = Some(self.put_payload(&event.id, raw).await?);
            body = serde_json::to_vec(&event).map_err(PublishError::Encode)?;
        }
        let ack = self
            .js
            .send_publish(
                event.subject(),
                PublishMessage::build()
                    .payload(body.into())
                    .message_id(&event.id),
            )
            .await
            .map_err(PublishError::from_publish)?
            .await
            .map_err(PublishError::from_publish)?;
        Ok(Stored {
            duplicate: ack.duplicate,
            by_reference,
        })
    }

    fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n,
        }
    }

    /// Stores an oversized body under the event id. A redelivery overwrites it with
    /// the same bytes, so the reference stays valid either way.
    async fn put_payload(&self, event_id: &str, raw: &[u8]) -> Result<PayloadRef, PublishError> {
        let store = self
            .payloads
            .get_or_try_init(|| streams::payloads(&self.js))
            .await
            .map_err(PublishError::PayloadStore)?;
        let mut reader = raw;
        store
            .put(event_id, &mut reader)
            .await
            .map_err(PublishError::Payload)?;
        Ok(PayloadRef {
            bucket: subjects::PAYLOADS_BUCKET.into(),
            key: event_id.to_owned(),
            size: raw.len() as u64,
            sha256: hex::encode(Sha256::digest(raw)),
        })
    }
}
