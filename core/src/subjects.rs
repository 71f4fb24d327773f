//! Stream and subject names: the public contract on the bus.

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
/// Control messages to runners (cancel requests).
pub const CONTROL_STREAM: &str = "SLUICE_CONTROL";
/// Key-value bucket of pipelines, keyed by name.
pub const PIPELINES_BUCKET: &str = "SLUICE_PIPELINES";
/// Key-value bucket of live runners: `<cluster>.<runner id>`, expiring unless renewed.
pub const RUNNERS_BUCKET: &str = "SLUICE_RUNNERS";
/// Key-value bucket of commit statuses waiting to be sent to the forges, by run id.
pub const REPORTS_BUCKET: &str = "SLUICE_REPORTS";
/// Key-value bucket of concurrency group states.
pub const GROUPS_BUCKET: &str = "SLUICE_GROUPS";
/// Object store bucket holding webhook bodies too large for one NATS message.
pub const PAYLOADS_BUCKET: &str = "SLUICE_PAYLOADS";

/// `sluice.events.<provider>.<kind>`.
pub fn event(provider: &str, kind: &str) -> String {
    format!("sluice.events.{provider}.{kind}")
}

/// `sluice.runs.<cluster>`.
pub fn runs(cluster: &str) -> String {
    format!("sluice.runs.{cluster}")
}

/// `sluice.status.<run_id>`.
pub fn status(run_id: &str) -> String {
    format!("sluice.status.{run_id}")
}

/// `sluice.logs.<run_id>`.
pub fn logs(run_id: &str) -> String {
    format!("sluice.logs.{run_id}")
}

/// `sluice.decisions.<digest of the event id>`.
pub fn decision(event_id: &str) -> String {
    format!("sluice.decisions.{}", crate::run::id_digest(event_id))
}

/// `sluice.deadletter.events`.
pub const DEADLETTER_EVENTS: &str = "sluice.deadletter.events";

/// `sluice.control.<cluster>.cancel`.
pub fn cancel(cluster: &str) -> String {
    format!("sluice.control.{cluster}.cancel")
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
    fn tokens_never_add_subject_levels_or_wildcards() {
        assert_eq!(token("Pipeline Hook"), "pipeline_hook");
        assert_eq!(token("a.b.>"), "a_b__");
        assert_eq!(token("check_run"), "check_run");
        assert_eq!(token("  "), "unknown");
        assert_eq!(event("github", &token("*")), "sluice.events.github._");
    }
}
