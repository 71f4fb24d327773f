//! The admin endpoints over a real socket: a runner is ready only once it has joined
//! its consumer group, says why not while NATS is down and is ready again after NATS
//! comes back, without a restart; its `/metrics` speaks the golden list's names.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use sluice_tests::ingest::jetstream;
use sluice_tests::nats::{reserve_port, NatsServer};
use sluice_tests::runner::{final_state, git_repo, publish_run, run_request, step, Runner};
use sluice_tests::{init_logs, wait_for, workspace_root};

/// The status code and body of `GET http://addr/path`, or `None` while nothing answers.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let answer = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    let code = answer.status().as_u16();
    Some((code, answer.text().await.ok()?))
}

/// `(name, type)` of every `# TYPE` line.
fn families(metrics: &str) -> BTreeSet<(String, String)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some((name.to_owned(), kind.to_owned()))
        })
        .collect()
}

fn golden(service: &str) -> BTreeSet<(String, String)> {
    let path = workspace_root().join(format!("tests/golden/metrics/{service}.txt"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (name, kind) = l.split_once(' ')?;
            Some((name.to_owned(), kind.trim().to_owned()))
        })
        .collect()
}

#[tokio::test]
async fn a_runner_is_ready_once_joined_not_while_nats_is_down_and_again_after() {
    init_logs();
    let mut nats = NatsServer::start().await;
    let url = nats.url();
    let js = jetstream(&url).await;
    sluice_tests::dispatcher::provision(&js).await;
    let admin: SocketAddr = format!("127.0.0.1:{}", reserve_port()).parse().unwrap();
    let _runner = Runner::start_with(&url, "eu-1", "admin-runner", |c| {
        c.admin_listen = Some(admin);
    })
    .await;

    let (code, body) = wait_for("/healthz", Duration::from_secs(20), || {
        get(admin, "/healthz")
    })
    .await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    wait_for(
        "the runner to be ready",
        Duration::from_secs(20),
        || async {
            let (code, _) = get(admin, "/readyz").await?;
            (code == 200).then_some(())
        },
    )
    .await;

    // A run, so every family this path touches has a sample.
    let (repo, sha) = git_repo();
    publish_run(
        &js,
        &run_request(
            "adm-1",
            "eu-1",
            repo.path(),
            &sha,
            vec![step("s", &["true"])],
        ),
    )
    .await;
    wait_for("the run to finish", Duration::from_secs(30), || {
        let js = js.clone();
        async move { final_state(&js, "adm-1").await }
    })
    .await;
    let (_, metrics) = wait_for("runs_total", Duration::from_secs(10), || async {
        let (_, m) = get(admin, "/metrics").await?;
        m.contains("sluice_runner_runs_total{cluster=\"eu-1\",result=\"succeeded\"} 1")
            .then_some(((), m))
    })
    .await;
    assert!(metrics.contains("sluice_build_info{version="), "{metrics}");
    assert!(metrics.contains("sluice_nats_connected 1"), "{metrics}");
    assert!(
        metrics.contains("sluice_runner_runs_in_flight{cluster=\"eu-1\"}"),
        "{metrics}"
    );
    // Every family exported is in the golden list (the Kubernetes ones need the
    // Kubernetes executor, so they are not all here).
    let exported = families(&metrics);
    let listed = golden("runner");
    let unknown: Vec<_> = exported.difference(&listed).collect();
    assert!(
        unknown.is_empty(),
        "not in tests/golden/metrics/runner.txt: {unknown:?}"
    );
    for family in [
        "sluice_build",
        "sluice_nats_connected",
        "sluice_runner_runs",
        "sluice_runner_runs_in_flight",
        "sluice_runner_pickup_duration_seconds",
        "sluice_runner_run_duration_seconds",
    ] {
        assert!(
            exported.iter().any(|(name, _)| name == family),
            "{family} missing: {metrics}"
        );
    }

    // NATS gone: not ready, naming NATS; the process keeps answering.
    nats.kill();
    wait_for(
        "a 503 naming NATS while NATS is down",
        Duration::from_secs(30),
        || async {
            let (code, body) = get(admin, "/readyz").await?;
            let verdict: serde_json::Value = serde_json::from_str(&body).ok()?;
            let names_nats = verdict["failed"]
                .as_array()?
                .iter()
                .any(|f| f["check"] == "nats");
            (code == 503 && verdict["ready"] == false && names_nats).then_some(())
        },
    )
    .await;
    let (code, _) = get(admin, "/healthz").await.expect("alive");
    assert_eq!(code, 200);
    let (_, metrics) = get(admin, "/metrics").await.expect("metrics");
    assert!(metrics.contains("sluice_nats_connected 0"), "{metrics}");

    // Back without a restart of the runner.
    nats.restart().await;
    wait_for(
        "ready again after NATS is back",
        Duration::from_secs(30),
        || async {
            let (code, _) = get(admin, "/readyz").await?;
            (code == 200).then_some(())
        },
    )
    .await;
}
