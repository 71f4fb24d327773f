//! Changed files of pull and merge requests, from the forge APIs, cached per head SHA.
//!
//! Push payloads list their changed files; pull request payloads do not. When a
//! pipeline filters on `paths`, the dispatcher asks the forge. Any failure — no token,
//! an API error, a timeout, more files than the API returns — leaves the list unknown
//! or incomplete, and path filters then fire rather than silently skip.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sluice_core::{Event, Provider};

use crate::github::{GitHub, GitHubApp};
use crate::{Error, Result};

/// Default `--github-api-url`.
pub const GITHUB_API_URL: &str = "https://api.github.com";
/// Default `--gitlab-api-url`.
pub const GITLAB_API_URL: &str = "https://gitlab.com/api/v4";

/// GitHub returns at most this many files for a pull request.
pub const GITHUB_MAX_FILES: usize = 3000;
const PER_PAGE: usize = 100;
/// Lists kept, by repository and head SHA.
const CACHE_ENTRIES: usize = 10_000;

/// Where the forge APIs are and how to authenticate. Lives only on the dispatcher side.
#[derive(Debug, Clone)]
pub struct ForgeConfig {
    pub github_token: Option<SecretString>,
    /// A GitHub App to authenticate as instead of the token.
    pub github_app: Option<GitHubApp>,
    /// `https://api.github.com`, or a GitHub Enterprise `https://HOST/api/v3`.
    pub github_api_url: String,
    pub gitlab_token: Option<SecretString>,
    /// `https://gitlab.com/api/v4` or a self-managed instance's.
    pub gitlab_api_url: String,
    /// Upper bound on one look-up, all pages included.
    pub timeout: Duration,
}

impl Default for ForgeConfig {
    fn default() -> Self {
        ForgeConfig {
            github_token: None,
            github_app: None,
            github_api_url: GITHUB_API_URL.into(),
            gitlab_token: None,
            gitlab_api_url: GITLAB_API_URL.into(),
            timeout: Duration::from_secs(5),
        }
    }
}

/// A pull request's changed files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileList {
    pub files: Vec<String>,
    /// False when the forge stopped listing (GitHub's 3,000-file cap).
    pub complete: bool,
}

/// Looks up and caches changed files.
pub struct ChangedFiles {
    config: ForgeConfig,
    github: Option<GitHub>,
    http: reqwest::Client,
    cache: Mutex<(HashMap<String, FileList>, VecDeque<String>)>,
}

impl std::fmt::Debug for ChangedFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangedFiles")
            .field("github_api_url", &self.config.github_api_url)
            .field("gitlab_api_url", &self.config.gitlab_api_url)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct GitlabDiff {
    new_path: String,
    old_path: String,
}

impl ChangedFiles {
    pub fn new(config: ForgeConfig) -> Result<Self> {
        let github = GitHub::new(
            &config.github_api_url,
            config.github_token.as_ref(),
            config.github_app.as_ref(),
        )?;
        let http = reqwest::Client::builder()
            .user_agent("sluice-dispatcher")
            .build()
            .map_err(Error::HttpClient)?;
        Ok(ChangedFiles {
            config,
            github,
            http,
            cache: Mutex::new((HashMap::new(), VecDeque::new())),
        })
    }

    /// The files changed by the pull/merge request of `event`, or why they are unknown.
    pub async fn pull_request(&self, event: &Event) -> Result<FileList> {
        let (Some(repo), Some(number)) = (event.repo.as_deref(), event.pr) else {
            return Err(Error::NoPullRequest);
        };
        let key = format!(
            "{}:{repo}:{}",
            event.provider,
            event.sha.as_deref().unwrap_or("-")
        );
        let cacheable = event.sha.is_some();
        if cacheable {
            if let Some(hit) = self.cache.lock().ok().and_then(|c| c.0.get(&key).cloned()) {
                return Ok(hit);
            }
        }
        let lookup = async {
            match event.provider {
                Provider::Github => self.github(repo, number).await,
                Provider::Gitlab => self.gitlab(repo, number).await,
                other => Err(Error::NoLookup(other)),
            }
        };
        let list = tokio::time::timeout(self.config.timeout, lookup)
            .await
            .map_err(|_| Error::ForgeTimeout(self.config.timeout))??;
        if cacheable {
            if let Ok(mut cache) = self.cache.lock() {
                let (map, order) = &mut *cache;
                if map.len() >= CACHE_ENTRIES {
                    if let Some(old) = order.pop_front() {
                        map.remove(&old);
                    }
                }
                if map.insert(key.clone(), list.clone()).is_none() {
                    order.push_back(key);
                }
            }
        }
        Ok(list)
    }

    async fn github(&self, repo: &str, number: u64) -> Result<FileList> {
        let Some(github) = &self.github else {
            return Err(crate::github::NO_CREDENTIALS);
        };
        let client = github.client(repo).await?;
        let mut files = Vec::new();
        for page in 1..=GITHUB_MAX_FILES / PER_PAGE {
            let route = format!("/repos/{repo}/pulls/{number}/files");
            let params = [
                ("per_page", PER_PAGE.to_string()),
                ("page", page.to_string()),
            ];
            let entries: Vec<octocrab::models::repos::DiffEntry> = client
                .get(route, Some(&params))
                .await
                .map_err(Error::GitHub)?;
            let last = entries.len() < PER_PAGE;
            for e in entries {
                if let Some(prev) = e.previous_filename {
                    files.push(prev);
                }
                files.push(e.filename);
            }
            if last {
                return Ok(FileList {
                    files,
                    complete: true,
                });
            }
        }
        // GitHub lists no more than 3,000 files.
        Ok(FileList {
            files,
            complete: false,
        })
    }

    async fn gitlab(&self, project: &str, iid: u64) -> Result<FileList> {
        let Some(token) = &self.config.gitlab_token else {
            return Err(NO_GITLAB_TOKEN);
        };
        let encoded = gitlab_project(project);
        let base = self.config.gitlab_api_url.trim_end_matches('/');
        let mut files = Vec::new();
        for page in 1..=100 {
            let url = format!("{base}/projects/{encoded}/merge_requests/{iid}/diffs?per_page={PER_PAGE}&page={page}");
            let response = self
                .http
                .get(&url)
                .header("PRIVATE-TOKEN", token.expose_secret())
                .send()
                .await
                .map_err(|e| Error::GitLab(e.without_url()))?;
            let status = response.status();
            if !status.is_success() {
                return Err(Error::ForgeStatus {
                    forge: Provider::Gitlab,
                    status,
                });
            }
            let diffs: Vec<GitlabDiff> = response
                .json()
                .await
                .map_err(|e| Error::GitLabAnswer(e.without_url()))?;
            let last = diffs.len() < PER_PAGE;
            for d in diffs {
                if d.old_path != d.new_path {
                    files.push(d.old_path);
                }
                files.push(d.new_path);
            }
            if last {
                return Ok(FileList {
                    files,
                    complete: true,
                });
            }
        }
        Ok(FileList {
            files,
            complete: false,
        })
    }
}

/// Why there is no GitLab look-up or status: no token.
pub(crate) const NO_GITLAB_TOKEN: Error = Error::NoCredentials {
    forge: "GitLab",
    hint: "SLUICE_GITLAB_TOKEN",
};

/// A GitLab project path as its API takes it in a URL (`group%2Fsub%2Fproject`).
pub fn gitlab_project(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
