//! An in-process dispatcher, and helpers to feed it events and pipelines and read what
//! it published.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use futures::TryStreamExt;
use sluice_core::nats::NatsOptions;
use sluice_core::pipeline::parse_documents;
use sluice_core::run::{Decision, RunRequest};
use sluice_core::streams::{self, StreamSettings};
use sluice_core::{subjects, Event};
use sluice_dispatcher::{Consumers, DispatcherConfig, Handle};
use tokio_util::sync::CancellationToken;

/// A running dispatcher.
#[derive(Debug)]
pub struct Dispatcher {
    shutdown: CancellationToken,
    handle: Option<Handle>,
}

impl Dispatcher {
    /// Test configuration: short ack wait so a killed dispatcher's events come back fast.
    pub fn config(nats_url: &str) -> DispatcherConfig {
        DispatcherConfig {
            ack_wait: Duration::from_secs(2),
            ..DispatcherConfig::new(NatsOptions::new(nats_url, "sluice-test-dispatcher"))
        }
    }

    pub async fn start(nats_url: &str) -> Dispatcher {
        Self::start_with(Self::config(nats_url)).await
    }

    pub async fn start_with(config: DispatcherConfig) -> Dispatcher {
        let shutdown = CancellationToken::new();
        let handle = sluice_dispatcher::start(config, shutdown.clone());
        Dispatcher {
            shutdown,
            handle: Some(handle),
        }
    }

    /// Whether each of its consumer loops is consuming.
    pub fn consumers(&self) -> Consumers {
        self.handle
            .as_ref()
            .map(|h| h.consumers().clone())
            .unwrap_or_default()
    }

    /// A clean stop: finishes the events in hand.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(handle) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(20), handle.wait())
                .await
                .expect("dispatcher stops in time")
                .expect("clean exit");
        }
    }

    /// A crash: the task is dropped wherever it is, nothing in hand is acknowledged.
    pub fn kill(mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Provisions every stream and bucket, as `sluice streams apply` does.
pub async fn provision(js: &jetstream::Context) {
    streams::apply(js, &StreamSettings::default(), false)
        .await
        .expect("streams");
}

/// Stores pipelines from YAML as `sluice pipelines apply` does.
pub async fn apply(js: &jetstream::Context, yaml: &str) {
    let kv = streams::bucket(js, subjects::PIPELINES_BUCKET)
        .await
        .expect("bucket (provision first)");
    for p in parse_documents("test.yaml", yaml).expect("valid pipelines") {
        kv.put(
            p.name.as_str(),
            serde_json::to_vec(&p).expect("json").into(),
        )
        .await
        .expect("put");
    }
}

/// Publishes an envelope as ingest does (subject by kind, `Nats-Msg-Id` = id).
pub async fn publish_event(js: &jetstream::Context, event: &Event) {
    js.send_publish(
        event.subject(),
        PublishMessage::build()
            .payload(serde_json::to_vec(event).expect("json").into())
            .message_id(&event.id),
    )
    .await
    .expect("publish")
    .await
    .expect("ack");
}

/// Every run request stored in `SLUICE_RUNS`, with its subject.
pub async fn run_requests(js: &jetstream::Context) -> Vec<(String, RunRequest)> {
    all_messages(js, subjects::RUNS_STREAM)
        .await
        .into_iter()
        .map(|(s, p)| (s, serde_json::from_slice(&p).expect("run request")))
        .collect()
}

/// Every message of a stream, in order, with its subject.
pub async fn all_messages(js: &jetstream::Context, stream: &str) -> Vec<(String, Vec<u8>)> {
    let mut stream = js.get_stream(stream).await.expect("stream");
    let state = stream.info().await.expect("info").state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            out.push((m.subject.to_string(), m.payload.to_vec()));
        }
    }
    out
}

/// The decision recorded for an event, if any yet.
pub async fn decision(js: &jetstream::Context, event_id: &str) -> Option<Decision> {
    let stream = js.get_stream(subjects::DECISIONS_STREAM).await.ok()?;
    let msg = stream
        .get_last_raw_message_by_subject(subjects::decision(event_id).as_str())
        .await
        .ok()?;
    serde_json::from_slice(&msg.payload).ok()
}

/// Number of messages in a stream.
pub async fn count(js: &jetstream::Context, stream: &str) -> u64 {
    let mut stream = js.get_stream(stream).await.expect("stream");
    stream.info().await.expect("info").state.messages
}

/// Keys in the pipelines bucket.
pub async fn pipeline_names(js: &jetstream::Context) -> Vec<String> {
    // Empty until someone has provisioned the bucket (tests wait on it).
    let Ok(kv) = streams::bucket(js, subjects::PIPELINES_BUCKET).await else {
        return Vec::new();
    };
    let mut names: Vec<String> = kv
        .keys()
        .await
        .expect("keys")
        .try_collect()
        .await
        .expect("keys");
    names.sort();
    names
}
