//! A repository's `.sluice/` files at a commit, read through the forge API (no clone)
//! and cached.
//!
//! A commit's files never change, so a listing read at a full commit SHA is cached:
//! in the shared `SLUICE_REPO_FILES` bucket (one replica's read serves the others), in
//! a small in-process map, and behind one flight per commit so that many events of
//! one push make one set of forge requests. A branch moves, so a read at a branch is
//! never cached. What a repository may make the dispatcher read is bounded by
//! [`Limits`]: files over the size limit are refused by the size the listing gives
//! (GitHub) or after a capped read (GitLab), and no body is ever read past its cap.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sluice_core::repo_pipelines::{is_pipeline_file, Limits, RepoFile, DIR};
use sluice_core::{subjects, Provider};

use crate::budget::ForgeBudget;
use crate::forge::ForgeConfig;
use crate::github::GitHub;
use crate::{Error, Result};

/// Bytes a directory listing may have: GitHub lists up to 1,000 entries of a few
/// hundred bytes each.
pub const LISTING_MAX_BYTES: usize = 1024 * 1024;
/// Entries GitLab is asked for in one tree page (its maximum); pipeline files past
/// them are not seen.
const GITLAB_PER_PAGE: usize = 100;
/// Bytes of listings kept in process, all entries together.
const MEMORY_BYTES: usize = 16 * 1024 * 1024;

/// Every `.sluice/` pipeline file of a repository at one ref, and those not read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// Files read, in path order (`RepoFile.path` is the repository path, e.g.
    /// `.sluice/build.yaml`).
    pub files: Vec<RepoFile>,
    /// Files seen but not read, with why, in path order: `(path, reason)`. Reasons
    /// name the flag that sets the limit.
    pub refused: Vec<(String, String)>,
}

impl Listing {
    fn bytes(&self) -> usize {
        self.files
            .iter()
            .map(|f| f.path.len() + f.text.len())
            .chain(self.refused.iter().map(|(p, r)| p.len() + r.len()))
            .sum::<usize>()
            + 64
    }
}

/// How one flight ended, for the reads that waited on it (an [`Error`] cannot be
/// cloned; they get [`Error::RepoFiles`] with its text and retryability).
type Outcome = std::result::Result<Listing, (String, bool)>;
type Flight = Arc<tokio::sync::Mutex<Option<Outcome>>>;

/// Reads and caches repositories' `.sluice/` files.
pub struct RepoFiles {
    github: Option<GitHub>,
    github_api_url: String,
    gitlab_token: Option<SecretString>,
    gitlab_api_url: String,
    http: reqwest::Client,
    timeout: Duration,
    limits: Limits,
    cache: Option<kv::Store>,
    memory: Mutex<Memory>,
    flights: Mutex<HashMap<String, Flight>>,
    requests: AtomicU64,
    /// The forge request budget shared with the reporter; `None`: reads are not
    /// limited.
    budget: Option<ForgeBudget>,
}

impl std::fmt::Debug for RepoFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepoFiles")
            .field("github", &self.github)
            .field("github_api_url", &self.github_api_url)
            .field(
                "gitlab_token",
                &self.gitlab_token.as_ref().map(|_| "[redacted]"),
            )
            .field("gitlab_api_url", &self.gitlab_api_url)
            .field("limits", &self.limits)
            .field("shared_cache", &self.cache.is_some())
            .field("requests", &self.requests())
            .field("budget", &self.budget.is_some())
            .finish_non_exhaustive()
    }
}

impl RepoFiles {
    /// A reader with `forge`'s credentials. `cache`: the [`subjects::REPO_FILES_BUCKET`]
    /// bucket (`None`: no shared cache, in-process only).
    pub fn new(forge: &ForgeConfig, cache: Option<kv::Store>, limits: Limits) -> Result<Self> {
        let github = GitHub::new(
            &forge.github_api_url,
            forge.github_token.as_ref(),
            forge.github_app.as_ref(),
        )?;
        let http = reqwest::Client::builder()
            .user_agent("sluice-dispatcher")
            .build()
            .map_err(Error::HttpClient)?;
        Ok(RepoFiles {
            github,
            github_api_url: forge.github_api_url.clone(),
            gitlab_token: forge.gitlab_token.clone(),
            gitlab_api_url: forge.gitlab_api_url.trim_end_matches('/').to_owned(),
            http,
            timeout: forge.timeout,
            limits,
            cache,
            memory: Mutex::new(Memory::default()),
            flights: Mutex::new(HashMap::new()),
            requests: AtomicU64::new(0),
            budget: None,
        })
    }

    /// Each forge request takes one from `budget` (the one the commit status reporter
    /// and the delivery reconciler spend from); when none is left the read fails as
    /// retryable.
    pub fn sharing(mut self, budget: ForgeBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Forge API requests this reader made so far (for tests and metrics; octocrab's
    /// own immediate retries of a 5xx are not counted).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Every `.sluice/*.yaml|yml` file of `repo` at `git_ref` (a commit SHA, or a
    /// branch `refs/heads/x`). A repository without `.sluice/` has an empty listing.
    pub async fn read(&self, provider: Provider, repo: &str, git_ref: &str) -> Result<Listing> {
        if !is_commit_sha(git_ref) {
            return self.fetch(provider, repo, git_ref).await;
        }
        let key = memory_key(provider, repo, git_ref);
        if let Some(hit) = self.remembered(&key) {
            return Ok(hit);
        }
        let flight = self
            .flights
            .lock()
            .expect("flights")
            .entry(key.clone())
            .or_default()
            .clone();
        let mut slot = flight.lock().await;
        if let Some(outcome) = slot.as_ref() {
            return outcome
                .clone()
                .map_err(|(reason, retryable)| Error::RepoFiles {
                    repo: repo.to_owned(),
                    reason,
                    retryable,
                });
        }
        // This read leads the flight; should it be dropped half way, the next one
        // waiting takes over.
        let result = self.load(&key, provider, repo, git_ref).await;
        *slot = Some(match &result {
            Ok(listing) => Ok(listing.clone()),
            Err(e) => Err((flight_reason(e), e.is_retryable())),
        });
        {
            let mut flights = self.flights.lock().expect("flights");
            if flights.get(&key).is_some_and(|f| Arc::ptr_eq(f, &flight)) {
                flights.remove(&key);
            }
        }
        drop(slot);
        result
    }

    /// The listing from the shared cache, else the forge (then cached).
    async fn load(
        &self,
        key: &str,
        provider: Provider,
        repo: &str,
        git_ref: &str,
    ) -> Result<Listing> {
        if let Some(hit) = self.remembered(key) {
            return Ok(hit);
        }
        let kv_key = subjects::repo_files_key(provider.as_str(), repo, git_ref);
        if let Some(store) = &self.cache {
            match store.get(&kv_key).await {
                Ok(Some(value)) => match serde_json::from_slice::<Listing>(&value) {
                    Ok(listing) => {
                        self.remember(key, &listing);
                        return Ok(listing);
                    }
                    Err(e) => tracing::warn!(
                        %provider,
                        repo,
                        git_ref,
                        error = %e,
                        "cached .sluice/ listing unreadable; reading the forge"
                    ),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    %provider,
                    repo,
                    git_ref,
                    error = %e,
                    "repo files cache not readable; reading the forge"
                ),
            }
        }
        let listing = self.fetch(provider, repo, git_ref).await?;
        self.remember(key, &listing);
        if let Some(store) = &self.cache {
            let put = match serde_json::to_vec(&listing) {
                Ok(value) => store
                    .put(&kv_key, Bytes::from(value))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(error) = put {
                tracing::warn!(
                    %provider,
                    repo,
                    git_ref,
                    %error,
                    "repo files not cached in the bucket"
                );
            }
        }
        Ok(listing)
    }

    fn remembered(&self, key: &str) -> Option<Listing> {
        self.memory.lock().ok()?.get(key)
    }

    fn remember(&self, key: &str, listing: &Listing) {
        if let Ok(mut memory) = self.memory.lock() {
            memory.insert(key, listing.clone(), MEMORY_BYTES);
        }
    }

    /// Reads the forge, uncached.
    async fn fetch(&self, provider: Provider, repo: &str, git_ref: &str) -> Result<Listing> {
        let mut listing = match provider {
            Provider::Github => self.github(repo, git_ref).await,
            Provider::Gitlab => self.gitlab(repo, git_ref).await,
            other => Err(Error::RepoFiles {
                repo: repo.to_owned(),
                reason: format!("{other} events have no repository to read"),
                retryable: false,
            }),
        }?;
        listing.refused.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(listing)
    }

    /// Takes one request from the forge budget, counts it and bounds it, body
    /// included, by the forge timeout. With the budget spent the read fails, to be
    /// retried with the event's backoff rather than wait holding the event.
    async fn request<T>(
        &self,
        forge: Provider,
        repo: &str,
        request: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        if let Some(budget) = &self.budget {
            if budget.take(forge, std::time::Instant::now()).is_err() {
                return Err(budget_spent(repo));
            }
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| Error::ForgeTimeout(self.timeout))?
    }

    // === GitHub ===

    async fn github(&self, repo: &str, git_ref: &str) -> Result<Listing> {
        let Some(github) = &self.github else {
            return Err(crate::github::NO_CREDENTIALS);
        };
        // With an App, the installation is looked up once per owner.
        let client = tokio::time::timeout(self.timeout, github.client(repo))
            .await
            .map_err(|_| Error::ForgeTimeout(self.timeout))??;
        let get = |path: String, accept: &'static str, cap: usize| {
            let client = client.clone();
            async move {
                let route = github_route(repo, &path, git_ref);
                let mut headers = http::HeaderMap::new();
                headers.insert(http::header::ACCEPT, http::HeaderValue::from_static(accept));
                let response = client
                    ._get_with_headers(route, Some(headers))
                    .await
                    .map_err(Error::GitHub)?;
                let status = response.status();
                if !status.is_success() {
                    return Ok(Err(status_error(
                        Provider::Github,
                        repo,
                        status,
                        response.headers(),
                    )));
                }
                let body = http_body_util::Limited::new(response.into_body(), cap)
                    .collect()
                    .await;
                Ok(Ok(match body {
                    Ok(body) => Some(body.to_bytes()),
                    // Over the cap: reading stopped there.
                    Err(e) if e.is::<http_body_util::LengthLimitError>() => None,
                    Err(e) => {
                        return Err(Error::ForgeAnswer {
                            what: "GitHub API body",
                            source: e,
                        })
                    }
                }))
            }
        };
        let listing = self
            .request(
                Provider::Github,
                repo,
                get(
                    DIR.to_owned(),
                    "application/vnd.github+json",
                    LISTING_MAX_BYTES,
                ),
            )
            .await?;
        let body = match listing {
            Ok(Some(body)) => body,
            Ok(None) => return Err(listing_too_large(repo)),
            Err(Refusal::NotFound) => return Ok(Listing::default()),
            Err(Refusal::Error(e)) => return Err(e),
        };
        let unreadable = |e: serde_json::Error| Error::ForgeAnswer {
            what: "GitHub contents listing",
            source: e.into(),
        };
        let entries: serde_json::Value = serde_json::from_slice(&body).map_err(unreadable)?;
        if !entries.is_array() {
            // An object, not a list: `.sluice` is a file (or a link), not a folder.
            return Ok(Listing::default());
        }
        let entries: Vec<GitHubEntry> = serde_json::from_value(entries).map_err(unreadable)?;
        let entries = entries
            .into_iter()
            .filter(|e| e.kind == "file")
            .map(|e| Entry {
                name: e.name,
                path: e.path,
                size: Some(e.size),
            });
        let mut out = Listing::default();
        for entry in choose(entries, &self.limits, &mut out.refused) {
            let cap = self.limits.max_file_bytes + 1;
            let answer = self
                .request(
                    Provider::Github,
                    repo,
                    get(entry.path.clone(), "application/vnd.github.raw+json", cap),
                )
                .await?;
            self.take(&mut out, entry.path, answer)?;
        }
        Ok(out)
    }

    // === GitLab ===

    async fn gitlab(&self, project: &str, git_ref: &str) -> Result<Listing> {
        let Some(token) = &self.gitlab_token else {
            return Err(crate::forge::NO_GITLAB_TOKEN);
        };
        let base = format!(
            "{}/projects/{}/repository",
            self.gitlab_api_url,
            encode(project)
        );
        let get = |url: String, cap: usize| async move {
            let response = self
                .http
                .get(&url)
                .header("PRIVATE-TOKEN", token.expose_secret())
                .send()
                .await
                .map_err(|e| Error::GitLab(e.without_url()))?;
            let status = response.status();
            if !status.is_success() {
                return Ok(Err(status_error(
                    Provider::Gitlab,
                    project,
                    status,
                    response.headers(),
                )));
            }
            Ok(Ok(read_capped(response, cap).await?))
        };
        let url = format!(
            "{base}/tree?path={}&ref={}&per_page={GITLAB_PER_PAGE}",
            encode(DIR),
            encode(git_ref)
        );
        let body = match self
            .request(Provider::Gitlab, project, get(url, LISTING_MAX_BYTES))
            .await?
        {
            Ok(Some(body)) => body,
            Ok(None) => return Err(listing_too_large(project)),
            Err(Refusal::NotFound) => return Ok(Listing::default()),
            Err(Refusal::Error(e)) => return Err(e),
        };
        let entries: Vec<GitLabEntry> =
            serde_json::from_slice(&body).map_err(|e| Error::ForgeAnswer {
                what: "GitLab repository tree",
                source: e.into(),
            })?;
        let entries = entries
            .into_iter()
            .filter(|e| e.kind == "blob")
            .map(|e| Entry {
                name: e.name,
                path: e.path,
                size: None,
            });
        let mut out = Listing::default();
        for entry in choose(entries, &self.limits, &mut out.refused) {
            let url = format!(
                "{base}/files/{}/raw?ref={}",
                encode(&entry.path),
                encode(git_ref)
            );
            let answer = self
                .request(
                    Provider::Gitlab,
                    project,
                    get(url, self.limits.max_file_bytes + 1),
                )
                .await?;
            self.take(&mut out, entry.path, answer)?;
        }
        Ok(out)
    }

    /// Adds one downloaded file to `out`, or refuses it.
    fn take(
        &self,
        out: &mut Listing,
        path: String,
        answer: std::result::Result<Option<Bytes>, Refusal>,
    ) -> Result<()> {
        let body = match answer {
            Ok(body) => body,
            // Listed, then gone: the ref moved in between (a branch).
            Err(Refusal::NotFound) => {
                out.refused
                    .push((path, "listed, but not found when read".to_owned()));
                return Ok(());
            }
            Err(Refusal::Error(e)) => return Err(e),
        };
        let max = self.limits.max_file_bytes;
        match body.filter(|b| b.len() <= max) {
            None => out.refused.push((path, too_large(None, max))),
            Some(body) => match String::from_utf8(body.to_vec()) {
                Ok(text) => out.files.push(RepoFile { path, text }),
                Err(_) => out
                    .refused
                    .push((path, "the file is not UTF-8 text".to_owned())),
            },
        }
        Ok(())
    }
}

// === Listings ===

#[derive(Deserialize)]
struct GitHubEntry {
    name: String,
    path: String,
    #[serde(default)]
    size: u64,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct GitLabEntry {
    name: String,
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// A file of the folder's listing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    path: String,
    /// What the listing says it has (GitLab's tree does not say).
    size: Option<u64>,
}

/// The pipeline files to download, in path order: the first `max_files` not over the
/// size the listing gives. The others go to `refused`, with why.
fn choose(
    entries: impl IntoIterator<Item = Entry>,
    limits: &Limits,
    refused: &mut Vec<(String, String)>,
) -> Vec<Entry> {
    let mut files: Vec<Entry> = entries
        .into_iter()
        .filter(|e| is_pipeline_file(&e.name))
        .collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut chosen = Vec::new();
    for (i, entry) in files.into_iter().enumerate() {
        if i >= limits.max_files {
            refused.push((
                entry.path,
                format!(
                    "not read: a repository may have at most {} pipeline files in {DIR}/ (--repo-pipelines-max-files)",
                    limits.max_files
                ),
            ));
        } else if entry
            .size
            .is_some_and(|size| size > limits.max_file_bytes as u64)
        {
            let reason = too_large(entry.size, limits.max_file_bytes);
            refused.push((entry.path, reason));
        } else {
            chosen.push(entry);
        }
    }
    chosen
}

fn too_large(size: Option<u64>, max: usize) -> String {
    let size = match size {
        Some(n) => format!("{n} bytes"),
        None => "larger".to_owned(),
    };
    format!(
        "not read: the file is {size}, more than the {max} bytes a repository pipeline file may have (--repo-pipelines-max-file-bytes)"
    )
}

/// The forge request budget has nothing left: retried later, with the event's backoff.
pub(crate) fn budget_spent(repo: &str) -> Error {
    Error::RepoFiles {
        repo: repo.to_owned(),
        reason: "forge request budget spent; retrying".to_owned(),
        retryable: true,
    }
}

fn listing_too_large(repo: &str) -> Error {
    Error::RepoFiles {
        repo: repo.to_owned(),
        reason: format!("the listing of {DIR}/ is over {LISTING_MAX_BYTES} bytes"),
        retryable: false,
    }
}

// === Answers ===

/// A forge answer that is not a success.
enum Refusal {
    /// 404: no such folder or file at the ref.
    NotFound,
    Error(Error),
}

/// What a non-success status means: retryable when the forge may answer later,
/// otherwise a message naming what to fix.
fn status_error(
    forge: Provider,
    repo: &str,
    status: http::StatusCode,
    headers: &http::HeaderMap,
) -> Refusal {
    use http::StatusCode;
    let (setting, permission) = match forge {
        Provider::Github => (
            "SLUICE_GITHUB_TOKEN or the GitHub App",
            "read access to the repository's contents (`contents: read`)",
        ),
        _ => (
            "SLUICE_GITLAB_TOKEN",
            "the `read_api` scope and at least Reporter access to the project",
        ),
    };
    let rate_limited = headers
        .get("x-ratelimit-remaining")
        .is_some_and(|v| v.as_bytes() == b"0")
        || headers.contains_key(http::header::RETRY_AFTER);
    let (reason, retryable) = match status {
        StatusCode::NOT_FOUND => return Refusal::NotFound,
        StatusCode::TOO_MANY_REQUESTS => {
            (format!("{forge} API answered {status}: rate-limited"), true)
        }
        StatusCode::FORBIDDEN if rate_limited => {
            (format!("{forge} API answered {status}: rate-limited"), true)
        }
        s if s.is_server_error() => (format!("{forge} API answered {status}"), true),
        StatusCode::UNAUTHORIZED => (
            format!("{forge} API answered {status}: the credentials were refused; check {setting}"),
            false,
        ),
        StatusCode::FORBIDDEN => (
            format!("{forge} API answered {status}: the credentials ({setting}) need {permission}"),
            false,
        ),
        _ => (format!("{forge} API answered {status}"), false),
    };
    Refusal::Error(Error::RepoFiles {
        repo: repo.to_owned(),
        reason,
        retryable,
    })
}

/// The body, or `None` when it has more than `cap` bytes (reading stops there).
async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Option<Bytes>> {
    let mut body = BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Error::GitLab(e.without_url()))?
    {
        if body.len() + chunk.len() > cap {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body.freeze()))
}

fn flight_reason(e: &Error) -> String {
    match e {
        Error::RepoFiles { reason, .. } => reason.clone(),
        other => other.to_string(),
    }
}

// === Keys and URLs ===

/// Whether `git_ref` is a full commit SHA (SHA-1 or SHA-256), which never moves.
pub fn is_commit_sha(git_ref: &str) -> bool {
    matches!(git_ref.len(), 40 | 64) && git_ref.bytes().all(|b| b.is_ascii_hexdigit())
}

fn memory_key(provider: Provider, repo: &str, git_ref: &str) -> String {
    format!("{provider}:{repo}:{git_ref}")
}

/// `s` percent-encoded for one URL path segment or query value: everything but the
/// unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// `/repos/{owner}/{name}/contents/{path}?ref={git_ref}`, each segment encoded.
fn github_route(repo: &str, path: &str, git_ref: &str) -> String {
    let segments = |s: &str| s.split('/').map(encode).collect::<Vec<_>>().join("/");
    format!(
        "/repos/{}/contents/{}?ref={}",
        segments(repo),
        segments(path),
        encode(git_ref)
    )
}

// === In-process cache ===

/// Listings by key, the oldest dropped first once they hold more than a bound of bytes.
#[derive(Debug, Default)]
struct Memory {
    entries: HashMap<String, (Listing, usize)>,
    order: VecDeque<String>,
    bytes: usize,
}

impl Memory {
    fn get(&self, key: &str) -> Option<Listing> {
        self.entries.get(key).map(|(l, _)| l.clone())
    }

    fn insert(&mut self, key: &str, listing: Listing, max_bytes: usize) {
        let size = listing.bytes();
        if size > max_bytes || self.entries.contains_key(key) {
            return;
        }
        while self.bytes + size > max_bytes {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, n)) = self.entries.remove(&old) {
                self.bytes -= n;
            }
        }
        self.entries.insert(key.to_owned(), (listing, size));
        self.order.push_back(key.to_owned());
        self.bytes += size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_full_commit_shas_are_cached() {
        assert!(is_commit_sha("0123456789abcdef0123456789abcdef01234567"));
        assert!(is_commit_sha("0123456789ABCDEF0123456789abcdef01234567"));
        assert!(is_commit_sha(&"a".repeat(64)));
        assert!(
            !is_commit_sha("0123456"),
            "a short SHA may become ambiguous"
        );
        assert!(!is_commit_sha("refs/heads/main"));
        assert!(!is_commit_sha(&"g".repeat(40)));
        assert!(!is_commit_sha(&"a".repeat(41)));
        assert!(!is_commit_sha(""));
    }

    #[test]
    fn keys_name_provider_repo_and_ref() {
        let sha = "0123456789abcdef0123456789abcdef01234567";
        assert_eq!(
            memory_key(Provider::Github, "acme/app", sha),
            format!("github:acme/app:{sha}")
        );
        let shared = subjects::repo_files_key("github", "acme/app", sha);
        assert_eq!(shared.len(), 64);
        assert_ne!(shared, subjects::repo_files_key("gitlab", "acme/app", sha));
    }

    #[test]
    fn refs_and_paths_are_encoded() {
        assert_eq!(encode("refs/heads/feat x"), "refs%2Fheads%2Ffeat%20x");
        assert_eq!(encode("a&b=c?#%+"), "a%26b%3Dc%3F%23%25%2B");
        assert_eq!(encode("group/sub/proj"), "group%2Fsub%2Fproj");
        assert_eq!(encode(".sluice/build.yaml"), ".sluice%2Fbuild.yaml");
        assert_eq!(encode("é"), "%C3%A9");
        assert_eq!(
            github_route("acme/app", ".sluice/a b.yaml", "refs/heads/x&y"),
            "/repos/acme/app/contents/.sluice/a%20b.yaml?ref=refs%2Fheads%2Fx%26y"
        );
    }

    fn entry(name: &str, size: Option<u64>) -> Entry {
        Entry {
            name: name.to_owned(),
            path: format!(".sluice/{name}"),
            size,
        }
    }

    #[test]
    fn pipeline_files_are_chosen_in_path_order_within_the_limits() {
        let limits = Limits {
            max_files: 2,
            max_file_bytes: 100,
            ..Limits::default()
        };
        let mut refused = Vec::new();
        let chosen = choose(
            [
                entry("c.yml", Some(1)),
                entry("README.md", Some(1)),
                entry(".hidden.yaml", Some(1)),
                entry("b.yaml", Some(101)),
                entry("a.yaml", Some(100)),
                entry("d.yaml", Some(1)),
                entry("e.yaml", None),
            ],
            &limits,
            &mut refused,
        );
        let paths: Vec<&str> = chosen.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, [".sluice/a.yaml"]);
        let refused_paths: Vec<&str> = refused.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            refused_paths,
            [
                ".sluice/b.yaml",
                ".sluice/c.yml",
                ".sluice/d.yaml",
                ".sluice/e.yaml"
            ]
        );
        assert!(refused[0].1.contains("101 bytes"), "{}", refused[0].1);
        assert!(refused[0].1.contains("--repo-pipelines-max-file-bytes"));
        assert!(refused[1].1.contains("--repo-pipelines-max-files"));
    }

    #[test]
    fn statuses_say_whether_to_retry() {
        let retryable = |forge, status: u16, headers: &[(&'static str, &'static str)]| {
            let mut map = http::HeaderMap::new();
            for (k, v) in headers {
                map.insert(*k, http::HeaderValue::from_static(v));
            }
            let status = http::StatusCode::from_u16(status).expect("status");
            match status_error(forge, "acme/app", status, &map) {
                Refusal::NotFound => None,
                Refusal::Error(e) => Some((e.is_retryable(), e.to_string())),
            }
        };
        assert!(retryable(Provider::Github, 404, &[]).is_none());
        for s in [500, 502, 503, 429] {
            assert!(retryable(Provider::Github, s, &[]).expect("error").0, "{s}");
        }
        let limited = retryable(Provider::Github, 403, &[("x-ratelimit-remaining", "0")]);
        assert!(limited.expect("error").0);
        let (again, message) = retryable(Provider::Github, 403, &[]).expect("error");
        assert!(!again);
        assert!(message.contains("SLUICE_GITHUB_TOKEN"), "{message}");
        let (again, message) = retryable(Provider::Gitlab, 401, &[]).expect("error");
        assert!(!again);
        assert!(message.contains("SLUICE_GITLAB_TOKEN"), "{message}");
    }

    #[test]
    fn memory_drops_the_oldest_past_its_bytes() {
        let listing = |text: &str| Listing {
            files: vec![RepoFile {
                path: ".sluice/a.yaml".into(),
                text: text.into(),
            }],
            refused: vec![],
        };
        let size = listing(&"x".repeat(100)).bytes();
        let mut memory = Memory::default();
        memory.insert("a", listing(&"x".repeat(100)), size * 2);
        memory.insert("b", listing(&"y".repeat(100)), size * 2);
        assert!(memory.get("a").is_some());
        memory.insert("c", listing(&"z".repeat(100)), size * 2);
        assert!(memory.get("a").is_none(), "the oldest went");
        assert!(memory.get("b").is_some() && memory.get("c").is_some());
        assert_eq!(memory.bytes, size * 2);
    }
}
