//! Every way a delivery can be refused: the right status, a useful message, and
//! nothing in the stream.

use std::time::Duration;

use sluice_tests::ingest::{
    jetstream, stored_count, Ingest, GITHUB_SECRET, GITLAB_TOKEN, SIGNING_SECRET,
};
use sluice_tests::nats::NatsServer;
use sluice_tests::{fixture, init_logs, sign};

struct Case {
    name: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    status: u16,
    message: &'static str,
}

fn github_headers(sig: String) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", "application/json".into()),
        ("x-github-event", "pull_request".into()),
        ("x-github-delivery", "d-1".into()),
        ("x-hub-signature-256", sig),
    ]
}

fn cases() -> Vec<Case> {
    let body = fixture("github/pull_request.opened.json");
    let good = sign::github_sha256(GITHUB_SECRET, &body);
    let mut tampered = body.clone();
    let at = tampered.iter().position(|b| *b == b'2').expect("a digit");
    tampered[at] = b'3';
    let without = |name: &str, sig: String| -> Vec<(&'static str, String)> {
        github_headers(sig)
            .into_iter()
            .filter(|(h, _)| *h != name)
            .collect()
    };
    let malformed = br#"{"action": "opened", "#.to_vec();
    let ts = sign::now();
    let generic_body = br#"{"type":"push","data":{"repo":"a/b"}}"#.to_vec();
    let generic = |id: &str, ts: i64, sig: String| {
        vec![
            ("content-type", "application/json".into()),
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sig),
        ]
    };
    vec![
        Case {
            name: "tampered body",
            path: "/webhooks/github",
            headers: github_headers(good.clone()),
            body: tampered,
            status: 401,
            message: "signature does not match",
        },
        Case {
            name: "wrong secret",
            path: "/webhooks/github",
            headers: github_headers(sign::github_sha256("not-the-secret", &body)),
            body: body.clone(),
            status: 401,
            message: "signature does not match",
        },
        Case {
            name: "missing signature",
            path: "/webhooks/github",
            headers: without("x-hub-signature-256", good.clone()),
            body: body.clone(),
            status: 401,
            message: "missing signature header",
        },
        Case {
            name: "garbled signature",
            path: "/webhooks/github",
            headers: github_headers("sha256=zz".into()),
            body: body.clone(),
            status: 401,
            message: "malformed signature header",
        },
        Case {
            name: "sha1 only, not enabled",
            path: "/webhooks/github",
            headers: {
                let mut h = without("x-hub-signature-256", good.clone());
                h.push(("x-hub-signature", sign::github_sha1(GITHUB_SECRET, &body)));
                h
            },
            body: body.clone(),
            status: 401,
            message: "SHA-1 signatures are not accepted",
        },
        Case {
            name: "missing event header",
            path: "/webhooks/github",
            headers: without("x-github-event", good.clone()),
            body: body.clone(),
            status: 400,
            message: "missing X-GitHub-Event header",
        },
        Case {
            name: "missing delivery header",
            path: "/webhooks/github",
            headers: without("x-github-delivery", good.clone()),
            body: body.clone(),
            status: 400,
            message: "missing X-GitHub-Delivery header",
        },
        Case {
            name: "malformed JSON, correctly signed",
            path: "/webhooks/github",
            headers: github_headers(sign::github_sha256(GITHUB_SECRET, &malformed)),
            body: malformed.clone(),
            status: 400,
            message: "invalid JSON payload",
        },
        Case {
            name: "malformed JSON, badly signed: the signature is checked first",
            path: "/webhooks/github",
            headers: github_headers(sign::github_sha256("nope", &malformed)),
            body: malformed,
            status: 401,
            message: "signature does not match",
        },
        Case {
            name: "unsupported content type",
            path: "/webhooks/github",
            headers: {
                let mut h = without("content-type", good.clone());
                h.push(("content-type", "text/plain".into()));
                h
            },
            body: body.clone(),
            status: 415,
            message: "unsupported Content-Type",
        },
        Case {
            name: "gitlab wrong token",
            path: "/webhooks/gitlab",
            headers: vec![
                ("content-type", "application/json".into()),
                ("x-gitlab-event", "Push Hook".into()),
                ("x-gitlab-token", format!("{GITLAB_TOKEN}x")),
            ],
            body: fixture("gitlab/push-event.json"),
            status: 401,
            message: "signature does not match",
        },
        Case {
            name: "gitlab no token",
            path: "/webhooks/gitlab",
            headers: vec![
                ("content-type", "application/json".into()),
                ("x-gitlab-event", "Push Hook".into()),
            ],
            body: fixture("gitlab/push-event.json"),
            status: 401,
            message: "missing signature header",
        },
        Case {
            name: "standard webhook replayed outside the tolerance",
            path: "/webhooks/generic",
            headers: generic(
                "msg_old",
                ts - 301,
                sign::standard(SIGNING_SECRET, "msg_old", ts - 301, &generic_body),
            ),
            body: generic_body.clone(),
            status: 401,
            message: "outside the accepted tolerance",
        },
        Case {
            name: "standard webhook from the future",
            path: "/webhooks/generic",
            headers: generic(
                "msg_new",
                ts + 400,
                sign::standard(SIGNING_SECRET, "msg_new", ts + 400, &generic_body),
            ),
            body: generic_body.clone(),
            status: 401,
            message: "outside the accepted tolerance",
        },
        Case {
            name: "standard webhook with the id changed",
            path: "/webhooks/generic",
            headers: generic(
                "msg_other",
                ts,
                sign::standard(SIGNING_SECRET, "msg_1", ts, &generic_body),
            ),
            body: generic_body.clone(),
            status: 401,
            message: "signature does not match",
        },
        Case {
            name: "standard webhook without a type",
            path: "/webhooks/generic",
            headers: generic(
                "msg_2",
                ts,
                sign::standard(SIGNING_SECRET, "msg_2", ts, b"{}"),
            ),
            body: b"{}".to_vec(),
            status: 400,
            message: "needs a `type` field",
        },
    ]
}

#[tokio::test]
async fn refused_deliveries_get_the_right_status_and_store_nothing() {
    init_logs();
    let nats = NatsServer::start().await;
    let ingest = Ingest::start(&nats.url()).await;
    let js = jetstream(&nats.url()).await;
    for case in cases() {
        let mut req = ingest.http.post(ingest.url(case.path)).body(case.body);
        for (h, v) in &case.headers {
            req = req.header(*h, v);
        }
        let r = req.send().await.expect("sent");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        assert_eq!(status, case.status, "{}: {text}", case.name);
        assert!(text.contains(case.message), "{}: {text}", case.name);
        assert!(
            text.starts_with("{\"error\":"),
            "{}: JSON error body: {text}",
            case.name
        );
    }
    assert_eq!(stored_count(&js).await, 0, "nothing refused was stored");

    let metrics = ingest.metrics().await;
    assert!(
        metrics.contains(
            r#"sluice_ingest_verification_failures_total{provider="github",reason="mismatch"} 3"#
        ),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"sluice_ingest_requests_total{provider="github",outcome="bad_request"} 3"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_endpoint_without_a_secret_refuses_everything() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.secrets = Default::default();
    let ingest = Ingest::start_with(config).await;
    let js = jetstream(&nats.url()).await;
    let body = fixture("github/ping.json");
    // Even a signature made with an empty key is refused: no secret is not "any secret".
    let r = ingest
        .http
        .post(ingest.url("/webhooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", "ping")
        .header("x-github-delivery", "p-1")
        .header("x-hub-signature-256", sign::github_sha256("", &body))
        .body(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 401);
    assert!(r
        .text()
        .await
        .expect("text")
        .contains("no webhook secret is configured"));
    assert_eq!(stored_count(&js).await, 0);
}

#[tokio::test]
async fn oversized_bodies_are_refused_without_being_read_whole() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.max_body_bytes = 64 * 1024;
    let ingest = Ingest::start_with(config).await;
    let js = jetstream(&nats.url()).await;
    let big = vec![b' '; 64 * 1024 + 1];

    // Declared too large: refused from the header alone.
    let r = ingest
        .http
        .post(ingest.url("/webhooks/github"))
        .headers(header_map(github_headers(sign::github_sha256(
            GITHUB_SECRET,
            &big,
        ))))
        .body(big.clone())
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 413);

    // Streamed without a length: refused once the limit is crossed.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        big.chunks(8 * 1024).map(|c| Ok(c.to_vec())).collect();
    let r = ingest
        .http
        .post(ingest.url("/webhooks/github"))
        .headers(header_map(github_headers(sign::github_sha256(
            GITHUB_SECRET,
            &big,
        ))))
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 413);
    assert_eq!(stored_count(&js).await, 0);
}

#[tokio::test]
async fn a_body_that_never_finishes_is_answered_in_time() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.read_timeout = Duration::from_millis(300);
    let ingest = Ingest::start_with(config).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    tx.send(Ok(b"{\"action\":".to_vec()))
        .await
        .expect("first chunk");
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let r = ingest
        .http
        .post(ingest.url("/webhooks/github"))
        .headers(header_map(github_headers("sha256=00".into())))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 408);
    drop(tx);
}

/// A request whose body arrives only when the answer is due (9 s after the request
/// began) is answered 503 without being sent: sent then, its publish would time out at
/// once and might be stored behind an answer that says it failed.
#[tokio::test]
async fn a_request_with_no_time_left_is_refused_unsent() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.read_timeout = Duration::from_secs(30);
    let ingest = Ingest::start_with(config).await;
    let body = fixture("github/pull_request.opened.json");
    let (head, tail) = body.split_at(100);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(2);
    tx.send(Ok(head.to_vec())).await.expect("head");
    let stream =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let late = tokio::spawn(
        ingest
            .http
            .post(ingest.url("/webhooks/github"))
            .header("content-type", "application/json")
            .header("x-github-event", "pull_request")
            .header("x-github-delivery", "late-1")
            .header(
                "x-hub-signature-256",
                sign::github_sha256(GITHUB_SECRET, &body),
            )
            .body(reqwest::Body::wrap_stream(stream))
            .send(),
    );
    // The client is that slow: the rest of the body comes when the answer is due.
    tokio::time::sleep(sluice_ingest::publish::ANSWER_WITHIN).await;
    tx.send(Ok(tail.to_vec())).await.expect("tail");
    drop(tx);
    let answer = late.await.expect("task").expect("answered");
    assert_eq!(answer.status().as_u16(), 503);
    let text = answer.text().await.expect("body");
    assert!(text.contains("took too long to arrive"), "{text}");

    // Publishes are stored in order: once a later delivery is, the late one would be.
    let on_time = ingest.post_github("pull_request", "on-time-1", &body).await;
    assert_eq!(on_time.status().as_u16(), 202);
    let js = jetstream(&nats.url()).await;
    assert_eq!(stored_count(&js).await, 1, "the late delivery was stored");
    let metrics = ingest.metrics().await;
    assert!(
        metrics.contains(r#"sluice_ingest_requests_total{provider="github",outcome="timeout"} 1"#),
        "{metrics}"
    );
}

fn header_map(headers: Vec<(&'static str, String)>) -> reqwest::header::HeaderMap {
    headers
        .into_iter()
        .map(|(k, v)| {
            (
                reqwest::header::HeaderName::from_static(k),
                v.parse().expect("header value"),
            )
        })
        .collect()
}
