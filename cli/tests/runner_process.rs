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
    let path = dir.join("kubeconfig");
    let body = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://{}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: nobody\n    namespace: default\ncurrent-context: double\nusers:\n- name: nobody\n  user: {{}}\n",
        api.addr
    );
    std::fs::write(&path, body).expect("kubeconfig");
    path.display().to_string()
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
    let count = "i=1; while [ $i -le 40 ]; do echo line $i; i=$((i+1)); sleep 0.1; done";
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
    let expected: Vec<String> = (1..=40).map(|i| format!("line {i}")).collect();
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
