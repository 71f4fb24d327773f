//! Secrets and bodies never reach the logs, whatever the outcome; delivery ids do.
//! (Its own test binary: it installs the process-wide log subscriber.)

use std::io::Write;
use std::sync::{Arc, Mutex};

use sluice_tests::ingest::{Ingest, GITHUB_SECRET, GITLAB_TOKEN, SIGNING_SECRET};
use sluice_tests::nats::NatsServer;
use sluice_tests::sign;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_and_bodies_never_appear_in_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let nats = NatsServer::start().await;
    let ingest = Ingest::start(&nats.url()).await;
    let marker = "body-marker-3c1d9e";
    let body =
        format!(r#"{{"zen":"{marker}","hook_id":1,"repository":{{"full_name":"acme/app"}}}}"#);
    let wrong_token = "wrong-token-value-55aa";

    // Accepted, refused for a bad signature, refused for a bad token, a signed generic.
    assert_eq!(
        ingest
            .post_github("ping", "log-ok-1", body.as_bytes())
            .await
            .status()
            .as_u16(),
        200
    );
    let bad = ingest
        .http
        .post(ingest.url("/webhooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", "ping")
        .header("x-github-delivery", "log-bad-2")
        .header(
            "x-hub-signature-256",
            sign::github_sha256("wrong-secret-value-77", body.as_bytes()),
        )
        .body(body.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(bad.status().as_u16(), 401);
    let bad_token = ingest
        .http
        .post(ingest.url("/webhooks/gitlab"))
        .header("content-type", "application/json")
        .header("x-gitlab-event", "Push Hook")
        .header("x-gitlab-token", wrong_token)
        .body(body.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(bad_token.status().as_u16(), 401);
    let generic = format!(r#"{{"type":"push","data":{{"comment":"{marker}"}}}}"#);
    assert_eq!(
        ingest
            .post_generic("log-generic-3", generic.as_bytes())
            .await
            .status()
            .as_u16(),
        202
    );

    // NATS gone: every delivery is refused unsent, and logged as a line a second at most
    // with the count, not one warning each (a spike or an outage sends thousands).
    let mut nats = nats;
    nats.kill();
    let ready = ingest.admin_url("/readyz");
    sluice_tests::wait_for(
        "ingest to see NATS gone",
        std::time::Duration::from_secs(10),
        || async {
            let r = reqwest::get(&ready).await.ok()?;
            (r.status().as_u16() == 503).then_some(())
        },
    )
    .await;
    let refused_from = std::time::Instant::now();
    const REFUSED: usize = 30;
    for i in 0..REFUSED {
        let answer = ingest
            .post_github("ping", &format!("log-refused-{i}"), body.as_bytes())
            .await;
        assert_eq!(answer.status().as_u16(), 503, "refusal {i}");
    }
    ingest.stop().await.expect("stop");
    let seconds = refused_from.elapsed().as_secs() as usize;

    let logs = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf8");
    // Reported as counts, at most a line a second plus the last one at shutdown, and
    // every refusal in a count.
    let summaries: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("webhooks refused without being sent"))
        .collect();
    assert!(
        (1..=seconds + 2).contains(&summaries.len()),
        "{} summary lines for {REFUSED} refusals in {seconds} s:\n{logs}",
        summaries.len()
    );
    let counted: usize = summaries
        .iter()
        .map(|l| {
            let n = l.split("disconnected=").nth(1).expect("a count");
            n.split(' ')
                .next()
                .unwrap_or(n)
                .parse::<usize>()
                .expect("a number")
        })
        .sum();
    assert_eq!(counted, REFUSED, "{logs}");
    assert!(
        !logs
            .lines()
            .any(|l| l.contains(" WARN ") && l.contains("event not stored")),
        "a warning per refused delivery:\n{logs}"
    );
    for i in 0..REFUSED {
        // Each one at debug level, with its event id.
        let id = format!("event_id=github:log-refused-{i} ");
        assert!(logs.contains(&id), "{id} not logged:\n{logs}");
    }
    assert!(
        logs.contains("log-ok-1"),
        "accepted deliveries are logged with their id:\n{logs}"
    );
    assert!(
        logs.contains("log-bad-2"),
        "refused deliveries are logged with their id:\n{logs}"
    );
    for secret in [
        GITHUB_SECRET,
        GITLAB_TOKEN,
        SIGNING_SECRET,
        "wrong-secret-value-77",
        wrong_token,
        marker,
    ] {
        assert!(
            !logs.contains(secret),
            "{secret:?} leaked into the logs:\n{logs}"
        );
    }
    let whsec_key = SIGNING_SECRET.trim_start_matches("whsec_");
    assert!(!logs.contains(whsec_key));
}
