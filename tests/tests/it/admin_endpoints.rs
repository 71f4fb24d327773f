//! The admin endpoints over a real socket: a runner is ready only once it has joined
//! its consumer group, says why not while NATS is down and is ready again after NATS
//! comes back, without a restart; its `/metrics` speaks the golden list's names.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use sluice_core::admin::Admin;
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

/// Serves `admin` on a free loopback port until the test ends.
async fn serve(admin: Admin) -> (SocketAddr, tokio_util::sync::DropGuard) {
    let stop = tokio_util::sync::CancellationToken::new();
    let (addr, _task) = admin
        .serve("127.0.0.1:0".parse().unwrap(), stop.clone())
        .await
        .expect("admin endpoints");
    (addr, stop.drop_guard())
}

/// `(name, type)` of every family `register` puts on an admin surface once `sample`
/// has given each labelled family a series (without one, a family is not written).
async fn registered(register: impl FnOnce(&mut Admin)) -> BTreeSet<(String, String)> {
    let mut admin = Admin::new("0.0.0-test");
    register(&mut admin);
    let (addr, _stop) = serve(admin).await;
    let (code, metrics) = get(addr, "/metrics").await.expect("/metrics");
    assert_eq!(code, 200);
    families(&metrics)
}

/// Both ways: every family a service registers is in its golden list, and every listed
/// family is registered, so a rename or a new metric is a deliberate change there.
#[tokio::test]
async fn each_service_registers_exactly_its_golden_list() {
    let ingest = sluice_ingest::metrics::Metrics::default();
    ingest.request("github", "accepted");
    ingest
        .verification_failures
        .get_or_create(&sluice_ingest::metrics::VerifyFailure {
            provider: "github",
            reason: "mismatch",
        })
        .inc();
    ingest
        .duplicates
        .get_or_create(&sluice_ingest::metrics::ProviderLabel { provider: "github" })
        .inc();
    ingest
        .connections
        .timed_out
        .get_or_create(&sluice_ingest::metrics::TimeoutPhase { phase: "idle" })
        .inc();
    let exported = registered(|a| {
        ingest.register(
            a.registry("sluice_ingest"),
            &sluice_ingest::publish::BacklogView::default(),
        );
    })
    .await;
    assert_eq!(
        exported,
        golden("ingest"),
        "tests/golden/metrics/ingest.txt"
    );

    let dispatcher = sluice_dispatcher::metrics::Metrics::default();
    dispatcher.event("github", "dispatched");
    let eu = sluice_dispatcher::metrics::ClusterLabel {
        cluster: "eu-1".into(),
    };
    dispatcher.runs_planned.get_or_create(&eu).inc();
    dispatcher.runs_pending.get_or_create(&eu).set(1);
    dispatcher.status(sluice_core::Provider::Github, "sent");
    dispatcher.delivery_recovered("github");
    dispatcher.delivery_unrecoverable("github", "refused");
    let exported = registered(|a| dispatcher.register(a)).await;
    assert_eq!(
        exported,
        golden("dispatcher"),
        "tests/golden/metrics/dispatcher.txt"
    );

    let runner = sluice_runner::metrics::Metrics::default();
    runner
        .runs_in_flight
        .get_or_create(&sluice_runner::metrics::ClusterLabel {
            cluster: "eu-1".into(),
        })
        .set(0);
    runner
        .runs
        .get_or_create(&sluice_runner::metrics::RunResult {
            cluster: "eu-1".into(),
            result: "succeeded",
        })
        .inc();
    runner
        .run_seconds
        .get_or_create(&sluice_runner::metrics::ResultLabel {
            result: "succeeded",
        })
        .observe(1.0);
    runner.kube.request(Some("create"), Some(201));
    runner.kube.pod_create_error(None);
    let exported = registered(|a| runner.register(a.registry("sluice_runner"))).await;
    assert_eq!(
        exported,
        golden("runner"),
        "tests/golden/metrics/runner.txt"
    );
}

/// A real ingest's `/metrics`, on its own port beside the webhooks: the families every
/// service has, and nothing outside its golden list. The webhooks' port, which an
/// Ingress exposes, serves none of the admin endpoints.
#[tokio::test]
async fn ingest_serves_the_admin_surface_on_its_own_port() {
    init_logs();
    let nats = NatsServer::start().await;
    let ingest = sluice_tests::ingest::Ingest::start(&nats.url()).await;
    let answer = ingest
        .post_github(
            "pull_request",
            "m-1",
            &sluice_tests::fixture("github/pull_request.opened.json"),
        )
        .await;
    assert_eq!(answer.status().as_u16(), 202);
    let metrics = ingest.metrics().await;
    assert!(metrics.contains("sluice_build_info{version="), "{metrics}");
    assert!(metrics.contains("sluice_nats_connected 1"), "{metrics}");
    assert!(
        metrics
            .contains("sluice_ingest_requests_total{provider=\"github\",outcome=\"accepted\"} 1"),
        "{metrics}"
    );
    let unknown: Vec<_> = families(&metrics)
        .difference(&golden("ingest"))
        .cloned()
        .collect();
    assert!(
        unknown.is_empty(),
        "not in tests/golden/metrics/ingest.txt: {unknown:?}"
    );
    for path in ["/metrics", "/readyz", "/healthz"] {
        let answer = ingest.http.get(ingest.url(path)).send().await.expect(path);
        assert_eq!(
            answer.status().as_u16(),
            404,
            "{path} on the webhooks' port"
        );
    }
}

/// The dispatcher counts what it does on the real path: an event dispatched, the run it
/// planned, the time that took, an unreadable event dead-lettered, and the backlog of
/// a cluster whose runners are all away.
#[tokio::test]
async fn the_dispatcher_counts_events_runs_dead_letters_and_each_clusters_backlog() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    sluice_core::streams::apply(
        &js,
        &sluice_core::streams::StreamSettings {
            clusters: vec![sluice_core::streams::ClusterConsumer::new("eu-1")],
            ..Default::default()
        },
        false,
    )
    .await
    .expect("streams");
    sluice_tests::dispatcher::apply(
        &js,
        r#"
name: app-ci
triggers:
  - provider: github
    kinds: [push]
runtime: { cluster: eu-1 }
steps:
  - { name: test, image: alpine, commands: ["true"] }
"#,
    )
    .await;
    let config = sluice_tests::dispatcher::Dispatcher::config(&nats.url());
    let metrics = config.metrics.clone();
    let _dispatcher = sluice_tests::dispatcher::Dispatcher::start_with(config).await;
    let (admin, _stop) = serve({
        let mut admin = Admin::new("0.0.0-test");
        metrics.register(&mut admin);
        admin
    })
    .await;

    let mut event = sluice_core::Event::new(sluice_core::Provider::Github, "m-1", "push");
    event.repo = Some("acme/app".into());
    event.git_ref = Some("refs/heads/main".into());
    event.sha = Some("abc".into());
    sluice_tests::dispatcher::publish_event(&js, &event).await;
    js.publish("sluice.events.github.push", "{not json".into())
        .await
        .expect("publish")
        .await
        .expect("ack");

    let wanted = [
        "sluice_dispatcher_events_total{provider=\"github\",outcome=\"dispatched\"} 1",
        "sluice_dispatcher_events_total{provider=\"github\",outcome=\"dead_lettered\"} 1",
        "sluice_dispatcher_runs_planned_total{cluster=\"eu-1\"} 1",
        "sluice_dispatcher_dispatch_duration_seconds_count 1",
        "sluice_dispatcher_dead_letters_total 1",
        // No runner took it: the whole backlog.
        "sluice_runs_pending{cluster=\"eu-1\"} 1",
    ];
    let metrics = wait_for("every count", Duration::from_secs(30), || async {
        let (_, m) = get(admin, "/metrics").await?;
        wanted.iter().all(|w| m.contains(w)).then_some(m)
    })
    .await;
    let unknown: Vec<_> = families(&metrics)
        .difference(&golden("dispatcher"))
        .cloned()
        .collect();
    assert!(
        unknown.is_empty(),
        "not in tests/golden/metrics/dispatcher.txt: {unknown:?}"
    );
}
