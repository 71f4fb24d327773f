//! End to end through a real nats-server: signed webhooks → ingest → dispatcher →
//! runner (local executor) → states, logs, and commit status requests to an HTTP test
//! double of the GitHub API; for a passing pipeline, a failing one, a cancelled one and
//! a `/retest` comment.

use std::time::Duration;

use serde_json::{json, Value};
use sluice_core::run::{run_id, RunState};
use sluice_dispatcher::forge::ForgeConfig;
use sluice_dispatcher::reporter::ReporterConfig;
use sluice_tests::dispatcher::{apply, provision, Dispatcher};
use sluice_tests::ingest::{jetstream, Ingest};
use sluice_tests::nats::NatsServer;
use sluice_tests::runner::{final_state, git_repo, log_lines, Runner};
use sluice_tests::{fixture, init_logs, wait_for};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

const PIPELINES: &str = r#"
name: pass
triggers: [{ kinds: [push], branches: [main] }]
runtime: { cluster: local }
steps:
  - { name: build, image: alpine, commands: ["cat hello.txt"] }
---
name: fail
triggers: [{ kinds: [push], branches: [main] }]
runtime: { cluster: local }
steps:
  - { name: test, image: alpine, commands: ["echo failing on purpose", "exit 4"] }
---
name: slow
triggers: [{ kinds: [push], branches: [main] }]
runtime: { cluster: local }
concurrency: { group: "${repo}/${branch}", cancel_in_progress: true }
steps:
  - { name: wait, image: alpine, commands: ["echo waiting", "sleep 60"] }
---
name: retest
triggers: [{ command: /retest }]
runtime: { cluster: local }
steps:
  - { name: again, image: alpine, commands: ["echo retesting"] }
"#;

fn push(repo_path: &str, sha: &str) -> Vec<u8> {
    let mut p: Value =
        serde_json::from_slice(&fixture("github/push.with-new-branch.json")).expect("json");
    p["ref"] = json!("refs/heads/main");
    p["after"] = json!(sha);
    p["created"] = json!(false);
    p["repository"]["full_name"] = json!("acme/app");
    p["repository"]["clone_url"] = json!(repo_path);
    serde_json::to_vec(&p).expect("json")
}

#[tokio::test]
async fn webhooks_to_runs_to_commit_statuses() {
    init_logs();
    let github = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path_regex(r"^/repos/acme/app/statuses/[0-9a-f]{40}$"))
        .respond_with(
            ResponseTemplate::new(201).set_body_json(json!({"id": 1, "state": "success"})),
        )
        .mount(&github)
        .await;

    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let ingest = Ingest::start(&nats.url()).await;
    let (repo, sha) = git_repo();
    // The ref a PR comment's run fetches, as a forge serves it.
    let status = std::process::Command::new("git")
        .args(["update-ref", "refs/pull/2/head", "HEAD"])
        .current_dir(repo.path())
        .status()
        .expect("git");
    assert!(status.success());
    apply(&js, PIPELINES).await;
    let mut config = Dispatcher::config(&nats.url());
    config.forge = ForgeConfig {
        github_token: Some(secrecy::SecretString::from("gh-token".to_owned())),
        github_api_url: github.uri(),
        ..ForgeConfig::default()
    };
    config.reporter = Some(ReporterConfig {
        link_base_url: "https://ci.example.com".into(),
        interval: Duration::from_millis(200),
        requests_per_hour: 36_000,
    });
    let _dispatcher = Dispatcher::start_with(config).await;
    let _runner = Runner::start(&nats.url(), "local", "e2e").await;

    // A push starts pass, fail and slow.
    let repo_path = repo.path().display().to_string();
    let r = ingest
        .post_github("push", "push-1", &push(&repo_path, &sha))
        .await;
    assert_eq!(r.status().as_u16(), 202);
    let pass = run_id("github:push-1", "pass", 0);
    let fail = run_id("github:push-1", "fail", 0);
    let slow = run_id("github:push-1", "slow", 0);
    let done = wait_for("pass", Duration::from_secs(30), || final_state(&js, &pass)).await;
    assert_eq!(done.state, RunState::Succeeded);
    assert_eq!(
        log_lines(&js, &pass, "build").await,
        ["hello from the repository"]
    );
    let done = wait_for("fail", Duration::from_secs(30), || final_state(&js, &fail)).await;
    assert_eq!(done.state, RunState::Failed);
    assert_eq!(
        log_lines(&js, &fail, "test").await,
        ["failing on purpose", "exited with 4"]
    );

    // Another push to the same branch cancels the slow run in progress.
    wait_for("slow to be running", Duration::from_secs(30), || async {
        (log_lines(&js, &slow, "wait").await == ["waiting"]).then_some(())
    })
    .await;
    let r = ingest
        .post_github("push", "push-2", &push(&repo_path, &sha))
        .await;
    assert_eq!(r.status().as_u16(), 202);
    let done = wait_for("slow cancelled", Duration::from_secs(30), || {
        final_state(&js, &slow)
    })
    .await;
    assert_eq!(done.state, RunState::Cancelled);

    // A trusted /retest comment on pull request 2 starts retest.
    let mut comment: Value =
        serde_json::from_slice(&fixture("github/issue_comment.created.json")).expect("json");
    comment["issue"]["number"] = json!(2);
    comment["issue"]["pull_request"] =
        json!({"url": "https://api.github.com/repos/acme/app/pulls/2"});
    comment["comment"]["body"] = json!("/retest");
    comment["comment"]["author_association"] = json!("MEMBER");
    comment["repository"]["full_name"] = json!("acme/app");
    comment["repository"]["clone_url"] = json!(repo_path);
    let r = ingest
        .post_github(
            "issue_comment",
            "comment-1",
            &serde_json::to_vec(&comment).expect("json"),
        )
        .await;
    assert_eq!(r.status().as_u16(), 202);
    let retest = run_id("github:comment-1", "retest", 0);
    let done = wait_for("retest", Duration::from_secs(30), || {
        final_state(&js, &retest)
    })
    .await;
    assert_eq!(done.state, RunState::Succeeded);
    assert_eq!(log_lines(&js, &retest, "again").await, ["retesting"]);

    // The forge hears the final state of every run with a commit: one context per
    // pipeline, linking to the run.
    let link = |run: &str| format!("https://ci.example.com/runs/{run}");
    let finals = wait_for(
        "the final commit statuses",
        Duration::from_secs(30),
        || async {
            let requests = github.received_requests().await?;
            let bodies: Vec<Value> = requests
                .iter()
                .filter(|r| r.url.path() == format!("/repos/acme/app/statuses/{sha}"))
                .filter_map(|r| serde_json::from_slice(&r.body).ok())
                .collect();
            let last = |run: &str| {
                bodies
                    .iter()
                    .rev()
                    .find(|b| b["target_url"] == link(run))
                    .cloned()
            };
            let (p, f, s) = (last(&pass)?, last(&fail)?, last(&slow)?);
            (p["state"] == "success" && f["state"] == "failure" && s["state"] == "error")
                .then_some((p, f, s, bodies.len()))
        },
    )
    .await;
    let (pass_status, fail_status, slow_status, total) = finals;
    assert_eq!(pass_status["context"], "sluice/pass");
    assert_eq!(pass_status["description"], "succeeded");
    assert_eq!(fail_status["context"], "sluice/fail");
    assert!(
        fail_status["description"]
            .as_str()
            .unwrap_or("")
            .contains("exited with 4"),
        "{fail_status}"
    );
    assert_eq!(slow_status["context"], "sluice/slow");
    assert!(
        slow_status["description"]
            .as_str()
            .unwrap_or("")
            .starts_with("cancelled"),
        "{slow_status}"
    );
    let auth = github.received_requests().await.unwrap_or_default();
    assert!(auth.iter().all(
        |r| r.headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer gh-token")
    ));
    assert!(total >= 3);
}
