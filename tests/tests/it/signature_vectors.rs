//! The published signature test vectors (`../shared/fixtures/README.md`), checked by the
//! verifiers directly and, where the scheme allows, through the real router.

use secrecy::SecretString;
use sluice_ingest::verify::{self, Failure, StandardHeaders};
use sluice_tests::ingest::Ingest;
use sluice_tests::init_logs;
use sluice_tests::nats::NatsServer;

const GITHUB_SECRET: &str = "It's a Secret to Everybody";
const GITHUB_SIG: &str = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

fn secrets(list: &[&str]) -> Vec<SecretString> {
    list.iter()
        .map(|s| SecretString::from((*s).to_owned()))
        .collect()
}

#[test]
fn github_vector() {
    let s = secrets(&["rotated-out", GITHUB_SECRET]);
    assert_eq!(
        verify::github_sha256(&s, GITHUB_SIG, b"Hello, World!"),
        Ok(())
    );
    assert_eq!(
        verify::github_sha256(&s, GITHUB_SIG, b"Hello, World?"),
        Err(Failure::Mismatch)
    );
    assert_eq!(
        verify::github_sha256(&secrets(&["other"]), GITHUB_SIG, b"Hello, World!"),
        Err(Failure::Mismatch)
    );
}

#[test]
fn standard_webhooks_vectors() {
    let vectors = [
        (
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
        ),
        (
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            r#"{"email":"test@example.com","username":"test_user"}"#,
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=",
        ),
    ];
    for (secret, id, ts, body, sig) in vectors {
        let s = secrets(&[secret]);
        let timestamp = ts.to_string();
        let h = StandardHeaders {
            id,
            timestamp: &timestamp,
            signature: sig,
        };
        assert_eq!(
            verify::standard(&s, h, body.as_bytes(), ts, 300),
            Ok(()),
            "{id}"
        );
        // Several signatures in one header: any valid one passes.
        let several = format!("v1,bm90LWl0 {sig}");
        let h2 = StandardHeaders {
            signature: &several,
            ..h
        };
        assert_eq!(
            verify::standard(&s, h2, body.as_bytes(), ts, 300),
            Ok(()),
            "{id}"
        );
        // The same delivery replayed six minutes later is refused.
        assert_eq!(
            verify::standard(&s, h, body.as_bytes(), ts + 360, 300),
            Err(Failure::Expired),
            "{id}"
        );
        let tampered = body.replace('2', "3").replace("test_user", "test_usr");
        assert_eq!(
            verify::standard(&s, h, tampered.as_bytes(), ts, 300),
            Err(Failure::Mismatch),
            "{id}"
        );
    }
}

#[tokio::test]
async fn github_vector_through_the_router() {
    init_logs();
    let nats = NatsServer::start().await;
    let mut config = Ingest::config(&nats.url());
    config.secrets.github = sluice_ingest::secrets::SecretSet::from_list(GITHUB_SECRET);
    let ingest = Ingest::start_with(config).await;
    let post = |sig: &'static str| {
        ingest
            .http
            .post(ingest.url("/webhooks/github"))
            .header("content-type", "application/json")
            .header("x-github-event", "push")
            .header("x-github-delivery", "vector-1")
            .header("x-hub-signature-256", sig)
            .body("Hello, World!")
            .send()
    };
    // The signature checks out, so the (non-JSON) body is then reported as malformed.
    let r = post(GITHUB_SIG).await.expect("sent");
    assert_eq!(r.status().as_u16(), 400);
    let r = post("sha256=857107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17")
        .await
        .expect("sent");
    assert_eq!(r.status().as_u16(), 401);
}
