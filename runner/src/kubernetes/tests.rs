//! Pod builder snapshots (review a change with `cargo insta review`) and the reading
//! of Pod statuses.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodStatus,
};
use sluice_core::pipeline::{Resources, Runtime};
use sluice_core::run::{RunCache, RunRequest, RunStep};

use super::status::{container_states, waiting_reason, CState};
use super::watch::PodState;
use super::*;

fn step(name: &str, commands: &[&str]) -> RunStep {
    RunStep {
        name: name.into(),
        image: Some("docker.io/library/rust:1.89".into()),
        commands: commands.iter().map(|c| (*c).to_owned()).collect(),
        env: BTreeMap::new(),
        secrets: Vec::new(),
        resources: None,
        timeout_secs: None,
        pipeline: None,
        runtime: None,
    }
}

fn request(steps: Vec<RunStep>) -> RunRequest {
    RunRequest {
        run_id: "4f1c2a9e0b7d3c5a8e21".into(),
        pipeline: "app-ci".into(),
        cluster: "eu-1".into(),
        event_id: "github:72d3162e-cc78-11e3-81ab-4c9367dc0958".into(),
        repo: Some("acme/app".into()),
        clone_url: Some("https://github.com/acme/app.git".into()),
        git_ref: Some("refs/heads/main".into()),
        sha: Some("0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c".into()),
        pr: None,
        env: BTreeMap::from([("RUST_LOG".into(), "info".into())]),
        steps,
        skipped_steps: Vec::new(),
        runtime: Runtime::default(),
        timeout_secs: None,
        cache: None,
        concurrency_group: None,
        parent: None,
        attempt: 0,
        created_at: time::OffsetDateTime::UNIX_EPOCH,
    }
}

#[test]
fn minimal_pod() {
    let req = request(vec![step("test", &["cargo test"])]);
    let pod = pod::build(&req, 0, &req.steps, &KubeSettings::default(), None);
    insta::assert_yaml_snapshot!(pod);
}

#[test]
fn full_pod() {
    let mut build = step("build", &["cargo build --release"]);
    build.secrets = vec!["crates-token".into()];
    build.resources = Some(Resources {
        cpu: Some("2".into()),
        memory: Some("4Gi".into()),
        cpu_limit: Some("4".into()),
        memory_limit: Some("8Gi".into()),
    });
    build.env = BTreeMap::from([("RUST_LOG".into(), "debug".into())]);
    let mut req = request(vec![build, step("test", &["cargo test"])]);
    req.timeout_secs = Some(1800);
    req.cache = Some(RunCache {
        key: "acme/app/main".into(),
        fallback_key: Some("acme/app/main".into()),
        paths: vec!["target".into(), "/usr/local/cargo/registry".into()],
    });
    req.runtime = Runtime {
        node_selector: BTreeMap::from([("pool".into(), "ci".into())]),
        service_account: Some("deployer".into()),
        tolerations: vec![serde_json::json!({
            "key": "ci", "operator": "Equal", "value": "true", "effect": "NoSchedule"
        })],
        image_pull_secrets: vec!["registry".into()],
        ..Default::default()
    };
    let settings = KubeSettings {
        namespace: "ci".into(),
        clone_secret: Some("git-credentials".into()),
        ..Default::default()
    };
    let claim = pod::cache_claim_name("acme/app/main");
    let pod = pod::build(&req, 0, &req.steps, &settings, Some(&claim));
    insta::assert_yaml_snapshot!(pod);
}

#[test]
fn pod_names_come_from_the_run_id_alone() {
    assert_eq!(
        pod::pod_name("4f1c2a9e0b7d3c5a8e21", 0),
        "sluice-4f1c2a9e0b7d3c5a8e21"
    );
    assert_eq!(
        pod::pod_name("4f1c2a9e0b7d3c5a8e21", 2),
        "sluice-4f1c2a9e0b7d3c5a8e21-2"
    );
    // DNS labels: at most 63 characters.
    assert!(pod::pod_name("4f1c2a9e0b7d3c5a8e21", 99).len() <= 63);
}

#[test]
fn root_is_allowed_only_when_asked_for() {
    let req = request(vec![step("test", &["id"])]);
    let settings = KubeSettings {
        run_as_user: 0,
        ..Default::default()
    };
    let pod = pod::build(&req, 0, &req.steps, &settings, None);
    let security = pod.spec.and_then(|s| s.security_context).expect("context");
    assert_eq!(security.run_as_non_root, Some(false));
    assert_eq!(security.run_as_user, Some(0));
}

#[test]
fn child_steps_split_a_run_into_segments() {
    let mut child = step("deploy", &[]);
    child.pipeline = Some("deploy-prod".into());
    let steps = vec![step("a", &[]), step("b", &[]), child, step("c", &[])];
    let parts = crate::executor::segments(&steps);
    let shape: Vec<String> = parts
        .iter()
        .map(|s| match s {
            Segment::Pods(steps) => steps
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join("+"),
            Segment::Child(step) => format!("child:{}", step.name),
        })
        .collect();
    assert_eq!(shape, ["a+b", "child:deploy", "c"]);
}

fn pod_with(status: PodStatus) -> PodState {
    PodState::from(Pod {
        status: Some(status),
        ..Default::default()
    })
}

#[test]
fn why_a_pod_waits_names_the_image_pull_or_the_scheduler() {
    let names = ["sluice-clone", "build"];
    let pulling = pod_with(PodStatus {
        init_container_statuses: Some(vec![ContainerStatus {
            name: "sluice-clone".into(),
            state: Some(k8s_openapi::api::core::v1::ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ImagePullBackOff".into()),
                    message: Some("Back-off pulling image \"nope:1\"".into()),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]),
        ..Default::default()
    });
    let states = container_states(&pulling, names);
    assert_eq!(
        waiting_reason(&pulling, &states).as_deref(),
        Some("ImagePullBackOff: Back-off pulling image \"nope:1\"")
    );
    assert_eq!(states[1], CState::NotStarted);

    let unschedulable = pod_with(PodStatus {
        conditions: Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/3 nodes are available".into()),
            ..Default::default()
        }]),
        ..Default::default()
    });
    let states = container_states(&unschedulable, names);
    assert_eq!(
        waiting_reason(&unschedulable, &states).as_deref(),
        Some("Unschedulable: 0/3 nodes are available")
    );
}

#[tokio::test]
async fn a_rate_burst_or_stream_cap_of_zero_is_refused() {
    let config = || kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
    KubeExecutor::new(config(), KubeSettings::default()).expect("the defaults");
    for (setting, tweak) in [
        (
            "qps",
            (|s: &mut KubeSettings| s.qps = 0) as fn(&mut KubeSettings),
        ),
        ("burst", |s| s.burst = 0),
        ("log_streams_per_connection", |s| {
            s.log_streams_per_connection = 0
        }),
    ] {
        let mut settings = KubeSettings::default();
        tweak(&mut settings);
        match KubeExecutor::new(config(), settings) {
            Err(Error::Config { setting: s, .. }) => assert_eq!(s, setting),
            other => panic!("{setting} 0 not refused: {other:?}"),
        }
    }
}

#[test]
fn a_log_stream_ending_well_before_its_container_was_dropped() {
    use super::status::ended_before_the_container;
    use time::macros::datetime;
    let end = datetime!(2026-12-02 10:00:05.400 UTC);
    // The kubelet closes the stream at the exit; the status has whole seconds.
    assert!(!ended_before_the_container(
        end,
        Some(datetime!(2026-12-02 10:00:05 UTC))
    ));
    assert!(!ended_before_the_container(
        end,
        Some(datetime!(2026-12-02 10:00:06 UTC))
    ));
    assert!(ended_before_the_container(
        end,
        Some(datetime!(2026-12-02 10:00:08 UTC))
    ));
    assert!(!ended_before_the_container(end, None));
}
