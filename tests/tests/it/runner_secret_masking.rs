//! Secret masking in the Kubernetes executor: the real kube-rs client reads the run's
//! Secrets from the API double (a `v1 Secret` with base64 `data`), a step prints them
//! (raw, base64, line by line, cut across a 64 KiB line's pieces), and what is stored
//! in `SLUICE_LOGS` shows `***` and never a value. A Secret the runner may not read, or
//! that does not exist, fails the run before its Pod is made, naming the Secret.

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use sluice_core::run::RunState;
use sluice_runner::lines::MAX_LINE;
use sluice_tests::dispatcher::provision;
use sluice_tests::ingest::jetstream;
use sluice_tests::kubeapi::KubeApi;
use sluice_tests::nats::NatsServer;
use sluice_tests::runner::{
    final_state, git_repo, log_lines, publish_run, run_request, step, Runner,
};
use sluice_tests::{init_logs, wait_for};

const DEADLINE: Duration = Duration::from_secs(30);
const TOKEN: &str = "s3cret-npm-token-42";
/// A value of several lines, as a key file is.
const KEY: &str = "-----BEGIN TEST KEY-----\nMIIEvQIBADANBgkqhkiG9w0\nAQEFAASCBKcwggSjAgEAAoIB\n-----END TEST KEY-----\n";

/// Every way the test prints a value, to look for in what was stored.
fn forbidden_texts() -> Vec<String> {
    let mut texts = vec![
        TOKEN.to_owned(),
        STANDARD.encode(TOKEN),
        STANDARD.encode(format!("{TOKEN}\n")),
        URL_SAFE_NO_PAD.encode(TOKEN),
        // Either half of the token, as a cut line would leave it.
        TOKEN[..TOKEN.len() / 2].to_owned(),
        TOKEN[TOKEN.len() / 2..].to_owned(),
    ];
    texts.extend(KEY.lines().filter(|l| l.len() >= 4).map(str::to_owned));
    texts
}

#[tokio::test]
async fn a_step_printing_its_secret_stores_stars_and_never_the_value() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    api.put_secret("npm-token", &[("TOKEN", TOKEN), ("KEY", KEY)]);
    let (repo, sha) = git_repo();
    let _runner = Runner::start_kube(&nats.url(), "eu-1", "r1", &api, |_| {}).await;

    // The long line: the token straddles the cut at MAX_LINE bytes.
    let before_cut = MAX_LINE - TOKEN.len() / 2;
    let long_line =
        format!("printf '%{before_cut}s' '' | tr ' ' x; printf '%s tail\\n' \"$TOKEN\"");
    let mut prints = step(
        "prints",
        &[
            "echo plain output",
            "echo \"token=$TOKEN\"",
            "cat /var/run/secrets/sluice/npm-token/TOKEN; echo",
            "printf %s \"$TOKEN\" | base64",
            "echo \"$TOKEN\" | base64",
            "printf %s \"$TOKEN\" | base64 | tr '+/' '-_' | tr -d '='",
            "cat /var/run/secrets/sluice/npm-token/KEY",
            &long_line,
        ],
    );
    prints.secrets = vec!["npm-token".into()];
    // A step that does not mount the Secret but prints the value anyway: masking is
    // for the whole run.
    let other = step("other", &[&format!("echo 'copied: {TOKEN}'")]);
    publish_run(
        &js,
        &run_request("mask-1", "eu-1", repo.path(), &sha, vec![prints, other]),
    )
    .await;
    let done = wait_for("mask-1 to finish", DEADLINE, || final_state(&js, "mask-1")).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");

    let lines = log_lines(&js, "mask-1", "prints").await;
    let short: Vec<&str> = lines.iter().take(10).map(String::as_str).collect();
    assert_eq!(
        short,
        [
            "plain output",
            "token=***",
            "***",
            "***",
            "***",
            "***",
            "***",
            "***",
            "***",
            "***",
        ],
        "the value, base64 (with and without its newline, URL-safe unpadded), and each line of the key"
    );
    // The long line, in its two pieces: the token masked on both sides of the cut.
    assert_eq!(lines.len(), 12, "one stored line per piece");
    assert_eq!(lines[10], format!("{}***", "x".repeat(before_cut)));
    assert_eq!(lines[11], "*** tail");
    assert_eq!(log_lines(&js, "mask-1", "other").await, ["copied: ***"]);

    let stored = [lines, log_lines(&js, "mask-1", "other").await].concat();
    for text in forbidden_texts() {
        assert!(
            !stored.iter().any(|l| l.contains(&text)),
            "a stored line shows {text:?}"
        );
    }
    // The Secret was read before the Pod was made.
    let requests = api.requests();
    let read = requests
        .iter()
        .position(|r| r.uri.contains("/secrets/npm-token"));
    let created = requests
        .iter()
        .position(|r| r.method == http::Method::POST && r.uri.contains("/pods"));
    assert!(
        matches!((read, created), (Some(r), Some(c)) if r < c),
        "{read:?} {created:?}"
    );
}

#[tokio::test]
async fn a_secret_that_cannot_be_read_fails_the_run_before_its_pod() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    api.put_secret("npm-token", &[("TOKEN", TOKEN)]);
    api.forbid_secret_reads(true);
    let (repo, sha) = git_repo();
    let _runner = Runner::start_kube(&nats.url(), "eu-1", "r1", &api, |_| {}).await;
    let with_secret = |name: &str| {
        let mut s = step("prints", &["echo \"$TOKEN\""]);
        s.secrets = vec![name.to_owned()];
        s
    };

    // The runner's Role lacks `get` on `secrets`.
    publish_run(
        &js,
        &run_request(
            "forbidden-1",
            "eu-1",
            repo.path(),
            &sha,
            vec![with_secret("npm-token")],
        ),
    )
    .await;
    let done = wait_for("forbidden-1", DEADLINE, || final_state(&js, "forbidden-1")).await;
    assert_eq!(done.state, RunState::Error, "{done:?}");
    let message = done.message.clone().unwrap_or_default();
    assert!(message.contains("Secret \"npm-token\""), "{message}");
    assert!(
        message.contains("resources [\"secrets\"], verbs [\"get\"]"),
        "{message}"
    );

    // A Secret that does not exist.
    api.forbid_secret_reads(false);
    publish_run(
        &js,
        &run_request(
            "missing-1",
            "eu-1",
            repo.path(),
            &sha,
            vec![with_secret("no-such")],
        ),
    )
    .await;
    let missing = wait_for("missing-1", DEADLINE, || final_state(&js, "missing-1")).await;
    assert_eq!(missing.state, RunState::Error, "{missing:?}");
    let message = missing.message.clone().unwrap_or_default();
    assert!(
        message.starts_with("Secret \"no-such\" not found in namespace \"default\""),
        "{message}"
    );

    // Neither run made a Pod, so nothing printed anything; no message holds the value.
    assert!(api.created().is_empty(), "{:?}", api.created());
    assert!(log_lines(&js, "forbidden-1", "prints").await.is_empty());
    for update in [done, missing] {
        assert!(!format!("{update:?}").contains(TOKEN));
    }
}
