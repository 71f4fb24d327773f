//! Creates or updates Sluice's streams, idempotently, at every service start-up.

use std::time::Duration;

use async_nats::jetstream::{
    self,
    stream::{Config, RetentionPolicy, StorageType},
};

use crate::{subjects, Error, Result};

/// How Sluice's streams are sized. Every field has a flag on the services that own it.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Stream replicas: 1 for a single server, 3 for a production cluster.
    pub replicas: usize,
    /// How long a delivery id is remembered as a duplicate. GitHub lets a delivery be
    /// redelivered for three days, so the default is 72 h.
    pub dedup_window: Duration,
    /// How long events are kept; never shorter than `dedup_window`.
    pub events_max_age: Duration,
    /// How long step logs are kept.
    pub logs_max_age: Duration,
    /// Upper bound on the bytes of logs kept; the oldest are dropped first.
    pub logs_max_bytes: i64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            replicas: 1,
            dedup_window: Duration::from_secs(72 * 3600),
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            logs_max_age: Duration::from_secs(7 * 24 * 3600),
            logs_max_bytes: 5 * 1024 * 1024 * 1024,
        }
    }
}

impl StreamSettings {
    /// The event stream's configuration.
    pub fn events(&self) -> Config {
        Config {
            name: subjects::EVENTS_STREAM.into(),
            description: Some("Sluice: one normalized event per accepted webhook delivery".into()),
            subjects: vec!["sluice.events.>".into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            // JetStream refuses a duplicate window longer than the stream's max age.
            max_age: self.events_max_age.max(self.dedup_window),
            duplicate_window: self.dedup_window,
            ..Default::default()
        }
    }

    /// The run request work queue.
    pub fn runs(&self) -> Config {
        Config {
            name: subjects::RUNS_STREAM.into(),
            description: Some("Sluice: run requests, one work queue per cluster subject".into()),
            subjects: vec!["sluice.runs.>".into()],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            num_replicas: self.replicas,
            max_age: self.events_max_age.max(self.dedup_window),
            duplicate_window: self.dedup_window,
            ..Default::default()
        }
    }

    /// Run and step state changes.
    pub fn status(&self) -> Config {
        Config {
            name: subjects::STATUS_STREAM.into(),
            description: Some("Sluice: every run and step state change".into()),
            subjects: vec!["sluice.status.>".into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            max_age: self.logs_max_age,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        }
    }

    /// Step output.
    pub fn logs(&self) -> Config {
        Config {
            name: subjects::LOGS_STREAM.into(),
            description: Some("Sluice: step output, in order".into()),
            subjects: vec!["sluice.logs.>".into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            max_age: self.logs_max_age,
            max_bytes: self.logs_max_bytes,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        }
    }

    /// Dispatch decisions: only the latest per event is kept.
    pub fn decisions(&self) -> Config {
        Config {
            name: subjects::DECISIONS_STREAM.into(),
            description: Some("Sluice: why each event started the runs it did".into()),
            subjects: vec!["sluice.decisions.>".into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            max_age: self.events_max_age.max(self.dedup_window),
            max_messages_per_subject: 1,
            allow_direct: true,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        }
    }

    /// Events the dispatcher could not process, with the reason.
    pub fn deadletter(&self) -> Config {
        Config {
            name: subjects::DEADLETTER_STREAM.into(),
            description: Some(
                "Sluice: events that could not be dispatched, with the reason".into(),
            ),
            subjects: vec!["sluice.deadletter.>".into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            max_age: Duration::from_secs(30 * 24 * 3600),
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        }
    }

    /// Control messages for runners (cancel requests).
    pub fn control(&self) -> Config {
        Config {
            name: subjects::CONTROL_STREAM.into(),
            description: Some("Sluice: cancel requests for each cluster's runners".into()),
            subjects: vec!["sluice.control.>".into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            max_age: self.events_max_age,
            duplicate_window: Duration::from_secs(3600),
            ..Default::default()
        }
    }

    /// Every stream Sluice uses, in the order they are provisioned.
    pub fn all(&self) -> [Config; 7] {
        [
            self.events(),
            self.runs(),
            self.status(),
            self.logs(),
            self.decisions(),
            self.deadletter(),
            self.control(),
        ]
    }
}

/// Creates each stream that is missing and brings existing ones to `settings`.
///
/// Safe to call from every replica at every start-up: the server applies the same
/// configuration as a no-op. A change the server cannot make in place (for example the
/// retention policy of an existing stream) is reported with the stream's name.
pub async fn ensure(js: &jetstream::Context, settings: &StreamSettings) -> Result<()> {
    for config in settings.all() {
        let name = config.name.clone();
        js.create_or_update_stream(config)
            .await
            .map_err(|e| Error::Stream {
                stream: name.clone(),
                reason: e.to_string(),
            })?;
        tracing::debug!(stream = %name, "stream ready");
    }
    Ok(())
}

/// Creates or opens the object store bucket that holds oversized webhook bodies.
pub async fn payloads_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<jetstream::object_store::ObjectStore> {
    let config = jetstream::object_store::Config {
        bucket: subjects::PAYLOADS_BUCKET.into(),
        description: Some("Sluice: webhook bodies too large for one message".into()),
        max_age: settings.events_max_age.max(settings.dedup_window),
        storage: StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    };
    match js.get_object_store(subjects::PAYLOADS_BUCKET).await {
        Ok(store) => Ok(store),
        Err(_) => js
            .create_object_store(config)
            .await
            .map_err(|e| Error::Stream {
                stream: subjects::PAYLOADS_BUCKET.into(),
                reason: e.to_string(),
            }),
    }
}

/// Checks that every stream exists; used by readiness probes.
pub async fn check(js: &jetstream::Context) -> Result<()> {
    for config in StreamSettings::default().all() {
        js.get_stream(&config.name)
            .await
            .map_err(|e| Error::Stream {
                stream: config.name.clone(),
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

/// Opens a key-value bucket, creating it when missing.
pub async fn kv_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
    bucket: &str,
    description: &str,
    history: i64,
) -> Result<jetstream::kv::Store> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    js.create_key_value(jetstream::kv::Config {
        bucket: bucket.into(),
        description: description.into(),
        history,
        storage: StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| Error::Stream {
        stream: bucket.into(),
        reason: e.to_string(),
    })
}

/// The pipeline registry bucket (the last 5 versions of each pipeline are kept).
pub async fn pipelines_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<jetstream::kv::Store> {
    kv_bucket(
        js,
        settings,
        subjects::PIPELINES_BUCKET,
        "Sluice: pipelines by name",
        5,
    )
    .await
}

/// How long a runner's heartbeat keeps it listed as alive.
pub const RUNNER_TTL: Duration = Duration::from_secs(30);

/// Live runners: each runner renews `<cluster>.<runner id>` well within [`RUNNER_TTL`].
pub async fn runners_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<jetstream::kv::Store> {
    if let Ok(store) = js.get_key_value(subjects::RUNNERS_BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(jetstream::kv::Config {
        bucket: subjects::RUNNERS_BUCKET.into(),
        description: "Sluice: live runners by cluster".into(),
        history: 1,
        max_age: RUNNER_TTL,
        storage: StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| Error::Stream {
        stream: subjects::RUNNERS_BUCKET.into(),
        reason: e.to_string(),
    })
}

/// Concurrency group states.
pub async fn groups_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<jetstream::kv::Store> {
    kv_bucket(
        js,
        settings,
        subjects::GROUPS_BUCKET,
        "Sluice: concurrency group states",
        1,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_window_never_exceeds_max_age() {
        let settings = StreamSettings {
            dedup_window: Duration::from_secs(10 * 24 * 3600),
            ..Default::default()
        };
        let events = settings.events();
        assert!(events.max_age >= events.duplicate_window);
        assert_eq!(events.duplicate_window, Duration::from_secs(10 * 24 * 3600));
        assert_eq!(settings.runs().retention, RetentionPolicy::WorkQueue);
    }
}
