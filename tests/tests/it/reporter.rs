//! Commit statuses against HTTP test doubles of the GitHub and GitLab APIs: the exact
//! requests, rate limits honoured, nothing lost.

use std::time::{Duration, Instant};

use serde_json::json;
use sluice_core::run::{RunState, StatusUpdate};
use sluice_dispatcher::forge::ForgeConfig;
use sluice_dispatcher::metrics::StatusOutcome;
use sluice_dispatcher::reporter::ReporterConfig;
use sluice_tests::dispatcher::{provision, Dispatcher};
use sluice_tests::ingest::jetstream;
use sluice_tests::nats::NatsServer;
use sluice_tests::{init_logs, wait_for};
use wiremock::matchers::{body_string_contains, header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

fn update(run: &str, event: &str, repo: &str, state: RunState) -> StatusUpdate {
    StatusUpdate {
        run_id: run.into(),
        pipeline: "ci".into(),
        state,
        step: None,
        at: time::OffsetDateTime::now_utc(),
        cluster: Some("eu-1".into()),
        event_id: Some(event.into()),
        concurrency_group: None,
        exit_code: None,
        message: None,
        runner: None,
        repo: Some(repo.into()),
        sha: Some("0123456789abcdef0123456789abcdef01234567".into()),
        parent: None,
    }
}

async fn publish(js: &async_nats::jetstream::Context, u: &StatusUpdate) {
    js.publish(u.subject(), serde_json::to_vec(u).expect("json").into())
        .await
        .expect("pub")
        .await
        .expect("ack");
}

#[tokio::test]
async fn rate_limits_delay_statuses_but_never_lose_them() {
    init_logs();
    let github = MockServer::start().await;
    let gitlab = MockServer::start().await;
    let status_path = "/repos/acme/app/statuses/0123456789abcdef0123456789abcdef01234567";
    // The first request hits GitHub's secondary rate limit.
    Mock::given(method("POST"))
        .and(path(status_path))
        .respond_with(
            ResponseTemplate::new(403)
                .insert_header("retry-after", "1")
                .set_body_json(json!({"message": "You have exceeded a secondary rate limit"})),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&github)
        .await;
    Mock::given(method("POST"))
        .and(path(status_path))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": 2})))
        .with_priority(2)
        .mount(&github)
        .await;
    Mock::given(method("POST"))
        .and(path(
            "/api/v4/projects/group%2Fproj/statuses/0123456789abcdef0123456789abcdef01234567",
        ))
        .and(header("PRIVATE-TOKEN", "gl-token"))
        .and(body_string_contains("state=success"))
        .and(body_string_contains("name=sluice%2Fci"))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": 3})))
        .expect(1)
        .mount(&gitlab)
        .await;

    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let mut config = Dispatcher::config(&nats.url());
    config.forge = ForgeConfig {
        github_token: Some(secrecy::SecretString::from("gh".to_owned())),
        github_api_url: github.uri(),
        gitlab_token: Some(secrecy::SecretString::from("gl-token".to_owned())),
        gitlab_api_url: format!("{}/api/v4", gitlab.uri()),
        ..ForgeConfig::default()
    };
    config.reporter = Some(ReporterConfig {
        link_base_url: "https://ci.example.com".into(),
        interval: Duration::from_millis(100),
        requests_per_hour: 36_000,
    });
    let metrics = config.metrics.clone();
    let _dispatcher = Dispatcher::start_with(config).await;

    publish(
        &js,
        &update("run-gh", "github:d-1", "acme/app", RunState::Running),
    )
    .await;
    let refused_at = wait_for(
        "the rate-limited request",
        Duration::from_secs(20),
        || async {
            let n = github.received_requests().await?.len();
            (n >= 1).then(Instant::now)
        },
    )
    .await;
    // While paused, the run finishes: the final state replaces the pending one.
    publish(
        &js,
        &update("run-gh", "github:d-1", "acme/app", RunState::Succeeded),
    )
    .await;
    publish(
        &js,
        &update("run-gl", "gitlab:d-2", "group/proj", RunState::Succeeded),
    )
    .await;

    let bodies = wait_for(
        "the final GitHub status",
        Duration::from_secs(20),
        || async {
            let requests = github.received_requests().await?;
            let bodies: Vec<serde_json::Value> = requests
                .iter()
                .filter_map(|r| serde_json::from_slice(&r.body).ok())
                .collect();
            (bodies.last()?["state"] == "success").then_some(bodies)
        },
    )
    .await;
    assert!(
        refused_at.elapsed() >= Duration::from_millis(800),
        "Retry-After: 1 was honoured"
    );
    // Refused once, then only the latest state: the pending one was coalesced away.
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert_eq!(bodies[0]["state"], "pending");
    assert_eq!(bodies[1]["state"], "success");
    assert_eq!(bodies[1]["context"], "sluice/ci");
    assert_eq!(
        bodies[1]["target_url"],
        "https://ci.example.com/runs/run-gh"
    );
    wait_for("the GitLab status", Duration::from_secs(20), || async {
        (gitlab.received_requests().await?.len() == 1).then_some(())
    })
    .await;
    gitlab.verify().await;

    // Each request counted by what became of it; the queue empties once all are sent.
    let count = |forge: &'static str, outcome: &'static str| {
        metrics
            .reporter_statuses
            .get_or_create(&StatusOutcome { forge, outcome })
            .get()
    };
    wait_for("nothing left queued", Duration::from_secs(20), || async {
        (metrics.reporter_pending.get() == 0 && count("gitlab", "sent") == 1).then_some(())
    })
    .await;
    assert_eq!(count("github", "rate_limited"), 1);
    assert_eq!(count("github", "sent"), 1);
    assert_eq!(count("github", "failed"), 0);
}

/// A throwaway GitHub App key, made for this run only, in the PKCS#1 PEM GitHub hands out.
fn app_key() -> String {
    use rsa::pkcs1::{EncodeRsaPrivateKey, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).expect("an RSA key");
    key.to_pkcs1_pem(LineEnding::LF).expect("PEM").to_string()
}

#[tokio::test]
async fn a_github_app_signs_commit_statuses_with_installation_tokens() {
    use base64::Engine;
    use wiremock::matchers::header_regex;

    init_logs();
    let github = MockServer::start().await;
    let sha = "0123456789abcdef0123456789abcdef01234567";
    // The installation is looked up once per owner, as the App (a JWT).
    Mock::given(method("GET"))
        .and(path("/repos/acme/app/installation"))
        .and(header_regex(
            "authorization",
            "^Bearer [^.]+\\.[^.]+\\.[^.]+$",
        ))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"id": 4242})))
        .expect(1)
        .mount(&github)
        .await;
    Mock::given(method("POST"))
        .and(path("/app/installations/4242/access_tokens"))
        .and(header_regex(
            "authorization",
            "^Bearer [^.]+\\.[^.]+\\.[^.]+$",
        ))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({
            "token": "ghs_installation_token",
            "expires_at": "2099-01-01T00:00:00Z",
            "permissions": {"statuses": "write"}
        })))
        .expect(1)
        .mount(&github)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/repos/acme/app/statuses/{sha}")))
        .and(header("authorization", "Bearer ghs_installation_token"))
        .and(body_string_contains("\"state\":\"success\""))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": 1})))
        .expect(1)
        .mount(&github)
        .await;
    // A repository the App is not installed on: its status is dropped, not retried.
    Mock::given(method("GET"))
        .and(path("/repos/other/repo/installation"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({"message": "Not Found"})))
        .expect(1)
        .mount(&github)
        .await;

    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let mut config = Dispatcher::config(&nats.url());
    config.forge = ForgeConfig {
        github_app: Some(sluice_dispatcher::github::GitHubApp {
            id: 12345,
            private_key: secrecy::SecretString::from(app_key()),
        }),
        github_api_url: github.uri(),
        ..ForgeConfig::default()
    };
    config.reporter = Some(ReporterConfig {
        link_base_url: "https://ci.example.com".into(),
        interval: Duration::from_millis(100),
        requests_per_hour: 36_000,
    });
    let _dispatcher = Dispatcher::start_with(config).await;
    publish(
        &js,
        &update("run-app", "github:d-9", "acme/app", RunState::Succeeded),
    )
    .await;
    publish(
        &js,
        &update(
            "run-other",
            "github:d-10",
            "other/repo",
            RunState::Succeeded,
        ),
    )
    .await;
    wait_for(
        "the status and the refused look-up",
        Duration::from_secs(20),
        || async {
            let requests = github.received_requests().await?;
            let status = requests.iter().any(|r| r.url.path().contains("/statuses/"));
            let other = requests
                .iter()
                .any(|r| r.url.path() == "/repos/other/repo/installation");
            (status && other).then_some(())
        },
    )
    .await;
    // The JWT names the App as its issuer.
    let requests = github.received_requests().await.expect("recorded");
    let jwt = requests
        .iter()
        .find(|r| r.url.path() == "/app/installations/4242/access_tokens")
        .and_then(|r| r.headers.get("authorization"))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .expect("a JWT")
        .to_owned();
    let claims = jwt.split('.').nth(1).expect("claims");
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims)
            .expect("base64url"),
    )
    .expect("json");
    assert_eq!(claims["iss"], json!(12345), "{claims}");
    // Mocks' `expect` counts are verified when the server drops: one look-up per owner,
    // one token, one status, and no retry for the repository without the App.
}

/// A `.sluice/` refused in part fails `sluice/config` on its commit, linking to the
/// event's decision rather than to a run.
#[tokio::test]
async fn a_config_failure_is_sent_as_sluice_config_linking_to_the_decision() {
    init_logs();
    let github = MockServer::start().await;
    let sha = "0123456789abcdef0123456789abcdef01234567";
    Mock::given(method("POST"))
        .and(path(format!("/repos/acme/app/statuses/{sha}")))
        .respond_with(ResponseTemplate::new(201).set_body_json(json!({"id": 1})))
        .expect(1)
        .mount(&github)
        .await;
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let mut config = Dispatcher::config(&nats.url());
    config.forge = ForgeConfig {
        github_token: Some(secrecy::SecretString::from("gh".to_owned())),
        github_api_url: github.uri(),
        ..ForgeConfig::default()
    };
    config.reporter = Some(ReporterConfig {
        link_base_url: "https://ci.example.com".into(),
        interval: Duration::from_millis(100),
        requests_per_hour: 36_000,
    });
    let _dispatcher = Dispatcher::start_with(config).await;
    let reports = sluice_core::streams::bucket(&js, sluice_core::subjects::REPORTS_BUCKET)
        .await
        .expect("bucket");
    sluice_dispatcher::reporter::queue_config_failure(
        &reports,
        sluice_core::Provider::Github,
        "acme/app",
        sha,
        "github:d-7",
        &[
            ".sluice/lint.yaml:5:14: bad duration `soon`".into(),
            ".sluice/b.yaml: not read".into(),
        ],
    )
    .await
    .expect("queued");
    let body: serde_json::Value = wait_for("the status", Duration::from_secs(20), || async {
        let requests = github.received_requests().await?;
        serde_json::from_slice(&requests.first()?.body).ok()
    })
    .await;
    assert_eq!(body["context"], "sluice/config");
    assert_eq!(body["state"], "failure");
    assert_eq!(
        body["target_url"],
        "https://ci.example.com/events/github:d-7"
    );
    assert_eq!(
        body["description"],
        "2 problems; .sluice/lint.yaml:5:14: bad duration `soon`"
    );
}
