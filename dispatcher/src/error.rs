//! The one error type of `sluice-dispatcher`.
//!
//! Every variant keeps its cause (`#[source]`); callers decide on the variant, never on
//! the text: [`Error::is_retryable`] for the event and child-request loops,
//! [`Error::metric_label`] for metrics and logs.

use std::time::Duration;

use sluice_core::error::BoxError;
use sluice_core::Provider;

/// Why the dispatcher could not start, or could not process one event, child request
/// or commit status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Core(#[from] sluice_core::Error),

    /// A NATS or JetStream call failed, with what was being done; retried with backoff.
    #[error("{what}: {source}")]
    Nats {
        what: String,
        #[source]
        source: BoxError,
    },

    /// The event cannot be read as an envelope; retrying cannot help.
    #[error("not an event envelope: {0}")]
    Malformed(#[source] serde_json::Error),

    /// A forge's event must carry its delivery id; only manual events may leave it out.
    #[error("not an event envelope: a forge event without an `id`")]
    MissingEventId,

    #[error("the stored decision of {event_id} cannot be read: {source}")]
    StoredDecision {
        event_id: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("the stored state of concurrency group {key} cannot be read: {source}")]
    GroupState {
        key: String,
        #[source]
        source: serde_json::Error,
    },

    #[error("concurrency group {0:?} changed too often to update; will retry")]
    Contention(String),

    #[error("cannot encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("a dispatcher task stopped: {0}")]
    Task(#[from] tokio::task::JoinError),

    // === Settings ===
    #[error("invalid dispatcher settings: {setting} {requirement}")]
    InvalidSetting {
        setting: &'static str,
        requirement: &'static str,
    },

    #[error("GitHub API URL {url}: {}", github_message(.source))]
    GitHubUrl {
        url: String,
        #[source]
        source: octocrab::Error,
    },

    #[error("the GitHub App private key is not an RSA key in PEM format")]
    GitHubAppKey(#[source] octocrab::Error),

    #[error("cannot build the GitHub client: {}", github_message(.0))]
    GitHubClient(#[source] octocrab::Error),

    #[error("cannot build the HTTP client: {0}")]
    HttpClient(#[source] reqwest::Error),

    // === Forges ===
    /// No credentials for the forge: asking again will not help until it is configured.
    #[error("no {forge} credentials configured ({hint})")]
    NoCredentials {
        forge: &'static str,
        hint: &'static str,
    },

    #[error("the event names no repository or pull request")]
    NoPullRequest,

    #[error("no changed-files look-up for {0} events")]
    NoLookup(Provider),

    #[error("no commit statuses for {0} events")]
    NoStatuses(Provider),

    #[error("the forge API did not answer within {0:?}")]
    ForgeTimeout(Duration),

    #[error("GitHub API: {}", github_message(.0))]
    GitHub(#[source] octocrab::Error),

    #[error("GitLab API: {0}")]
    GitLab(#[source] reqwest::Error),

    #[error("GitLab API: unexpected answer: {0}")]
    GitLabAnswer(#[source] reqwest::Error),

    /// The forge refused the request for good (the repository or commit is gone, or
    /// the answer was not a success).
    #[error("{forge} API answered {status}")]
    ForgeStatus {
        forge: Provider,
        status: http::StatusCode,
    },

    /// The App is not installed on the repository: asking again will not help.
    #[error("the GitHub App is not installed on {repo}: {}", github_message(.source))]
    NotInstalled {
        repo: String,
        #[source]
        source: octocrab::Error,
    },

    #[error("cannot find the GitHub App's installation for {repo}: {}", github_message(.source))]
    Installation {
        repo: String,
        #[source]
        source: octocrab::Error,
    },

    #[error("GitHub App installation {id}: {}", github_message(.source))]
    InstallationClient {
        id: u64,
        #[source]
        source: octocrab::Error,
    },

    /// A `--recover-hooks` entry that names no hook.
    #[error("hook `{hook}`: {requirement}")]
    InvalidHook {
        hook: String,
        requirement: &'static str,
    },

    /// A forge answer that could not be read (too large, not the expected JSON).
    #[error("{what}: {source}")]
    ForgeAnswer {
        what: &'static str,
        #[source]
        source: BoxError,
    },

    /// A repository's `.sluice/` files could not be read. `retryable` when the forge
    /// may answer later (down, slow, rate-limited); otherwise `reason` says which
    /// setting or permission to fix.
    #[error("cannot read the .sluice/ files of {repo}: {reason}")]
    RepoFiles {
        repo: String,
        reason: String,
        retryable: bool,
    },

    /// A GitLab project membership could not be looked up. `retryable` when the forge
    /// may answer later (down, slow, rate-limited, the request budget spent).
    #[error("cannot look up a member of GitLab project {project}: {reason}")]
    Members {
        project: String,
        reason: String,
        retryable: bool,
    },

    // === Child requests ===
    #[error("`{0}` names no cluster")]
    ChildSubject(String),

    #[error("not a child request: {0}")]
    ChildRequestFormat(#[source] serde_json::Error),

    #[error("a request for run {0} on another run's subject")]
    ChildOtherSubject(String),

    /// The parent's decision is written after its run request, so a fast runner can
    /// ask first: retried.
    #[error("no decision for event {0} yet")]
    NoDecisionYet(String),

    #[error("event {event} started no run {run}")]
    NoSuchRun { event: String, run: String },

    #[error("run {run} runs on cluster {cluster}, not {asked}")]
    OtherCluster {
        run: String,
        cluster: String,
        asked: String,
    },

    #[error("pipeline {0} no longer exists")]
    PipelineGone(String),

    #[error("pipeline {pipeline} has no step {step}")]
    NoSuchStep { pipeline: String, step: String },

    #[error("step {step} of pipeline {pipeline} starts no child pipeline")]
    NotAChildStep { pipeline: String, step: String },

    /// The child's event was published but not decided yet: retried.
    #[error("child run {0} is not planned yet")]
    ChildNotPlanned(String),
}

impl Error {
    /// A NATS or JetStream call that failed, with what was being done.
    pub fn nats(what: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Nats {
            what: what.into(),
            source: source.into(),
        }
    }

    /// Whether trying the same event or request again can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::RepoFiles { retryable, .. } | Error::Members { retryable, .. } => *retryable,
            Error::Core(_)
            | Error::Nats { .. }
            | Error::Contention(_)
            | Error::Task(_)
            | Error::ForgeTimeout(_)
            | Error::GitHub(_)
            | Error::GitLab(_)
            | Error::GitLabAnswer(_)
            | Error::ForgeAnswer { .. }
            | Error::Installation { .. }
            | Error::InstallationClient { .. }
            | Error::NoDecisionYet(_)
            | Error::ChildNotPlanned(_) => true,
            Error::Malformed(_)
            | Error::MissingEventId
            | Error::StoredDecision { .. }
            | Error::GroupState { .. }
            | Error::Encode { .. }
            | Error::InvalidSetting { .. }
            | Error::InvalidHook { .. }
            | Error::GitHubUrl { .. }
            | Error::GitHubAppKey(_)
            | Error::GitHubClient(_)
            | Error::HttpClient(_)
            | Error::NoCredentials { .. }
            | Error::NoPullRequest
            | Error::NoLookup(_)
            | Error::NoStatuses(_)
            | Error::ForgeStatus { .. }
            | Error::NotInstalled { .. }
            | Error::ChildSubject(_)
            | Error::ChildRequestFormat(_)
            | Error::ChildOtherSubject(_)
            | Error::NoSuchRun { .. }
            | Error::OtherCluster { .. }
            | Error::PipelineGone(_)
            | Error::NoSuchStep { .. }
            | Error::NotAChildStep { .. } => false,
        }
    }

    /// A short, fixed label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Core(e) => e.metric_label(),
            Error::Nats { .. } => "nats",
            Error::Malformed(_) | Error::MissingEventId => "malformed",
            Error::StoredDecision { .. } => "stored_decision",
            Error::GroupState { .. } => "group_state",
            Error::Contention(_) => "contention",
            Error::Encode { .. } => "encode",
            Error::Task(_) => "task",
            Error::InvalidSetting { .. }
            | Error::InvalidHook { .. }
            | Error::GitHubUrl { .. }
            | Error::GitHubAppKey(_)
            | Error::GitHubClient(_)
            | Error::HttpClient(_) => "config",
            Error::NoCredentials { .. } => "no_credentials",
            Error::NoPullRequest | Error::NoLookup(_) | Error::NoStatuses(_) => "unsupported",
            Error::ForgeTimeout(_) => "forge_timeout",
            Error::GitHub(_)
            | Error::GitLab(_)
            | Error::GitLabAnswer(_)
            | Error::ForgeAnswer { .. } => "forge_api",
            Error::ForgeStatus { .. } => "forge_refused",
            Error::RepoFiles { .. } => "repo_files",
            Error::Members { .. } => "members",
            Error::NotInstalled { .. } => "not_installed",
            Error::Installation { .. } | Error::InstallationClient { .. } => "installation",
            Error::ChildSubject(_)
            | Error::ChildRequestFormat(_)
            | Error::ChildOtherSubject(_)
            | Error::NoSuchRun { .. }
            | Error::OtherCluster { .. }
            | Error::PipelineGone(_)
            | Error::NoSuchStep { .. }
            | Error::NotAChildStep { .. } => "child_refused",
            Error::NoDecisionYet(_) | Error::ChildNotPlanned(_) => "child_not_ready",
        }
    }
}

/// octocrab's message without request details: GitHub's own message and status, or the
/// first line of a transport error.
fn github_message(e: &octocrab::Error) -> String {
    match e {
        octocrab::Error::GitHub { source, .. } => {
            format!("{} ({})", source.message, source.status_code)
        }
        other => other
            .to_string()
            .lines()
            .next()
            .unwrap_or("request failed")
            .to_owned(),
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
