//! Reading back the dispatcher's own decisions: the record a child request is checked
//! against.

use async_nats::jetstream;
use sluice_core::run::Decision;
use sluice_core::subjects;

use crate::{Error, Result};

/// The stored decision for `event_id`, if any (the decisions stream keeps the last
/// one per event and serves direct gets).
pub async fn get(js: &jetstream::Context, event_id: &str) -> Result<Option<Decision>> {
    let stream = js
        .get_stream_no_info(subjects::DECISIONS_STREAM)
        .await
        .map_err(|e| Error::nats("decisions stream", e))?;
    match stream
        .direct_get_last_for_subject(subjects::decision(event_id))
        .await
    {
        Ok(message) => serde_json::from_slice(&message.payload)
            .map(Some)
            .map_err(|source| Error::StoredDecision {
                event_id: event_id.to_owned(),
                source,
            }),
        Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::nats(format!("decision of {event_id}"), e)),
    }
}
