//! Commit statuses against HTTP test doubles of the GitHub and GitLab APIs: the exact
//! requests, rate limits honoured, nothing lost.

use std::time::{Duration, Instant};

use serde_json::json;
use sluice_core::run::{RunState, StatusUpdate};
use sluice_core::subjects;
use sluice_dispatcher::forge::ForgeConfig;
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
    }
}

async fn publish(js: &async_nats::jetstream::Context, u: &StatusUpdate) {
    js.publish(
        subjects::status(&u.run_id),
        serde_json::to_vec(u).expect("json").into(),
    )
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
}
