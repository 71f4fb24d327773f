//! GitLab project membership, from its members API: GitLab's payloads say who acted
//! (`user.id`) but not their relation to the project, which GitHub's do
//! (`author_association`). The look-up gives a GitLab actor the association the trust
//! rule and `command_authors` read: `OWNER` (Owner), `MEMBER` (Developer or
//! Maintainer) or `NONE` (a Guest, a Reporter, or no member at all).
//!
//! `GET /projects/:id/members/all/:user_id` counts members inherited from the
//! project's groups. Answers are kept in process per project and user for
//! [`CACHE_TTL`], so a busy merge request asks once. Credentials GitLab refuses leave
//! the association unknown (untrusted) rather than failing the event; a forge that is
//! down, slow or rate-limited fails it for a retry.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sluice_core::Provider;

use crate::budget::ForgeBudget;
use crate::forge::{gitlab_project, ForgeConfig};
use crate::{Error, Result};

/// How long one answer is believed.
pub const CACHE_TTL: Duration = Duration::from_secs(5 * 60);
/// Answers kept, all projects and users together.
const CACHE_ENTRIES: usize = 10_000;
/// Bytes a member's answer may have: a few hundred in practice.
const BODY_MAX_BYTES: usize = 64 * 1024;
/// GitLab's Developer role: the least that may push to the project.
pub const DEVELOPER: u64 = 30;
/// GitLab's Owner role.
pub const OWNER: u64 = 50;

/// The association of a GitLab member with `access_level` (and `state`, when the
/// answer has it: an invitation awaiting approval is not a membership yet).
pub fn association(access_level: u64, state: Option<&str>) -> &'static str {
    if state.is_some_and(|s| s != "active") {
        return "NONE";
    }
    match access_level {
        OWNER.. => "OWNER",
        DEVELOPER.. => "MEMBER",
        _ => "NONE",
    }
}

/// What an association found by the look-up says of the author: `None` when it is
/// unknown.
pub fn trusted(association: Option<&str>) -> Option<bool> {
    association.map(|a| a != "NONE")
}

#[derive(Deserialize)]
struct Member {
    access_level: u64,
    state: Option<String>,
}

/// Looks GitLab project members up, and remembers the answers.
pub struct Members {
    http: reqwest::Client,
    token: SecretString,
    api_url: String,
    timeout: Duration,
    budget: Option<ForgeBudget>,
    cache: Mutex<Cache>,
    /// A refused credential is logged once, not at every event.
    warned: AtomicBool,
    requests: AtomicU64,
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Members")
            .field("api_url", &self.api_url)
            .field("token", &"[redacted]")
            .field("budget", &self.budget.is_some())
            .field("requests", &self.requests())
            .finish_non_exhaustive()
    }
}

impl Members {
    /// A look-up with `forge`'s GitLab token; `None` without one (GitLab actors' then
    /// stay of unknown association, as before).
    pub fn new(forge: &ForgeConfig) -> Result<Option<Self>> {
        let Some(token) = forge.gitlab_token.clone() else {
            return Ok(None);
        };
        let http = reqwest::Client::builder()
            .user_agent("sluice-dispatcher")
            .build()
            .map_err(Error::HttpClient)?;
        Ok(Some(Members {
            http,
            token,
            api_url: forge.gitlab_api_url.trim_end_matches('/').to_owned(),
            timeout: forge.timeout,
            budget: None,
            cache: Mutex::new(Cache::default()),
            warned: AtomicBool::new(false),
            requests: AtomicU64::new(0),
        }))
    }

    /// Each request takes one from `budget`, shared with the other forge callers.
    pub fn sharing(mut self, budget: ForgeBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Members API requests made so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The association of user `user_id` with GitLab project `project` (its full
    /// path): `OWNER`, `MEMBER`, `NONE`, or `None` when GitLab refused the credentials.
    pub async fn association(&self, project: &str, user_id: u64) -> Result<Option<&'static str>> {
        let key = (project.to_owned(), user_id);
        if let Some(hit) = self.lock().get(&key, Instant::now()) {
            return Ok(hit);
        }
        if let Some(budget) = &self.budget {
            if budget.take(Provider::Gitlab, Instant::now()).is_err() {
                return Err(Error::Members {
                    project: project.to_owned(),
                    reason: "forge request budget spent; retrying".into(),
                    retryable: true,
                });
            }
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let answer = tokio::time::timeout(self.timeout, self.ask(project, user_id))
            .await
            .map_err(|_| Error::ForgeTimeout(self.timeout))??;
        self.lock().insert(key, answer, Instant::now());
        Ok(answer)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // A poisoned lock only means a panic elsewhere mid-update: the map is usable.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn ask(&self, project: &str, user_id: u64) -> Result<Option<&'static str>> {
        use http::StatusCode;
        let url = format!(
            "{}/projects/{}/members/all/{user_id}",
            self.api_url,
            gitlab_project(project)
        );
        let mut response = self
            .http
            .get(&url)
            .header("PRIVATE-TOKEN", self.token.expose_secret())
            .send()
            .await
            .map_err(|e| Error::GitLab(e.without_url()))?;
        let status = response.status();
        let refused = |reason: String, retryable| Error::Members {
            project: project.to_owned(),
            reason,
            retryable,
        };
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(Some("NONE")),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        project,
                        %status,
                        "GitLab refused the members look-up: GitLab authors are of unknown association (untrusted) until SLUICE_GITLAB_TOKEN has the read_api scope and access to the project"
                    );
                }
                return Ok(None);
            }
            StatusCode::TOO_MANY_REQUESTS => {
                return Err(refused(
                    format!("GitLab API answered {status}: rate-limited"),
                    true,
                ))
            }
            s if s.is_server_error() => {
                return Err(refused(format!("GitLab API answered {status}"), true))
            }
            _ => return Err(refused(format!("GitLab API answered {status}"), false)),
        }
        let mut body = BytesMut::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| Error::GitLab(e.without_url()))?
        {
            if body.len() + chunk.len() > BODY_MAX_BYTES {
                return Err(refused(
                    format!("the answer is over {BODY_MAX_BYTES} bytes"),
                    false,
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let member: Member = serde_json::from_slice(&body).map_err(|e| Error::ForgeAnswer {
            what: "GitLab project member",
            source: e.into(),
        })?;
        Ok(Some(association(
            member.access_level,
            member.state.as_deref(),
        )))
    }
}

// === Cache ===

type Key = (String, u64);

/// Answers by project and user, each for [`CACHE_TTL`]; the oldest go first past
/// [`CACHE_ENTRIES`].
#[derive(Debug, Default)]
struct Cache {
    entries: HashMap<Key, (Instant, Option<&'static str>)>,
    order: VecDeque<Key>,
}

impl Cache {
    fn get(&self, key: &Key, now: Instant) -> Option<Option<&'static str>> {
        let (at, answer) = self.entries.get(key)?;
        (now.saturating_duration_since(*at) < CACHE_TTL).then_some(*answer)
    }

    fn insert(&mut self, key: Key, answer: Option<&'static str>, now: Instant) {
        if self.entries.insert(key.clone(), (now, answer)).is_some() {
            // An expired answer renewed: move it to the back.
            self.order.retain(|k| k != &key);
        }
        self.order.push_back(key);
        while self.entries.len() > CACHE_ENTRIES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.entries.remove(&old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn developers_and_maintainers_are_members_owners_owners_and_the_rest_none() {
        for (level, want) in [
            (0, "NONE"),
            (5, "NONE"),
            (10, "NONE"),
            (15, "NONE"),
            (20, "NONE"),
            (30, "MEMBER"),
            (40, "MEMBER"),
            (50, "OWNER"),
            (60, "OWNER"),
        ] {
            assert_eq!(association(level, None), want, "{level}");
            assert_eq!(association(level, Some("active")), want, "{level}");
        }
        assert_eq!(
            association(40, Some("awaiting")),
            "NONE",
            "not approved yet"
        );
        assert_eq!(trusted(Some("MEMBER")), Some(true));
        assert_eq!(trusted(Some("OWNER")), Some(true));
        assert_eq!(trusted(Some("NONE")), Some(false));
        assert_eq!(trusted(None), None);
    }

    #[test]
    fn answers_last_five_minutes_and_the_oldest_go_first() {
        let start = Instant::now();
        let mut cache = Cache::default();
        let key = |n: u64| ("group/app".to_owned(), n);
        cache.insert(key(1), Some("MEMBER"), start);
        cache.insert(key(2), None, start);
        assert_eq!(cache.get(&key(1), start), Some(Some("MEMBER")));
        assert_eq!(
            cache.get(&key(2), start),
            Some(None),
            "unknown is an answer"
        );
        assert_eq!(cache.get(&key(3), start), None);
        let later = start + CACHE_TTL;
        assert_eq!(
            cache.get(&key(1), later - Duration::from_secs(1)),
            Some(Some("MEMBER"))
        );
        assert_eq!(cache.get(&key(1), later), None, "expired");
        cache.insert(key(1), Some("NONE"), later);
        assert_eq!(cache.get(&key(1), later), Some(Some("NONE")));
        assert_eq!(cache.order, [key(2), key(1)]);
        for n in 10..10 + CACHE_ENTRIES as u64 {
            cache.insert(key(n), Some("NONE"), later);
        }
        assert_eq!(cache.entries.len(), CACHE_ENTRIES);
        assert_eq!(cache.get(&key(2), start), None, "the oldest went");
        assert_eq!(cache.get(&key(1), later), None);
        assert!(cache.get(&key(10), later).is_some());
    }
}
