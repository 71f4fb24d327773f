//! Changed files of pull/merge requests from the forge APIs (HTTP test doubles that
//! speak GitHub's and GitLab's wire format), cached per head SHA; when the list cannot
//! be had, path filters fire and the decision says why.

use std::time::Duration;

use secrecy::SecretString;
use serde_json::json;
use sluice_core::{Event, Provider};
use sluice_dispatcher::forge::ForgeConfig;
use sluice_tests::dispatcher::{apply, decision, provision, publish_event, Dispatcher};
use sluice_tests::ingest::jetstream;
use sluice_tests::nats::NatsServer;
use sluice_tests::{init_logs, wait_for};
use wiremock::matchers::{header, method, path, query_param};
use wiremock::{Mock, MockServer, ResponseTemplate};

const PIPELINES: &str = r#"
name: docs
triggers:
  - kinds: [pull_request]
    paths: ["docs/**"]
steps:
  - { name: s, image: alpine }
---
name: code
triggers:
  - kinds: [pull_request]
    paths: ["src/**", "!src/generated/**"]
steps:
  - { name: s, image: alpine }
"#;

fn github_file(name: &str) -> serde_json::Value {
    // The fields GitHub's "List pull requests files" answers with.
    json!({
        "sha": "bbcd538c8e72b8c175046e27cc8f907076331401",
        "filename": name,
        "status": "modified",
        "additions": 1,
        "deletions": 0,
        "changes": 1,
        "blob_url": format!("https://github.com/acme/app/blob/abc/{name}"),
        "raw_url": format!("https://github.com/acme/app/raw/abc/{name}"),
        "contents_url": format!("https://api.github.com/repos/acme/app/contents/{name}?ref=abc"),
        "patch": "@@ -1 +1 @@"
    })
}

fn pr_event(provider: Provider, id: &str, repo: &str, pr: u64, sha: &str) -> Event {
    let mut e = Event::new(provider, id, "pull_request");
    e.repo = Some(repo.into());
    e.pr = Some(pr);
    e.sha = Some(sha.into());
    e.action = Some("opened".into());
    e.base_ref = Some("refs/heads/main".into());
    e
}

fn matched(d: &sluice_core::run::Decision) -> Vec<&str> {
    let mut m: Vec<&str> = d.runs.iter().map(|r| r.pipeline.as_str()).collect();
    m.sort_unstable();
    m
}

#[tokio::test]
async fn github_and_gitlab_changed_files_decide_path_filters() {
    init_logs();
    let github = MockServer::start().await;
    let gitlab = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/app/pulls/7/files"))
        .and(query_param("page", "1"))
        .and(header("authorization", "Bearer gh-token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([
            github_file("docs/guide.md"),
            github_file("src/generated/x.rs")
        ])))
        .expect(1) // the second event with the same head SHA is served from the cache
        .mount(&github)
        .await;
    Mock::given(method("GET"))
        .and(path("/repos/acme/app/pulls/8/files"))
        .respond_with(ResponseTemplate::new(500).set_body_json(json!({"message": "Server Error"})))
        .mount(&github)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v4/projects/group%2Fsub%2Fproj/merge_requests/3/diffs"))
        .and(header("PRIVATE-TOKEN", "gl-token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([
            {"old_path": "src/old.rs", "new_path": "src/new.rs", "a_mode": "100644", "b_mode": "100644",
             "diff": "", "new_file": false, "renamed_file": true, "deleted_file": false}
        ])))
        .mount(&gitlab)
        .await;

    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(&js, PIPELINES).await;
    let mut config = Dispatcher::config(&nats.url());
    config.forge = ForgeConfig {
        github_token: Some(SecretString::from("gh-token".to_owned())),
        github_api_url: github.uri(),
        gitlab_token: Some(SecretString::from("gl-token".to_owned())),
        gitlab_api_url: format!("{}/api/v4", gitlab.uri()),
        timeout: Duration::from_secs(5),
        github_app: None,
    };
    let _dispatcher = Dispatcher::start_with(config).await;

    // docs/guide.md passes docs; src/generated/x.rs is excluded from code.
    publish_event(
        &js,
        &pr_event(Provider::Github, "gh-1", "acme/app", 7, "abc"),
    )
    .await;
    let d = wait_for("gh-1", Duration::from_secs(20), || {
        decision(&js, "github:gh-1")
    })
    .await;
    assert_eq!(matched(&d), ["docs"]);
    let code = d
        .pipelines
        .iter()
        .find(|p| p.pipeline == "code")
        .expect("code");
    assert_eq!(code.triggers[0].failed.as_deref(), Some("paths"));
    assert!(
        code.triggers[0]
            .detail
            .contains("none of the 2 changed files"),
        "{:?}",
        code.triggers[0]
    );

    // Same PR and head SHA, another delivery: the cached list, no second API call.
    publish_event(
        &js,
        &pr_event(Provider::Github, "gh-2", "acme/app", 7, "abc"),
    )
    .await;
    let d = wait_for("gh-2", Duration::from_secs(20), || {
        decision(&js, "github:gh-2")
    })
    .await;
    assert_eq!(matched(&d), ["docs"]);

    // The API fails: both path filters fire rather than skip, and say why.
    publish_event(
        &js,
        &pr_event(Provider::Github, "gh-3", "acme/app", 8, "def"),
    )
    .await;
    let d = wait_for("gh-3", Duration::from_secs(20), || {
        decision(&js, "github:gh-3")
    })
    .await;
    assert_eq!(matched(&d), ["code", "docs"]);
    let detail = &d.pipelines[0].triggers[0].detail;
    assert!(
        detail.contains("GitHub API") && detail.contains("trigger fires"),
        "{detail}"
    );

    // GitLab: a rename counts both paths.
    publish_event(
        &js,
        &pr_event(Provider::Gitlab, "gl-1", "group/sub/proj", 3, "123"),
    )
    .await;
    let d = wait_for("gl-1", Duration::from_secs(20), || {
        decision(&js, "gitlab:gl-1")
    })
    .await;
    assert_eq!(matched(&d), ["code"]);

    github.verify().await;
}

#[tokio::test]
async fn githubs_3000_file_cap_leaves_the_list_incomplete() {
    init_logs();
    let github = MockServer::start().await;
    let page: Vec<serde_json::Value> = (0..100)
        .map(|i| github_file(&format!("src/f{i}.rs")))
        .collect();
    Mock::given(method("GET"))
        .and(path("/repos/acme/big/pulls/1/files"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page))
        .expect(30)
        .mount(&github)
        .await;
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(&js, PIPELINES).await;
    let mut config = Dispatcher::config(&nats.url());
    config.forge = ForgeConfig {
        github_token: Some(SecretString::from("t".to_owned())),
        github_api_url: github.uri(),
        ..ForgeConfig::default()
    };
    let _dispatcher = Dispatcher::start_with(config).await;
    publish_event(
        &js,
        &pr_event(Provider::Github, "big-1", "acme/big", 1, "sha"),
    )
    .await;
    let d = wait_for("big-1", Duration::from_secs(30), || {
        decision(&js, "github:big-1")
    })
    .await;
    // 3,000 src/ files listed, none under docs/, but the list is cut: docs fires anyway.
    assert_eq!(matched(&d), ["code", "docs"]);
    let docs = d
        .pipelines
        .iter()
        .find(|p| p.pipeline == "docs")
        .expect("docs");
    assert!(
        docs.triggers[0]
            .detail
            .contains("may be incomplete (3000 listed)"),
        "{:?}",
        docs.triggers[0]
    );
    github.verify().await;
}

#[tokio::test]
async fn without_a_token_path_filters_fire_and_say_why() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(&js, PIPELINES).await;
    let _dispatcher = Dispatcher::start(&nats.url()).await;
    publish_event(
        &js,
        &pr_event(Provider::Github, "nt-1", "acme/app", 7, "abc"),
    )
    .await;
    let d = wait_for("nt-1", Duration::from_secs(20), || {
        decision(&js, "github:nt-1")
    })
    .await;
    assert_eq!(matched(&d), ["code", "docs"]);
    assert!(d.pipelines[0].triggers[0]
        .detail
        .contains("no GitHub credentials configured"));
}
