//! Pipelines kept in a repository: the files `.sluice/*.yaml` and `.sluice/*.yml` at
//! an event's commit, in the format `sluice pipelines apply` takes.
//!
//! What is read (the limits), how the files become pipelines (named `<repo>:<name>`,
//! every file on its own so one bad file does not stop its siblings) and whose
//! definitions an event runs (the trust rule) are decided here, in pure functions, so
//! the dispatcher and `sluice pipelines validate` agree exactly.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::envelope::{kind, Event, Provider};
use crate::pipeline::{self, Pipeline, SpecError};

/// The folder of a repository that holds its pipelines.
pub const DIR: &str = ".sluice";

/// What a repository may make the dispatcher read and accept. Each refusal is
/// explained in the event's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pipeline files read from `.sluice/` (in path order); later ones are refused.
    pub max_files: usize,
    /// Bytes one file may have.
    pub max_file_bytes: usize,
    /// Deepest nesting of mappings and lists in a file.
    pub max_depth: usize,
    /// Pipelines one repository may define, all files together.
    pub max_pipelines: usize,
}

/// Default `--repo-pipelines-max-files`.
pub const MAX_FILES: usize = 20;
/// Default `--repo-pipelines-max-file-bytes`: a pipeline is a few kilobytes, and the
/// whole set of files must fit one cache entry (NATS's 1 MiB message) with room.
pub const MAX_FILE_BYTES: usize = 32 * 1024;
/// Default `--repo-pipelines-max-depth`.
pub const MAX_DEPTH: usize = 32;
/// Default `--repo-pipelines-max-pipelines`.
pub const MAX_PIPELINES: usize = 20;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_files: MAX_FILES,
            max_file_bytes: MAX_FILE_BYTES,
            max_depth: MAX_DEPTH,
            max_pipelines: MAX_PIPELINES,
        }
    }
}

/// One file of `.sluice/` as the forge served it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoFile {
    /// Path in the repository (`.sluice/build.yaml`).
    pub path: String,
    pub text: String,
}

/// Whether a file name directly inside `.sluice/` is a pipeline file.
pub fn is_pipeline_file(name: &str) -> bool {
    !name.starts_with('.')
        && !name.contains('/')
        && (name.ends_with(".yaml") || name.ends_with(".yml"))
}

/// The name a repository pipeline runs under: `<repo>:<name>`, so it can never shadow
/// or replace an applied pipeline (whose names have no `:`).
pub fn qualified_name(repo: &str, name: &str) -> String {
    format!("{repo}:{name}")
}

/// A repository's pipelines, and what was refused.
#[derive(Debug, Default)]
pub struct Parsed {
    /// Accepted pipelines, named `<repo>:<name>`.
    pub pipelines: Vec<Pipeline>,
    /// Files or pipelines refused, each with where and why.
    pub errors: Vec<SpecError>,
}

/// Parses `files` (as read from `.sluice/`) into `repo`'s pipelines. A file that does
/// not parse or validate is refused whole and the others still count; a pipeline
/// name defined in two files keeps the first (in path order); past the limits, what
/// comes later is refused.
pub fn parse(repo: &str, files: &[RepoFile], limits: &Limits) -> Parsed {
    let mut files: Vec<&RepoFile> = files.iter().collect();
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut out = Parsed::default();
    let mut defined_in: HashMap<String, &str> = HashMap::new();
    for (i, file) in files.iter().enumerate() {
        let refuse = |message: String| SpecError {
            file: file.path.clone(),
            line: 0,
            column: 0,
            message,
        };
        if i >= limits.max_files {
            out.errors.push(refuse(format!(
                "not read: a repository may have at most {} pipeline files in {DIR}/ (--repo-pipelines-max-files)",
                limits.max_files
            )));
            continue;
        }
        if file.text.len() > limits.max_file_bytes {
            out.errors.push(refuse(format!(
                "the file is {} bytes, more than the {} a repository pipeline file may have (--repo-pipelines-max-file-bytes)",
                file.text.len(),
                limits.max_file_bytes
            )));
            continue;
        }
        let pipelines =
            match pipeline::parse_documents_limited(&file.path, &file.text, limits.max_depth) {
                Ok(ps) => ps,
                Err(e) => {
                    out.errors.push(e);
                    continue;
                }
            };
        for mut p in pipelines {
            let name = p.name.to_string();
            if let Some(other) = defined_in.get(&name) {
                out.errors.push(refuse(format!(
                    "pipeline `{name}` is also defined in {other}; the first one is used"
                )));
                continue;
            }
            if out.pipelines.len() >= limits.max_pipelines {
                out.errors.push(refuse(format!(
                    "pipeline `{name}` not accepted: a repository may define at most {} pipelines (--repo-pipelines-max-pipelines)",
                    limits.max_pipelines
                )));
                continue;
            }
            defined_in.insert(name.clone(), &file.path);
            p.name = pipeline::Name::qualified(repo, &name);
            out.pipelines.push(p);
        }
    }
    out
}

/// What the dispatcher last read from one repository's `.sluice/`, kept in
/// `SLUICE_REPO_FILES` under [`crate::subjects::repo_last_read_key`] (for as long as the
/// bucket keeps entries) for `sluice pipelines list` and the dashboard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastRead {
    pub provider: Provider,
    pub repo: String,
    pub side: Side,
    /// The commit (or branch) read.
    pub git_ref: String,
    /// The event it was read for.
    pub event_id: String,
    /// Pipelines accepted (`<repo>:<name>`).
    pub pipelines: Vec<String>,
    /// Files or pipelines refused.
    pub errors: usize,
    #[serde(with = "time::serde::rfc3339")]
    pub read_at: time::OffsetDateTime,
}

// === Trust ===

/// The associations a forge reports for people with write access: their pull
/// requests run the definitions they propose.
pub const TRUSTED_ASSOCIATIONS: [&str; 3] = ["OWNER", "MEMBER", "COLLABORATOR"];

/// Whose `.sluice/` an event runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The event's own commit: a push, or a trusted author's pull request.
    Head,
    /// The pull request's target branch: an untrusted author's pull request.
    Base,
}

/// Where an event's repository pipelines are read, and why there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub side: Side,
    /// A commit SHA, or for a base without a known commit the branch (`refs/heads/…`).
    pub git_ref: String,
    /// Why this side, for the decision record.
    pub reason: String,
}

/// Where `event`'s repository pipelines are read, or why none are. Pure: the rule
/// `docs/pipelines.md` documents.
///
/// A push runs what it pushed (pushing needs write access). A pull or merge request
/// runs what it proposes only when it comes from the repository itself and its author
/// is an owner, member or collaborator; otherwise — a fork, or an association the
/// forge does not report as trusted (GitLab's payloads carry none) — the target
/// branch's definitions, so a stranger cannot change what runs, where, or with which
/// Secrets. `trusted_author` is the caller's own look-up (GitLab's members API) and
/// counts only for a request that is not from a fork.
pub fn source(event: &Event, trusted_author: Option<bool>) -> Result<Source, String> {
    if !matches!(event.provider, Provider::Github | Provider::Gitlab) {
        return Err("only GitHub and GitLab events read repository pipelines".into());
    }
    match event.kind.as_str() {
        kind::PUSH | kind::TAG => {
            let sha = event
                .sha
                .as_deref()
                .filter(|s| !s.is_empty() && !s.bytes().all(|b| b == b'0'))
                .ok_or("the push names no commit (a deleted branch or tag)")?;
            Ok(Source {
                side: Side::Head,
                git_ref: sha.to_owned(),
                reason: "a push runs the definitions it pushed".into(),
            })
        }
        kind::PULL_REQUEST => {
            let association = event.actor_association.as_deref().unwrap_or("");
            let trusted = TRUSTED_ASSOCIATIONS
                .iter()
                .any(|a| a.eq_ignore_ascii_case(association))
                || trusted_author == Some(true);
            let fork = event.from_fork != Some(false);
            if trusted && !fork {
                let sha = event
                    .sha
                    .as_deref()
                    .ok_or("the pull request names no head commit")?;
                return Ok(Source {
                    side: Side::Head,
                    git_ref: sha.to_owned(),
                    reason: format!(
                        "the author is {} and the head is in the repository: its proposed definitions run",
                        association_shown(association, trusted_author)
                    ),
                });
            }
            let reason = if fork {
                match event.from_fork {
                    Some(_) => "the pull request comes from a fork: its target branch's definitions run".to_owned(),
                    None => "the payload does not say whether the pull request comes from a fork: its target branch's definitions run".to_owned(),
                }
            } else {
                format!(
                    "the author is {}, not an owner, member or collaborator: the target branch's definitions run",
                    association_shown(association, trusted_author)
                )
            };
            let git_ref = event
                .base_sha
                .clone()
                .or_else(|| event.base_ref.clone())
                .ok_or("the pull request names no target branch")?;
            Ok(Source {
                side: Side::Base,
                git_ref,
                reason,
            })
        }
        other => Err(format!(
            "`{other}` events run applied pipelines only; repository pipelines run on pushes and pull requests"
        )),
    }
}

// === Approval ===

/// The comment by which a trusted user runs a pull request's proposed definitions.
pub const OK_TO_TEST: &str = "/ok-to-test";

/// What an `/ok-to-test` comment asks: `None` for any other event; the pull request's
/// number when its author may approve; why not otherwise.
pub fn ok_to_test(event: &Event) -> Option<Result<u64, String>> {
    let first = event.comment.as_deref()?.split_whitespace().next()?;
    if event.kind != kind::COMMENT || first != OK_TO_TEST {
        return None;
    }
    let pr = event.pr?;
    match event.provider {
        Provider::Github => {}
        // GitLab comments carry no association: the dispatcher sets the one its
        // members look-up found, and without it nobody may approve.
        Provider::Gitlab if event.actor_association.is_none() => {
            return Some(Err(format!(
                "{OK_TO_TEST} on GitLab needs the commenter's project membership, looked up through the members API with --gitlab-token (read_api); it is not known"
            )))
        }
        Provider::Gitlab => {}
        other => {
            return Some(Err(format!(
                "{OK_TO_TEST} is accepted on GitHub and GitLab only, not on {other} events"
            )))
        }
    }
    let association = event.actor_association.as_deref().unwrap_or("");
    if TRUSTED_ASSOCIATIONS
        .iter()
        .any(|a| a.eq_ignore_ascii_case(association))
    {
        Some(Ok(pr))
    } else {
        Some(Err(format!(
            "{} is {}: only an owner, member or collaborator's {OK_TO_TEST} runs a pull request's proposed definitions",
            event.actor.as_deref().unwrap_or("the commenter"),
            association_shown(association, None)
        )))
    }
}

/// A pull request's head as the forge reports it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullHead {
    pub sha: String,
    pub git_ref: Option<String>,
    pub from_fork: bool,
    pub base_sha: Option<String>,
    pub base_ref: Option<String>,
}

/// The event an approved `/ok-to-test` runs the proposed definitions for: the pull
/// request's head commit, as a `pull_request` `synchronize` by the approver. Its id is
/// derived from the repository, pull request and head commit, so the runs' ids are
/// too: a second approval of the same commit stores nothing new (the run requests are
/// duplicates), and a new push needs a new approval.
pub fn approved_event(comment: &Event, head: &PullHead) -> Event {
    let mut e = comment.clone();
    let repo = comment.repo.as_deref().unwrap_or_default();
    let pr = comment.pr.unwrap_or_default();
    e.id = format!(
        "{}:ok-to-test:{}",
        comment.provider,
        crate::run::id_digest(&format!("{repo}#{pr}@{}", head.sha))
    );
    e.kind = kind::PULL_REQUEST.into();
    e.action = Some("synchronize".into());
    e.sha = Some(head.sha.clone());
    e.git_ref = head
        .git_ref
        .clone()
        .or_else(|| Some(format!("refs/pull/{pr}/head")));
    e.base_sha = head.base_sha.clone();
    e.base_ref = head.base_ref.clone().or(e.base_ref);
    e.from_fork = Some(head.from_fork);
    e.comment = None;
    // Matched by its triggers, never started by a name the comment carried.
    e.pipeline = None;
    e.repo_pipelines_at = None;
    e.changed_files = None;
    e.changed_files_complete = false;
    e.attempt = 0;
    e
}

// === Reruns ===

/// Whether a pipeline name is a repository pipeline's (`<repo>:<name>`): applied
/// pipelines' names have no `:`.
pub fn is_repo_pipeline(name: &str) -> bool {
    name.contains(':')
}

/// Where a rerun of a repository pipeline reads it: the side and commit its run's
/// decision read, carried by the rerun's event ([`Event::repo_pipelines_at`]). A rerun
/// repeats what ran; it is not judged again against whatever the pull request or its
/// target branch say now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pinned {
    pub side: Side,
    /// The commit (or, for a target branch known only by name, the branch) read.
    #[serde(rename = "ref")]
    pub git_ref: String,
}

impl Pinned {
    /// The [`Source`] the dispatcher reads a rerun at.
    pub fn source(&self) -> Source {
        Source {
            side: self.side,
            git_ref: self.git_ref.clone(),
            reason: format!(
                "a rerun reads the definitions its run read, at {}",
                self.git_ref
            ),
        }
    }
}

/// Where a rerun of `pipeline` for `original` reads its definitions: `Ok(None)` for an
/// applied pipeline (the registry's, as it is now), the commit `decision` (the
/// original's) read for a repository pipeline, or why it cannot be rerun. Pure: the
/// CLI and the dispatcher both refuse with these words before anything is stored.
pub fn rerun_source(
    original: &Event,
    pipeline: &str,
    decision: Option<&crate::run::Decision>,
) -> Result<Option<Pinned>, String> {
    if !is_repo_pipeline(pipeline) {
        return Ok(None);
    }
    // An approval runs one pull request commit's proposal; repeating it from the
    // comment would need that commit to still be the head, which only a new approval
    // says.
    if ok_to_test(original).is_some() {
        return Err(format!(
            "{pipeline} ran because {OK_TO_TEST} approved the pull request's proposed definitions: comment {OK_TO_TEST} on the pull request again to run them again"
        ));
    }
    let Some(decision) = decision else {
        return Err(format!(
            "the decision on event {} is no longer stored, so which commit's .sluice/ {pipeline} came from is unknown: push again to run it",
            original.id
        ));
    };
    let read = decision.repo_pipelines.as_ref();
    match read.and_then(|r| Some((r.side?, r.git_ref.clone()?))) {
        Some((side, git_ref)) if read.is_some_and(|r| r.pipelines.iter().any(|p| p == pipeline)) => {
            Ok(Some(Pinned { side, git_ref }))
        }
        Some((_, git_ref)) => Err(format!(
            "{pipeline} is not among the pipelines event {}'s decision read from .sluice/ at {git_ref}",
            original.id
        )),
        None => Err(format!(
            "event {}'s decision read no .sluice/, so {pipeline} has no definitions to run again",
            original.id
        )),
    }
}

fn association_shown(association: &str, trusted_author: Option<bool>) -> String {
    match (association, trusted_author) {
        ("", Some(true)) => "a project member".into(),
        ("", _) => "of unknown association".into(),
        (a, _) => a.to_ascii_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, text: &str) -> RepoFile {
        RepoFile {
            path: path.into(),
            text: text.into(),
        }
    }

    const BUILD: &str =
        "name: build\nsteps:\n  - name: test\n    image: alpine\n    commands: [make test]\n";

    #[test]
    fn pipelines_are_named_after_their_repository() {
        let parsed = parse(
            "acme/app",
            &[file(".sluice/build.yaml", BUILD)],
            &Limits::default(),
        );
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        let names: Vec<&str> = parsed.pipelines.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["acme/app:build"]);
    }

    #[test]
    fn a_file_may_hold_a_list_of_pipelines() {
        let list = format!(
            "- {}\n- {}\n",
            BUILD.trim_end().replace('\n', "\n  "),
            BUILD
                .trim_end()
                .replace("name: build", "name: lint")
                .replace('\n', "\n  ")
        );
        let parsed = parse(
            "acme/app",
            &[file(".sluice/all.yaml", &list)],
            &Limits::default(),
        );
        assert!(parsed.errors.is_empty(), "{list}{:?}", parsed.errors);
        let names: Vec<&str> = parsed.pipelines.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["acme/app:build", "acme/app:lint"]);
    }

    #[test]
    fn a_bad_file_is_refused_with_its_line_and_its_sibling_still_counts() {
        let bad = "name: lint\nsteps:\n  - name: x\n    image: alpine\n    commands: ['true']\n    timeout: soon\n";
        let parsed = parse(
            "acme/app",
            &[
                file(".sluice/lint.yaml", bad),
                file(".sluice/build.yml", BUILD),
            ],
            &Limits::default(),
        );
        assert_eq!(parsed.pipelines.len(), 1);
        assert_eq!(parsed.pipelines[0].name.as_str(), "acme/app:build");
        assert_eq!(parsed.errors.len(), 1);
        let e = &parsed.errors[0];
        assert_eq!(e.file, ".sluice/lint.yaml");
        assert_eq!(e.line, 6, "{e}");
    }

    #[test]
    fn limits_refuse_what_comes_later_and_say_which_flag() {
        let limits = Limits {
            max_files: 3,
            max_file_bytes: 200,
            max_depth: 4,
            max_pipelines: 1,
        };
        let other = BUILD.replace("name: build", "name: other");
        let deep = "name: deep\nsteps:\n  - name: a\n    image: alpine\n    commands: [x]\n    env: {A: [[[[1]]]]}\n";
        let parsed = parse(
            "acme/app",
            &[
                file(".sluice/a.yaml", BUILD),
                file(".sluice/b.yaml", &other),
                file(".sluice/c.yaml", deep),
                file(".sluice/d.yaml", BUILD),
            ],
            &limits,
        );
        assert_eq!(parsed.pipelines.len(), 1);
        let messages: Vec<String> = parsed.errors.iter().map(|e| e.to_string()).collect();
        assert!(
            messages[0].starts_with(".sluice/b.yaml")
                && messages[0].contains("--repo-pipelines-max-pipelines"),
            "{messages:?}"
        );
        assert!(
            messages[1].starts_with(".sluice/c.yaml") && messages[1].contains("depth"),
            "{messages:?}"
        );
        assert!(
            messages[2].starts_with(".sluice/d.yaml")
                && messages[2].contains("--repo-pipelines-max-files"),
            "{messages:?}"
        );
        let big = format!("{BUILD}# {}\n", "x".repeat(300));
        let parsed = parse("acme/app", &[file(".sluice/big.yaml", &big)], &limits);
        assert!(parsed.errors[0]
            .message
            .contains("--repo-pipelines-max-file-bytes"));
    }

    #[test]
    fn a_name_defined_twice_keeps_the_first_file() {
        let parsed = parse(
            "acme/app",
            &[file(".sluice/b.yaml", BUILD), file(".sluice/a.yaml", BUILD)],
            &Limits::default(),
        );
        assert_eq!(parsed.pipelines.len(), 1);
        assert_eq!(parsed.errors[0].file, ".sluice/b.yaml");
        assert!(parsed.errors[0].message.contains(".sluice/a.yaml"));
    }

    #[test]
    fn pipeline_files_are_yaml_directly_in_the_folder() {
        assert!(is_pipeline_file("build.yaml"));
        assert!(is_pipeline_file("build.yml"));
        assert!(!is_pipeline_file("README.md"));
        assert!(!is_pipeline_file(".hidden.yaml"));
        assert!(!is_pipeline_file("nested/x.yaml"));
    }

    fn pull_request(association: &str, fork: Option<bool>) -> Event {
        let mut e = Event::new(Provider::Github, "d1", kind::PULL_REQUEST);
        e.repo = Some("acme/app".into());
        e.sha = Some("head1".into());
        e.base_sha = Some("base1".into());
        e.base_ref = Some("refs/heads/main".into());
        e.actor_association = Some(association.into());
        e.from_fork = fork;
        e
    }

    #[test]
    fn a_trusted_author_on_a_branch_of_the_repository_runs_the_proposal() {
        for a in ["OWNER", "MEMBER", "COLLABORATOR"] {
            let s = source(&pull_request(a, Some(false)), None).unwrap();
            assert_eq!((s.side, s.git_ref.as_str()), (Side::Head, "head1"), "{a}");
        }
    }

    #[test]
    fn forks_strangers_and_unknowns_run_the_base() {
        for (association, fork, trusted) in [
            ("OWNER", Some(true), None),
            ("MEMBER", None, None),
            ("CONTRIBUTOR", Some(false), None),
            ("FIRST_TIME_CONTRIBUTOR", Some(false), None),
            ("NONE", Some(false), Some(false)),
            ("", Some(false), None),
            // A member look-up does not make a fork's proposal trusted.
            ("", Some(true), Some(true)),
        ] {
            let s = source(&pull_request(association, fork), trusted).unwrap();
            assert_eq!(
                (s.side, s.git_ref.as_str()),
                (Side::Base, "base1"),
                "{association} {fork:?}"
            );
        }
        let mut e = pull_request("NONE", Some(false));
        e.base_sha = None;
        assert_eq!(source(&e, None).unwrap().git_ref, "refs/heads/main");
    }

    #[test]
    fn a_gitlab_member_look_up_trusts_a_merge_request_from_the_project() {
        let mut e = pull_request("", Some(false));
        e.provider = Provider::Gitlab;
        e.actor_association = None;
        assert_eq!(source(&e, Some(true)).unwrap().side, Side::Head);
        assert_eq!(source(&e, None).unwrap().side, Side::Base);
    }

    fn comment(body: &str, association: &str) -> Event {
        let mut e = Event::new(Provider::Github, "c1", kind::COMMENT);
        e.repo = Some("acme/app".into());
        e.pr = Some(7);
        e.actor = Some("alice".into());
        e.comment = Some(body.into());
        e.actor_association = Some(association.into());
        e
    }

    #[test]
    fn only_a_trusted_ok_to_test_on_a_pull_request_approves() {
        assert_eq!(ok_to_test(&comment("/ok-to-test", "MEMBER")), Some(Ok(7)));
        assert_eq!(
            ok_to_test(&comment("/ok-to-test please", "owner")),
            Some(Ok(7))
        );
        let refused = ok_to_test(&comment("/ok-to-test", "CONTRIBUTOR"))
            .unwrap()
            .unwrap_err();
        assert!(refused.contains("alice is contributor"), "{refused}");
        assert_eq!(ok_to_test(&comment("/retest", "MEMBER")), None);
        assert_eq!(ok_to_test(&comment("lgtm /ok-to-test", "MEMBER")), None);
        let mut issue = comment("/ok-to-test", "MEMBER");
        issue.pr = None;
        assert_eq!(ok_to_test(&issue), None);
        // GitLab: the association the members look-up set, or no approval.
        let mut gitlab = comment("/ok-to-test", "MEMBER");
        gitlab.provider = Provider::Gitlab;
        assert_eq!(ok_to_test(&gitlab), Some(Ok(7)));
        gitlab.actor_association = Some("NONE".into());
        let refused = ok_to_test(&gitlab).unwrap().unwrap_err();
        assert!(refused.contains("alice is none"), "{refused}");
        gitlab.actor_association = None;
        let refused = ok_to_test(&gitlab).unwrap().unwrap_err();
        assert!(refused.contains("members API"), "{refused}");
        let mut generic = comment("/ok-to-test", "MEMBER");
        generic.provider = Provider::Generic;
        assert!(ok_to_test(&generic).unwrap().is_err());
    }

    #[test]
    fn an_approval_runs_as_the_head_commit_once_per_commit() {
        let head = PullHead {
            sha: "h1".into(),
            git_ref: None,
            from_fork: true,
            base_sha: Some("b1".into()),
            base_ref: Some("refs/heads/main".into()),
        };
        let a = approved_event(&comment("/ok-to-test", "MEMBER"), &head);
        assert_eq!(
            (a.kind.as_str(), a.action.as_deref()),
            ("pull_request", Some("synchronize"))
        );
        assert_eq!(
            (a.sha.as_deref(), a.git_ref.as_deref()),
            (Some("h1"), Some("refs/pull/7/head"))
        );
        assert_eq!(a.from_fork, Some(true));
        assert!(a.comment.is_none());
        // Another comment approving the same commit: the same id; a new commit: another.
        let mut again = comment("/ok-to-test", "OWNER");
        again.id = "github:c2".into();
        assert_eq!(approved_event(&again, &head).id, a.id);
        let next = PullHead {
            sha: "h2".into(),
            ..head
        };
        assert_ne!(approved_event(&again, &next).id, a.id);
        assert!(a.id.starts_with("github:ok-to-test:"));
    }

    #[test]
    fn pushes_run_their_commit_and_other_events_none() {
        let mut e = Event::new(Provider::Github, "d2", kind::PUSH);
        e.sha = Some("abc".into());
        assert_eq!(source(&e, None).unwrap().git_ref, "abc");
        e.sha = Some("0".repeat(40));
        assert!(source(&e, None).is_err());
        let comment = Event::new(Provider::Github, "d3", kind::COMMENT);
        assert!(source(&comment, None).is_err());
        let manual = Event::new(Provider::Manual, "d4", kind::PUSH);
        assert!(source(&manual, None).is_err());
    }

    fn decided(read: Option<crate::run::RepoPipelinesRead>) -> crate::run::Decision {
        crate::run::Decision {
            event_id: "github:d1".into(),
            provider: "github".into(),
            kind: kind::PUSH.into(),
            action: None,
            repo: Some("acme/app".into()),
            git_ref: Some("refs/heads/main".into()),
            sha: Some("c1".into()),
            clone_url: None,
            pr: None,
            decided_at: time::OffsetDateTime::UNIX_EPOCH,
            pipelines: Vec::new(),
            not_considered: 0,
            runs: Vec::new(),
            repo_pipelines: read,
        }
    }

    #[test]
    fn a_rerun_of_a_repository_pipeline_reads_where_its_run_read() {
        let push = Event::new(Provider::Github, "d1", kind::PUSH);
        let read = crate::run::RepoPipelinesRead {
            side: Some(Side::Base),
            git_ref: Some("b1".into()),
            reason: "a fork".into(),
            pipelines: vec!["acme/app:build".into()],
            errors: Vec::new(),
        };
        // Applied pipelines are the registry's, as they are now.
        assert_eq!(rerun_source(&push, "build", None), Ok(None));
        let pinned = rerun_source(&push, "acme/app:build", Some(&decided(Some(read.clone()))))
            .expect("rerunnable")
            .expect("pinned");
        assert_eq!(
            pinned,
            Pinned {
                side: Side::Base,
                git_ref: "b1".into()
            }
        );
        assert_eq!(
            (pinned.source().side, pinned.source().git_ref.as_str()),
            (Side::Base, "b1")
        );

        let refused = |pipeline: &str, decision: Option<&crate::run::Decision>| {
            rerun_source(&push, pipeline, decision).expect_err("refused")
        };
        assert!(refused("acme/app:build", None).contains("no longer stored"));
        assert!(refused("acme/app:lint", Some(&decided(Some(read.clone()))))
            .contains("not among the pipelines"));
        assert!(refused("acme/app:build", Some(&decided(None))).contains("read no .sluice/"));
        let nothing_read = crate::run::RepoPipelinesRead {
            side: None,
            git_ref: None,
            ..read.clone()
        };
        assert!(
            refused("acme/app:build", Some(&decided(Some(nothing_read))))
                .contains("read no .sluice/")
        );
        // An approval is repeated by approving again, never from the comment.
        let approval = comment("/ok-to-test", "MEMBER");
        let why = rerun_source(&approval, "acme/app:build", Some(&decided(Some(read))))
            .expect_err("refused");
        assert!(
            why.contains("comment /ok-to-test on the pull request again"),
            "{why}"
        );
    }

    #[test]
    fn a_pin_survives_the_event_round_trip() {
        let mut e = Event::new(Provider::Github, "d1", kind::PUSH);
        let json = serde_json::to_string(&e).expect("json");
        assert!(
            !json.contains("repo_pipelines_at"),
            "absent unless pinned: {json}"
        );
        e.repo_pipelines_at = Some(Pinned {
            side: Side::Head,
            git_ref: "c1".into(),
        });
        let back: Event =
            serde_json::from_str(&serde_json::to_string(&e).expect("json")).expect("parse");
        assert_eq!(back.repo_pipelines_at, e.repo_pipelines_at);
    }
}
