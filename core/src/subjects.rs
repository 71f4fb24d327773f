//! Stream, bucket, subject, key, consumer and message-id names: the public contract on
//! the bus, defined once. Every reader and writer builds and parses them here.
//!
//! Subjects that carry one run's data name its cluster first (`sluice.status.<cluster>.
//! <run_id>`), so a NATS permission list can give each cluster's runner its own
//! subjects and nothing else (see [`crate::roles`]).

/// The version of this layout. Stored in each stream's metadata under
/// [`CONTRACT_METADATA_KEY`] by `sluice streams apply`; a service refuses streams of
/// another version instead of misreading them.
pub const CONTRACT_VERSION: &str = "2";
/// Stream metadata key holding [`CONTRACT_VERSION`].
pub const CONTRACT_METADATA_KEY: &str = "sluice.contract";

/// Normalized events, one per accepted delivery.
pub const EVENTS_STREAM: &str = "SLUICE_EVENTS";
/// Run requests, a work queue shared by each cluster's runners.
pub const RUNS_STREAM: &str = "SLUICE_RUNS";
/// Every run and step state change.
pub const STATUS_STREAM: &str = "SLUICE_STATUS";
/// Step output, in order.
pub const LOGS_STREAM: &str = "SLUICE_LOGS";
/// Dispatch decisions, one per event: why it started the runs it did.
pub const DECISIONS_STREAM: &str = "SLUICE_DECISIONS";
/// Events the dispatcher gave up on, with the reason.
pub const DEADLETTER_STREAM: &str = "SLUICE_DEADLETTER";
/// Messages to a cluster's runners: cancel requests, child pipeline results.
pub const CONTROL_STREAM: &str = "SLUICE_CONTROL";
/// Requests from a cluster's runners to the dispatcher: start or cancel a child run.
pub const CHILDREN_STREAM: &str = "SLUICE_CHILDREN";
/// Key-value bucket of pipelines, keyed by name.
pub const PIPELINES_BUCKET: &str = "SLUICE_PIPELINES";
/// Key-value bucket of live runners: [`runner_key`], expiring unless renewed.
pub const RUNNERS_BUCKET: &str = "SLUICE_RUNNERS";
/// Key-value bucket of commit statuses waiting to be sent to the forges, by run id.
pub const REPORTS_BUCKET: &str = "SLUICE_REPORTS";
/// Key-value bucket of concurrency group states.
pub const GROUPS_BUCKET: &str = "SLUICE_GROUPS";
/// Key-value bucket of the delivery reconciler: its lease, and a record per forge
/// delivery it redelivered or gave up on (`<forge>.<guid>`).
pub const DELIVERIES_BUCKET: &str = "SLUICE_DELIVERIES";
/// Key-value bucket of the `.sluice/` files read from the forges at a commit, shared by
/// the dispatcher replicas: [`repo_files_key`].
pub const REPO_FILES_BUCKET: &str = "SLUICE_REPO_FILES";
/// Object store bucket holding webhook bodies too large for one NATS message.
pub const PAYLOADS_BUCKET: &str = "SLUICE_PAYLOADS";

/// Every stream, in the order `sluice streams apply` provisions them.
pub const STREAMS: [&str; 8] = [
    EVENTS_STREAM,
    RUNS_STREAM,
    STATUS_STREAM,
    LOGS_STREAM,
    DECISIONS_STREAM,
    DEADLETTER_STREAM,
    CONTROL_STREAM,
    CHILDREN_STREAM,
];

/// Every key-value bucket.
pub const BUCKETS: [&str; 6] = [
    PIPELINES_BUCKET,
    RUNNERS_BUCKET,
    REPORTS_BUCKET,
    GROUPS_BUCKET,
    DELIVERIES_BUCKET,
    REPO_FILES_BUCKET,
];

/// Object store buckets.
pub const OBJECT_STORES: [&str; 1] = [PAYLOADS_BUCKET];

// === Subjects ===

/// `sluice.events.<provider>.<kind>`.
pub fn event(provider: &str, kind: &str) -> String {
    format!("sluice.events.{provider}.{kind}")
}

/// `sluice.runs.<cluster>`: the cluster's run requests.
pub fn runs(cluster: &str) -> String {
    format!("sluice.runs.{cluster}")
}

/// `sluice.status.<cluster>.<run_id>`: a run's state changes.
pub fn status(cluster: &str, run_id: &str) -> String {
    format!("sluice.status.{cluster}.{run_id}")
}

/// `sluice.status.*.<run_id>`: one run's states, for a reader that does not know the
/// run's cluster (the CLI, the dashboard).
pub fn status_of_run(run_id: &str) -> String {
    format!("sluice.status.*.{run_id}")
}

/// `sluice.status.>`: every state change.
pub const ALL_STATUS: &str = "sluice.status.>";

/// `sluice.logs.<cluster>.<run_id>`: a run's output.
pub fn logs(cluster: &str, run_id: &str) -> String {
    format!("sluice.logs.{cluster}.{run_id}")
}

/// `sluice.logs.*.<run_id>`: one run's output, whatever its cluster.
pub fn logs_of_run(run_id: &str) -> String {
    format!("sluice.logs.*.{run_id}")
}

/// `sluice.decisions.<digest of the event id>`.
pub fn decision(event_id: &str) -> String {
    format!("sluice.decisions.{}", crate::run::id_digest(event_id))
}

/// `sluice.deadletter.events`.
pub const DEADLETTER_EVENTS: &str = "sluice.deadletter.events";

/// `sluice.rerun`: requests to rerun a run ([`crate::run::RerunRequest`]), answered by
/// one dispatcher of the queue group [`RERUN_QUEUE`]. Core NATS, not stored.
pub const RERUN: &str = "sluice.rerun";

/// The queue group dispatchers answer [`RERUN`] in: one answer per request.
pub const RERUN_QUEUE: &str = "sluice-dispatcher";

/// `sluice.control.<cluster>.cancel`: cancel requests for the cluster's runners.
pub fn cancel(cluster: &str) -> String {
    format!("sluice.control.{cluster}.cancel")
}

/// `sluice.control.<cluster>.child.<parent run id>`: the final states of the child runs
/// of a run on the cluster, relayed by the dispatcher (a runner cannot read another
/// cluster's states).
pub fn child_result(cluster: &str, parent_run: &str) -> String {
    format!("sluice.control.{cluster}.child.{parent_run}")
}

/// `sluice.control.<cluster>.>`: everything for the cluster's runners.
pub fn control(cluster: &str) -> String {
    format!("sluice.control.{cluster}.>")
}

/// `sluice.children.<cluster>.<parent run id>`: a runner's request to start or cancel
/// the child run of one of its runs.
pub fn child_request(cluster: &str, parent_run: &str) -> String {
    format!("sluice.children.{cluster}.{parent_run}")
}

/// The cluster named by a subject of the form `sluice.<kind>.<cluster>.…` (run states,
/// logs, control messages, child requests, run requests).
pub fn cluster_of(subject: &str) -> Option<&str> {
    let mut parts = subject.split('.');
    (parts.next()? == "sluice").then_some(())?;
    parts.next()?;
    parts.next().filter(|c| !c.is_empty())
}

// === Key-value keys ===

/// A runner's heartbeat key in [`RUNNERS_BUCKET`]: `<cluster>.<runner id>`, so a
/// runner's credential can be limited to its own cluster's keys.
pub fn runner_key(cluster: &str, runner_id: &str) -> String {
    format!("{cluster}.{runner_id}")
}

/// A commit's `.sluice/` listing's key in [`REPO_FILES_BUCKET`]: the hex SHA-256 of
/// `<provider>:<repo>:<git ref>`, since repository paths hold characters a key may not.
pub fn repo_files_key(provider: &str, repo: &str, git_ref: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(format!("{provider}:{repo}:{git_ref}")))
}

/// Prefix of the keys in [`REPO_FILES_BUCKET`] that record what was last read from
/// each repository ([`crate::repo_pipelines::LastRead`]), beside the listings.
pub const REPO_LAST_READ_PREFIX: &str = "last.";

/// The key of a repository's [`crate::repo_pipelines::LastRead`].
pub fn repo_last_read_key(provider: &str, repo: &str) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "{REPO_LAST_READ_PREFIX}{}",
        hex::encode(Sha256::digest(format!("{provider}:{repo}")))
    )
}

/// `(cluster, runner id)` of a [`runner_key`].
pub fn parse_runner_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('.')
        .filter(|(c, r)| !c.is_empty() && !r.is_empty())
}

// === Consumers ===

/// Durable consumer of `SLUICE_EVENTS` that every dispatcher replica joins.
pub const DISPATCHER_CONSUMER: &str = "sluice-dispatcher";
/// Durable consumer of `SLUICE_STATUS` freeing concurrency slots and relaying child
/// results.
pub const DISPATCHER_STATUS_CONSUMER: &str = "sluice-dispatcher-groups";
/// Durable consumer of `SLUICE_CHILDREN`.
pub const DISPATCHER_CHILDREN_CONSUMER: &str = "sluice-dispatcher-children";
/// Durable consumer of `SLUICE_STATUS` that feeds commit statuses.
pub const REPORTER_CONSUMER: &str = "sluice-reporter";

/// The durable consumer a cluster's runners share (the consumer group).
pub fn runner_consumer(cluster: &str) -> String {
    format!("{RUNNER_CONSUMER_PREFIX}{cluster}")
}

/// The cluster whose runners share the durable consumer `name`, if it is one.
pub fn runner_consumer_cluster(name: &str) -> Option<&str> {
    name.strip_prefix(RUNNER_CONSUMER_PREFIX)
        .filter(|cluster| !cluster.is_empty())
}

const RUNNER_CONSUMER_PREFIX: &str = "sluice-runner-";

// === Message ids (`Nats-Msg-Id`) ===
//
// Every publish carries one, so a retried publish is stored once.

/// A run request's message id: its run id.
pub fn run_request_id(run_id: &str) -> String {
    run_id.to_owned()
}

/// A state change's message id: the same state of the same run or step reported twice
/// (a retry, a restarted runner, the dispatcher and a runner both cancelling a queued
/// run) is stored once.
pub fn status_id(run_id: &str, step: Option<&str>, state: &str) -> String {
    format!("{run_id}:{}:{state}", step.unwrap_or("-"))
}

/// A log chunk's message id.
pub fn log_chunk_id(run_id: &str, step: &str, seq: u64) -> String {
    format!("{run_id}:{step}:{seq}")
}

/// A cancel request's message id: one per run.
pub fn cancel_id(run_id: &str) -> String {
    format!("cancel:{run_id}")
}

/// A relayed child result's message id: one per child run.
pub fn child_result_id(child_run: &str) -> String {
    format!("child:{child_run}")
}

/// A child request's message id: one start and one cancel per parent step.
pub fn child_request_id(parent_run: &str, step: &str, action: &str) -> String {
    format!("{parent_run}:{step}:{action}")
}

/// A dead letter's message id: one per event stream sequence.
pub fn dead_letter_id(stream_sequence: u64) -> String {
    format!("dead:{stream_sequence}")
}

/// The delivery id part of a child run's event id: the parent run and the step.
pub fn child_delivery_id(parent_run: &str, step: &str) -> String {
    format!("{parent_run}-{step}")
}

/// Turns a forge's event name into one subject token: lower case, and anything that is
/// not `[a-z0-9_-]` (dots, spaces, wildcards) becomes `_`, so a hostile or odd header
/// can never add tokens to, or wildcard, a subject.
pub fn token(raw: &str) -> String {
    let token: String = raw
        .trim()
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_' | '-') => c,
            _ => '_',
        })
        .collect();
    if token.is_empty() {
        "unknown".to_owned()
    } else {
        token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_files_keys_are_hex_and_differ_by_every_part() {
        let k = repo_files_key("github", "acme/app", "0123");
        assert_eq!(k.len(), 64);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(k, repo_files_key("github", "acme/app", "0123"));
        assert_ne!(k, repo_files_key("gitlab", "acme/app", "0123"));
        assert_ne!(k, repo_files_key("github", "acme/other", "0123"));
        assert_ne!(k, repo_files_key("github", "acme/app", "0124"));
    }

    #[test]
    fn tokens_never_add_subject_levels_or_wildcards() {
        assert_eq!(token("Pipeline Hook"), "pipeline_hook");
        assert_eq!(token("a.b.>"), "a_b__");
        assert_eq!(token("check_run"), "check_run");
        assert_eq!(token("  "), "unknown");
        assert_eq!(event("github", &token("*")), "sluice.events.github._");
    }

    #[test]
    fn run_subjects_name_the_cluster_first() {
        assert_eq!(status("eu-1", "abc"), "sluice.status.eu-1.abc");
        assert_eq!(logs("eu-1", "abc"), "sluice.logs.eu-1.abc");
        assert_eq!(cancel("eu-1"), "sluice.control.eu-1.cancel");
        assert_eq!(child_result("eu-1", "abc"), "sluice.control.eu-1.child.abc");
        assert_eq!(child_request("eu-1", "abc"), "sluice.children.eu-1.abc");
        assert_eq!(runs("eu-1"), "sluice.runs.eu-1");
        for s in [
            status("eu-1", "abc"),
            logs("eu-1", "abc"),
            cancel("eu-1"),
            child_result("eu-1", "abc"),
            child_request("eu-1", "abc"),
            runs("eu-1"),
        ] {
            assert_eq!(cluster_of(&s), Some("eu-1"), "{s}");
        }
        assert_eq!(cluster_of("other.status.eu-1"), None);
        assert_eq!(cluster_of("sluice.status"), None);
        assert_eq!(status_of_run("abc"), "sluice.status.*.abc");
        assert_eq!(logs_of_run("abc"), "sluice.logs.*.abc");
    }

    #[test]
    fn runner_keys_round_trip() {
        let key = runner_key("eu-1", "runner-7");
        assert_eq!(key, "eu-1.runner-7");
        assert_eq!(parse_runner_key(&key), Some(("eu-1", "runner-7")));
        assert_eq!(parse_runner_key("eu-1"), None);
        assert_eq!(parse_runner_key(".x"), None);
        assert_eq!(runner_consumer("eu-1"), "sluice-runner-eu-1");
        assert_eq!(runner_consumer_cluster("sluice-runner-eu-1"), Some("eu-1"));
        assert_eq!(runner_consumer_cluster("sluice-runner-"), None);
        assert_eq!(runner_consumer_cluster("sluice-dispatcher"), None);
    }

    #[test]
    fn message_ids_are_stable() {
        assert_eq!(status_id("r", None, "running"), "r:-:running");
        assert_eq!(status_id("r", Some("build"), "failed"), "r:build:failed");
        assert_eq!(log_chunk_id("r", "build", 3), "r:build:3");
        assert_eq!(cancel_id("r"), "cancel:r");
        assert_eq!(child_result_id("c"), "child:c");
        assert_eq!(child_request_id("r", "deploy", "start"), "r:deploy:start");
        assert_eq!(dead_letter_id(42), "dead:42");
        assert_eq!(child_delivery_id("r", "deploy"), "r-deploy");
    }
}
