//! The delivery reconciler (`sluice dispatcher --recover-deliveries`): GitHub never
//! redelivers a failed webhook delivery by itself, and GitLab gives up after a few
//! retries, so every outage in front of `SLUICE_EVENTS` (NATS, ingest, the ingress, the
//! network) would lose its window's events. Periodically, one replica (a lease in
//! `SLUICE_DELIVERIES`) lists the recent deliveries of the configured hooks (GitHub's
//! App, repository and organisation hooks; GitLab project hooks, see [`gitlab`]) back
//! to a horizon, and asks the forge to redeliver each one that failed and has no event.
//! Ingest stores a redelivery under its original delivery id, so one that did arrive is
//! never doubled.
//!
//! What to do is decided in [`decide`] from what was read; this module only reads
//! and acts. Every redelivery is claimed first by a compare-and-set on its record, so
//! two reconcilers (a lease handed over mid-pass) never redeliver one delivery twice.

pub mod decide;
pub mod gitlab;
pub mod lease;
mod stored;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::Store;
use async_nats::jetstream::{self};
use bytes::Bytes;
use futures::TryStreamExt;
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use octocrab::Octocrab;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sluice_core::{streams, subjects, Provider};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::budget::ForgeBudget;
use crate::forge::ForgeConfig;
use crate::github::GitHub;
use crate::metrics::Metrics;
use crate::{Error, Result};
use decide::{Action, Delivery, Limits, Reason, Record, Records, State};

pub use lease::LEASE_KEY;

/// Default `--recover-horizon`.
pub const HORIZON: Duration = Duration::from_secs(6 * 3600);
/// GitHub keeps deliveries for redelivery this long; a longer horizon is refused
/// while a GitHub hook is reconciled.
pub const MAX_HORIZON: Duration = Duration::from_secs(3 * 24 * 3600);
/// GitLab lists a hook's events this long; a longer horizon is refused.
pub const GITLAB_MAX_HORIZON: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default `--recover-interval`.
pub const INTERVAL: Duration = Duration::from_secs(300);
/// Default `--recover-max-attempts`.
pub const MAX_ATTEMPTS: u32 = 3;
/// Default `--recover-requests-per-hour`, per forge: a tenth of GitHub's 5,000 an
/// hour (GitLab's API limits are higher; its resends are held to 5 a minute per
/// project by GitLab itself, which the reconciler waits out as a rate limit). With
/// `--report-statuses` every request is also taken from the reporter's budget
/// (`--forge-requests-per-hour`), so the two together stay within that; this cap keeps
/// reconciling from starving the statuses.
pub const REQUESTS_PER_HOUR: u32 = 500;
/// The key of the last pass's summary (`sluice events lost` shows it).
pub const PASS_KEY: &str = "pass";

/// GitHub's largest page.
const PER_PAGE: u32 = 100;
/// Pages read per hook and pass at most: 20,000 deliveries.
const MAX_PAGES: usize = 200;
/// A page of 100 GitHub deliveries is ~40 KB; anything far larger is not GitHub's
/// answer.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// A page of 100 GitLab events carries each payload: up to ~25 MB a page is GitLab's.
const GITLAB_MAX_BODY: usize = 64 * 1024 * 1024;

/// A hook whose deliveries are reconciled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    /// The GitHub App's own hook (`/app/hook`), read with the App's JWT.
    App,
    /// A repository hook (`/repos/<owner>/<name>/hooks/<id>`).
    Repo { repo: String, id: u64 },
    /// An organisation hook (`/orgs/<org>/hooks/<id>`).
    Org { org: String, id: u64 },
    /// A GitLab project hook (`/projects/<project>/hooks/<id>`): the project's numeric
    /// id or its path (`group/sub/project`).
    Gitlab { project: String, id: u64 },
}

impl Hook {
    /// `app`, `repo:<owner>/<name>:<id>`, `org:<org>:<id>` or
    /// `gitlab:<project id or path>:<id>` (a path also URL-encoded, as GitLab shows it).
    pub fn parse(s: &str) -> Result<Hook> {
        let invalid = |requirement| Error::InvalidHook {
            hook: s.to_owned(),
            requirement,
        };
        let name_ok = |n: &str| {
            !n.is_empty()
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        if s == "app" {
            return Ok(Hook::App);
        }
        const FORMS: &str =
            "must be app, repo:<owner>/<name>:<id>, org:<org>:<id> or gitlab:<project>:<id>";
        let (kind, rest) = s.split_once(':').ok_or(invalid(FORMS))?;
        let (name, id) = rest
            .rsplit_once(':')
            .ok_or(invalid("must end with :<hook id>"))?;
        let id: u64 = id
            .parse()
            .map_err(|_| invalid("the hook id must be a number"))?;
        match kind {
            "repo" => match name.split_once('/') {
                Some((owner, repo)) if name_ok(owner) && name_ok(repo) => Ok(Hook::Repo {
                    repo: name.to_owned(),
                    id,
                }),
                _ => Err(invalid("a repository is <owner>/<name>")),
            },
            "org" if name_ok(name) => Ok(Hook::Org {
                org: name.to_owned(),
                id,
            }),
            "gitlab" => {
                let project = name.replace("%2F", "/").replace("%2f", "/");
                let numeric = !project.is_empty() && project.bytes().all(|b| b.is_ascii_digit());
                let path = project.contains('/')
                    && project
                        .split('/')
                        .all(|p| name_ok(p) && p != "." && p != "..");
                if numeric || path {
                    Ok(Hook::Gitlab { project, id })
                } else {
                    Err(invalid(
                        "a GitLab project is its numeric id or its path <group>/<project>",
                    ))
                }
            }
            _ => Err(invalid(FORMS)),
        }
    }

    /// The forge, as event ids, records and the `forge` label name it.
    pub fn forge(&self) -> &'static str {
        self.provider().as_str()
    }

    fn provider(&self) -> Provider {
        match self {
            Hook::App | Hook::Repo { .. } | Hook::Org { .. } => Provider::Github,
            Hook::Gitlab { .. } => Provider::Gitlab,
        }
    }

    /// The forge's name in messages.
    fn forge_name(&self) -> &'static str {
        forge_name(self.provider())
    }

    /// The hook as `--recover-hooks` names it, for records and logs.
    pub fn name(&self) -> String {
        match self {
            Hook::App => "app".into(),
            Hook::Repo { repo, id } => format!("repo:{repo}:{id}"),
            Hook::Org { org, id } => format!("org:{org}:{id}"),
            Hook::Gitlab { project, id } => format!("gitlab:{project}:{id}"),
        }
    }

    /// The deliveries route (relative to the forge's API URL).
    fn deliveries(&self) -> String {
        match self {
            Hook::App => "/app/hook/deliveries".into(),
            Hook::Repo { repo, id } => format!("/repos/{repo}/hooks/{id}/deliveries"),
            Hook::Org { org, id } => format!("/orgs/{org}/hooks/{id}/deliveries"),
            Hook::Gitlab { project, id } => format!(
                "/projects/{}/hooks/{id}/events",
                gitlab::project_route(project)
            ),
        }
    }

    /// The route that redelivers the delivery `delivery_id` of this hook.
    fn redelivery(&self, delivery_id: u64) -> String {
        match self {
            Hook::Gitlab { .. } => format!("{}/{delivery_id}/resend", self.deliveries()),
            _ => format!("{}/{delivery_id}/attempts", self.deliveries()),
        }
    }
}

/// How deliveries are reconciled.
#[derive(Debug, Clone)]
pub struct RecoverConfig {
    pub hooks: Vec<Hook>,
    /// Deliveries older than this are left alone (at most [`MAX_HORIZON`] with a
    /// GitHub hook, [`GITLAB_MAX_HORIZON`] with GitLab's only).
    pub horizon: Duration,
    /// Time between passes; also the time a redelivery gets to arrive before the
    /// next is asked for.
    pub interval: Duration,
    /// Redeliveries of one delivery before it is reported lost.
    pub max_attempts: u32,
    /// Requests to each forge per hour, listing and redeliveries together.
    pub requests_per_hour: u32,
    /// This replica's name in the lease.
    pub holder: String,
}

impl Default for RecoverConfig {
    fn default() -> Self {
        RecoverConfig {
            hooks: vec![Hook::App],
            horizon: HORIZON,
            interval: INTERVAL,
            max_attempts: MAX_ATTEMPTS,
            requests_per_hour: REQUESTS_PER_HOUR,
            holder: default_holder(),
        }
    }
}

impl RecoverConfig {
    /// Refuses settings under which the reconciler could recover nothing.
    pub fn check(&self) -> Result<()> {
        let invalid = |setting, requirement| {
            Err(Error::InvalidSetting {
                setting,
                requirement,
            })
        };
        if self.hooks.is_empty() {
            return invalid("recover hooks", "must name at least one hook");
        }
        if self.horizon.is_zero() || self.horizon > GITLAB_MAX_HORIZON {
            return invalid(
                "recover horizon",
                "must be more than 0 and at most GitLab's 7 days",
            );
        }
        let github = self.hooks.iter().any(|h| h.provider() == Provider::Github);
        if github && self.horizon > MAX_HORIZON {
            return invalid(
                "recover horizon",
                "must be at most GitHub's 3 days while a GitHub hook is reconciled",
            );
        }
        if self.interval.is_zero() {
            return invalid("recover interval", "must be more than 0");
        }
        if self.max_attempts == 0 {
            return invalid("recover max attempts", "must be at least 1");
        }
        if self.requests_per_hour == 0 {
            return invalid("recover requests per hour", "must be at least 1");
        }
        Ok(())
    }
}

/// The host name and process id: unique enough to tell replicas apart in the lease.
fn default_holder() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "dispatcher".into());
    format!("{host}-{}", std::process::id())
}

/// What one pass found and did; stored under [`PASS_KEY`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub at: Option<OffsetDateTime>,
    pub holder: String,
    /// Deliveries listed within the horizon.
    pub listed: usize,
    /// Redeliveries the forges accepted.
    pub redelivered: usize,
    /// Deliveries stored after a redelivery.
    pub recovered: usize,
    /// Deliveries given up on.
    pub lost: usize,
    /// Redeliveries left for the next pass (budget spent, rate limited, shut down).
    pub deferred: usize,
    /// Hooks that could not be listed, with why.
    pub errors: Vec<String>,
}

/// How one pass may spend: until when it may wait for the budget, and which forges
/// it stopped asking (rate limited, budget spent, shutting down).
struct Pass<'a> {
    until: Instant,
    shutdown: &'a CancellationToken,
    stopped: Vec<Provider>,
}

impl Pass<'_> {
    fn stopped(&self, forge: Provider) -> bool {
        self.shutdown.is_cancelled() || self.stopped.contains(&forge)
    }

    fn stop(&mut self, forge: Provider) {
        if !self.stopped.contains(&forge) {
            self.stopped.push(forge);
        }
    }
}

/// GitLab's API with the token (`PRIVATE-TOKEN`).
struct GitLabApi {
    http: reqwest::Client,
    base: String,
    token: SecretString,
}

/// A reconciler: the forge clients, the bucket, the budget.
pub struct Reconciler {
    js: jetstream::Context,
    kv: Store,
    /// Present when a GitHub hook is reconciled.
    github: Option<GitHub>,
    /// Present when a GitLab hook is reconciled.
    gitlab: Option<GitLabApi>,
    config: RecoverConfig,
    metrics: Metrics,
    /// Its own `requests_per_hour`.
    budget: ForgeBudget,
    /// The commit status reporter's, when it runs: requests are taken from both.
    shared: Option<ForgeBudget>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("hooks", &self.config.hooks)
            .field("holder", &self.config.holder)
            .finish_non_exhaustive()
    }
}

/// Why a request was not answered usefully.
enum Refusal {
    /// The own budget is spent or the forge said to wait: stop asking it this pass.
    Wait,
    /// The forge refused for good (4xx other than a rate limit).
    Refused(http::StatusCode),
    /// Try again next pass (network, 5xx, unreadable answer).
    Failed(String),
}

impl Reconciler {
    /// A reconciler for `forge`'s credentials (GitHub's when a GitHub hook is
    /// reconciled, the GitLab token when a GitLab one is); the bucket must exist.
    pub async fn new(
        js: jetstream::Context,
        forge: &ForgeConfig,
        config: RecoverConfig,
        metrics: Metrics,
    ) -> Result<Self> {
        config.check()?;
        let wants = |p| config.hooks.iter().any(|h| h.provider() == p);
        let github = match wants(Provider::Github) {
            false => None,
            true => Some(
                GitHub::new(
                    &forge.github_api_url,
                    forge.github_token.as_ref(),
                    forge.github_app.as_ref(),
                )?
                .ok_or(crate::github::NO_CREDENTIALS)?,
            ),
        };
        if config.hooks.contains(&Hook::App)
            && github.as_ref().is_none_or(|g| g.app_client().is_none())
        {
            return Err(Error::NoCredentials {
                forge: "GitHub",
                hint: "a GitHub App (--github-app-id) to read the App's hook",
            });
        }
        let gitlab = match wants(Provider::Gitlab) {
            false => None,
            true => Some(GitLabApi {
                http: reqwest::Client::builder()
                    .user_agent("sluice-dispatcher")
                    .timeout(Duration::from_secs(30))
                    .build()
                    .map_err(Error::HttpClient)?,
                base: forge.gitlab_api_url.trim_end_matches('/').to_owned(),
                token: forge
                    .gitlab_token
                    .clone()
                    .ok_or(crate::forge::NO_GITLAB_TOKEN)?,
            }),
        };
        let kv = streams::bucket(&js, subjects::DELIVERIES_BUCKET).await?;
        let budget = ForgeBudget::new(config.requests_per_hour);
        Ok(Reconciler {
            js,
            kv,
            github,
            gitlab,
            config,
            metrics,
            budget,
            shared: None,
        })
    }

    /// Spends from `budget` too (the commit status reporter's), and pauses it when
    /// a forge says to wait.
    pub fn sharing(self, budget: ForgeBudget) -> Self {
        Reconciler {
            shared: Some(budget),
            ..self
        }
    }

    /// One request from its own budget and the shared one; when either has none, how
    /// long until the next (`None` while paused).
    fn take(&self, forge: Provider) -> std::result::Result<(), Option<Duration>> {
        let now = Instant::now();
        self.budget.take(forge, now)?;
        match self.shared.as_ref().map(|b| b.take(forge, now)) {
            None | Some(Ok(())) => Ok(()),
            Some(Err(wait)) => {
                self.budget.refund(forge, now);
                Err(wait)
            }
        }
    }

    /// One pass over every hook at `now`, whether or not this replica holds the lease
    /// (the loop in [`run`] takes it first). Stops between requests on `shutdown`.
    pub async fn reconcile(
        &self,
        now: OffsetDateTime,
        shutdown: &CancellationToken,
    ) -> Result<Summary> {
        let horizon = time::Duration::try_from(self.config.horizon).unwrap_or(time::Duration::MAX);
        let horizon_start = now - horizon;
        let mut summary = Summary {
            at: Some(now),
            holder: self.config.holder.clone(),
            ..Summary::default()
        };
        // The listing comes first: anything stored after it was read is in the set
        // below, so a delivery arriving meanwhile is never taken for a missing one.
        // A pass waits for its budget for half an interval at most, so that passes
        // never pile up and a busy hook is still read further back than one burst.
        let mut ctl = Pass {
            until: Instant::now() + self.config.interval / 2,
            shutdown,
            stopped: Vec::new(),
        };
        let mut listings = Vec::new();
        for hook in &self.config.hooks {
            match self.list(hook, horizon_start, &mut ctl).await {
                Ok(listing) => listings.push((hook, listing)),
                Err(why) => {
                    tracing::warn!(hook = %hook.name(), error = %why, "cannot list the hook's deliveries");
                    summary.errors.push(format!("{}: {why}", hook.name()));
                }
            }
        }
        let mut stored = std::collections::HashSet::new();
        for forge in [Provider::Github, Provider::Gitlab] {
            if self.config.hooks.iter().any(|h| h.provider() == forge) {
                stored.extend(stored::event_ids(&self.js, horizon_start, forge.as_str()).await?);
            }
        }
        let records = self.records().await?;
        let limits = Limits {
            horizon_start,
            max_attempts: self.config.max_attempts,
            spacing: self.config.interval,
            now,
        };
        for (hook, listing) in listings {
            summary.listed += listing.len();
            let actions = decide::plan(
                hook.forge(),
                &hook.name(),
                &listing,
                &stored,
                &records,
                &limits,
            );
            for action in actions {
                self.act(hook, action, &records, &mut ctl, &mut summary)
                    .await?;
            }
        }
        self.remember(&summary).await;
        Ok(summary)
    }

    /// Carries out one action; one that needs the forge is deferred once the pass
    /// stopped asking it.
    async fn act(
        &self,
        hook: &Hook,
        action: Action,
        records: &Records,
        ctl: &mut Pass<'_>,
        summary: &mut Summary,
    ) -> Result<()> {
        let revision = |r: &Record| {
            records
                .get(&decide::record_key(&r.forge, &r.guid))
                .map(|(_, rev)| *rev)
        };
        match action {
            Action::Recovered { record } => {
                if self.claim(&record, revision(&record)).await?.is_some() {
                    tracing::info!(guid = %record.guid, event = %record.event, attempts = record.attempts, "redelivered delivery stored");
                    self.metrics.delivery_recovered(hook.forge());
                    summary.recovered += 1;
                }
                Ok(())
            }
            Action::Lost { record } => {
                if self.claim(&record, revision(&record)).await?.is_some() {
                    self.report_lost(hook, &record);
                    summary.lost += 1;
                }
                Ok(())
            }
            Action::Redeliver {
                delivery_id,
                record,
            } => {
                if ctl.stopped(hook.provider()) || !self.spend(hook.provider(), ctl).await {
                    summary.deferred += 1;
                    return Ok(());
                }
                let previous = records
                    .get(&decide::record_key(&record.forge, &record.guid))
                    .cloned();
                let go_on = self
                    .redeliver(hook, delivery_id, record, previous, summary)
                    .await?;
                if !go_on {
                    ctl.stop(hook.provider());
                }
                Ok(())
            }
        }
    }

    /// Takes one request to `forge` from the budget, waiting for it until the pass's
    /// deadline; `false` (and the pass stops asking that forge) when paused by it,
    /// spent until after the deadline, or shutting down.
    async fn spend(&self, forge: Provider, ctl: &mut Pass<'_>) -> bool {
        loop {
            if ctl.shutdown.is_cancelled() {
                ctl.stop(forge);
                return false;
            }
            let wait = match self.take(forge) {
                Ok(()) => return true,
                Err(Some(wait)) if Instant::now() + wait <= ctl.until => wait,
                Err(_) => {
                    ctl.stop(forge);
                    return false;
                }
            };
            tokio::select! {
                () = ctl.shutdown.cancelled() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Asks for one redelivery (its request already taken from the budget); `false`
    /// when the pass should stop asking the forge.
    async fn redeliver(
        &self,
        hook: &Hook,
        delivery_id: u64,
        record: Record,
        previous: Option<(Record, u64)>,
        summary: &mut Summary,
    ) -> Result<bool> {
        // The claim: only one reconciler gets past it per attempt.
        let Some(claimed) = self
            .claim(&record, previous.as_ref().map(|(_, rev)| *rev))
            .await?
        else {
            return Ok(true);
        };
        let route = hook.redelivery(delivery_id);
        match self.post(hook, &route).await {
            Ok(()) => {
                tracing::info!(hook = %hook.name(), guid = %record.guid, delivery_id, attempt = record.attempts, "asked the forge to redeliver a delivery that has no event");
                summary.redelivered += 1;
                Ok(true)
            }
            Err(Refusal::Wait) => {
                // Not redelivered: the attempt is handed back.
                self.undo(&record, previous, claimed).await;
                summary.deferred += 1;
                Ok(false)
            }
            Err(Refusal::Refused(status)) => {
                let lost = Record {
                    state: State::Lost,
                    reason: Some(Reason::Refused),
                    detail: Some(format!(
                        "{} answered {status} to the redelivery",
                        hook.forge_name()
                    )),
                    ..record
                };
                if self.claim(&lost, Some(claimed)).await?.is_some() {
                    self.report_lost(hook, &lost);
                    summary.lost += 1;
                }
                Ok(true)
            }
            Err(Refusal::Failed(why)) => {
                // Counted as an attempt: one that keeps failing ends as lost.
                tracing::warn!(hook = %hook.name(), guid = %record.guid, error = %why, "redelivery request failed; will retry");
                Ok(true)
            }
        }
    }

    fn report_lost(&self, hook: &Hook, record: &Record) {
        let reason = record.reason.unwrap_or(Reason::AttemptsExhausted);
        tracing::error!(
            hook = %record.hook,
            guid = %record.guid,
            event = %record.event,
            reason = reason.as_str(),
            detail = record.detail.as_deref().unwrap_or(""),
            "webhook delivery cannot be recovered: it must be redelivered by hand (sluice events lost)"
        );
        self.metrics
            .delivery_unrecoverable(hook.forge(), reason.as_str());
    }

    /// Stores `record` if its key is still at `revision` (absent when `None`); the new
    /// revision, or `None` when another reconciler changed it first.
    async fn claim(&self, record: &Record, revision: Option<u64>) -> Result<Option<u64>> {
        let key = decide::record_key(&record.forge, &record.guid);
        let value: Bytes = serde_json::to_vec(record)
            .map_err(|source| Error::Encode {
                what: "a delivery record",
                source,
            })?
            .into();
        use async_nats::jetstream::kv::{CreateErrorKind, UpdateErrorKind};
        match revision {
            Some(rev) => match self.kv.update(&key, value, rev).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
                Err(e) => Err(Error::nats("store a delivery record", e)),
            },
            None => match self.kv.create(&key, value).await {
                Ok(rev) => Ok(Some(rev)),
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(Error::nats("create a delivery record", e)),
            },
        }
    }

    /// Puts the record back as it was before a claim whose redelivery was not made.
    async fn undo(&self, record: &Record, previous: Option<(Record, u64)>, claimed: u64) {
        let key = decide::record_key(&record.forge, &record.guid);
        let undone = match previous {
            Some((previous, _)) => match serde_json::to_vec(&previous) {
                Ok(v) => self
                    .kv
                    .update(&key, v.into(), claimed)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            },
            None => self
                .kv
                .delete_expect_revision(&key, Some(claimed))
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = undone {
            // One attempt is counted that was not made: the delivery may be reported
            // lost one redelivery early.
            tracing::warn!(guid = %record.guid, error = %e, "cannot hand back a redelivery attempt");
        }
    }

    async fn records(&self) -> Result<Records> {
        records(&self.kv).await
    }

    /// Stores the pass's summary for `sluice events lost`; a failure only costs that.
    async fn remember(&self, summary: &Summary) {
        if let Ok(value) = serde_json::to_vec(summary) {
            if let Err(e) = self.kv.put(PASS_KEY, value.into()).await {
                tracing::warn!(error = %e, "cannot store the reconcile summary");
            }
        }
    }

    /// The client for `hook`: the App's JWT for its own hook, else the installation
    /// (or the token) of the repository or organisation.
    async fn client(&self, hook: &Hook) -> std::result::Result<Octocrab, String> {
        let github = self
            .github
            .as_ref()
            .ok_or_else(|| "no GitHub credentials configured".to_owned())?;
        match hook {
            Hook::App => github
                .app_client()
                .ok_or_else(|| "no GitHub App configured".to_owned()),
            Hook::Repo { repo, .. } => github.client(repo).await.map_err(|e| e.to_string()),
            Hook::Org { org, .. } => github.org_client(org).await.map_err(|e| e.to_string()),
            Hook::Gitlab { .. } => Err("not a GitHub hook".to_owned()),
        }
    }

    /// The hook's deliveries back to `horizon_start`, newest first; fewer when the
    /// budget ran out (the pass acts on what it read).
    async fn list(
        &self,
        hook: &Hook,
        horizon_start: OffsetDateTime,
        ctl: &mut Pass<'_>,
    ) -> std::result::Result<Vec<Delivery>, String> {
        if let Hook::Gitlab { .. } = hook {
            return self.list_gitlab(hook, horizon_start, ctl).await;
        }
        let client = self.client(hook).await?;
        let mut deliveries = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            if ctl.stopped(Provider::Github) || !self.spend(Provider::Github, ctl).await {
                break;
            }
            let mut route = format!("{}?per_page={PER_PAGE}", hook.deliveries());
            if let Some(c) = &cursor {
                route.push_str("&cursor=");
                route.push_str(&form_urlencoded::byte_serialize(c.as_bytes()).collect::<String>());
            }
            let (page, link) = match self.get_page(&client, &route).await {
                Ok(answer) => answer,
                Err(Refusal::Wait) => {
                    ctl.stop(Provider::Github);
                    break;
                }
                Err(Refusal::Refused(status)) => return Err(format!("GitHub answered {status}")),
                Err(Refusal::Failed(why)) => return Err(why),
            };
            let done = decide::reaches_horizon(&page, horizon_start);
            deliveries.extend(page);
            cursor = link.as_deref().and_then(decide::next_cursor);
            if done || cursor.is_none() {
                break;
            }
        }
        Ok(deliveries)
    }

    /// A GitLab project hook's events back to `horizon_start`, page by page.
    async fn list_gitlab(
        &self,
        hook: &Hook,
        horizon_start: OffsetDateTime,
        ctl: &mut Pass<'_>,
    ) -> std::result::Result<Vec<Delivery>, String> {
        let api = self
            .gitlab
            .as_ref()
            .ok_or_else(|| "no GitLab token configured".to_owned())?;
        let mut deliveries = Vec::new();
        let mut page = 1;
        for _ in 0..MAX_PAGES {
            if ctl.stopped(Provider::Gitlab) || !self.spend(Provider::Gitlab, ctl).await {
                break;
            }
            let url = format!(
                "{}{}?per_page={}&page={page}",
                api.base,
                hook.deliveries(),
                gitlab::PER_PAGE
            );
            let (events, next) = match self.gitlab_page(api, &url).await {
                Ok(answer) => answer,
                Err(Refusal::Wait) => {
                    ctl.stop(Provider::Gitlab);
                    break;
                }
                Err(Refusal::Refused(status)) => return Err(format!("GitLab answered {status}")),
                Err(Refusal::Failed(why)) => return Err(why),
            };
            let done = events.iter().any(|e| e.created_at < horizon_start);
            let unmatched = events.iter().filter(|e| e.delivery_id().is_none()).count();
            if unmatched > 0 {
                // GitLab before 15.x sent no event UUID; such a delivery cannot be told
                // from its event, so it is never resent.
                tracing::warn!(hook = %hook.name(), unmatched, "GitLab hook events without an Idempotency-Key or event UUID are left alone");
            }
            deliveries.extend(events.iter().filter_map(gitlab::HookEvent::delivery));
            match next {
                Some(n) if !done && n > page => page = n,
                _ => break,
            }
        }
        Ok(deliveries)
    }

    async fn gitlab_page(
        &self,
        api: &GitLabApi,
        url: &str,
    ) -> std::result::Result<(Vec<gitlab::HookEvent>, Option<u32>), Refusal> {
        let mut response = api
            .http
            .get(url)
            .header("PRIVATE-TOKEN", api.token.expose_secret())
            .send()
            .await
            .map_err(|e| Refusal::Failed(Error::GitLab(e.without_url()).to_string()))?;
        self.refused(Provider::Gitlab, response.status(), response.headers())?;
        let next = gitlab::next_page(
            response
                .headers()
                .get("x-next-page")
                .and_then(|v| v.to_str().ok()),
        );
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| Refusal::Failed(Error::GitLab(e.without_url()).to_string()))?
        {
            if body.len() + chunk.len() > GITLAB_MAX_BODY {
                return Err(Refusal::Failed(
                    "GitLab's list of hook events is too large".into(),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let events: Vec<gitlab::HookEvent> = serde_json::from_slice(&body).map_err(|e| {
            Refusal::Failed(
                Error::ForgeAnswer {
                    what: "GitLab's list of hook events",
                    source: e.into(),
                }
                .to_string(),
            )
        })?;
        Ok((events, next))
    }

    async fn get_page(
        &self,
        client: &Octocrab,
        route: &str,
    ) -> std::result::Result<(Vec<Delivery>, Option<String>), Refusal> {
        let response = client
            ._get(route)
            .await
            .map_err(|e| Refusal::Failed(Error::GitHub(e).to_string()))?;
        self.refused(Provider::Github, response.status(), response.headers())?;
        let link = response
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = bounded(response)
            .await
            .map_err(|e| Refusal::Failed(e.to_string()))?;
        let page: Vec<Delivery> = serde_json::from_slice(&body).map_err(|e| {
            Refusal::Failed(
                Error::ForgeAnswer {
                    what: "GitHub's list of deliveries",
                    source: e.into(),
                }
                .to_string(),
            )
        })?;
        Ok((page, link))
    }

    async fn post(&self, hook: &Hook, route: &str) -> std::result::Result<(), Refusal> {
        if let Hook::Gitlab { .. } = hook {
            let api = self
                .gitlab
                .as_ref()
                .ok_or_else(|| Refusal::Failed("no GitLab token configured".into()))?;
            let response = api
                .http
                .post(format!("{}{route}", api.base))
                .header("PRIVATE-TOKEN", api.token.expose_secret())
                .send()
                .await
                .map_err(|e| Refusal::Failed(Error::GitLab(e.without_url()).to_string()))?;
            return self.refused(Provider::Gitlab, response.status(), response.headers());
        }
        let client = self.client(hook).await.map_err(Refusal::Failed)?;
        let response = client
            ._post(route, None::<&()>)
            .await
            .map_err(|e| Refusal::Failed(Error::GitHub(e).to_string()))?;
        self.refused(Provider::Github, response.status(), response.headers())
    }

    /// `Ok` for a 2xx; a rate limit pauses the forge's budget.
    fn refused(
        &self,
        forge: Provider,
        status: http::StatusCode,
        headers: &http::HeaderMap,
    ) -> std::result::Result<(), Refusal> {
        if status.is_success() {
            return Ok(());
        }
        let name = forge_name(forge);
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        let limit = RateLimit::of(forge);
        if limit.statuses.contains(&status.as_u16()) {
            let wait = decide::rate_limit_wait(
                status.as_u16(),
                header("retry-after"),
                header(limit.remaining),
                header(limit.reset),
                OffsetDateTime::now_utc(),
            );
            if let Some(wait) = wait {
                tracing::warn!(
                    forge = name,
                    ?wait,
                    "forge rate limit reached; pausing delivery recovery"
                );
                let now = Instant::now();
                for budget in std::iter::once(&self.budget).chain(&self.shared) {
                    budget.pause(forge, now, now + wait);
                }
                return Err(Refusal::Wait);
            }
        }
        if status.is_client_error() {
            Err(Refusal::Refused(status))
        } else {
            Err(Refusal::Failed(format!("{name} answered {status}")))
        }
    }
}

/// A forge's name in messages.
fn forge_name(forge: Provider) -> &'static str {
    match forge {
        Provider::Gitlab => "GitLab",
        _ => "GitHub",
    }
}

/// How a forge answers a spent rate limit: the statuses, and the headers that say how
/// many requests are left and when the limit resets (Unix seconds).
struct RateLimit {
    statuses: &'static [u16],
    remaining: &'static str,
    reset: &'static str,
}

impl RateLimit {
    fn of(forge: Provider) -> RateLimit {
        match forge {
            // GitLab answers 403 for a missing permission only; its limits are 429s.
            Provider::Gitlab => RateLimit {
                statuses: &[429],
                remaining: "ratelimit-remaining",
                reset: "ratelimit-reset",
            },
            _ => RateLimit {
                statuses: &[403, 429],
                remaining: "x-ratelimit-remaining",
                reset: "x-ratelimit-reset",
            },
        }
    }
}

/// The body, at most [`MAX_BODY`] bytes.
async fn bounded(response: http::Response<BoxBody<Bytes, octocrab::Error>>) -> Result<Bytes> {
    let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY);
    let collected = limited
        .collect()
        .await
        .map_err(|source| Error::ForgeAnswer {
            what: "GitHub's answer (too large, or cut off)",
            source,
        })?;
    Ok(collected.to_bytes())
}

/// What `sluice events lost` shows: the deliveries given up on (oldest first) and the
/// last pass.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LostReport {
    pub last_pass: Option<Summary>,
    pub lost: Vec<Record>,
}

/// Reads the reconciler's bucket for [`LostReport`]; records it cannot read are skipped.
pub async fn lost(js: &jetstream::Context) -> Result<LostReport> {
    let kv = streams::bucket(js, subjects::DELIVERIES_BUCKET).await?;
    let mut report = LostReport::default();
    if let Ok(Some(pass)) = kv.get(PASS_KEY).await {
        report.last_pass = serde_json::from_slice(&pass).ok();
    }
    report.lost = records(&kv)
        .await?
        .into_values()
        .map(|(record, _)| record)
        .filter(|r| r.state == State::Lost)
        .collect();
    report.lost.sort_by_key(|r| r.first_delivered_at);
    Ok(report)
}

/// Every delivery record in the bucket (only failed deliveries have one, so few), with
/// its revision; the bucket's other keys (the lease, the last pass) have no dot.
async fn records(kv: &Store) -> Result<Records> {
    let keys: Vec<String> = kv
        .keys()
        .await
        .map_err(|e| Error::nats("list delivery records", e))?
        .try_collect()
        .await
        .map_err(|e| Error::nats("list delivery records", e))?;
    let mut records = Records::new();
    for key in keys.into_iter().filter(|k| k.contains('.')) {
        let Some(entry) = kv
            .entry(&key)
            .await
            .map_err(|e| Error::nats("read a delivery record", e))?
        else {
            continue;
        };
        if let Ok(record) = serde_json::from_slice::<Record>(&entry.value) {
            records.insert(key, (record, entry.revision));
        }
    }
    Ok(records)
}

/// Runs passes every `config.interval` until `shutdown`, on the replica holding the
/// lease.
pub async fn run(reconciler: Arc<Reconciler>, shutdown: CancellationToken) {
    let interval = reconciler.config.interval;
    // Longer than a pass between renewals, so a healthy holder keeps it; short enough
    // that another replica takes over within a few intervals of a crash.
    let ttl = interval * 3;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = OffsetDateTime::now_utc();
        match lease::acquire(&reconciler.kv, &reconciler.config.holder, now, ttl).await {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "cannot take the delivery reconciler's lease");
                continue;
            }
        }
        match reconciler.reconcile(now, &shutdown).await {
            Ok(s) if s.redelivered + s.lost + s.recovered > 0 || !s.errors.is_empty() => {
                tracing::info!(
                    listed = s.listed,
                    redelivered = s.redelivered,
                    recovered = s.recovered,
                    lost = s.lost,
                    deferred = s.deferred,
                    errors = s.errors.len(),
                    "deliveries reconciled"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconciling deliveries failed; will retry"),
        }
    }
    lease::release(&reconciler.kv, &reconciler.config.holder).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_named_as_the_flag_takes_them() {
        assert_eq!(Hook::parse("app").ok(), Some(Hook::App));
        let repo = Hook::parse("repo:acme/app:123").expect("repo hook");
        assert_eq!(
            repo,
            Hook::Repo {
                repo: "acme/app".into(),
                id: 123
            }
        );
        assert_eq!(repo.deliveries(), "/repos/acme/app/hooks/123/deliveries");
        let org = Hook::parse("org:acme:456").expect("org hook");
        assert_eq!(org.deliveries(), "/orgs/acme/hooks/456/deliveries");
        assert_eq!(org.name(), "org:acme:456");
        let gitlab = Hook::parse("gitlab:acme/sub/app:7").expect("gitlab hook");
        assert_eq!(
            gitlab.deliveries(),
            "/projects/acme%2Fsub%2Fapp/hooks/7/events"
        );
        assert_eq!(
            gitlab.redelivery(9),
            "/projects/acme%2Fsub%2Fapp/hooks/7/events/9/resend"
        );
        assert_eq!(
            (gitlab.name().as_str(), gitlab.forge()),
            ("gitlab:acme/sub/app:7", "gitlab")
        );
        assert_eq!(
            Hook::parse("gitlab:acme%2Fapp:7").ok(),
            Some(Hook::Gitlab {
                project: "acme/app".into(),
                id: 7
            }),
            "as GitLab shows it encoded"
        );
        let numeric = Hook::parse("gitlab:42:7").expect("by project id");
        assert_eq!(numeric.deliveries(), "/projects/42/hooks/7/events");
        assert_eq!(
            repo.redelivery(9),
            "/repos/acme/app/hooks/123/deliveries/9/attempts"
        );
        for bad in [
            "",
            "repo:acme:1",
            "repo:acme/app",
            "org:acme:x",
            "org:ac/me:1",
            "repo:../x/y:1",
            "user:me:1",
            "gitlab:acme:1",
            "gitlab:acme/../x:1",
            "gitlab:acme/app",
            "gitlab::1",
            "gitlab:acme//app:1",
        ] {
            assert!(Hook::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_that_could_recover_nothing_are_refused() {
        assert!(RecoverConfig::default().check().is_ok());
        for bad in [
            RecoverConfig {
                hooks: vec![],
                ..RecoverConfig::default()
            },
            RecoverConfig {
                horizon: MAX_HORIZON + Duration::from_secs(1),
                ..RecoverConfig::default()
            },
            RecoverConfig {
                max_attempts: 0,
                ..RecoverConfig::default()
            },
            RecoverConfig {
                requests_per_hour: 0,
                ..RecoverConfig::default()
            },
            RecoverConfig {
                horizon: GITLAB_MAX_HORIZON + Duration::from_secs(1),
                hooks: vec![gitlab_hook()],
                ..RecoverConfig::default()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
        // GitLab lists 7 days: a longer horizon than GitHub's 3 is fine for it alone.
        let gitlab_only = RecoverConfig {
            horizon: GITLAB_MAX_HORIZON,
            hooks: vec![gitlab_hook()],
            ..RecoverConfig::default()
        };
        assert!(gitlab_only.check().is_ok());
        let both = RecoverConfig {
            hooks: vec![gitlab_hook(), Hook::App],
            ..gitlab_only
        };
        assert!(
            both.check().is_err(),
            "GitHub's 3 days hold with a GitHub hook"
        );
    }

    fn gitlab_hook() -> Hook {
        Hook::Gitlab {
            project: "acme/app".into(),
            id: 1,
        }
    }

    #[test]
    fn only_gitlab_429s_are_rate_limits() {
        assert_eq!(RateLimit::of(Provider::Gitlab).statuses, [429]);
        assert_eq!(RateLimit::of(Provider::Gitlab).reset, "ratelimit-reset");
        assert_eq!(RateLimit::of(Provider::Github).statuses, [403, 429]);
    }
}
