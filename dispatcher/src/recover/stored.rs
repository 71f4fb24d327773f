//! Which forge deliveries `SLUICE_EVENTS` holds.
//!
//! The stream is read from the horizon's start (less a margin for clocks) with an
//! ordered consumer that delivers headers only: the event id is the `Nats-Msg-Id`
//! header, so no payload crosses the wire, and an ordered consumer is ephemeral, needs
//! no acknowledgements and leaves nothing behind. The ids go into a set, bounded by the
//! horizon (at most GitHub's 3 days: ~50 bytes an event). JetStream has no look-up by
//! message id, and its duplicate window cannot be queried, so this is the one way to
//! know that a delivery GitHub saw fail was stored after all (the 2xx lost on its way
//! back), which redelivering would not double within the window but would still cost a
//! request.

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self};
use futures::StreamExt;
use sluice_core::subjects;
use time::OffsetDateTime;

use crate::{Error, Result};

/// Events stored up to this long before a delivery's `delivered_at` still count (clock
/// differences between GitHub and NATS).
const CLOCK_MARGIN: time::Duration = time::Duration::minutes(10);
/// A stream that delivers nothing for this long is not answering: the pass fails
/// rather than work from a partial set.
const IDLE: Duration = Duration::from_secs(10);

/// The ids (`<provider>:<delivery id>`) of the `provider` events stored since `since`.
pub(crate) async fn event_ids(
    js: &jetstream::Context,
    since: OffsetDateTime,
    provider: &str,
) -> Result<HashSet<String>> {
    let stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .map_err(|e| Error::nats("events stream", e))?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: subjects::event(provider, ">"),
            deliver_policy: DeliverPolicy::ByStartTime {
                start_time: since - CLOCK_MARGIN,
            },
            headers_only: true,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::nats("read stored event ids", e))?;
    let mut ids = HashSet::new();
    if consumer.cached_info().num_pending == 0 {
        return Ok(ids);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Error::nats("read stored event ids", e))?;
    loop {
        let message = tokio::time::timeout(IDLE, messages.next())
            .await
            .map_err(|_| Error::nats("read stored event ids", "the stream stopped answering"))?
            .ok_or_else(|| Error::nats("read stored event ids", "the stream ended"))?
            .map_err(|e| Error::nats("read stored event ids", e))?;
        if let Some(id) = message
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        {
            ids.insert(id.to_string());
        }
        let pending = message
            .info()
            .map_err(|e| Error::nats("read stored event ids", e))?
            .pending;
        if pending == 0 {
            return Ok(ids);
        }
    }
}
