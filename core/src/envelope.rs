//! The normalized event envelope published on `SLUICE_EVENTS`.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use time::OffsetDateTime;

/// Where an event came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Github,
    Gitlab,
    /// Any sender that signs Standard Webhooks.
    Generic,
    /// Published by hand (`sluice events publish`, `nats pub`).
    #[default]
    Manual,
}

impl Provider {
    /// The lower-case name used in subjects and event ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Github => "github",
            Provider::Gitlab => "gitlab",
            Provider::Generic => "generic",
            Provider::Manual => "manual",
        }
    }

    /// The provider an event id names (`<provider>:<delivery id>`, as [`Event::new`]
    /// writes it); `None` for an id of another form.
    pub fn of_event_id(event_id: &str) -> Option<Provider> {
        let (name, _) = event_id.split_once(':')?;
        [
            Provider::Github,
            Provider::Gitlab,
            Provider::Generic,
            Provider::Manual,
        ]
        .into_iter()
        .find(|p| p.as_str() == name)
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kinds Sluice understands; any other provider event keeps its own lower-case name.
pub mod kind {
    pub const PUSH: &str = "push";
    pub const TAG: &str = "tag";
    pub const PULL_REQUEST: &str = "pull_request";
    pub const COMMENT: &str = "comment";
    pub const PING: &str = "ping";
}

/// A webhook body stored beside the event because it is larger than one NATS message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PayloadRef {
    /// Object store bucket (`SLUICE_PAYLOADS`).
    pub bucket: String,
    /// Object name inside the bucket.
    pub key: String,
    /// Size of the stored body in bytes.
    pub size: u64,
    /// Hex SHA-256 of the stored body, so a reader can check what it fetched.
    pub sha256: String,
}

/// One accepted delivery, normalized. Fields a provider does not have are `null`.
///
/// Hand-written (manual) events may leave out anything: the dispatcher takes a missing
/// `id`, `provider` or `kind` from the message's subject and sequence.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// `<provider>:<delivery id>`; also the `Nats-Msg-Id`, so a redelivery is a duplicate.
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub provider: Provider,
    /// `push`, `tag`, `pull_request`, `comment`, `ping`, or the provider's own name.
    #[serde(default)]
    pub kind: String,
    /// The PR/MR action (`opened`, `synchronize`, …) or comment action.
    pub action: Option<String>,
    /// `owner/name` (GitLab: the full project path).
    pub repo: Option<String>,
    pub clone_url: Option<String>,
    /// The repository's default branch, when the payload names it.
    #[serde(default)]
    pub default_branch: Option<String>,
    /// The pushed ref, or a pull request's head ref (`refs/heads/…`, `refs/tags/…`).
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    /// The commit to build: the pushed head, or the pull request's head.
    pub sha: Option<String>,
    /// A pull request's target branch (`refs/heads/…`).
    pub base_ref: Option<String>,
    /// The target branch's commit the pull/merge request was based on, when the
    /// payload names it: where an untrusted request's repository pipelines are read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_sha: Option<String>,
    /// True when a pull/merge request's head is in another repository (a fork); `None`
    /// when the payload does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_fork: Option<bool>,
    /// Pull/merge request number (GitLab: the `iid`).
    pub pr: Option<u64>,
    pub pr_draft: Option<bool>,
    /// Login of whoever caused the event.
    pub actor: Option<String>,
    /// The forge's word on the actor's relation to the repository (`OWNER`, `MEMBER`,
    /// `COLLABORATOR`, …) when the payload carries it.
    pub actor_association: Option<String>,
    /// The forge's numeric user id of the actor, when the payload has it (GitLab: what
    /// its members API is asked about).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor_id: Option<u64>,
    /// Paths touched, when the payload lists them; `None` when it does not.
    pub changed_files: Option<Vec<String>>,
    /// False when the payload's list may be cut short (the forges cap commit lists).
    #[serde(default)]
    pub changed_files_complete: bool,
    /// The comment's body for `comment` events.
    pub comment: Option<String>,
    #[serde(with = "time::serde::rfc3339", default = "OffsetDateTime::now_utc")]
    pub received_at: OffsetDateTime,
    /// The provider's original payload, unless it was stored by reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<Box<RawValue>>,
    /// Where the original payload is when it was too large for one message.
    #[serde(default)]
    pub payload_ref: Option<PayloadRef>,
    /// Manual events only: start this pipeline, whatever its triggers say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// Child events only (published by the dispatcher): the run whose `pipeline:` step
    /// asked for this one, and its cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<crate::run::ParentRef>,
    /// Manual events only: a rerun of the event's runs counts up from 0, so it gets new
    /// run ids while a repeated delivery of the same rerun converges on one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
    /// Manual events only: run on these clusters (the first with a live runner)
    /// instead of the pipeline's own list: a child step's `runtime.cluster`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
    /// Reruns of a repository pipeline only: read its definitions here, where the run
    /// repeated read them ([`crate::repo_pipelines::rerun_source`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_pipelines_at: Option<crate::repo_pipelines::Pinned>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Event {
    /// A blank event of a kind, to be filled by a normalizer.
    pub fn new(provider: Provider, delivery_id: &str, kind: impl Into<String>) -> Self {
        Event {
            id: format!("{provider}:{delivery_id}"),
            provider,
            kind: kind.into(),
            action: None,
            repo: None,
            clone_url: None,
            default_branch: None,
            git_ref: None,
            sha: None,
            base_ref: None,
            base_sha: None,
            from_fork: None,
            pr: None,
            pr_draft: None,
            actor: None,
            actor_association: None,
            actor_id: None,
            changed_files: None,
            changed_files_complete: false,
            comment: None,
            received_at: OffsetDateTime::now_utc(),
            payload: None,
            payload_ref: None,
            pipeline: None,
            parent: None,
            attempt: 0,
            clusters: Vec::new(),
            repo_pipelines_at: None,
        }
    }

    /// Serializes the event with `raw` as its `payload`.
    ///
    /// `raw` must be one complete JSON value that the caller has already parsed (ingest
    /// has read its fields by then): splicing it in saves parsing a large body a second
    /// time on the hot path. `self.payload` must be `None`.
    pub fn to_json_with_payload(&self, raw: &[u8]) -> serde_json::Result<Vec<u8>> {
        debug_assert!(self.payload.is_none());
        let mut out = Vec::with_capacity(raw.len() + 1024);
        serde_json::to_writer(&mut out, self)?;
        // `out` is a JSON object: replace its closing brace with the payload member.
        out.pop();
        out.extend_from_slice(br#","payload":"#);
        out.extend_from_slice(raw);
        out.push(b'}');
        Ok(out)
    }

    /// The subject this event is published on.
    pub fn subject(&self) -> String {
        crate::subjects::event(self.provider.as_str(), &crate::subjects::token(&self.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_with_raw_payload() {
        let mut e = Event::new(Provider::Github, "d-1", kind::PUSH);
        e.git_ref = Some("refs/heads/main".into());
        e.payload = Some(RawValue::from_string(r#"{"a": [1, 2]}"#.into()).expect("raw json"));
        let json = serde_json::to_string(&e).expect("serialize");
        assert!(json.contains(r#""ref":"refs/heads/main""#), "{json}");
        assert!(json.contains(r#""payload":{"a": [1, 2]}"#), "{json}");
        let back: Event = serde_json::from_str(&json).expect("deserialize");
        let mut plain = back.clone();
        plain.payload = None;
        let spliced = plain
            .to_json_with_payload(br#"{"a": [1, 2]}"#)
            .expect("splice");
        let again: Event = serde_json::from_slice(&spliced).expect("spliced is valid JSON");
        assert_eq!(again.payload.expect("payload").get(), r#"{"a": [1, 2]}"#);
        assert_eq!(back.id, "github:d-1");
        assert_eq!(
            back.payload.as_ref().expect("payload").get(),
            r#"{"a": [1, 2]}"#
        );
        assert_eq!(back.subject(), "sluice.events.github.push");
    }

    #[test]
    fn an_event_id_names_its_provider() {
        for p in [
            Provider::Github,
            Provider::Gitlab,
            Provider::Generic,
            Provider::Manual,
        ] {
            let e = Event::new(p, "d:1", kind::PUSH);
            assert_eq!(Provider::of_event_id(&e.id), Some(p));
        }
        assert_eq!(Provider::of_event_id("bitbucket:1"), None);
        assert_eq!(Provider::of_event_id("github"), None);
    }
}
