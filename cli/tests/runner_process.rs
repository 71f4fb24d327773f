//! `sluice runner --executor kubernetes` as a process, against the Kubernetes API test
//! double (found through a kubeconfig, as kubectl would) and a real nats-server:
//! killed with SIGKILL mid-run and started again, it loses no run, makes no second
//! Pod, and ships every log line exactly once.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sluice_core::run::RunState;
use sluice_tests::dispatcher::provision;
use sluice_tests::ingest::jetstream;
use sluice_tests::kubeapi::KubeApi;
use sluice_tests::nats::NatsServer;
use sluice_tests::runner::{final_state, git_repo, log_lines, publish_run, run_request, step};
use sluice_tests::{init_logs, wait_for};

fn kubeconfig(dir: &Path, api: &KubeApi) -> String {
    api.write_kubeconfig(dir).display().to_string()
}

fn runner(nats_url: &str, kubeconfig: &str, id: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "runner",
            "--cluster",
            "eu-1",
            "--executor",
            "kubernetes",
            "--ack-wait",
            "2s",
            "--delete-after",
            "1h",
            "--runner-id",
            id,
        ])
        .env("SLUICE_NATS_URL", nats_url)
        // Any free port: two replicas may run at once.
        .env("SLUICE_ADMIN_LISTEN", "127.0.0.1:0")
        .env("KUBECONFIG", kubeconfig)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice runner")
}

#[tokio::test]
async fn kill_9_and_restart_loses_no_run_and_makes_no_second_pod() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let api = KubeApi::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let config = kubeconfig(dir.path(), &api);
    let (repo, sha) = git_repo();
    let mut first = runner(&nats.url(), &config, "first");

    let ids: Vec<String> = (0..3).map(|i| format!("crash-{i}")).collect();
    let count = "i=1; while [ $i -le 80 ]; do echo line $i; i=$((i+1)); sleep 0.1; done";
    for id in &ids {
        publish_run(
            &js,
            &run_request(id, "eu-1", repo.path(), &sha, vec![step("count", &[count])]),
        )
        .await;
    }
    // Every run is mid-way through its output when the runner dies.
    wait_for(
        "every run to be writing",
        Duration::from_secs(30),
        || async {
            for id in &ids {
                if log_lines(&js, id, "count").await.len() < 5 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    first.kill().expect("SIGKILL");
    first.wait().expect("reaped");

    let mut second = runner(&nats.url(), &config, "second");
    let expected: Vec<String> = (1..=80).map(|i| format!("line {i}")).collect();
    for id in &ids {
        let done = wait_for(id, Duration::from_secs(60), || final_state(&js, id)).await;
        assert_eq!(done.state, RunState::Succeeded, "{done:?}");
        assert_eq!(
            done.runner.as_deref(),
            Some("second"),
            "adopted after the restart"
        );
        assert_eq!(
            log_lines(&js, id, "count").await,
            expected,
            "{id}: every line once, in order"
        );
    }
    let created = api.created();
    let unique: HashSet<&String> = created.iter().collect();
    assert_eq!(created.len(), ids.len(), "one Pod per run: {created:?}");
    assert_eq!(unique.len(), ids.len());
    let _ = second.kill();
    let _ = second.wait();
}

#[tokio::test]
async fn sluice_dev_runs_steps_as_pods_with_the_kubernetes_executor() {
    use sluice_core::run::run_id;
    use sluice_core::{Event, Provider};
    use sluice_tests::dispatcher::{pipeline_names, publish_event};

    init_logs();
    // 1 GiB of JetStream storage, as on a laptop with little disk free: dev mode's
    // streams must fit (the production logs limit alone reserves 5 GiB).
    let nats = NatsServer::start_with_storage("1G").await;
    let js = jetstream(&nats.url()).await;
    let api = KubeApi::start().await;
    let dir = tempfile::tempdir().expect("tmp");
    let config = kubeconfig(dir.path(), &api);
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir_all(&pipelines).expect("mkdir");
    std::fs::write(
        pipelines.join("hello.yaml"),
        "name: hello\ntriggers:\n  - kinds: [push]\nsteps:\n  - name: greet\n    image: alpine\n    commands: [\"echo hello from a pod\"]\n",
    )
    .expect("write");
    let port = sluice_tests::nats::reserve_port();
    let mut dev = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["dev", "--executor", "kubernetes", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        // Any free port: the default one may be taken on a shared machine.
        .args(["--dashboard-listen", "127.0.0.1:0"])
        .arg("--pipelines")
        .arg(&pipelines)
        .arg("--data")
        .arg(dir.path().join("data"))
        .env("SLUICE_NATS_URL", nats.url())
        .env("KUBECONFIG", &config)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start sluice dev");
    wait_for(
        "the pipeline to be applied",
        Duration::from_secs(30),
        || async {
            pipeline_names(&js)
                .await
                .contains(&"hello".to_owned())
                .then_some(())
        },
    )
    .await;
    let (repo, sha) = git_repo();
    let mut event = Event::new(Provider::Manual, "dev-1", "push");
    event.repo = Some("acme/app".into());
    event.clone_url = Some(repo.path().display().to_string());
    event.git_ref = Some("refs/heads/main".into());
    event.sha = Some(sha);
    publish_event(&js, &event).await;
    let id = run_id("manual:dev-1", "hello", 0);
    let done = wait_for("the run", Duration::from_secs(30), || final_state(&js, &id)).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(log_lines(&js, &id, "greet").await, ["hello from a pod"]);
    assert!(
        api.pod(&format!("sluice-{id}")).is_some(),
        "the step ran in a Pod through the Kubernetes API"
    );
    let _ = Command::new("kill").arg(dev.id().to_string()).status();
    let _ = dev.wait();
}
