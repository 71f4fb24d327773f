//! Reading what a stream holds incrementally: each call returns what was stored after
//! the last one, so a harness can follow a stream of thousands of messages cheaply.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use time::OffsetDateTime;

/// One stored message.
#[derive(Debug, Clone)]
pub struct Stored {
    pub sequence: u64,
    pub subject: String,
    pub payload: bytes::Bytes,
    /// When the stream stored it (the server's clock).
    pub published: OffsetDateTime,
}

/// Messages of `stream` on `filter` after sequence `cursor` (which moves on), up to
/// what is there now.
pub async fn read_from(
    js: &jetstream::Context,
    stream: &str,
    filter: &str,
    cursor: &mut u64,
) -> anyhow::Result<Vec<Stored>> {
    let policy = DeliverPolicy::ByStartSequence {
        start_sequence: *cursor + 1,
    };
    let (consumer, pending) = sluice_core::bus::ordered(js, stream, filter.into(), policy).await?;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer.messages().await?;
    let mut last = *cursor;
    while out.len() < pending as usize {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .with_context(|| format!("reading {stream} stalled"))?;
        let Some(m) = next else { break };
        let m = m.map_err(|e| anyhow::anyhow!("read {stream}: {e}"))?;
        let info = m.info().map_err(|e| anyhow::anyhow!("message info: {e}"))?;
        let (sequence, published) = (info.stream_sequence, info.published);
        // An ordered consumer recreated (a leader change) before its first message
        // can start again from the stream's beginning: what was read before is
        // skipped, not counted twice, and the read goes on until `pending` new ones.
        if sequence <= last {
            continue;
        }
        last = sequence;
        out.push(Stored {
            sequence,
            subject: m.subject.to_string(),
            payload: m.payload.clone(),
            published,
        });
    }
    // Only a complete read moves the cursor: a failed one is read again.
    *cursor = last;
    Ok(out)
}
