//! Commit statuses back to the forges: one context per pipeline (`sluice/<pipeline>`),
//! with a link to the run.
//!
//! Two loops. *Intake* reads `SLUICE_STATUS` and stores the latest wanted status of each
//! run in the `SLUICE_REPORTS` bucket before acknowledging: rapid changes coalesce there,
//! and nothing is lost to a restart. *Flush* sends what the bucket holds within each
//! forge's rate limit (a token bucket sized from requests per hour), honours
//! `Retry-After` and GitHub's rate-limit headers, and removes an entry only once it was
//! sent and not superseded meanwhile. A spike of thousands of runs degrades to later
//! statuses, never to lost ones.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::kv::Store;
use async_nats::jetstream::{self, AckKind};
use futures::{StreamExt, TryStreamExt};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sluice_core::run::{RunState, StatusUpdate};
use sluice_core::streams;
use sluice_core::{subjects, Provider};
use tokio_util::sync::CancellationToken;

use crate::budget::ForgeBudget;
use crate::consume::{self, keep_consuming, Consuming};
use crate::forge::ForgeConfig;
use crate::metrics::Metrics;
use crate::{Error, Result};

/// How statuses are reported.
#[derive(Debug, Clone)]
pub struct ReporterConfig {
    /// Links in statuses point at `<base>/runs/<run_id>`.
    pub link_base_url: String,
    /// How often pending statuses are sent.
    pub interval: Duration,
    /// Budget per forge and token (GitHub allows 5,000 per hour).
    pub requests_per_hour: u32,
}

/// Default `--status-link-base-url`: the dashboard at its default listen address
/// (`sluice_dashboard::DEFAULT_LISTEN`, checked by a test in the `sluice` binary), where
/// run pages are; set it to the dashboard's URL as users reach it.
pub const LINK_BASE_URL: &str = "http://127.0.0.1:8090";
/// Default `--forge-requests-per-hour`: GitHub's limit per token.
pub const REQUESTS_PER_HOUR: u32 = 5000;

impl Default for ReporterConfig {
    fn default() -> Self {
        ReporterConfig {
            link_base_url: LINK_BASE_URL.into(),
            interval: Duration::from_secs(1),
            requests_per_hour: REQUESTS_PER_HOUR,
        }
    }
}

/// A status to send, as stored in `SLUICE_REPORTS`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Wanted {
    provider: Provider,
    repo: String,
    sha: String,
    pipeline: String,
    run_id: String,
    state: RunState,
    description: String,
    /// Where the status links, under the link base, instead of the run's page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    link_path: Option<String>,
}

/// The context of the status that reports a repository's `.sluice/` files refused.
pub const CONFIG_CONTEXT: &str = "config";

/// Queues a failed `sluice/config` status on `sha`: the `.sluice/` files read there
/// were refused in part (`problems`, the first one in the description), linking to the
/// event's decision. Sent by the reporter like run statuses, within the same budget.
pub async fn queue_config_failure(
    reports: &Store,
    provider: Provider,
    repo: &str,
    sha: &str,
    event_id: &str,
    problems: &[String],
) -> Result<()> {
    let first = problems.first().map(String::as_str).unwrap_or_default();
    let description = match problems.len() {
        0 | 1 => first.to_owned(),
        n => format!("{n} problems; {first}"),
    };
    let key = format!(
        "config-{}",
        sluice_core::run::id_digest(&format!("{provider}:{repo}:{sha}"))
    );
    queue(
        reports,
        &Wanted {
            provider,
            repo: repo.to_owned(),
            sha: sha.to_owned(),
            pipeline: CONFIG_CONTEXT.into(),
            run_id: key,
            state: RunState::Failed,
            description: description.chars().take(140).collect(),
            link_path: Some(format!("/events/{event_id}")),
        },
    )
    .await
}

pub const CONSUMER: &str = subjects::REPORTER_CONSUMER;

/// Runs both loops until `shutdown`; the intake starts again whenever its pull ends,
/// and `consuming` says whether it is pulling.
pub async fn run(
    js: jetstream::Context,
    forge: ForgeConfig,
    config: ReporterConfig,
    budget: ForgeBudget,
    consuming: Consuming,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<()> {
    let kv = streams::bucket(&js, subjects::REPORTS_BUCKET).await?;
    let sender = Arc::new(Sender::new(forge, &config, budget, metrics)?);
    let intake = tokio::spawn({
        let (kv, shutdown) = (kv.clone(), shutdown.clone());
        async move {
            keep_consuming(CONSUMER, &consuming, &shutdown, || {
                intake(&js, &kv, &consuming, &shutdown)
            })
            .await;
        }
    });
    flush_loop(kv, sender, config.interval, shutdown).await;
    intake.await?;
    Ok(())
}

/// One intake session: reads run states in order and queues the statuses they ask for.
async fn intake(
    js: &jetstream::Context,
    kv: &Store,
    consuming: &Consuming,
    shutdown: &CancellationToken,
) -> Result<()> {
    let stream = js
        .get_stream(subjects::STATUS_STREAM)
        .await
        .map_err(|e| Error::nats("status stream", e))?;
    let consumer = stream
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| Error::nats(format!("consumer {CONSUMER}"), e))?;
    let messages = consume::open(&consumer, 200, CONSUMER).await?;
    consuming.start();
    let mut messages = std::pin::pin!(consume::pulled(messages, CONSUMER, shutdown.clone()));
    while let Some(message) = messages.next().await {
        // In order, one at a time: a later state must not be overwritten by an earlier.
        let stored = match wanted(&message.payload) {
            Some(w) => queue(kv, &w).await,
            None => Ok(()),
        };
        let kind = match stored {
            Ok(()) => AckKind::Ack,
            Err(e) => {
                tracing::warn!(error = %e, "cannot queue a commit status; will retry");
                AckKind::Nak(Some(Duration::from_secs(1)))
            }
        };
        let _ = message.ack_with(kind).await;
    }
    Ok(())
}

/// Stores the latest wanted status of a run, replacing an older one.
async fn queue(kv: &Store, w: &Wanted) -> Result<()> {
    let value = serde_json::to_vec(w).map_err(|source| Error::Encode {
        what: "a commit status",
        source,
    })?;
    kv.put(&w.run_id, value.into())
        .await
        .map_err(|e| Error::nats("queue a commit status", e))?;
    Ok(())
}

/// The commit status a run-level state change asks for, if it is about a forge commit.
fn wanted(payload: &[u8]) -> Option<Wanted> {
    let u: StatusUpdate = serde_json::from_slice(payload).ok()?;
    if u.step.is_some() {
        return None;
    }
    let provider = Provider::of_event_id(u.event_id.as_deref()?)?;
    if !matches!(provider, Provider::Github | Provider::Gitlab) {
        return None;
    }
    let description = match (u.state, &u.message) {
        (RunState::Queued, _) => "queued".to_owned(),
        (RunState::Scheduled, _) => "starting".to_owned(),
        (RunState::Running, _) => "running".to_owned(),
        (RunState::Succeeded, _) => "succeeded".to_owned(),
        (state, Some(m)) => format!("{}: {m}", state.as_str()),
        (state, None) => state.as_str().to_owned(),
    };
    Some(Wanted {
        provider,
        repo: u.repo?,
        sha: u.sha?,
        pipeline: u.pipeline,
        run_id: u.run_id,
        state: u.state,
        // The forges cap descriptions (GitHub: 140 characters).
        description: description.chars().take(140).collect(),
        link_path: None,
    })
}

async fn flush_loop(
    kv: Store,
    sender: Arc<Sender>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = flush(&kv, &sender, &shutdown).await {
            tracing::warn!(error = %e, "sending commit statuses failed; will retry");
        }
    }
}

/// Sends what the bucket holds; on shutdown it stops between statuses (what is left
/// stays queued for the next dispatcher).
async fn flush(kv: &Store, sender: &Sender, shutdown: &CancellationToken) -> Result<()> {
    let keys: Vec<String> = kv
        .keys()
        .await
        .map_err(|e| Error::nats("list queued commit statuses", e))?
        .try_collect()
        .await
        .map_err(|e| Error::nats("list queued commit statuses", e))?;
    let pending = &sender.metrics.reporter_pending;
    pending.set(i64::try_from(keys.len()).unwrap_or(i64::MAX));
    for key in keys {
        if shutdown.is_cancelled() {
            break;
        }
        let Some(entry) = kv
            .entry(&key)
            .await
            .map_err(|e| Error::nats("read a queued commit status", e))?
        else {
            continue;
        };
        let Ok(w) = serde_json::from_slice::<Wanted>(&entry.value) else {
            let _ = kv.delete(&key).await;
            continue;
        };
        match sender.send(&w).await {
            Sent::Done => {
                // Removed only if no newer state arrived meanwhile; otherwise the newer
                // one is sent on the next round.
                if kv
                    .delete_expect_revision(&key, Some(entry.revision))
                    .await
                    .is_ok()
                {
                    pending.dec();
                }
            }
            Sent::Later(_) => {}
            Sent::Dropped(why) => {
                tracing::warn!(run_id = %w.run_id, reason = %why, "commit status cannot be sent; dropping it");
                if kv
                    .delete_expect_revision(&key, Some(entry.revision))
                    .await
                    .is_ok()
                {
                    pending.dec();
                }
            }
        }
    }
    Ok(())
}

enum Sent {
    Done,
    /// Not sent for now: keep it.
    Later(Later),
    /// Can never succeed (no token for this forge, repository gone): log and forget.
    Dropped(Error),
}

/// Why a status waits for a later round.
enum Later {
    /// The own budget for the forge is spent: no request was made.
    Budget,
    /// The forge said to wait (403/429).
    RateLimited,
    /// The request failed (network, 5xx, no token for the repository yet).
    Failed,
}

/// A forge client with its rate budget.
struct Sender {
    github: Option<crate::github::GitHub>,
    gitlab_token: Option<secrecy::SecretString>,
    gitlab_api_url: String,
    http: reqwest::Client,
    link_base_url: String,
    /// Shared with the delivery reconciler, when it runs.
    budget: ForgeBudget,
    metrics: Metrics,
}

impl Sender {
    fn new(
        forge: ForgeConfig,
        config: &ReporterConfig,
        budget: ForgeBudget,
        metrics: Metrics,
    ) -> Result<Self> {
        if config.requests_per_hour == 0 {
            return Err(Error::InvalidSetting {
                setting: "forge requests per hour",
                requirement: "must be at least 1",
            });
        }
        let github = crate::github::GitHub::new(
            &forge.github_api_url,
            forge.github_token.as_ref(),
            forge.github_app.as_ref(),
        )?;
        Ok(Sender {
            github,
            gitlab_token: forge.gitlab_token,
            gitlab_api_url: forge.gitlab_api_url,
            http: reqwest::Client::builder()
                .user_agent("sluice-reporter")
                .build()
                .map_err(Error::HttpClient)?,
            link_base_url: config.link_base_url.trim_end_matches('/').to_owned(),
            budget,
            metrics,
        })
    }

    /// Takes one request from `forge`'s budget, or says to wait.
    async fn allow(&self, forge: Provider) -> bool {
        self.budget.take(forge, Instant::now()).is_ok()
    }

    async fn pause(&self, forge: Provider, wait: Duration) {
        tracing::warn!(
            %forge,
            ?wait,
            "forge rate limit reached; pausing commit statuses"
        );
        let now = Instant::now();
        self.budget.pause(forge, now, now + wait);
    }

    /// Sends one status and counts what became of it (nothing when the own budget
    /// deferred it: no request was made).
    async fn send(&self, w: &Wanted) -> Sent {
        let sent = self.try_send(w).await;
        let outcome = match &sent {
            Sent::Done => Some("sent"),
            Sent::Later(Later::Budget) => None,
            Sent::Later(Later::RateLimited) => Some("rate_limited"),
            Sent::Later(Later::Failed) => Some("failed"),
            Sent::Dropped(_) => Some("dropped"),
        };
        if let (Some(outcome), Provider::Github | Provider::Gitlab) = (outcome, w.provider) {
            self.metrics.status(w.provider, outcome);
        }
        sent
    }

    async fn try_send(&self, w: &Wanted) -> Sent {
        let link = match &w.link_path {
            Some(path) => format!("{}{path}", self.link_base_url),
            None => format!("{}/runs/{}", self.link_base_url, w.run_id),
        };
        let context = format!("sluice/{}", w.pipeline);
        match w.provider {
            Provider::Github => {
                let Some(github) = &self.github else {
                    return Sent::Dropped(crate::github::NO_CREDENTIALS);
                };
                if !self.allow(Provider::Github).await {
                    return Sent::Later(Later::Budget);
                }
                let client = match github.client(&w.repo).await {
                    Ok(c) => c,
                    Err(e) if !e.is_retryable() => return Sent::Dropped(e),
                    Err(e) => {
                        tracing::warn!(repo = %w.repo, error = %e, "no GitHub client for this repository yet");
                        return Sent::Later(Later::Failed);
                    }
                };
                let state = match w.state {
                    RunState::Queued | RunState::Scheduled | RunState::Running => "pending",
                    RunState::Succeeded => "success",
                    RunState::Failed => "failure",
                    RunState::Cancelled | RunState::Error => "error",
                };
                let body = serde_json::json!({
                    "state": state,
                    "target_url": link,
                    "description": w.description,
                    "context": context,
                });
                let route = format!("/repos/{}/statuses/{}", w.repo, w.sha);
                match client._post(route.as_str(), Some(&body)).await {
                    Ok(response) => {
                        self.outcome(Provider::Github, response.status(), response.headers())
                            .await
                    }
                    Err(e) => {
                        tracing::warn!(error = %Error::GitHub(e), "GitHub status request failed");
                        Sent::Later(Later::Failed)
                    }
                }
            }
            Provider::Gitlab => {
                let Some(token) = &self.gitlab_token else {
                    return Sent::Dropped(crate::forge::NO_GITLAB_TOKEN);
                };
                if !self.allow(Provider::Gitlab).await {
                    return Sent::Later(Later::Budget);
                }
                let state = match w.state {
                    RunState::Queued | RunState::Scheduled => "pending",
                    RunState::Running => "running",
                    RunState::Succeeded => "success",
                    RunState::Failed | RunState::Error => "failed",
                    RunState::Cancelled => "canceled",
                };
                let project = crate::forge::gitlab_project(&w.repo);
                let url = format!(
                    "{}/projects/{project}/statuses/{}",
                    self.gitlab_api_url.trim_end_matches('/'),
                    w.sha
                );
                let sent = self
                    .http
                    .post(url)
                    .header("PRIVATE-TOKEN", token.expose_secret())
                    .form(&[
                        ("state", state),
                        ("name", context.as_str()),
                        ("target_url", link.as_str()),
                        ("description", w.description.as_str()),
                    ])
                    .send()
                    .await;
                match sent {
                    Ok(response) => {
                        self.outcome(Provider::Gitlab, response.status(), response.headers())
                            .await
                    }
                    Err(e) => {
                        tracing::warn!(error = %Error::GitLab(e.without_url()), "GitLab status request failed");
                        Sent::Later(Later::Failed)
                    }
                }
            }
            other => Sent::Dropped(Error::NoStatuses(other)),
        }
    }

    async fn outcome(
        &self,
        forge: Provider,
        status: http::StatusCode,
        headers: &http::HeaderMap,
    ) -> Sent {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        match status.as_u16() {
            200..=299 => Sent::Done,
            403 | 429 => {
                // Retry-After (secondary limits), else the primary limit's reset time.
                let wait = header("retry-after")
                    .and_then(|v| v.parse::<u64>().ok())
                    .or_else(|| {
                        let remaining = header("x-ratelimit-remaining")?;
                        let reset: i64 = header("x-ratelimit-reset")?.parse().ok()?;
                        (remaining == "0").then(|| {
                            (reset - time::OffsetDateTime::now_utc().unix_timestamp()).max(1) as u64
                        })
                    })
                    .unwrap_or(60);
                self.pause(forge, Duration::from_secs(wait)).await;
                Sent::Later(Later::RateLimited)
            }
            404 | 422 => Sent::Dropped(Error::ForgeStatus { forge, status }),
            _ => Sent::Later(Later::Failed),
        }
    }
}
