//! The delivery reconciler's command line: its flags refused out of range with a
//! message, and `sluice events lost` (and `sluice status`) showing what could not be
//! recovered and why.

use std::process::{Command, Output};

use sluice_core::subjects;
use sluice_dispatcher::recover::decide::{Reason, Record, State};
use sluice_dispatcher::recover::{Summary, PASS_KEY};
use sluice_tests::dispatcher::provision;
use sluice_tests::ingest::jetstream;
use sluice_tests::nats::NatsServer;
use time::macros::datetime;

fn sluice(nats_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env("SLUICE_NATS_URL", nats_url)
        .env("NO_COLOR", "1")
        .output()
        .expect("run sluice")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn recover_flags_out_of_range_are_refused_with_a_message() {
    for (args, says) in [
        (
            &["dispatcher", "--recover-horizon", "169h"][..],
            "at most 168h",
        ),
        (&["dispatcher", "--recover-horizon", "0s"], "more than 0"),
        (
            &["dispatcher", "--recover-interval", "0s"],
            "longer than zero",
        ),
        (&["dispatcher", "--recover-max-attempts", "0"], "at least 1"),
        (
            &["dispatcher", "--recover-requests-per-hour", "0"],
            "at least 1",
        ),
        (
            &["dispatcher", "--recover-hooks", "app,repo:acme:12"],
            "<owner>/<name>",
        ),
        (&["dispatcher", "--recover-hooks", "org:acme:x"], "number"),
    ] {
        let out = sluice("nats://127.0.0.1:1", args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = text(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

fn lost(guid: &str, reason: Reason) -> Record {
    Record {
        forge: "github".into(),
        hook: "app".into(),
        guid: guid.into(),
        event: "pull_request".into(),
        action: Some("opened".into()),
        first_delivered_at: datetime!(2026-12-02 10:00 UTC),
        attempts: 3,
        last_attempt_at: Some(datetime!(2026-12-02 10:20 UTC)),
        state: State::Lost,
        reason: Some(reason),
        detail: Some("redelivered 3 times; last answer 0".into()),
    }
}

#[tokio::test]
async fn events_lost_lists_what_could_not_be_recovered_and_why() {
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let url = nats.url();
    let empty = tokio::task::spawn_blocking({
        let url = url.clone();
        move || sluice(&url, &["events", "lost"])
    })
    .await
    .expect("ran");
    assert!(empty.status.success(), "{}", text(&empty.stderr));
    let out = text(&empty.stdout);
    assert!(
        out.contains("No reconcile pass yet") && out.contains("No delivery lost"),
        "{out}"
    );

    let kv = js
        .get_key_value(subjects::DELIVERIES_BUCKET)
        .await
        .expect("bucket");
    let put = |key: String, value: Vec<u8>| {
        let kv = kv.clone();
        async move { kv.put(key, value.into()).await.expect("put") }
    };
    put(
        "github.g-exhausted".into(),
        serde_json::to_vec(&lost("g-exhausted", Reason::AttemptsExhausted)).expect("json"),
    )
    .await;
    put(
        "github.g-refused".into(),
        serde_json::to_vec(&lost("g-refused", Reason::Refused)).expect("json"),
    )
    .await;
    let pending = Record {
        state: State::Pending,
        reason: None,
        ..lost("g-pending", Reason::Refused)
    };
    put(
        "github.g-pending".into(),
        serde_json::to_vec(&pending).expect("json"),
    )
    .await;
    let summary = Summary {
        at: Some(datetime!(2026-12-02 11:00 UTC)),
        holder: "dispatcher-0".into(),
        listed: 40,
        redelivered: 1,
        lost: 2,
        ..Summary::default()
    };
    put(PASS_KEY.into(), serde_json::to_vec(&summary).expect("json")).await;

    let (table, json, status) = tokio::task::spawn_blocking(move || {
        (
            sluice(&url, &["events", "lost"]),
            sluice(&url, &["events", "lost", "-o", "json"]),
            sluice(&url, &["status"]),
        )
    })
    .await
    .expect("ran");
    let status = text(&status.stdout);
    assert!(
        status.contains("Delivery reconciler: 2026-12-02T11:00:00Z by dispatcher-0: 40 listed")
            && status.contains("2 webhook deliveries could not be recovered"),
        "{status}"
    );
    assert!(table.status.success(), "{}", text(&table.stderr));
    let out = text(&table.stdout);
    for says in [
        "Last pass: 2026-12-02T11:00:00Z by dispatcher-0: 40 listed, 1 redelivered",
        "github:g-exhausted",
        "attempts_exhausted",
        "github:g-refused",
        "refused",
        "pull_request/opened",
        "by hand",
    ] {
        assert!(out.contains(says), "{says}: {out}");
    }
    assert!(!out.contains("g-pending"), "only lost ones: {out}");
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(report["lost"].as_array().map(Vec::len), Some(2), "{report}");
    assert_eq!(report["last_pass"]["listed"], 40);
}
