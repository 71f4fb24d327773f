//! Sluice's streams, buckets and each cluster's runner consumer: what they should be,
//! how what exists differs from that, and the two ways of acting on it.
//!
//! There is one owner: `sluice streams apply` ([`apply`]) creates and updates them.
//! Services only [`prepare`] what they need at start-up: they create an object that is
//! missing (so a first try against a bare server works) but never change one that
//! exists; a difference from their own settings is reported, not applied.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy},
    stream::{Config, RetentionPolicy, StorageType},
};
use futures::TryStreamExt;

use crate::{subjects, Error, Result};

/// The command that owns provisioning; named in every message that asks for it.
pub const APPLY_COMMAND: &str = "sluice streams apply";

/// How long a pulled run may go without a progress signal before NATS gives it to
/// another replica.
pub const DEFAULT_RUNNER_ACK_WAIT: Duration = Duration::from_secs(30);
/// Unacknowledged runs per cluster consumer: unlimited, since replicas bound their own
/// work with `--max-running` (JetStream's default of 1,000 would silently cap a whole
/// cluster: 20 replicas of 50 already reach it).
pub const DEFAULT_RUNNER_MAX_IN_FLIGHT: i64 = -1;

/// How long a runner's heartbeat keeps it listed as alive.
pub const RUNNER_TTL: Duration = Duration::from_secs(30);
/// How long the delivery reconciler's records live (`SLUICE_DELIVERIES`): GitHub's
/// 3 days of redeliveries and a day to read `sluice events lost`.
pub const DELIVERY_RECORDS_TTL: Duration = Duration::from_secs(4 * 24 * 3600);
/// How long a commit's `.sluice/` files stay cached (`SLUICE_REPO_FILES`): a commit's
/// files never change, so this only bounds the bucket's size.
pub const REPO_FILES_TTL: Duration = Duration::from_secs(3600);
/// Bytes one cached listing may have: one NATS message.
pub const REPO_FILES_MAX_VALUE: i32 = 1024 * 1024;

/// How Sluice's streams are sized. Every field has a flag on `sluice streams apply`.
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
    /// The clusters whose runner consumers `apply` creates.
    pub clusters: Vec<ClusterConsumer>,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            replicas: 1,
            dedup_window: Duration::from_secs(72 * 3600),
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            logs_max_age: Duration::from_secs(7 * 24 * 3600),
            logs_max_bytes: 5 * 1024 * 1024 * 1024,
            clusters: Vec::new(),
        }
    }
}

/// One cluster's runner consumer: `NAME[:ACK_WAIT[:MAX_IN_FLIGHT]]` on the command
/// line, e.g. `eu-1`, `eu-1:60s`, `eu-1:30s:500`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConsumer {
    pub cluster: String,
    pub ack_wait: Duration,
    /// Unacknowledged runs at once across the cluster's replicas; -1 for no limit.
    pub max_in_flight: i64,
}

impl ClusterConsumer {
    pub fn new(cluster: impl Into<String>) -> Self {
        ClusterConsumer {
            cluster: cluster.into(),
            ack_wait: DEFAULT_RUNNER_ACK_WAIT,
            max_in_flight: DEFAULT_RUNNER_MAX_IN_FLIGHT,
        }
    }

    /// Reads `NAME[:ACK_WAIT[:MAX_IN_FLIGHT]]`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split(':');
        let name = parts.next().unwrap_or_default();
        crate::pipeline::Name::parse(name)?;
        let mut out = ClusterConsumer::new(name);
        if let Some(wait) = parts.next() {
            out.ack_wait = crate::duration::parse(wait)?;
            if out.ack_wait < Duration::from_secs(3) {
                return Err(format!(
                    "cluster {name}: an ack wait under 3s leaves no room for progress signals"
                ));
            }
        }
        if let Some(n) = parts.next() {
            out.max_in_flight = n.parse().map_err(|_| {
                format!("cluster {name}: max in flight `{n}` is not a number (-1 for no limit)")
            })?;
            if out.max_in_flight == 0 || out.max_in_flight < -1 {
                return Err(format!(
                    "cluster {name}: max in flight must be at least 1, or -1 for no limit"
                ));
            }
        }
        if parts.next().is_some() {
            return Err(format!(
                "`{s}`: expected NAME[:ACK_WAIT[:MAX_IN_FLIGHT]], e.g. eu-1:30s:500"
            ));
        }
        Ok(out)
    }

    /// The durable pull consumer the cluster's runners share.
    pub fn config(&self) -> pull::Config {
        let name = subjects::runner_consumer(&self.cluster);
        pull::Config {
            durable_name: Some(name.clone()),
            name: Some(name),
            description: Some(format!("Sluice: the runners of cluster {}", self.cluster)),
            filter_subject: subjects::runs(&self.cluster),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            max_ack_pending: self.max_in_flight,
            ..Default::default()
        }
    }
}

fn metadata() -> HashMap<String, String> {
    HashMap::from([(
        subjects::CONTRACT_METADATA_KEY.to_owned(),
        subjects::CONTRACT_VERSION.to_owned(),
    )])
}

impl StreamSettings {
    fn stream(&self, name: &str, description: &str, subjects: &str) -> Config {
        Config {
            name: name.into(),
            description: Some(format!("Sluice: {description}")),
            subjects: vec![subjects.into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: Duration::from_secs(120),
            metadata: metadata(),
            ..Default::default()
        }
    }

    /// The event stream's configuration.
    pub fn events(&self) -> Config {
        Config {
            // JetStream refuses a duplicate window longer than the stream's max age.
            max_age: self.events_max_age.max(self.dedup_window),
            duplicate_window: self.dedup_window,
            ..self.stream(
                subjects::EVENTS_STREAM,
                "one normalized event per accepted webhook delivery",
                "sluice.events.>",
            )
        }
    }

    /// The run request work queue.
    pub fn runs(&self) -> Config {
        Config {
            retention: RetentionPolicy::WorkQueue,
            max_age: self.events_max_age.max(self.dedup_window),
            duplicate_window: self.dedup_window,
            ..self.stream(
                subjects::RUNS_STREAM,
                "run requests, one work queue per cluster subject",
                "sluice.runs.>",
            )
        }
    }

    /// Run and step state changes.
    pub fn status(&self) -> Config {
        Config {
            max_age: self.logs_max_age,
            // A run's last state is read by subject (`bus::final_state`, once per run a
            // runner takes) without creating a consumer.
            allow_direct: true,
            ..self.stream(
                subjects::STATUS_STREAM,
                "every run and step state change",
                "sluice.status.>",
            )
        }
    }

    /// Step output.
    pub fn logs(&self) -> Config {
        Config {
            max_age: self.logs_max_age,
            max_bytes: self.logs_max_bytes,
            ..self.stream(
                subjects::LOGS_STREAM,
                "step output, in order",
                "sluice.logs.>",
            )
        }
    }

    /// Dispatch decisions: only the latest per event is kept.
    pub fn decisions(&self) -> Config {
        Config {
            max_age: self.events_max_age.max(self.dedup_window),
            max_messages_per_subject: 1,
            allow_direct: true,
            ..self.stream(
                subjects::DECISIONS_STREAM,
                "why each event started the runs it did",
                "sluice.decisions.>",
            )
        }
    }

    /// Events the dispatcher could not process, with the reason.
    pub fn deadletter(&self) -> Config {
        Config {
            max_age: Duration::from_secs(30 * 24 * 3600),
            ..self.stream(
                subjects::DEADLETTER_STREAM,
                "events that could not be dispatched, with the reason",
                "sluice.deadletter.>",
            )
        }
    }

    /// Messages for runners: cancel requests, child results.
    pub fn control(&self) -> Config {
        Config {
            max_age: self.events_max_age,
            duplicate_window: Duration::from_secs(3600),
            ..self.stream(
                subjects::CONTROL_STREAM,
                "cancel requests and child results for each cluster's runners",
                "sluice.control.>",
            )
        }
    }

    /// Runners' requests to start or cancel child runs.
    pub fn children(&self) -> Config {
        Config {
            max_age: self.events_max_age,
            duplicate_window: Duration::from_secs(3600),
            ..self.stream(
                subjects::CHILDREN_STREAM,
                "runners' requests to start or cancel child pipelines",
                "sluice.children.>",
            )
        }
    }

    /// Every stream Sluice uses, in the order they are provisioned.
    pub fn all(&self) -> [Config; 8] {
        [
            self.events(),
            self.runs(),
            self.status(),
            self.logs(),
            self.decisions(),
            self.deadletter(),
            self.control(),
            self.children(),
        ]
    }

    /// One stream's configuration by name.
    pub fn stream_config(&self, name: &str) -> Option<Config> {
        self.all().into_iter().find(|c| c.name == name)
    }

    /// Every key-value bucket.
    pub fn buckets(&self) -> [jetstream::kv::Config; 6] {
        let bucket = |name: &str, description: &str, history: i64| jetstream::kv::Config {
            bucket: name.into(),
            description: format!("Sluice: {description}"),
            history,
            storage: StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        };
        [
            bucket(subjects::PIPELINES_BUCKET, "pipelines by name", 5),
            jetstream::kv::Config {
                max_age: RUNNER_TTL,
                ..bucket(subjects::RUNNERS_BUCKET, "live runners by cluster", 1)
            },
            bucket(subjects::REPORTS_BUCKET, "commit statuses to send", 1),
            bucket(subjects::GROUPS_BUCKET, "concurrency group states", 1),
            jetstream::kv::Config {
                // GitHub redelivers for 3 days: a record older than that can change
                // nothing, and a lost delivery stays listed for a day beyond.
                max_age: DELIVERY_RECORDS_TTL,
                ..bucket(
                    subjects::DELIVERIES_BUCKET,
                    "forge deliveries redelivered or lost",
                    1,
                )
            },
            jetstream::kv::Config {
                max_age: REPO_FILES_TTL,
                max_value_size: REPO_FILES_MAX_VALUE,
                ..bucket(
                    subjects::REPO_FILES_BUCKET,
                    "repositories' .sluice/ files by commit",
                    1,
                )
            },
        ]
    }

    /// The object store of oversized webhook bodies.
    pub fn payloads(&self) -> jetstream::object_store::Config {
        jetstream::object_store::Config {
            bucket: subjects::PAYLOADS_BUCKET.into(),
            description: Some("Sluice: webhook bodies too large for one message".into()),
            max_age: self.events_max_age.max(self.dedup_window),
            storage: StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }
}

// === Differences ===

/// One setting of an existing object that is not what was asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub object: String,
    pub field: &'static str,
    pub have: String,
    pub want: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: have {}, want {}",
            self.object, self.field, self.have, self.want
        )
    }
}

fn differ<T: fmt::Debug + PartialEq>(
    out: &mut Vec<Difference>,
    object: &str,
    field: &'static str,
    have: T,
    want: T,
) {
    if have != want {
        out.push(Difference {
            object: object.to_owned(),
            field,
            have: format!("{have:?}"),
            want: format!("{want:?}"),
        });
    }
}

/// How an existing stream differs from `want`, in the settings Sluice chooses.
pub fn stream_differences(have: &Config, want: &Config) -> Vec<Difference> {
    let mut out = Vec::new();
    let o = want.name.as_str();
    differ(&mut out, o, "subjects", &have.subjects, &want.subjects);
    differ(&mut out, o, "retention", have.retention, want.retention);
    differ(&mut out, o, "storage", have.storage, want.storage);
    differ(
        &mut out,
        o,
        "replicas",
        have.num_replicas,
        want.num_replicas,
    );
    differ(&mut out, o, "max_age", have.max_age, want.max_age);
    differ(
        &mut out,
        o,
        "duplicate_window",
        have.duplicate_window,
        want.duplicate_window,
    );
    // The server writes -1 for "no limit".
    let bytes = |b: i64| if b == 0 { -1 } else { b };
    differ(
        &mut out,
        o,
        "max_bytes",
        bytes(have.max_bytes),
        bytes(want.max_bytes),
    );
    let per_subject = |n: i64| if n == 0 { -1 } else { n };
    differ(
        &mut out,
        o,
        "max_messages_per_subject",
        per_subject(have.max_messages_per_subject),
        per_subject(want.max_messages_per_subject),
    );
    differ(
        &mut out,
        o,
        "allow_direct",
        have.allow_direct,
        want.allow_direct,
    );
    differ(
        &mut out,
        o,
        "contract version",
        contract_version(have).unwrap_or("none"),
        subjects::CONTRACT_VERSION,
    );
    out
}

/// The contract version a stream was laid out for, if it says.
pub fn contract_version(config: &Config) -> Option<&str> {
    config
        .metadata
        .get(subjects::CONTRACT_METADATA_KEY)
        .map(String::as_str)
}

fn bucket_differences(name: &str, have: &Config, want: &jetstream::kv::Config) -> Vec<Difference> {
    let mut out = Vec::new();
    differ(
        &mut out,
        name,
        "replicas",
        have.num_replicas,
        want.num_replicas,
    );
    differ(&mut out, name, "max_age", have.max_age, want.max_age);
    differ(
        &mut out,
        name,
        "history",
        have.max_messages_per_subject,
        want.history,
    );
    out
}

fn consumer_differences(
    have: &jetstream::consumer::Config,
    want: &pull::Config,
) -> Vec<Difference> {
    let mut out = Vec::new();
    let o = want.durable_name.clone().unwrap_or_default();
    differ(
        &mut out,
        &o,
        "filter_subject",
        &have.filter_subject,
        &want.filter_subject,
    );
    differ(&mut out, &o, "ack_wait", have.ack_wait, want.ack_wait);
    differ(
        &mut out,
        &o,
        "max_in_flight",
        have.max_ack_pending,
        want.max_ack_pending,
    );
    out
}

// === Planning and applying (the owner) ===

/// What `apply` does to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Create,
    Update(Vec<Difference>),
    Unchanged,
}

/// One object and what `apply` does to it.
#[derive(Debug, Clone)]
pub struct Planned {
    /// `stream SLUICE_EVENTS`, `bucket SLUICE_RUNNERS`, `consumer sluice-runner-eu-1`, …
    pub object: String,
    pub change: Change,
}

/// What `apply` would do.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub objects: Vec<Planned>,
    /// Streams holding messages of the previous subject layout (a run's states and logs
    /// without its cluster), with how many subjects: `apply` refuses to touch them
    /// unless told to purge those messages.
    pub old_layout: Vec<(String, usize)>,
}

impl Plan {
    /// True when applying changes nothing.
    pub fn is_empty(&self) -> bool {
        self.objects.iter().all(|o| o.change == Change::Unchanged) && self.old_layout.is_empty()
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for o in &self.objects {
            match &o.change {
                Change::Create => writeln!(f, "+ create {}", o.object)?,
                Change::Update(d) => {
                    writeln!(f, "~ update {}", o.object)?;
                    for d in d {
                        writeln!(f, "    {}: {} -> {}", d.field, d.have, d.want)?;
                    }
                }
                Change::Unchanged => writeln!(f, "  {} (unchanged)", o.object)?,
            }
        }
        for (stream, n) in &self.old_layout {
            writeln!(
                f,
                "! {stream} holds {n} subject(s) of the old layout (no cluster in the subject)"
            )?;
        }
        Ok(())
    }
}

fn is_not_found(e: &impl fmt::Display) -> bool {
    let s = e.to_string().to_ascii_lowercase();
    s.contains("not found") || s.contains("10059") || s.contains("10014")
}

/// Subjects of the old layout in the status and logs streams: `sluice.status.<run>`
/// (two tokens after `sluice`) where the cluster now comes first.
async fn old_layout(js: &jetstream::Context, stream: &str, prefix: &str) -> Result<usize> {
    let Ok(handle) = js.get_stream_no_info(stream).await else {
        return Ok(0);
    };
    let mut info = match handle.info_with_subjects(format!("{prefix}.*")).await {
        Ok(info) => info,
        Err(e) if is_not_found(&e) => return Ok(0),
        Err(e) => return Err(Error::bus(format!("stream {stream}"), e)),
    };
    let mut n = 0;
    while info
        .try_next()
        .await
        .map_err(|e| Error::bus(format!("stream {stream}"), e))?
        .is_some()
    {
        n += 1;
    }
    Ok(n)
}

/// Compares what exists with `settings`: what [`apply`] would create or change.
pub async fn plan(js: &jetstream::Context, settings: &StreamSettings) -> Result<Plan> {
    let mut plan = Plan::default();
    for want in settings.all() {
        let object = format!("stream {}", want.name);
        let change = match js.get_stream(&want.name).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| Error::bus(object.clone(), e))?;
                let d = stream_differences(&info.config, &want);
                if d.is_empty() {
                    Change::Unchanged
                } else {
                    Change::Update(d)
                }
            }
            Err(e) if is_not_found(&e) => Change::Create,
            Err(e) => return Err(Error::bus(object, e)),
        };
        plan.objects.push(Planned { object, change });
    }
    for want in settings.buckets() {
        let object = format!("bucket {}", want.bucket);
        let change = match js.get_stream(format!("KV_{}", want.bucket)).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(|e| Error::bus(object.clone(), e))?;
                let d = bucket_differences(&want.bucket, &info.config, &want);
                if d.is_empty() {
                    Change::Unchanged
                } else {
                    Change::Update(d)
                }
            }
            Err(e) if is_not_found(&e) => Change::Create,
            Err(e) => return Err(Error::bus(object, e)),
        };
        plan.objects.push(Planned { object, change });
    }
    let payloads = settings.payloads();
    let object = format!("object store {}", payloads.bucket);
    let change = match js.get_stream(format!("OBJ_{}", payloads.bucket)).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(|e| Error::bus(object.clone(), e))?;
            let mut d = Vec::new();
            differ(
                &mut d,
                &payloads.bucket,
                "replicas",
                info.config.num_replicas,
                payloads.num_replicas,
            );
            differ(
                &mut d,
                &payloads.bucket,
                "max_age",
                info.config.max_age,
                payloads.max_age,
            );
            if d.is_empty() {
                Change::Unchanged
            } else {
                Change::Update(d)
            }
        }
        Err(e) if is_not_found(&e) => Change::Create,
        Err(e) => return Err(Error::bus(object, e)),
    };
    plan.objects.push(Planned { object, change });
    for cluster in &settings.clusters {
        let want = cluster.config();
        let name = subjects::runner_consumer(&cluster.cluster);
        let object = format!("consumer {name}");
        let change = match js
            .get_consumer_from_stream::<pull::Config, _, _>(&name, subjects::RUNS_STREAM)
            .await
        {
            Ok(mut c) => {
                let info = c.info().await.map_err(|e| Error::bus(object.clone(), e))?;
                let d = consumer_differences(&info.config, &want);
                if d.is_empty() {
                    Change::Unchanged
                } else {
                    Change::Update(d)
                }
            }
            Err(e) if is_not_found(&e) => Change::Create,
            Err(e) => return Err(Error::bus(object, e)),
        };
        plan.objects.push(Planned { object, change });
    }
    for (stream, prefix) in [
        (subjects::STATUS_STREAM, "sluice.status"),
        (subjects::LOGS_STREAM, "sluice.logs"),
    ] {
        let n = old_layout(js, stream, prefix).await?;
        if n > 0 {
            plan.old_layout.push((stream.to_owned(), n));
        }
    }
    Ok(plan)
}

/// Brings every stream, bucket and listed cluster consumer to `settings`, creating what
/// is missing: the one command that changes them. Refuses (changing nothing) while the
/// status or logs stream holds messages of the old subject layout, unless
/// `purge_old_layout`, which deletes those messages first: they would otherwise be
/// invisible to every reader of the new layout. Returns the plan it carried out.
pub async fn apply(
    js: &jetstream::Context,
    settings: &StreamSettings,
    purge_old_layout: bool,
) -> Result<Plan> {
    let plan = plan(js, settings).await?;
    if !plan.old_layout.is_empty() {
        if !purge_old_layout {
            let (stream, n) = &plan.old_layout[0];
            return Err(Error::Provisioning {
                what: format!("stream {stream}"),
                problem: format!(
                    "it holds {n} subject(s) written by an older Sluice (run states and logs without their cluster), which this version cannot read"
                ),
                fix: format!("{APPLY_COMMAND} --purge-old-layout"),
            });
        }
        for (stream, prefix) in [
            (subjects::STATUS_STREAM, "sluice.status"),
            (subjects::LOGS_STREAM, "sluice.logs"),
        ] {
            if let Ok(handle) = js.get_stream_no_info(stream).await {
                handle
                    .purge()
                    .filter(format!("{prefix}.*"))
                    .await
                    .map_err(|e| Error::bus(format!("purge {stream}"), e))?;
                tracing::info!(stream, "old-layout messages purged");
            }
        }
    }
    for want in settings.all() {
        let (name, max_bytes) = (want.name.clone(), want.max_bytes);
        js.create_or_update_stream(want)
            .await
            .map_err(|e| match e.kind() {
                jetstream::context::CreateStreamErrorKind::JetStream(js)
                    if js.error_code() == jetstream::ErrorCode::STORAGE_RESOURCES_EXCEEDED =>
                {
                    storage_exceeded(&name, max_bytes)
                }
                _ => Error::Stream {
                    stream: name.clone(),
                    reason: e.to_string(),
                },
            })?;
    }
    for want in settings.buckets() {
        let name = want.bucket.clone();
        js.create_or_update_key_value(want)
            .await
            .map_err(|e| Error::Stream {
                stream: name,
                reason: e.to_string(),
            })?;
    }
    let payloads = settings.payloads();
    match js.get_object_store(&payloads.bucket).await {
        Ok(_) => {
            let mut stream = js
                .get_stream(format!("OBJ_{}", payloads.bucket))
                .await
                .map_err(|e| Error::bus("object store", e))?;
            let mut config = stream
                .info()
                .await
                .map_err(|e| Error::bus("object store", e))?
                .config
                .clone();
            config.num_replicas = payloads.num_replicas;
            config.max_age = payloads.max_age;
            js.update_stream(config)
                .await
                .map_err(|e| Error::bus("object store", e))?;
        }
        Err(_) => {
            js.create_object_store(payloads)
                .await
                .map_err(|e| Error::bus("object store", e))?;
        }
    }
    let runs = js
        .get_stream_no_info(subjects::RUNS_STREAM)
        .await
        .map_err(|e| Error::bus("stream SLUICE_RUNS", e))?;
    for cluster in &settings.clusters {
        runs.create_consumer(cluster.config())
            .await
            .map_err(|e| Error::bus(format!("consumer of cluster {}", cluster.cluster), e))?;
    }
    Ok(plan)
}

// === Checking (every service) ===

/// Streams and buckets a service cannot work without.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    pub streams: &'static [&'static str],
    pub buckets: &'static [&'static str],
    pub object_stores: &'static [&'static str],
}

/// Checks what a service needs at start-up. A missing object is created (a first try
/// against a bare server works) when the service's credential allows it; otherwise the
/// error names the command to run. An existing object is never changed: how it differs
/// from `settings` is returned for the service to report. A stream of another layout
/// version is refused.
pub async fn prepare(
    js: &jetstream::Context,
    settings: &StreamSettings,
    needs: Needs,
) -> Result<Vec<Difference>> {
    let mut differences = Vec::new();
    for name in needs.streams {
        let want = settings
            .stream_config(name)
            .ok_or_else(|| Error::Invalid(format!("{name} is not one of Sluice's streams")))?;
        match js.get_stream(name).await {
            Ok(mut s) => {
                let info = s
                    .info()
                    .await
                    .map_err(|e| Error::bus(format!("stream {name}"), e))?;
                if contract_version(&info.config) != Some(subjects::CONTRACT_VERSION) {
                    return Err(Error::Provisioning {
                        what: format!("stream {name}"),
                        problem: format!(
                            "it was laid out for contract version {}, this Sluice speaks version {}",
                            contract_version(&info.config).unwrap_or("1"),
                            subjects::CONTRACT_VERSION
                        ),
                        fix: APPLY_COMMAND.into(),
                    });
                }
                differences.extend(stream_differences(&info.config, &want));
            }
            Err(e) if is_not_found(&e) => {
                js.create_stream(want)
                    .await
                    .map_err(|e| missing(format!("stream {name}"), &e))?;
                tracing::info!(stream = %name, "stream was missing; created it");
            }
            Err(e) => return Err(Error::bus(format!("stream {name}"), e)),
        }
    }
    for want in settings.buckets() {
        if !needs.buckets.contains(&want.bucket.as_str()) {
            continue;
        }
        let name = want.bucket.clone();
        match js.get_stream(format!("KV_{name}")).await {
            Ok(mut s) => {
                let info = s
                    .info()
                    .await
                    .map_err(|e| Error::bus(format!("bucket {name}"), e))?;
                differences.extend(bucket_differences(&name, &info.config, &want));
            }
            Err(e) if is_not_found(&e) => {
                js.create_key_value(want)
                    .await
                    .map_err(|e| missing(format!("bucket {name}"), &e))?;
                tracing::info!(bucket = %name, "bucket was missing; created it");
            }
            Err(e) => return Err(Error::bus(format!("bucket {name}"), e)),
        }
    }
    if needs.object_stores.contains(&subjects::PAYLOADS_BUCKET) {
        let want = settings.payloads();
        match js.get_stream(format!("OBJ_{}", want.bucket)).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {
                js.create_object_store(want).await.map_err(|e| {
                    missing(format!("object store {}", subjects::PAYLOADS_BUCKET), &e)
                })?;
            }
            Err(e) => return Err(Error::bus("object store", e)),
        }
    }
    Ok(differences)
}

fn missing(what: String, e: &impl fmt::Display) -> Error {
    Error::Provisioning {
        what,
        problem: format!("it does not exist and cannot be created with this credential ({e})"),
        fix: APPLY_COMMAND.into(),
    }
}

/// Logs each difference once, as a warning naming the owner command.
pub fn report(service: &str, differences: &[Difference]) {
    for d in differences {
        tracing::warn!(
            service,
            object = %d.object,
            field = d.field,
            have = %d.have,
            want = %d.want,
            "differs from this service's settings; left as it is (`{APPLY_COMMAND}` changes it)"
        );
    }
}

/// Opens a key-value bucket that [`prepare`] has checked.
pub async fn bucket(js: &jetstream::Context, name: &str) -> Result<jetstream::kv::Store> {
    js.get_key_value(name)
        .await
        .map_err(|e| not_there(format!("bucket {name}"), &e))
}

fn not_there(what: String, e: &impl fmt::Display) -> Error {
    Error::Provisioning {
        what,
        problem: format!("cannot open it ({e})"),
        fix: APPLY_COMMAND.into(),
    }
}

/// JetStream refused `stream` because the server cannot reserve its byte limit: every
/// stream's `max_bytes` is reserved from the server's file storage up front, and that
/// storage, unless the server's configuration sets it, is 75% of the disk free when the
/// server started. The message says both ways out.
fn storage_exceeded(stream: &str, max_bytes: i64) -> Error {
    let limit = if max_bytes > 0 {
        format!("its limit of {} MiB", max_bytes >> 20)
    } else {
        "its storage".to_owned()
    };
    Error::Provisioning {
        what: format!("stream {stream}"),
        problem: format!(
            "the NATS server cannot reserve {limit}: JetStream's file storage (`max_file_store` in the server's jetstream block, else 75% of the disk free when it started) is smaller than the streams' limits. Give the server more (set max_file_store to what its volume holds and restart it), or keep fewer logs"
        ),
        fix: format!("{APPLY_COMMAND} --logs-max-bytes 1073741824"),
    }
}

/// Opens the object store of oversized webhook bodies that [`prepare`] has checked.
pub async fn payloads(js: &jetstream::Context) -> Result<jetstream::object_store::ObjectStore> {
    js.get_object_store(subjects::PAYLOADS_BUCKET)
        .await
        .map_err(|e| not_there(format!("object store {}", subjects::PAYLOADS_BUCKET), &e))
}

/// Checks that each named stream can take a write now: it exists and, when replicated,
/// has a leader and a quorum of current replicas. Ingest's readiness: a stream that
/// exists but has lost its quorum answers its info for a while (from the last leader)
/// while every publish to it times out.
pub async fn check_writable(js: &jetstream::Context, names: &[&str]) -> Result<()> {
    for name in names {
        let stream_error = |reason: String| Error::Stream {
            stream: (*name).to_owned(),
            reason,
        };
        // Getting the stream is one STREAM.INFO request: its answer is the state.
        let stream = js
            .get_stream(name)
            .await
            .map_err(|e| stream_error(e.to_string()))?;
        let info = stream.cached_info();
        writable(info.config.num_replicas, info.cluster.as_ref()).map_err(stream_error)?;
    }
    Ok(())
}

/// Whether a stream of `replicas` replicas, in this state, has a quorum to store a
/// write: a leader, and with it a majority of the replicas current (caught up and
/// seen recently by the leader). A single-replica stream needs no more than to exist.
pub fn writable(
    replicas: usize,
    cluster: Option<&jetstream::stream::ClusterInfo>,
) -> std::result::Result<(), String> {
    if replicas <= 1 {
        return Ok(());
    }
    let Some(cluster) = cluster else {
        return Ok(());
    };
    if cluster.leader.is_none() {
        return Err(
            "no leader: the stream cannot store a write until its servers elect one".into(),
        );
    }
    let current = 1 + cluster
        .replicas
        .iter()
        .filter(|peer| peer.current && !peer.offline)
        .count();
    let quorum = replicas / 2 + 1;
    if current < quorum {
        let away: Vec<&str> = cluster
            .replicas
            .iter()
            .filter(|peer| !peer.current || peer.offline)
            .map(|peer| peer.name.as_str())
            .collect();
        return Err(format!(
            "{current} of {replicas} replicas current, {quorum} needed to store a write (behind or unreachable: {})",
            away.join(", ")
        ));
    }
    Ok(())
}

/// Checks that each named stream exists; used by readiness probes.
pub async fn check_streams(js: &jetstream::Context, names: &[&str]) -> Result<()> {
    for name in names {
        js.get_stream(name).await.map_err(|e| Error::Stream {
            stream: (*name).to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(
        leader: Option<&str>,
        peers: &[(&str, bool, bool)],
    ) -> jetstream::stream::ClusterInfo {
        serde_json::from_value(serde_json::json!({
            "name": "c",
            "leader": leader,
            "replicas": peers.iter().map(|(name, current, offline)| serde_json::json!({
                "name": name, "current": current, "offline": offline, "active": 1_000_000,
            })).collect::<Vec<_>>(),
        }))
        .unwrap()
    }

    #[test]
    fn a_replicated_stream_is_writable_only_with_a_leader_and_a_quorum() {
        assert_eq!(writable(1, None), Ok(()));
        assert_eq!(
            writable(
                3,
                Some(&cluster(
                    Some("n1"),
                    &[("n2", true, false), ("n3", true, false)]
                ))
            ),
            Ok(())
        );
        // One replica away: the leader and one current replica are still a quorum.
        assert_eq!(
            writable(
                3,
                Some(&cluster(
                    Some("n1"),
                    &[("n2", true, false), ("n3", false, true)]
                ))
            ),
            Ok(())
        );
        // Two away: the leader alone is not.
        let lost = writable(
            3,
            Some(&cluster(
                Some("n1"),
                &[("n2", false, true), ("n3", true, true)],
            )),
        )
        .expect_err("no quorum");
        assert!(lost.contains("1 of 3 replicas current, 2 needed"), "{lost}");
        assert!(lost.contains("n2, n3"), "{lost}");
        let leaderless =
            writable(3, Some(&cluster(None, &[("n2", true, false)]))).expect_err("no leader");
        assert!(leaderless.starts_with("no leader"), "{leaderless}");
        // R5 with two away still has three of five.
        assert_eq!(
            writable(
                5,
                Some(&cluster(
                    Some("n1"),
                    &[
                        ("n2", true, false),
                        ("n3", true, false),
                        ("n4", false, true),
                        ("n5", false, false)
                    ]
                ))
            ),
            Ok(())
        );
    }

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

    #[test]
    fn every_stream_carries_the_contract_version() {
        let settings = StreamSettings::default();
        let names: Vec<String> = settings.all().iter().map(|c| c.name.clone()).collect();
        assert_eq!(names, subjects::STREAMS.map(str::to_owned));
        for c in settings.all() {
            assert_eq!(contract_version(&c), Some(subjects::CONTRACT_VERSION));
            assert!(stream_differences(&c, &c).is_empty(), "{}", c.name);
        }
        let buckets: Vec<String> = settings
            .buckets()
            .iter()
            .map(|b| b.bucket.clone())
            .collect();
        assert_eq!(buckets, subjects::BUCKETS.map(str::to_owned));
    }

    #[test]
    fn differences_name_field_have_and_want() {
        let want = StreamSettings {
            replicas: 3,
            dedup_window: Duration::from_secs(96 * 3600),
            ..Default::default()
        }
        .events();
        let have = StreamSettings::default().events();
        let d = stream_differences(&have, &want);
        let fields: Vec<&str> = d.iter().map(|d| d.field).collect();
        assert_eq!(fields, ["replicas", "duplicate_window"]);
        assert_eq!(d[0].to_string(), "SLUICE_EVENTS replicas: have 1, want 3");
        let mut old = have.clone();
        old.metadata.clear();
        let d = stream_differences(&old, &have);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].have, "\"none\"");
    }

    #[test]
    fn cluster_consumers_parse_with_their_settings() {
        let c = ClusterConsumer::parse("eu-1").expect("plain");
        assert_eq!(c, ClusterConsumer::new("eu-1"));
        let c = ClusterConsumer::parse("eu-1:60s:500").expect("full");
        assert_eq!(c.ack_wait, Duration::from_secs(60));
        assert_eq!(c.max_in_flight, 500);
        assert_eq!(c.config().filter_subject, "sluice.runs.eu-1");
        assert_eq!(
            c.config().durable_name.as_deref(),
            Some("sluice-runner-eu-1")
        );
        for bad in [
            "EU",
            "eu-1:1s",
            "eu-1:30s:0",
            "eu-1:30s:-5",
            "eu-1:30s:x",
            "a:30s:1:2",
        ] {
            assert!(ClusterConsumer::parse(bad).is_err(), "{bad}");
        }
    }
}
