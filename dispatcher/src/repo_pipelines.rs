//! Repository pipelines at dispatch time: whether an event's repository is read at all
//! (`--repo-pipelines`, none by default), whose definitions it runs (core's trust
//! rule), and the pipelines read from its `.sluice/` through [`RepoFiles`].
//!
//! A repository pipeline is considered only for events of its own repository, beside
//! the applied pipelines that watch it; it is named `<repo>:<name>`, so it can never
//! shadow an applied one.

use std::sync::Arc;

use async_nats::jetstream::kv::Store;
use sluice_core::envelope::kind;
use sluice_core::pipeline::{passes, Glob, Pipeline};
use sluice_core::repo_pipelines::{self, Limits, Side};
use sluice_core::run::RepoPipelinesRead;
use sluice_core::{subjects, Event, Provider};

use serde::Deserialize;

use crate::budget::ForgeBudget;
use crate::forge::ForgeConfig;
use crate::github::GitHub;
use crate::members::{self, Members};
use crate::repo_files::{self, RepoFiles};
use crate::reporter;
use crate::{Error, Result};

/// Which repositories' `.sluice/` the dispatcher reads, and the limits on what it reads.
#[derive(Debug, Clone, Default)]
pub struct RepoPipelinesConfig {
    /// Repository globs (`acme/*`, `!acme/secret`); none reads nothing.
    pub repos: Vec<Glob>,
    pub limits: Limits,
}

impl RepoPipelinesConfig {
    /// True when `repo`'s pipelines are read: a glob includes it and none excludes it.
    pub fn opted_in(&self, repo: &str) -> bool {
        opted_in(&self.repos, repo)
    }
}

/// True when the globs include `repo` (compared in lower case, like triggers) and none
/// excludes it. No globs: no repository.
pub fn opted_in(globs: &[Glob], repo: &str) -> bool {
    globs.iter().any(|g| !g.is_negated()) && passes(globs, &repo.to_ascii_lowercase())
}

/// An event's repository pipelines and the record of where they came from.
#[derive(Debug, Default)]
pub struct Loaded {
    pub pipelines: Vec<Arc<Pipeline>>,
    pub record: RepoPipelinesRead,
    /// For an approved `/ok-to-test`: the event the pipelines are matched and planned
    /// against (the pull request's head commit), instead of the comment.
    pub as_event: Option<Event>,
}

/// Reads repositories' pipelines for events.
#[derive(Debug)]
pub struct RepoPipelines {
    config: RepoPipelinesConfig,
    files: RepoFiles,
    /// `SLUICE_REPORTS`, with `--report-statuses`: refused files fail `sluice/config`.
    reports: Option<Store>,
    /// `SLUICE_REPO_FILES`, where what was last read from each repository is noted.
    last_read: Option<Store>,
    /// Pull request look-ups for `/ok-to-test`.
    github: Option<GitHub>,
    /// GitLab merge request authors' membership, with a GitLab token.
    members: Option<Arc<Members>>,
    /// The forge request budget shared with the reporter; `None`: not limited.
    budget: Option<ForgeBudget>,
    timeout: std::time::Duration,
}

impl RepoPipelines {
    /// `cache` is the `SLUICE_REPO_FILES` bucket the replicas share; `reports` the
    /// reporter's `SLUICE_REPORTS` when commit statuses are sent; `budget` the forge
    /// request budget every forge read takes from (`None`: reads are not limited).
    pub fn new(
        config: RepoPipelinesConfig,
        forge: &ForgeConfig,
        cache: Option<Store>,
        reports: Option<Store>,
        budget: Option<ForgeBudget>,
    ) -> Result<Self> {
        let files = RepoFiles::new(forge, cache.clone(), config.limits)?;
        let files = match &budget {
            Some(b) => files.sharing(b.clone()),
            None => files,
        };
        let github = GitHub::new(
            &forge.github_api_url,
            forge.github_token.as_ref(),
            forge.github_app.as_ref(),
        )?;
        Ok(RepoPipelines {
            config,
            files,
            reports,
            last_read: cache,
            github,
            members: None,
            budget,
            timeout: forge.timeout,
        })
    }

    /// GitLab merge requests' authors are looked up in `members` (the trust rule's
    /// `trusted_author`).
    pub fn with_members(mut self, members: Arc<Members>) -> Self {
        self.members = Some(members);
        self
    }

    /// Forge requests made so far.
    pub fn requests(&self) -> u64 {
        self.files.requests()
    }

    /// The repository pipelines `event` runs, or `None` when its repository is not
    /// opted in (then nothing is read). A forge error that may pass (down, slow, rate
    /// limited) is returned, for the event to be retried and dead-lettered with the
    /// reason once its attempts are spent. One that cannot (no credentials, refused,
    /// the App not installed) reads nothing: the record says why and which setting to
    /// fix, and the applied pipelines still run — dead-lettering every event of the
    /// repository would stop those too. Files that do not parse are in the record, and
    /// the others still count.
    pub async fn load(&self, event: &Event) -> Result<Option<Loaded>> {
        match self.load_or_fail(event).await {
            Err(e) if !e.is_retryable() => {
                tracing::warn!(event_id = %event.id, repo = event.repo.as_deref().unwrap_or(""), error = %e, "repository pipelines not read");
                Ok(Some(Loaded {
                    record: RepoPipelinesRead {
                        reason: format!("not read: {e}"),
                        ..RepoPipelinesRead::default()
                    },
                    ..Loaded::default()
                }))
            }
            other => other,
        }
    }

    async fn load_or_fail(&self, event: &Event) -> Result<Option<Loaded>> {
        let Some(repo) = event.repo.as_deref() else {
            return Ok(None);
        };
        // An event that names an applied pipeline (a rerun, a child) runs that one alone.
        if event
            .pipeline
            .as_deref()
            .is_some_and(|p| !repo_pipelines::is_repo_pipeline(p))
        {
            return Ok(None);
        }
        let not_read = |reason| {
            Ok(Some(Loaded {
                record: RepoPipelinesRead {
                    reason,
                    ..RepoPipelinesRead::default()
                },
                ..Loaded::default()
            }))
        };
        if !self.config.opted_in(repo) {
            return match event.repo_pipelines_at {
                Some(_) => not_read(format!(
                    "{repo} is no longer among --repo-pipelines: its pipelines are not read, not even for a rerun"
                )),
                None => Ok(None),
            };
        }
        // A rerun reads what its run read, judged when it first ran.
        if let Some(pinned) = &event.repo_pipelines_at {
            return self.read(event, repo, pinned.source()).await.map(Some);
        }
        // Named without that pin (stored by hand, or by an older CLI), judging the
        // event again could run what nobody approved: an `/ok-to-test` comment would
        // run the pull request's head as it is now.
        if event.pipeline.is_some() {
            return not_read(
                "a repository pipeline is started by name only by a rerun, which carries where its run read it (`sluice runs rerun`)".into(),
            );
        }
        if let Some(approval) = repo_pipelines::ok_to_test(event) {
            let pr = match approval {
                Ok(pr) => pr,
                Err(reason) => return not_read(reason),
            };
            let head = match event.provider {
                // The note names the merge request's head: nothing to look up.
                Provider::Gitlab => match gitlab_head(event) {
                    Some(head) => head,
                    None => {
                        return not_read(format!(
                            "the comment on merge request !{pr} names no head commit"
                        ))
                    }
                },
                _ => self.pull_head(repo, pr).await?,
            };
            let approved = repo_pipelines::approved_event(event, &head);
            let source = repo_pipelines::Source {
                side: Side::Head,
                git_ref: head.sha.clone(),
                reason: format!(
                    "{}'s {} approved pull request #{pr}'s proposed definitions at {}: they run as for a push to it",
                    event.actor.as_deref().unwrap_or("a trusted user"),
                    repo_pipelines::OK_TO_TEST,
                    head.sha
                ),
            };
            let mut loaded = self.read(event, repo, source).await?;
            loaded.as_event = Some(approved);
            return Ok(Some(loaded));
        }
        let association = self.author_association(event, repo).await?;
        // Judged with the association found, so the decision names it.
        let with_association = association.map(|a| {
            let mut e = event.clone();
            e.actor_association = Some(a.to_owned());
            e
        });
        let judged = with_association.as_ref().unwrap_or(event);
        let source = match repo_pipelines::source(judged, members::trusted(association)) {
            Ok(source) => source,
            Err(reason) => return not_read(reason),
        };
        self.read(event, repo, source).await.map(Some)
    }

    /// Reads and parses `repo`'s `.sluice/` where `source` says, noting what was read
    /// and failing `sluice/config` on the commit when files were refused.
    async fn read(
        &self,
        event: &Event,
        repo: &str,
        source: repo_pipelines::Source,
    ) -> Result<Loaded> {
        let listing = self
            .files
            .read(event.provider, repo, &source.git_ref)
            .await?;
        let parsed = repo_pipelines::parse(repo, &listing.files, &self.config.limits);
        let mut errors: Vec<String> = listing
            .refused
            .iter()
            .map(|(path, why)| format!("{path}: {why}"))
            .collect();
        errors.extend(parsed.errors.iter().map(|e| e.to_string()));
        self.record_last_read(event, &source, &parsed.pipelines, errors.len())
            .await;
        if !errors.is_empty() {
            tracing::warn!(event_id = %event.id, repo, git_ref = %source.git_ref, problems = errors.len(), "repository pipelines refused in part");
            // On the author's own commit only: a base branch's errors are not theirs
            // to fix, and the decision records them either way.
            if let (Some(reports), Side::Head) = (&self.reports, &source.side) {
                reporter::queue_config_failure(
                    reports,
                    event.provider,
                    repo,
                    &source.git_ref,
                    &event.id,
                    &errors,
                )
                .await?;
            }
        }
        Ok(Loaded {
            record: RepoPipelinesRead {
                side: Some(source.side),
                git_ref: Some(source.git_ref),
                reason: source.reason,
                pipelines: parsed
                    .pipelines
                    .iter()
                    .map(|p| p.name.to_string())
                    .collect(),
                errors,
            },
            pipelines: parsed.pipelines.into_iter().map(Arc::new).collect(),
            as_event: None,
        })
    }

    /// A GitLab merge request author's association from the members API, when it
    /// decides whose definitions run (a merge request from the project itself, by an
    /// author the payload gives no association) and can be looked up; else `None`.
    async fn author_association(&self, event: &Event, repo: &str) -> Result<Option<&'static str>> {
        let (Some(members), Some(user_id)) = (&self.members, event.actor_id) else {
            return Ok(None);
        };
        if event.provider != Provider::Gitlab
            || event.kind != kind::PULL_REQUEST
            || event.from_fork != Some(false)
            || event.actor_association.is_some()
        {
            return Ok(None);
        }
        members.association(repo, user_id).await
    }

    /// The pull request's head as GitHub reports it now: an `/ok-to-test` comment
    /// carries no head commit.
    async fn pull_head(&self, repo: &str, pr: u64) -> Result<repo_pipelines::PullHead> {
        #[derive(Deserialize)]
        struct Pull {
            head: Branch,
            base: Branch,
        }
        #[derive(Deserialize)]
        struct Branch {
            sha: String,
            #[serde(rename = "ref")]
            git_ref: Option<String>,
            repo: Option<Repo>,
        }
        #[derive(Deserialize)]
        struct Repo {
            full_name: String,
        }
        let Some(github) = &self.github else {
            return Err(crate::github::NO_CREDENTIALS);
        };
        if let Some(budget) = &self.budget {
            if budget
                .take(Provider::Github, std::time::Instant::now())
                .is_err()
            {
                return Err(repo_files::budget_spent(repo));
            }
        }
        let ask = async {
            let client = github.client(repo).await?;
            client
                .get::<Pull, _, ()>(format!("/repos/{repo}/pulls/{pr}"), None)
                .await
                .map_err(Error::GitHub)
        };
        let pull = tokio::time::timeout(self.timeout, ask)
            .await
            .map_err(|_| Error::ForgeTimeout(self.timeout))??;
        let from_fork = match (&pull.head.repo, &pull.base.repo) {
            (Some(head), Some(base)) => !head.full_name.eq_ignore_ascii_case(&base.full_name),
            // A deleted fork.
            _ => true,
        };
        Ok(repo_pipelines::PullHead {
            sha: pull.head.sha,
            git_ref: None,
            from_fork,
            base_sha: Some(pull.base.sha),
            base_ref: pull.base.git_ref.map(|r| format!("refs/heads/{r}")),
        })
    }
}

/// A GitLab merge request's head as its note names it (`merge_request.last_commit`);
/// `None` without one. A head of unknown origin counts as a fork's.
fn gitlab_head(comment: &Event) -> Option<repo_pipelines::PullHead> {
    let sha = comment.sha.clone().filter(|s| !s.is_empty())?;
    Some(repo_pipelines::PullHead {
        sha,
        git_ref: comment.git_ref.clone(),
        from_fork: comment.from_fork != Some(false),
        base_sha: comment.base_sha.clone(),
        base_ref: comment.base_ref.clone(),
    })
}

impl RepoPipelines {
    /// Notes what was read, for `sluice pipelines list`; best effort (a failure is
    /// logged: the decision holds the same record).
    async fn record_last_read(
        &self,
        event: &Event,
        source: &repo_pipelines::Source,
        pipelines: &[Pipeline],
        errors: usize,
    ) {
        let (Some(cache), Some(repo)) = (&self.last_read, event.repo.as_deref()) else {
            return;
        };
        let record = repo_pipelines::LastRead {
            provider: event.provider,
            repo: repo.to_owned(),
            side: source.side,
            git_ref: source.git_ref.clone(),
            event_id: event.id.clone(),
            pipelines: pipelines.iter().map(|p| p.name.to_string()).collect(),
            errors,
            read_at: time::OffsetDateTime::now_utc(),
        };
        let key = subjects::repo_last_read_key(event.provider.as_str(), repo);
        let put = match serde_json::to_vec(&record) {
            Ok(value) => cache
                .put(&key, value.into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = put {
            tracing::warn!(repo, error = %e, "cannot record the repository pipelines read");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn globs(list: &[&str]) -> Vec<Glob> {
        list.iter().map(|g| Glob::parse(g).unwrap()).collect()
    }

    #[test]
    fn no_globs_read_no_repository() {
        assert!(!opted_in(&[], "acme/app"));
        // Exclusions alone include nothing.
        assert!(!opted_in(&globs(&["!acme/secret"]), "acme/app"));
    }

    #[test]
    fn globs_include_and_exclude_in_lower_case() {
        let g = globs(&["acme/*", "!acme/secret"]);
        assert!(opted_in(&g, "acme/app"));
        assert!(opted_in(&g, "Acme/App"));
        assert!(!opted_in(&g, "acme/secret"));
        assert!(!opted_in(&g, "other/app"));
        assert!(opted_in(&globs(&["**"]), "group/sub/project"));
    }

    #[test]
    fn a_gitlab_note_names_its_merge_requests_head() {
        let mut note = Event::new(Provider::Gitlab, "n1", kind::COMMENT);
        note.pr = Some(3);
        note.sha = Some("abc".into());
        note.git_ref = Some("refs/merge-requests/3/head".into());
        note.base_ref = Some("refs/heads/main".into());
        note.from_fork = Some(false);
        let head = gitlab_head(&note).expect("a head");
        assert_eq!(
            (head.sha.as_str(), head.git_ref.as_deref(), head.from_fork),
            ("abc", Some("refs/merge-requests/3/head"), false)
        );
        assert_eq!(head.base_ref.as_deref(), Some("refs/heads/main"));
        note.from_fork = None;
        assert!(
            gitlab_head(&note).expect("a head").from_fork,
            "unknown: a fork"
        );
        note.sha = None;
        assert!(gitlab_head(&note).is_none());
    }
}
