//! A repository's `.sluice/` files read through the forge APIs (an HTTP double that
//! speaks GitHub's contents and GitLab's repository wire format) at a commit, cached
//! per commit SHA in a real `SLUICE_REPO_FILES` bucket and behind one flight per
//! commit.

use std::sync::Arc;

use async_nats::jetstream::kv;
use secrecy::SecretString;
use sluice_core::repo_pipelines::{Limits, RepoFile};
use sluice_core::streams::{self, Needs, StreamSettings};
use sluice_core::{subjects, Provider};
use sluice_dispatcher::budget::ForgeBudget;
use sluice_dispatcher::forge::ForgeConfig;
use sluice_dispatcher::repo_files::{Listing, RepoFiles};
use sluice_tests::forge_files::{Api, ForgeFiles, GITHUB_TOKEN, GITLAB_TOKEN};
use sluice_tests::ingest::jetstream;
use sluice_tests::init_logs;
use sluice_tests::nats::NatsServer;

const SHA_1: &str = "1111111111111111111111111111111111111111";
const SHA_2: &str = "2222222222222222222222222222222222222222";
const BUILD_1: &str = "name: build\nsteps:\n  - { name: s, image: alpine }\n";
const BUILD_2: &str = "name: build\nsteps:\n  - { name: s, image: alpine:3 }\n";
const TEST: &str = "name: test\nsteps:\n  - { name: t, image: alpine }\n";
const LIST_ACCEPT: &str = "application/vnd.github+json";
const RAW_ACCEPT: &str = "application/vnd.github.raw+json";

/// A nats-server with the bucket, and the forge double.
struct Setup {
    _nats: NatsServer,
    js: async_nats::jetstream::Context,
    bucket: kv::Store,
    forge: ForgeFiles,
}

async fn setup() -> Setup {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    streams::prepare(
        &js,
        &StreamSettings::default(),
        Needs {
            buckets: &[subjects::REPO_FILES_BUCKET],
            ..Needs::default()
        },
    )
    .await
    .expect("bucket");
    let bucket = streams::bucket(&js, subjects::REPO_FILES_BUCKET)
        .await
        .expect("open bucket");
    Setup {
        _nats: nats,
        js,
        bucket,
        forge: ForgeFiles::start().await,
    }
}

impl Setup {
    fn config(&self) -> ForgeConfig {
        ForgeConfig {
            github_token: Some(SecretString::from(GITHUB_TOKEN)),
            github_api_url: self.forge.github_url(),
            gitlab_token: Some(SecretString::from(GITLAB_TOKEN)),
            gitlab_api_url: self.forge.gitlab_url(),
            ..ForgeConfig::default()
        }
    }

    /// A reader (one dispatcher replica) sharing the bucket.
    fn reader(&self, limits: Limits) -> RepoFiles {
        RepoFiles::new(&self.config(), Some(self.bucket.clone()), limits).expect("reader")
    }
}

fn file(name: &str, text: &str) -> RepoFile {
    RepoFile {
        path: format!(".sluice/{name}"),
        text: text.to_owned(),
    }
}

fn gh_list(repo: &str, git_ref: &str) -> String {
    format!("/repos/{repo}/contents/.sluice?ref={git_ref}")
}

fn gh_file(repo: &str, name: &str, git_ref: &str) -> String {
    format!("/repos/{repo}/contents/.sluice/{name}?ref={git_ref}")
}

fn gl_tree(project: &str, git_ref: &str) -> String {
    format!("/api/v4/projects/{project}/repository/tree?path=.sluice&ref={git_ref}&per_page=100")
}

fn gl_file(project: &str, name: &str, git_ref: &str) -> String {
    format!("/api/v4/projects/{project}/repository/files/.sluice%2F{name}/raw?ref={git_ref}")
}

#[tokio::test]
async fn repo_files_github_reads_each_commits_own_files() {
    let s = setup().await;
    s.forge.set(
        "acme/app",
        SHA_1,
        &[
            ("test.yml", TEST),
            ("README.md", "# no"),
            ("build.yaml", BUILD_1),
            ("old/", ""),
        ],
    );
    s.forge.set("acme/app", SHA_2, &[("build.yaml", BUILD_2)]);
    let reader = s.reader(Limits::default());

    let at_1 = reader
        .read(Provider::Github, "acme/app", SHA_1)
        .await
        .expect("read");
    assert_eq!(
        at_1,
        Listing {
            files: vec![file("build.yaml", BUILD_1), file("test.yml", TEST)],
            refused: vec![],
        },
        "pipeline files only, in path order"
    );
    let at_2 = reader
        .read(Provider::Github, "acme/app", SHA_2)
        .await
        .expect("read");
    assert_eq!(at_2.files, [file("build.yaml", BUILD_2)]);

    let received = s.forge.received();
    let asked: Vec<(&str, &str)> = received
        .iter()
        .map(|r| (r.target.as_str(), r.accept.as_deref().unwrap_or("")))
        .collect();
    assert_eq!(
        asked,
        [
            (gh_list("acme/app", SHA_1).as_str(), LIST_ACCEPT),
            (
                gh_file("acme/app", "build.yaml", SHA_1).as_str(),
                RAW_ACCEPT
            ),
            (gh_file("acme/app", "test.yml", SHA_1).as_str(), RAW_ACCEPT),
            (gh_list("acme/app", SHA_2).as_str(), LIST_ACCEPT),
            (
                gh_file("acme/app", "build.yaml", SHA_2).as_str(),
                RAW_ACCEPT
            ),
        ]
    );
    assert!(received
        .iter()
        .all(|r| r.api == Api::GitHub && r.method == "GET" && r.authorized));
    assert_eq!(reader.requests(), 5);
}

#[tokio::test]
async fn repo_files_gitlab_reads_each_commits_own_files() {
    let s = setup().await;
    let project = "group/sub/app";
    s.forge.set(
        project,
        SHA_1,
        &[
            ("build.yaml", BUILD_1),
            ("notes.txt", "no"),
            ("test.yml", TEST),
        ],
    );
    s.forge.set(project, SHA_2, &[("build.yaml", BUILD_2)]);
    let reader = s.reader(Limits::default());

    let at_1 = reader
        .read(Provider::Gitlab, project, SHA_1)
        .await
        .expect("read");
    assert_eq!(
        at_1.files,
        [file("build.yaml", BUILD_1), file("test.yml", TEST)]
    );
    let at_2 = reader
        .read(Provider::Gitlab, project, SHA_2)
        .await
        .expect("read");
    assert_eq!(at_2.files, [file("build.yaml", BUILD_2)]);

    let encoded = "group%2Fsub%2Fapp";
    assert_eq!(
        s.forge.targets(),
        [
            gl_tree(encoded, SHA_1),
            gl_file(encoded, "build.yaml", SHA_1),
            gl_file(encoded, "test.yml", SHA_1),
            gl_tree(encoded, SHA_2),
            gl_file(encoded, "build.yaml", SHA_2),
        ]
    );
    assert!(s
        .forge
        .received()
        .iter()
        .all(|r| r.api == Api::GitLab && r.method == "GET" && r.authorized));
}

#[tokio::test]
async fn repo_files_a_repository_without_sluice_has_an_empty_listing() {
    let s = setup().await;
    s.forge.set_file("acme/dotfile", SHA_1, "not a folder");
    let reader = s.reader(Limits::default());
    for (provider, repo) in [
        (Provider::Github, "acme/none"),
        (Provider::Gitlab, "acme/none"),
        (Provider::Github, "acme/dotfile"),
    ] {
        s.forge.clear();
        let listing = reader.read(provider, repo, SHA_1).await.expect("read");
        assert_eq!(listing, Listing::default(), "{provider} {repo}");
        assert_eq!(
            s.forge.received().len(),
            1,
            "{provider} {repo}: one listing"
        );
    }
}

#[tokio::test]
async fn repo_files_one_commit_is_read_once_by_every_replica() {
    let s = setup().await;
    s.forge.set(
        "acme/app",
        SHA_1,
        &[("build.yaml", BUILD_1), ("test.yml", TEST)],
    );
    let reader = Arc::new(s.reader(Limits::default()));
    let reads: Vec<_> = (0..50)
        .map(|_| {
            let reader = reader.clone();
            tokio::spawn(async move { reader.read(Provider::Github, "acme/app", SHA_1).await })
        })
        .collect();
    for read in reads {
        let listing = read.await.expect("task").expect("read");
        assert_eq!(
            listing.files,
            [file("build.yaml", BUILD_1), file("test.yml", TEST)]
        );
    }
    assert_eq!(
        s.forge.targets(),
        [
            gh_list("acme/app", SHA_1),
            gh_file("acme/app", "build.yaml", SHA_1),
            gh_file("acme/app", "test.yml", SHA_1),
        ],
        "one listing and one request per file for 50 reads"
    );
    assert_eq!(reader.requests(), 3);

    // Another replica: the bucket has it.
    let other = s.reader(Limits::default());
    let listing = other
        .read(Provider::Github, "acme/app", SHA_1)
        .await
        .expect("read");
    assert_eq!(listing.files.len(), 2);
    assert_eq!(other.requests(), 0);
    assert_eq!(s.forge.received().len(), 3);

    // Without the shared cache, the replica asks the forge.
    let alone = RepoFiles::new(&s.config(), None, Limits::default()).expect("reader");
    alone
        .read(Provider::Github, "acme/app", SHA_1)
        .await
        .expect("read");
    assert_eq!(alone.requests(), 3);
}

#[tokio::test]
async fn repo_files_a_branch_is_read_again_every_time() {
    let s = setup().await;
    let branch = "refs/heads/feature/x";
    s.forge.set("acme/app", branch, &[("build.yaml", BUILD_1)]);
    let reader = s.reader(Limits::default());
    let first = reader
        .read(Provider::Github, "acme/app", branch)
        .await
        .expect("read");
    s.forge.set("acme/app", branch, &[("build.yaml", BUILD_2)]);
    let second = reader
        .read(Provider::Github, "acme/app", branch)
        .await
        .expect("read");
    assert_eq!(first.files, [file("build.yaml", BUILD_1)]);
    assert_eq!(
        second.files,
        [file("build.yaml", BUILD_2)],
        "the branch moved"
    );
    let list = "/repos/acme/app/contents/.sluice?ref=refs%2Fheads%2Ffeature%2Fx";
    let targets = s.forge.targets();
    assert_eq!(
        targets.iter().filter(|t| *t == list).count(),
        2,
        "{targets:?}"
    );
    assert_eq!(targets.len(), 4);
}

#[tokio::test]
async fn repo_files_over_the_limits_are_refused_with_the_flag() {
    let s = setup().await;
    let big = "x".repeat(200);
    let files = [
        ("a.yaml", BUILD_1),
        ("b.yaml", big.as_str()),
        ("c.yaml", TEST),
        ("d.yaml", TEST),
    ];
    s.forge.set("acme/app", SHA_1, &files);
    s.forge
        .set_bytes("acme/bin", SHA_1, vec![("a.yaml".into(), vec![0xff, 0xfe])]);
    let limits = Limits {
        max_files: 3,
        max_file_bytes: 100,
        ..Limits::default()
    };
    let reader = s.reader(limits);

    let listing = reader
        .read(Provider::Github, "acme/app", SHA_1)
        .await
        .expect("read");
    assert_eq!(
        listing.files,
        [file("a.yaml", BUILD_1), file("c.yaml", TEST)]
    );
    let refused: Vec<&str> = listing.refused.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(refused, [".sluice/b.yaml", ".sluice/d.yaml"]);
    assert!(
        listing.refused[0].1.contains("200 bytes")
            && listing.refused[0]
                .1
                .contains("--repo-pipelines-max-file-bytes"),
        "{}",
        listing.refused[0].1
    );
    assert!(listing.refused[1].1.contains("--repo-pipelines-max-files"));
    let targets = s.forge.targets();
    assert!(
        !targets
            .iter()
            .any(|t| t.contains("b.yaml") || t.contains("d.yaml")),
        "refused by the listing, never downloaded: {targets:?}"
    );

    // GitLab lists no sizes: the file is read up to the limit and refused.
    s.forge.set("acme/gl", SHA_1, &files);
    let listing = reader
        .read(Provider::Gitlab, "acme/gl", SHA_1)
        .await
        .expect("read");
    assert_eq!(
        listing.files,
        [file("a.yaml", BUILD_1), file("c.yaml", TEST)]
    );
    let refused: Vec<&str> = listing.refused.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(refused, [".sluice/b.yaml", ".sluice/d.yaml"]);
    assert!(listing.refused[0]
        .1
        .contains("--repo-pipelines-max-file-bytes"));

    let listing = reader
        .read(Provider::Github, "acme/bin", SHA_1)
        .await
        .expect("read");
    assert!(listing.files.is_empty());
    assert!(
        listing.refused[0].1.contains("UTF-8"),
        "{:?}",
        listing.refused
    );
}

#[tokio::test]
async fn repo_files_forge_down_is_retryable_then_read() {
    let s = setup().await;
    s.forge.set("acme/app", SHA_1, &[("build.yaml", BUILD_1)]);
    let reader = s.reader(Limits::default());
    s.forge.set_down(true);
    for provider in [Provider::Github, Provider::Gitlab] {
        let e = reader
            .read(provider, "acme/app", SHA_1)
            .await
            .expect_err("forge down");
        assert!(e.is_retryable(), "{provider}: {e}");
        assert!(e.to_string().contains("503"), "{e}");
    }
    s.forge.set_down(false);
    for provider in [Provider::Github, Provider::Gitlab] {
        let listing = reader
            .read(provider, "acme/app", SHA_1)
            .await
            .expect("back");
        assert_eq!(listing.files, [file("build.yaml", BUILD_1)], "{provider}");
    }
}

#[tokio::test]
async fn repo_files_refused_credentials_name_the_setting() {
    let s = setup().await;
    s.forge.set("acme/app", SHA_1, &[("build.yaml", BUILD_1)]);
    let wrong = ForgeConfig {
        github_token: Some(SecretString::from("ghp-wrong")),
        gitlab_token: None,
        ..s.config()
    };
    let reader = RepoFiles::new(&wrong, Some(s.bucket.clone()), Limits::default()).expect("reader");
    let e = reader
        .read(Provider::Github, "acme/app", SHA_1)
        .await
        .expect_err("refused");
    assert!(!e.is_retryable(), "{e}");
    let message = e.to_string();
    assert!(message.contains("SLUICE_GITHUB_TOKEN"), "{message}");
    assert!(!message.contains("ghp-wrong"), "{message}");
    assert!(!format!("{reader:?}").contains("ghp-wrong"));
    let e = reader
        .read(Provider::Gitlab, "acme/app", SHA_1)
        .await
        .expect_err("no token");
    assert!(!e.is_retryable(), "{e}");
    assert!(e.to_string().contains("SLUICE_GITLAB_TOKEN"), "{e}");
}

#[tokio::test]
async fn repo_files_a_cache_that_fails_is_passed_by() {
    let s = setup().await;
    s.forge.set("acme/app", SHA_1, &[("build.yaml", BUILD_1)]);
    let reader = s.reader(Limits::default());
    s.js.delete_key_value(subjects::REPO_FILES_BUCKET)
        .await
        .expect("delete the bucket");
    let listing = reader
        .read(Provider::Github, "acme/app", SHA_1)
        .await
        .expect("read from the forge");
    assert_eq!(listing.files, [file("build.yaml", BUILD_1)]);
    assert_eq!(reader.requests(), 2);
    // Still kept in process.
    reader
        .read(Provider::Github, "acme/app", SHA_1)
        .await
        .expect("read");
    assert_eq!(reader.requests(), 2);
}

#[tokio::test]
async fn repo_files_a_spent_forge_budget_refuses_the_read_as_retryable() {
    let s = setup().await;
    s.forge.set("acme/app", SHA_2, &[("build.yaml", BUILD_2)]);
    // One request an hour, shared with the commit status reporter.
    let budget = ForgeBudget::new(1);
    let reader = s.reader(Limits::default()).sharing(budget.clone());
    let listing = reader
        .read(Provider::Github, "acme/none", SHA_1)
        .await
        .expect("the one request");
    assert_eq!(listing, Listing::default());
    assert_eq!(s.forge.received().len(), 1);

    let e = reader
        .read(Provider::Github, "acme/app", SHA_2)
        .await
        .expect_err("the budget is spent");
    assert!(e.is_retryable(), "retried with the event's backoff: {e}");
    assert!(e.to_string().contains("budget spent"), "{e}");
    assert_eq!(s.forge.received().len(), 1, "nothing asked of the forge");
    assert!(
        budget
            .take(Provider::Github, std::time::Instant::now())
            .is_err(),
        "the reporter's share is spent too"
    );
    // Each forge has its own budget.
    let listing = reader
        .read(Provider::Gitlab, "acme/none", SHA_1)
        .await
        .expect("GitLab's request");
    assert_eq!(listing, Listing::default());
}
