//! The runner-only preflight against a real `nats-server` started from what
//! `sluice nats init` writes: the cluster's seed reaches NATS and its consumer is
//! there (the install goes on), a seed NATS does not know, and a cluster whose
//! consumer was never created — each a one-line failure saying what to do, before
//! anything is written to the cluster.

use std::path::Path;
use std::process::Output;

use sluice_core::roles::Role;
use sluice_core::streams::{ClusterConsumer, StreamSettings};
use sluice_tests::auth::{AuthNats, Probe};
use sluice_tests::kubeapi::KubeApi;

fn install(dir: &Path, api: &KubeApi, url: &str, cluster: &str, seed: &Path) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "install",
            "--yes",
            "--hosts",
            "runner",
            "--cluster",
            cluster,
        ])
        .arg("--existing-nats-url")
        .arg(url)
        .arg("--nats-seed")
        .arg(seed)
        .current_dir(dir)
        .env("KUBECONFIG", api.write_kubeconfig(dir))
        .env("NO_COLOR", "1")
        .env("SLUICE_INSTALL_TIMEOUT", "20s")
        .env_remove("SLUICE_INSTALL_VALUES")
        .output()
        .expect("run sluice")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The failure line naming `needle`, which must be the only line saying so.
fn failure_line(said: &str, needle: &str) -> String {
    let lines: Vec<&str> = said.lines().filter(|l| l.contains(needle)).collect();
    assert_eq!(lines.len(), 1, "one line with {needle:?} in {said}");
    lines[0].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_runner_only_preflight_checks_the_seed_and_the_consumer_on_nats() {
    // NATS for clusters eu-1 and us-1, but the streams and consumers applied for eu-1
    // only, as `sluice streams apply --clusters eu-1` does.
    let nats = AuthNats::start(&["eu-1", "us-1"]).await;
    let admin = Probe::connect(&nats, &Role::Admin).await;
    let settings = StreamSettings {
        clusters: vec![ClusterConsumer::new("eu-1")],
        // Small enough for any test machine's disk.
        logs_max_bytes: 64 << 20,
        ..Default::default()
    };
    sluice_core::streams::apply(&admin.js, &settings, false)
        .await
        .expect("streams apply with the admin seed");
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_owned();
    let url = nats.url();

    // The seed of `sluice cluster add eu-1`, and its consumer: preflight passes and the
    // runner is installed.
    let api = KubeApi::start().await;
    let (api_ref, eu1) = (&api, nats.seed(&Role::Runner("eu-1".into())));
    let out = tokio::task::block_in_place(|| install(&dir, api_ref, &url, "eu-1", &eu1));
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("✓ API server, permissions, namespace, storage, NATS"),
        "{said}"
    );
    assert!(said.contains("Deployment/sluice-runner"), "{said}");

    // A seed this NATS does not know: refused, saying which seed to use.
    let stranger = dir.join("stranger.nk");
    std::fs::write(
        &stranger,
        nkeys::KeyPair::new_user().seed().expect("a seed"),
    )
    .expect("write");
    let api = KubeApi::start().await;
    let api_ref = &api;
    let out = tokio::task::block_in_place(|| install(&dir, api_ref, &url, "eu-1", &stranger));
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    let line = failure_line(&said, "refused the seed");
    assert!(line.contains(&url), "{line}");
    assert!(line.contains("stranger.nk"), "{line}");
    assert!(
        line.contains("runner-eu-1.nk from `sluice cluster add eu-1`"),
        "{line}"
    );
    let seed = std::fs::read_to_string(&stranger).expect("seed");
    assert!(
        !said.contains(seed.trim()),
        "the seed itself is never shown"
    );
    assert!(api.writes().is_empty(), "{:?}", api.writes());

    // us-1's seed is valid, but its consumer was never created.
    let api = KubeApi::start().await;
    let (api_ref, us1) = (&api, nats.seed(&Role::Runner("us-1".into())));
    let out = tokio::task::block_in_place(|| install(&dir, api_ref, &url, "us-1", &us1));
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    let line = failure_line(&said, "sluice-runner-us-1");
    assert!(line.contains("is not on NATS"), "{line}");
    assert!(line.contains("sluice streams apply --clusters"), "{line}");
    assert!(api.writes().is_empty(), "{:?}", api.writes());

    // NATS not reachable at all: named, with what to check.
    let api = KubeApi::start().await;
    let api_ref = &api;
    let closed = format!("nats://127.0.0.1:{}", sluice_tests::nats::reserve_port());
    let out = tokio::task::block_in_place(|| install(&dir, api_ref, &closed, "eu-1", &eu1));
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    let line = failure_line(&said, "cannot reach NATS");
    assert!(line.contains("that this machine can reach it"), "{line}");
    assert!(api.writes().is_empty(), "{:?}", api.writes());
}
