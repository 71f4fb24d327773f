//! The less common verification paths through the real router: GitLab signing tokens
//! (Standard Webhooks), GitLab's Idempotency-Key, GitHub's SHA-1 when enabled, and
//! rotated secrets.

use serde_json::Value;
use sluice_ingest::secrets::SecretSet;
use sluice_tests::ingest::{jetstream, stored_events, Ingest, GITHUB_SECRET};
use sluice_tests::nats::NatsServer;
use sluice_tests::{fixture, init_logs, sign};

/// base64 of "gitlab-signing-token-for-tests!!".
const GITLAB_SIGNING: &str = "whsec_Z2l0bGFiLXNpZ25pbmctdG9rZW4tZm9yLXRlc3RzISE=";

#[tokio::test]
async fn gitlab_signing_tokens_and_idempotency_keys() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.secrets.gitlab = SecretSet::from_list(&format!("plain-token,{GITLAB_SIGNING}"));
    let ingest = Ingest::start_with(config).await;
    let js = jetstream(&nats.url()).await;
    let body = fixture("gitlab/merge-request-event.json");
    let post = |id: &str, ts: i64, sig: String, key: Option<&str>| {
        let mut req = ingest
            .http
            .post(ingest.url("/webhooks/gitlab"))
            .header("content-type", "application/json")
            .header("x-gitlab-event", "Merge Request Hook")
            .header("x-gitlab-event-uuid", "uuid-should-lose")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(body.clone());
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        req.send()
    };
    let now = sign::now();
    let good = sign::standard(GITLAB_SIGNING, "wh-1", now, &body);
    let r = post("wh-1", now, good.clone(), Some("idem-1"))
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 202);
    let answer: Value = r.json().await.expect("json");
    assert_eq!(answer["event_id"], "gitlab:idem-1", "Idempotency-Key wins");
    // The same delivery retried by GitLab: same key, a duplicate.
    let r = post("wh-1", now, good, Some("idem-1")).await.expect("sent");
    assert_eq!(r.json::<Value>().await.expect("json")["duplicate"], true);
    // Signed with the plain token as if it were a signing key: refused.
    let wrong = sign::standard("whsec_cGxhaW4tdG9rZW4=", "wh-2", now, &body);
    assert_eq!(
        post("wh-2", now, wrong, None)
            .await
            .expect("sent")
            .status()
            .as_u16(),
        401
    );
    // A replayed signature outside the tolerance: refused.
    let old = sign::standard(GITLAB_SIGNING, "wh-3", now - 600, &body);
    assert_eq!(
        post("wh-3", now - 600, old, None)
            .await
            .expect("sent")
            .status()
            .as_u16(),
        401
    );

    let stored = stored_events(&js).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1.kind, "pull_request");
}

#[tokio::test]
async fn sha1_when_enabled_and_rotated_secrets() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.allow_sha1 = true;
    config.secrets.github = SecretSet::from_list(&format!("new-secret, {GITHUB_SECRET}"));
    let ingest = Ingest::start_with(config).await;
    let js = jetstream(&nats.url()).await;
    let body = fixture("github/ping.json");
    let send = |delivery: &'static str, header: &'static str, sig: String| {
        ingest
            .http
            .post(ingest.url("/webhooks/github"))
            .header("content-type", "application/json")
            .header("x-github-event", "ping")
            .header("x-github-delivery", delivery)
            .header(header, sig)
            .body(body.clone())
            .send()
    };
    let r = send(
        "sha1-1",
        "x-hub-signature",
        sign::github_sha1(GITHUB_SECRET, &body),
    )
    .await
    .expect("sent");
    assert_eq!(r.status().as_u16(), 200);
    // During a rotation both the old and the new secret are accepted.
    let r = send(
        "rot-1",
        "x-hub-signature-256",
        sign::github_sha256("new-secret", &body),
    )
    .await
    .expect("sent");
    assert_eq!(r.status().as_u16(), 200);
    let r = send(
        "rot-2",
        "x-hub-signature-256",
        sign::github_sha256(GITHUB_SECRET, &body),
    )
    .await
    .expect("sent");
    assert_eq!(r.status().as_u16(), 200);
    let r = send(
        "rot-3",
        "x-hub-signature-256",
        sign::github_sha256("retired", &body),
    )
    .await
    .expect("sent");
    assert_eq!(r.status().as_u16(), 401);
    assert_eq!(stored_events(&js).await.len(), 3);
}

#[tokio::test]
async fn a_repository_with_its_own_secret_accepts_only_that_one() {
    init_logs();
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("secrets.yaml");
    std::fs::write(
        &file,
        "github:\n  repos:\n    codertocat/hello-world: [repo-only-secret]\n",
    )
    .expect("write");
    let default = secrecy::SecretString::from(GITHUB_SECRET.to_owned());
    let mut config = Ingest::config(&nats.url());
    config.secrets = sluice_ingest::Secrets::load(sluice_ingest::SecretSources {
        github: Some(&default),
        file: Some(&file),
        ..Default::default()
    })
    .expect("secrets");
    let ingest = Ingest::start_with(config).await;
    let pr = fixture("github/pull_request.opened.json");
    let post = |delivery: &'static str, body: Vec<u8>, secret: &'static str| {
        ingest
            .http
            .post(ingest.url("/webhooks/github"))
            .header("content-type", "application/json")
            .header("x-github-event", "pull_request")
            .header("x-github-delivery", delivery)
            .header("x-hub-signature-256", sign::github_sha256(secret, &body))
            .body(body)
            .send()
    };
    assert_eq!(
        post("r-1", pr.clone(), GITHUB_SECRET)
            .await
            .expect("sent")
            .status()
            .as_u16(),
        401
    );
    assert_eq!(
        post("r-2", pr, "repo-only-secret")
            .await
            .expect("sent")
            .status()
            .as_u16(),
        202
    );
    // Another repository still uses the default.
    let other = fixture("github/ping.json");
    assert_eq!(
        post("r-3", other, GITHUB_SECRET)
            .await
            .expect("sent")
            .status()
            .as_u16(),
        202
    );
}

/// The secret is chosen from the one field that names the repository, before the rest
/// of the payload is read: a delivery signed with its repository's own secret is
/// verified even when the rest of its payload is not what it claims, and only then
/// refused as malformed (400, not 401).
#[tokio::test]
async fn the_secret_is_chosen_before_the_payload_is_parsed() {
    init_logs();
    let nats = NatsServer::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("secrets.yaml");
    std::fs::write(
        &file,
        format!(
            "github:\n  repos:\n    acme/payments: [payments-secret]\ngitlab:\n  groups:\n    platform/infra: [infra-token]\ngeneric:\n  repos:\n    acme/app: [{GITLAB_SIGNING}]\n"
        ),
    )
    .expect("write");
    let mut config = Ingest::config(&nats.url());
    let default = secrecy::SecretString::from(GITHUB_SECRET.to_owned());
    config.secrets = sluice_ingest::Secrets::load(sluice_ingest::SecretSources {
        github: Some(&default),
        file: Some(&file),
        ..Default::default()
    })
    .expect("secrets");
    let ingest = Ingest::start_with(config).await;
    let js = jetstream(&nats.url()).await;

    let github = br#"{"repository":{"full_name":"acme/payments"},"commits":"not a list"}"#;
    let r = ingest
        .http
        .post(ingest.url("/webhooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .header("x-github-delivery", "typed-1")
        .header(
            "x-hub-signature-256",
            sign::github_sha256("payments-secret", github),
        )
        .body(github.to_vec())
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 400);
    let text = r.text().await.expect("body");
    assert!(text.contains("invalid JSON payload"), "{text}");

    let gitlab = br#"{"project":{"path_with_namespace":"platform/infra/app"},"commits":7}"#;
    let r = ingest
        .http
        .post(ingest.url("/webhooks/gitlab"))
        .header("content-type", "application/json")
        .header("x-gitlab-event", "Push Hook")
        .header("x-gitlab-event-uuid", "typed-2")
        .header("x-gitlab-token", "infra-token")
        .body(gitlab.to_vec())
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 400);

    let generic = br#"{"type":"push","data":{"repo":"acme/app","pr":"not a number"}}"#;
    let ts = sign::now();
    let r = ingest
        .http
        .post(ingest.url("/webhooks/generic"))
        .header("content-type", "application/json")
        .header("webhook-id", "typed-3")
        .header("webhook-timestamp", ts.to_string())
        .header(
            "webhook-signature",
            sign::standard(GITLAB_SIGNING, "typed-3", ts, generic),
        )
        .body(generic.to_vec())
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 400);
    assert!(stored_events(&js).await.is_empty());
}
