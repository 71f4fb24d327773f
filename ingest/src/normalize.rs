//! Turns each forge's payload into the envelope of `sluice_core::Event`.
//!
//! Payloads are read into small typed views that name only the fields Sluice uses;
//! everything else is skipped by the parser, which is much cheaper than building a
//! `serde_json::Value` of a 30 KB pull request payload on every delivery.
//!
//! Those views are built only for verified deliveries. Before verification ingest
//! reads just the name that selects the secret ([`github_target`], [`gitlab_target`],
//! [`generic_target`]): a borrowed parse of one field that skips everything else
//! without allocating, so an unauthenticated body costs no more memory than itself.

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde::Deserialize;
use sluice_core::envelope::kind;
use sluice_core::{subjects, Event, Provider};

/// The payload could not be read as the event it claims to be.
#[derive(Debug)]
pub struct Malformed(pub String);

impl From<serde_json::Error> for Malformed {
    fn from(e: serde_json::Error) -> Self {
        Malformed(format!("invalid JSON payload: {e}"))
    }
}

/// GitHub pushes list at most this many commits; a push listing exactly this many may
/// have touched files that are not listed.
const GITHUB_MAX_COMMITS: usize = 2048;
const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

// === GitHub ===

#[derive(Debug, Deserialize)]
pub struct GithubPayload {
    action: Option<String>,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    ref_type: Option<String>,
    after: Option<String>,
    #[serde(default)]
    created: bool,
    #[serde(default)]
    deleted: bool,
    repository: Option<GhRepo>,
    organization: Option<GhLogin>,
    sender: Option<GhLogin>,
    pull_request: Option<GhPull>,
    issue: Option<GhIssue>,
    comment: Option<GhComment>,
    commits: Option<Vec<Commit>>,
}

#[derive(Debug, Deserialize)]
struct GhRepo {
    full_name: Option<String>,
    clone_url: Option<String>,
    default_branch: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GhLogin {
    login: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GhPull {
    number: Option<u64>,
    draft: Option<bool>,
    head: Option<GhBranch>,
    base: Option<GhBranch>,
    author_association: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GhBranch {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    sha: Option<String>,
    /// `None` when the payload leaves `repo` out, `Some(None)` when it is `null`: GitHub
    /// sends `null` for a head whose fork was deleted.
    #[serde(default, deserialize_with = "present")]
    repo: Option<Option<GhRepoName>>,
}

#[derive(Debug, Deserialize)]
struct GhRepoName {
    full_name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GhIssue {
    number: Option<u64>,
    /// Present (an object) only when the issue is a pull request.
    pull_request: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Deserialize)]
struct GhComment {
    body: Option<String>,
    author_association: Option<String>,
    user: Option<GhLogin>,
}

/// A commit in a push payload; both forges use these field names.
#[derive(Debug, Deserialize)]
struct Commit {
    #[serde(default)]
    added: Vec<String>,
    #[serde(default)]
    removed: Vec<String>,
    #[serde(default)]
    modified: Vec<String>,
}

impl GithubPayload {
    /// The repository the delivery is about.
    pub fn repo(&self) -> Option<&str> {
        self.repository.as_ref()?.full_name.as_deref()
    }

    /// The organisation of an organisation-level hook without a repository.
    pub fn org(&self) -> Option<&str> {
        self.organization.as_ref()?.login.as_deref()
    }

    /// What selects this delivery's secret: the repository, else the organisation.
    /// The same answer [`github_target`] gives for the same bytes.
    pub fn target(&self) -> Option<&str> {
        self.repo().or(self.org())
    }
}

/// The name that selects a GitHub delivery's secret (`repository.full_name`, else
/// `organization.login`), read from an unverified payload without building it. `None`
/// when the payload names neither or is not JSON: the default secrets then apply, and
/// a payload that is not JSON is refused after verification.
pub fn github_target(payload: &[u8]) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Target<'a> {
        #[serde(borrow)]
        repository: Option<Repo<'a>>,
        #[serde(borrow)]
        organization: Option<Org<'a>>,
    }
    #[derive(Deserialize)]
    struct Repo<'a> {
        #[serde(borrow)]
        full_name: Option<Text<'a>>,
    }
    #[derive(Deserialize)]
    struct Org<'a> {
        #[serde(borrow)]
        login: Option<Text<'a>>,
    }
    let t: Target<'_> = serde_json::from_slice(payload).ok()?;
    t.repository
        .and_then(|r| r.full_name)
        .or_else(|| t.organization.and_then(|o| o.login))
        .map(|t| t.0)
}

/// Normalizes a GitHub delivery of event `event_name` (`X-GitHub-Event`).
pub fn github(event_name: &str, delivery: &str, p: GithubPayload) -> Event {
    let kind = match event_name {
        "push"
            if p.git_ref
                .as_deref()
                .is_some_and(|r| r.starts_with("refs/tags/")) =>
        {
            kind::TAG
        }
        "push" => kind::PUSH,
        "pull_request" => kind::PULL_REQUEST,
        "issue_comment" | "pull_request_review_comment" | "commit_comment" => kind::COMMENT,
        "ping" => kind::PING,
        other => other,
    };
    let mut e = Event::new(Provider::Github, delivery, subjects::token(kind));
    e.repo = p
        .repo()
        .map(str::to_owned)
        .or_else(|| p.org().map(str::to_owned));
    e.clone_url = p.repository.as_ref().and_then(|r| r.clone_url.clone());
    e.default_branch = p.repository.as_ref().and_then(|r| r.default_branch.clone());
    e.actor = p.sender.as_ref().and_then(|s| s.login.clone());
    e.action = p.action.clone();

    match event_name {
        "push" => {
            e.git_ref = p.git_ref;
            if p.deleted {
                e.action = Some("deleted".into());
                e.changed_files = Some(Vec::new());
                e.changed_files_complete = true;
            } else {
                if p.created {
                    e.action = Some("created".into());
                }
                e.sha = p.after.filter(|s| s != ZERO_SHA);
                if let Some(commits) = &p.commits {
                    e.changed_files = Some(changed_files(commits));
                    // A new branch's first push lists only the commits new to the
                    // repository, not what differs from the default branch.
                    e.changed_files_complete = commits.len() < GITHUB_MAX_COMMITS && !p.created;
                }
            }
        }
        "pull_request" => {
            if let Some(pr) = p.pull_request {
                e.pr = pr.number;
                e.pr_draft = pr.draft;
                e.actor_association = pr.author_association;
                github_branches(&mut e, pr.head, pr.base);
                // The PR's head as the base repository serves it: fetchable from
                // `clone_url` even when the branch lives in a fork.
                e.git_ref = e.pr.map(|n| format!("refs/pull/{n}/head"));
            }
        }
        "issue_comment" | "pull_request_review_comment" | "commit_comment" => {
            if let Some(c) = p.comment {
                e.comment = c.body;
                e.actor_association = c.author_association;
                if let Some(login) = c.user.and_then(|u| u.login) {
                    e.actor = Some(login);
                }
            }
            let pr = match (&p.issue, &p.pull_request) {
                (Some(issue), _) if issue.pull_request.is_some() => issue.number,
                (_, Some(pr)) => pr.number,
                _ => None,
            };
            // Review comments carry the pull request with its head and base; issue
            // comments only say the issue is one, so their branches stay unknown.
            if let Some(pr_payload) = p.pull_request {
                github_branches(&mut e, pr_payload.head, pr_payload.base);
            }
            e.pr = pr;
            e.git_ref = pr.map(|n| format!("refs/pull/{n}/head"));
        }
        "create" | "delete" => {
            e.git_ref = match (p.ref_type.as_deref(), p.git_ref) {
                (Some("tag"), Some(r)) => Some(format!("refs/tags/{r}")),
                (Some("branch"), Some(r)) => Some(heads(&r)),
                (_, r) => r,
            };
        }
        _ => e.git_ref = p.git_ref,
    }
    e
}

/// Fills a pull request's head commit, target branch, base commit and fork flag.
fn github_branches(e: &mut Event, head: Option<GhBranch>, base: Option<GhBranch>) {
    e.from_fork = github_fork(head.as_ref(), base.as_ref());
    e.sha = head.and_then(|h| h.sha);
    if let Some(b) = base {
        e.base_ref = b.git_ref.map(|r| heads(&r));
        e.base_sha = b.sha;
    }
}

/// Whether a pull request's head is in another repository than its base. A `null` head
/// repository is a deleted fork (the base repository cannot be gone while it sends
/// hooks); missing repository objects or names say nothing.
fn github_fork(head: Option<&GhBranch>, base: Option<&GhBranch>) -> Option<bool> {
    let head_repo = head?.repo.as_ref()?;
    let Some(head_repo) = head_repo else {
        return Some(true);
    };
    let head_name = head_repo.full_name.as_deref()?;
    let base_name = base?.repo.as_ref()?.as_ref()?.full_name.as_deref()?;
    Some(!head_name.eq_ignore_ascii_case(base_name))
}

// === GitLab ===

#[derive(Debug, Deserialize)]
pub struct GitlabPayload {
    object_kind: Option<String>,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    after: Option<String>,
    checkout_sha: Option<String>,
    user_username: Option<String>,
    user_id: Option<u64>,
    user: Option<GlUser>,
    project: Option<GlProject>,
    commits: Option<Vec<Commit>>,
    total_commits_count: Option<u64>,
    object_attributes: Option<GlAttributes>,
    merge_request: Option<GlMergeRequest>,
}

#[derive(Debug, Deserialize)]
struct GlUser {
    id: Option<u64>,
    username: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GlProject {
    path_with_namespace: Option<String>,
    git_http_url: Option<String>,
    default_branch: Option<String>,
}

#[derive(Debug, Deserialize)]
struct GlAttributes {
    iid: Option<u64>,
    action: Option<String>,
    target_branch: Option<String>,
    last_commit: Option<GlCommitRef>,
    oldrev: Option<String>,
    source_project_id: Option<u64>,
    target_project_id: Option<u64>,
    draft: Option<bool>,
    work_in_progress: Option<bool>,
    note: Option<String>,
    noteable_type: Option<String>,
    /// A note's author (older note hooks carry no `user.id`).
    author_id: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct GlMergeRequest {
    iid: Option<u64>,
    target_branch: Option<String>,
    last_commit: Option<GlCommitRef>,
    source_project_id: Option<u64>,
    target_project_id: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct GlCommitRef {
    id: Option<String>,
}

impl GitlabPayload {
    /// The project's full path; it also selects the delivery's secret.
    pub fn repo(&self) -> Option<&str> {
        self.project.as_ref()?.path_with_namespace.as_deref()
    }
}

/// The project path that selects a GitLab delivery's secret
/// (`project.path_with_namespace`), read from an unverified payload without building
/// it; `None` as for [`github_target`].
pub fn gitlab_target(payload: &[u8]) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Target<'a> {
        #[serde(borrow)]
        project: Option<Project<'a>>,
    }
    #[derive(Deserialize)]
    struct Project<'a> {
        #[serde(borrow)]
        path_with_namespace: Option<Text<'a>>,
    }
    let t: Target<'_> = serde_json::from_slice(payload).ok()?;
    t.project?.path_with_namespace.map(|t| t.0)
}

/// Normalizes a GitLab delivery of `X-Gitlab-Event` `event_name`.
pub fn gitlab(event_name: &str, delivery: &str, p: GitlabPayload) -> Event {
    let is_mr_note = p
        .object_attributes
        .as_ref()
        .and_then(|a| a.noteable_type.as_deref())
        == Some("MergeRequest");
    let kind = match event_name {
        "Push Hook" => kind::PUSH.to_owned(),
        "Tag Push Hook" => kind::TAG.to_owned(),
        "Merge Request Hook" => kind::PULL_REQUEST.to_owned(),
        "Note Hook" if is_mr_note => kind::COMMENT.to_owned(),
        // Other hooks keep their own name: the payload's `object_kind` (`note`,
        // `pipeline`, `build`, …), else the header's words.
        other => subjects::token(
            p.object_kind
                .as_deref()
                .unwrap_or(other.trim_end_matches(" Hook")),
        ),
    };
    let mut e = Event::new(Provider::Gitlab, delivery, kind);
    e.repo = p.repo().map(str::to_owned);
    e.clone_url = p.project.as_ref().and_then(|p| p.git_http_url.clone());
    e.default_branch = p.project.as_ref().and_then(|p| p.default_branch.clone());
    e.actor = p
        .user_username
        .clone()
        .or_else(|| p.user.as_ref().and_then(|u| u.username.clone()));
    // Pushes name the pusher in `user_id`; merge request and note hooks in `user`.
    e.actor_id = p.user_id.or_else(|| p.user.as_ref().and_then(|u| u.id));

    match event_name {
        "Push Hook" | "Tag Push Hook" => {
            e.git_ref = p.git_ref;
            let after = p.after.filter(|s| s != ZERO_SHA);
            if after.is_none() {
                e.action = Some("deleted".into());
                e.changed_files = Some(Vec::new());
                e.changed_files_complete = true;
            } else {
                e.sha = p.checkout_sha.or(after);
                if let Some(commits) = &p.commits {
                    e.changed_files = Some(changed_files(commits));
                    // GitLab lists at most 20 commits but counts them all.
                    e.changed_files_complete =
                        p.total_commits_count.unwrap_or(0) <= commits.len() as u64;
                }
            }
        }
        "Merge Request Hook" => {
            if let Some(a) = p.object_attributes {
                e.pr = a.iid;
                e.action = a.action.map(|act| gitlab_action(&act, a.oldrev.is_some()));
                e.sha = a.last_commit.and_then(|c| c.id);
                e.base_ref = a.target_branch.map(|b| heads(&b));
                // `base_sha` stays `None`: merge request hooks name the target branch
                // but not its commit (`oldrev` is the source branch's previous head,
                // and `diff_refs` is in the API's merge request, not the hook's).
                e.from_fork = gitlab_fork(a.source_project_id, a.target_project_id);
                e.pr_draft = a.draft.or(a.work_in_progress);
            }
            e.git_ref = e.pr.map(|n| format!("refs/merge-requests/{n}/head"));
        }
        "Note Hook" => {
            if let Some(a) = p.object_attributes {
                e.comment = a.note;
                e.action = Some("created".into());
                e.actor_id = e.actor_id.or(a.author_id);
            }
            if let Some(mr) = p.merge_request {
                e.pr = mr.iid;
                e.sha = mr.last_commit.and_then(|c| c.id);
                e.base_ref = mr.target_branch.map(|b| heads(&b));
                e.from_fork = gitlab_fork(mr.source_project_id, mr.target_project_id);
                e.git_ref = e.pr.map(|n| format!("refs/merge-requests/{n}/head"));
            }
        }
        _ => e.git_ref = p.git_ref,
    }
    e
}

/// Whether a merge request comes from another project than the one it targets (a
/// fork); `None` unless the payload names both.
fn gitlab_fork(source: Option<u64>, target: Option<u64>) -> Option<bool> {
    Some(source? != target?)
}

/// GitLab's merge request actions in GitHub's words, so one trigger can list
/// `opened, synchronize, reopened` for both forges. An `update` that carries `oldrev`
/// pushed new commits (`synchronize`); other updates are `edited`.
fn gitlab_action(action: &str, new_commits: bool) -> String {
    match action {
        "open" => "opened",
        "reopen" => "reopened",
        "close" => "closed",
        "merge" => "merged",
        "update" if new_commits => "synchronize",
        "update" => "edited",
        "approved" | "approval" => "approved",
        "unapproved" | "unapproval" => "unapproved",
        other => other,
    }
    .to_owned()
}

// === Standard Webhooks (generic) ===

/// A Standard Webhooks body: `type` names the event, `data` describes it with the
/// envelope's own field names.
#[derive(Debug, Deserialize)]
pub struct GenericPayload {
    #[serde(rename = "type")]
    event_type: Option<String>,
    data: Option<GenericData>,
}

#[derive(Debug, Deserialize, Default)]
struct GenericData {
    action: Option<String>,
    repo: Option<String>,
    clone_url: Option<String>,
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    sha: Option<String>,
    base_ref: Option<String>,
    pr: Option<u64>,
    actor: Option<String>,
    changed_files: Option<Vec<String>>,
    comment: Option<String>,
}

impl GenericPayload {
    /// The repository named in `data.repo`; it also selects the delivery's secret.
    pub fn repo(&self) -> Option<&str> {
        self.data.as_ref()?.repo.as_deref()
    }
}

/// The repository that selects a Standard Webhooks delivery's secret (`data.repo`),
/// read from an unverified payload without building it; `None` as for
/// [`github_target`].
pub fn generic_target(payload: &[u8]) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Target<'a> {
        #[serde(borrow)]
        data: Option<Data<'a>>,
    }
    #[derive(Deserialize)]
    struct Data<'a> {
        #[serde(borrow)]
        repo: Option<Text<'a>>,
    }
    let t: Target<'_> = serde_json::from_slice(payload).ok()?;
    t.data?.repo.map(|t| t.0)
}

/// Normalizes a Standard Webhooks delivery.
pub fn generic(delivery: &str, p: GenericPayload) -> Result<Event, Malformed> {
    let event_type = p
        .event_type
        .ok_or_else(|| Malformed("a Standard Webhooks payload needs a `type` field".into()))?;
    let d = p.data.unwrap_or_default();
    let mut e = Event::new(Provider::Generic, delivery, subjects::token(&event_type));
    e.action = d.action;
    e.repo = d.repo;
    e.clone_url = d.clone_url;
    e.git_ref = d.git_ref;
    e.sha = d.sha;
    e.base_ref = d.base_ref;
    e.pr = d.pr;
    e.actor = d.actor;
    e.changed_files_complete = d.changed_files.is_some();
    e.changed_files = d.changed_files;
    e.comment = d.comment;
    Ok(e)
}

// === helpers ===

/// A string borrowed from the body when it has no escapes, owned when it has (serde's
/// own `Cow` always allocates, and `&str` cannot hold an unescaped name).
struct Text<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
        }
        d.deserialize_str(Visitor).map(Text)
    }
}

/// For `Option<Option<T>>` fields with `#[serde(default)]`: a present `null` is
/// `Some(None)`, so it differs from a missing field (`None`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

fn heads(branch: &str) -> String {
    if branch.starts_with("refs/") {
        branch.to_owned()
    } else {
        format!("refs/heads/{branch}")
    }
}

fn changed_files(commits: &[Commit]) -> Vec<String> {
    let mut set = BTreeSet::new();
    for c in commits {
        for f in c.added.iter().chain(&c.removed).chain(&c.modified) {
            set.insert(f.clone());
        }
    }
    set.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_actions_speak_github() {
        assert_eq!(gitlab_action("open", false), "opened");
        assert_eq!(gitlab_action("update", true), "synchronize");
        assert_eq!(gitlab_action("update", false), "edited");
        assert_eq!(gitlab_action("weird", false), "weird");
    }

    #[test]
    fn github_tag_push_is_a_tag() {
        let p: GithubPayload = serde_json::from_str(
            r#"{"ref":"refs/tags/v1","after":"abc","repository":{"full_name":"o/r"},"commits":[]}"#,
        )
        .expect("json");
        let e = github("push", "d", p);
        assert_eq!(e.kind, "tag");
        assert_eq!(e.sha.as_deref(), Some("abc"));
        assert_eq!(e.repo.as_deref(), Some("o/r"));
    }

    #[test]
    fn unknown_events_keep_their_name() {
        let p: GithubPayload = serde_json::from_str(r#"{"action":"completed"}"#).expect("json");
        assert_eq!(github("check_run", "d", p).kind, "check_run");
        let p: GitlabPayload = serde_json::from_str(r#"{"object_kind":"pipeline"}"#).expect("json");
        assert_eq!(gitlab("Pipeline Hook", "d", p).kind, "pipeline");
        let p: GitlabPayload = serde_json::from_str(r#"{}"#).expect("json");
        assert_eq!(gitlab("Job Hook", "d", p).kind, "job");
    }

    #[test]
    fn targets_are_read_without_the_rest_of_the_payload() {
        // Everything but the selecting field is skipped, whatever its type: a list a
        // typed parse would reject (or allocate millions of strings for) costs nothing.
        let gh = br#"{"commits":"not a list","repository":{"full_name":"acme/app","id":1},"organization":{"login":"acme"}}"#;
        let t = github_target(gh);
        assert_eq!(t.as_deref(), Some("acme/app"));
        assert!(
            matches!(t, Some(Cow::Borrowed(_))),
            "borrowed from the body"
        );
        assert_eq!(
            github_target(br#"{"organization":{"login":"acme"},"repository":null}"#).as_deref(),
            Some("acme")
        );
        // An escaped name is unescaped, as the full parse reads it.
        assert_eq!(
            github_target(br#"{"repository":{"full_name":"acme\/app"}}"#).as_deref(),
            Some("acme/app")
        );
        assert_eq!(github_target(b"{\"repository\": "), None);
        assert_eq!(github_target(b"[]"), None);
        assert_eq!(
            gitlab_target(br#"{"commits":[1,2],"project":{"path_with_namespace":"a/b/c"}}"#)
                .as_deref(),
            Some("a/b/c")
        );
        assert_eq!(gitlab_target(br#"{"project":{}}"#), None);
        assert_eq!(
            generic_target(br#"{"type":7,"data":{"changed_files":{},"repo":"a/b"}}"#).as_deref(),
            Some("a/b")
        );
        assert_eq!(generic_target(br#"{"data":"x"}"#), None);
    }

    #[test]
    fn a_target_and_the_full_parse_agree() {
        for body in [
            &br#"{"repository":{"full_name":"acme/app"},"organization":{"login":"acme"}}"#[..],
            br#"{"organization":{"login":"acme"}}"#,
            br#"{"repository":{"full_name":"acme\u002fapp"}}"#,
            br#"{}"#,
        ] {
            let p: GithubPayload = serde_json::from_slice(body).expect("json");
            assert_eq!(github_target(body).as_deref(), p.target(), "{body:?}");
        }
    }

    /// A payload from the shared webhook fixtures (`SLUICE_FIXTURES`, else
    /// `../shared/fixtures` beside the workspace).
    fn fixture(name: &str) -> serde_json::Value {
        let dir = std::env::var_os("SLUICE_FIXTURES")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures")
            });
        let path = dir.join(name);
        let body = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
        serde_json::from_slice(&body).expect("fixture is JSON")
    }

    fn github_event(event_name: &str, v: &serde_json::Value) -> Event {
        github(
            event_name,
            "d",
            serde_json::from_value(v.clone()).expect("payload"),
        )
    }

    fn gitlab_event(event_name: &str, v: &serde_json::Value) -> Event {
        gitlab(
            event_name,
            "d",
            serde_json::from_value(v.clone()).expect("payload"),
        )
    }

    const HELLO_WORLD_BASE: &str = "f95f852bd8fca8fcc58a9a2d6c842781e32a215e";

    #[test]
    fn github_pull_requests_carry_their_base_commit_and_fork_flag() {
        // Every pull request fixture is a branch of Codertocat/Hello-World itself.
        for name in [
            "opened",
            "synchronize",
            "reopened",
            "closed",
            "labeled",
            "converted_to_draft",
        ] {
            let e = github_event(
                "pull_request",
                &fixture(&format!("github/pull_request.{name}.json")),
            );
            assert_eq!(e.base_sha.as_deref(), Some(HELLO_WORLD_BASE), "{name}");
            assert_eq!(e.from_fork, Some(false), "{name}");
            assert_eq!(e.base_ref.as_deref(), Some("refs/heads/master"), "{name}");
            assert_eq!(
                e.sha.as_deref(),
                Some("ec26c3e57ca3a959ca5aad62de7213c562f8c821"),
                "{name}"
            );
        }
    }

    #[test]
    fn github_fork_is_read_from_the_head_and_base_repositories() {
        let opened = fixture("github/pull_request.opened.json");
        let from = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = opened.clone();
            edit(&mut v["pull_request"]);
            github_event("pull_request", &v).from_fork
        };

        let fork = from(&|pr| pr["head"]["repo"]["full_name"] = "octocat/Hello-World".into());
        assert_eq!(fork, Some(true), "head in another repository");
        // GitHub names are case-insensitive: the same repository spelled otherwise.
        let same = from(&|pr| pr["head"]["repo"]["full_name"] = "codertocat/hello-world".into());
        assert_eq!(same, Some(false));
        // A deleted fork leaves `head.repo: null`.
        assert_eq!(
            from(&|pr| pr["head"]["repo"] = serde_json::Value::Null),
            Some(true)
        );
        assert_eq!(
            from(&|pr| {
                pr["head"].as_object_mut().expect("head").remove("repo");
                pr["base"].as_object_mut().expect("base").remove("repo");
            }),
            None,
            "no repository objects: unknown"
        );
        assert_eq!(
            from(&|pr| {
                pr["base"].as_object_mut().expect("base").remove("repo");
            }),
            None,
            "no base repository: unknown"
        );
        // The base commit does not depend on where the head is.
        let mut v = opened.clone();
        v["pull_request"]["head"]["repo"] = serde_json::Value::Null;
        let e = github_event("pull_request", &v);
        assert_eq!(e.base_sha.as_deref(), Some(HELLO_WORLD_BASE));
        assert_eq!(e.from_fork, Some(true));
    }

    #[test]
    fn github_comments_carry_the_base_only_with_the_pull_request() {
        // An issue comment (this fixture is on a plain issue) names no branches.
        let e = github_event(
            "issue_comment",
            &fixture("github/issue_comment.created.json"),
        );
        assert_eq!((e.base_sha, e.from_fork), (None, None));

        // A review comment carries the whole pull request.
        let mut v = fixture("github/pull_request.opened.json");
        v["action"] = "created".into();
        v["comment"] = serde_json::json!({"body": "looks good", "user": {"login": "octocat"}});
        let e = github_event("pull_request_review_comment", &v);
        assert_eq!(e.base_sha.as_deref(), Some(HELLO_WORLD_BASE));
        assert_eq!(e.from_fork, Some(false));
        v["pull_request"]["head"]["repo"]["full_name"] = "octocat/Hello-World".into();
        let e = github_event("pull_request_review_comment", &v);
        assert_eq!(e.from_fork, Some(true));
        assert_eq!(e.pr, Some(2));
    }

    #[test]
    fn gitlab_merge_requests_say_whether_they_come_from_a_fork() {
        let mr = fixture("gitlab/merge-request-event.json");
        let e = gitlab_event("Merge Request Hook", &mr);
        assert_eq!(e.from_fork, Some(false), "project 14 into project 14");
        assert_eq!(
            e.base_sha, None,
            "the hook does not name the target's commit"
        );
        assert_eq!(e.base_ref.as_deref(), Some("refs/heads/master"));
        assert_eq!(e.actor_id, Some(1), "the merge request hook's `user.id`");

        let mut fork = mr.clone();
        fork["object_attributes"]["source_project_id"] = 15.into();
        assert_eq!(
            gitlab_event("Merge Request Hook", &fork).from_fork,
            Some(true)
        );
        let mut unknown = mr.clone();
        unknown["object_attributes"]
            .as_object_mut()
            .expect("attributes")
            .remove("target_project_id");
        assert_eq!(gitlab_event("Merge Request Hook", &unknown).from_fork, None);

        let note = fixture("gitlab/comment-merge-request-event.json");
        let e = gitlab_event("Note Hook", &note);
        assert_eq!(e.kind, "comment");
        assert_eq!(e.from_fork, Some(false), "project 5 into project 5");
        assert_eq!(e.base_sha, None);
        assert_eq!(
            e.sha.as_deref(),
            Some("562e173be03b8ff2efb05345d12df18815438a4b"),
            "the merge request's last commit"
        );
        assert_eq!(e.actor_id, Some(1), "the note's `author_id`: no `user.id`");
        let mut with_id = note.clone();
        with_id["user"]["id"] = 9.into();
        assert_eq!(gitlab_event("Note Hook", &with_id).actor_id, Some(9));
        let commit_note = fixture("gitlab/comment-commit-event.json");
        assert_eq!(gitlab_event("Note Hook", &commit_note).actor_id, Some(1));
        let mut fork = note.clone();
        fork["merge_request"]["source_project_id"] = 6.into();
        assert_eq!(gitlab_event("Note Hook", &fork).from_fork, Some(true));
    }

    #[test]
    fn pushes_have_no_base_commit_or_fork() {
        let e = github_event("push", &fixture("github/push.with-new-branch.json"));
        assert_eq!((e.base_sha, e.from_fork), (None, None));
        let e = gitlab_event("Push Hook", &fixture("gitlab/push-event.json"));
        assert_eq!((e.base_sha, e.from_fork), (None, None));
        assert_eq!(e.actor_id, Some(4), "the push hook's `user_id`");
        let e = gitlab_event("Tag Push Hook", &fixture("gitlab/tag-event.json"));
        assert_eq!(e.actor_id, Some(1));
        let e = github_event("push", &fixture("github/push.with-new-branch.json"));
        assert_eq!(e.actor_id, None, "GitHub events leave it out");
    }

    #[test]
    fn generic_needs_a_type() {
        let p: GenericPayload = serde_json::from_str(r#"{"data":{}}"#).expect("json");
        assert!(generic("m", p).is_err());
    }
}
