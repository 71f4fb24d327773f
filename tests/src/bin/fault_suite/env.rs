//! The system under test: the cluster in its namespaces, the streams, the pipelines,
//! the Kubernetes API doubles and the service processes.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use async_nats::jetstream;
use sluice_core::nats::NatsOptions;
use sluice_core::roles::{Role, ServerOptions};
use sluice_tests::auth::nats_admin;
use sluice_tests::kubeapi::KubeApi;
use sluice_tests::nats::reserve_port;

use crate::net::{self, Node};
use sluice_tests::process::{self as services, Service};

pub const CLUSTERS: [&str; 2] = ["c1", "c2"];

/// The pipelines every event is matched against: a push runs `fs-push` on c1, a pull
/// or merge request `fs-pr` on c2; comments run nothing.
const PIPELINES: &str = "\
name: fs-push
triggers:
  - kinds: [push]
runtime:
  cluster: c1
steps:
  - name: build
    image: alpine:3
    commands: [\"true\"]
---
name: fs-pr
triggers:
  - kinds: [pull_request]
runtime:
  cluster: c2
steps:
  - name: test
    image: alpine:3
    commands: [\"true\"]
";

/// The pipeline an event of `kind` runs, and on which cluster.
pub fn pipeline_for(kind: &str) -> Option<(&'static str, usize)> {
    match kind {
        "push" => Some(("fs-push", 0)),
        "pull_request" => Some(("fs-pr", 1)),
        _ => None,
    }
}

pub struct Env {
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub js: jetstream::Context,
    pub ingests: Vec<Service>,
    pub dispatchers: Vec<Service>,
    pub runners: Vec<Service>,
    /// One double per cluster, in `CLUSTERS` order.
    pub apis: Vec<KubeApi>,
    pub http: reqwest::Client,
    pub seen: crate::check::Seen,
}

impl Env {
    pub async fn start() -> anyhow::Result<Env> {
        let dir = std::env::var_os("SLUICE_FAULT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("sluice-fault-suite"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let sluice = services::sluice_bin()?;
        net::setup().context("network namespaces")?;

        // Credentials and the servers' configuration, as an operator makes them.
        let auth = dir.join("nats-auth");
        let clusters: Vec<String> = CLUSTERS.iter().map(|c| (*c).to_owned()).collect();
        nats_admin::init(
            &auth,
            &clusters,
            &ServerOptions {
                listen: "0.0.0.0:4222".into(),
                store_dir: "/unused".into(),
                max_file_store: Some(sluice_tests::nats::MAX_FILE_STORE.into()),
            },
            false,
        )?;
        let mut nodes = net::nodes(&auth.join(nats_admin::CONFIG_FILE), &dir)?;
        for node in &mut nodes {
            node.spawn()?;
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        for node in &nodes {
            wait_healthy(&http, node, Duration::from_secs(60)).await?;
        }
        let urls = nodes.iter().map(Node::url).collect::<Vec<_>>().join(",");
        let seed = |role: &Role| auth.join(role.seed_file());
        let admin = NatsOptions {
            nkey_file: Some(seed(&Role::Admin)),
            inbox_prefix: Some("_INBOX".into()),
            ..NatsOptions::new(urls.clone(), "fault-suite")
        };
        let js = jetstream::new(sluice_core::nats::connect(&admin).await?);

        // Streams (R3) and the pipelines, with the admin seed. The cluster may still be
        // settling (JetStream answers "insufficient resources" for a while): retry.
        let admin_env = |role: &Role| {
            vec![
                ("SLUICE_NATS_URL".to_owned(), urls.clone()),
                (
                    "SLUICE_NATS_NKEY".to_owned(),
                    seed(role).display().to_string(),
                ),
            ]
        };
        let cli = |args: &[&str]| -> anyhow::Result<String> {
            let out = Command::new(&sluice)
                .args(args)
                .envs(admin_env(&Role::Admin))
                .env("RUST_LOG", "warn")
                .output()?;
            if !out.status.success() {
                bail!(
                    "sluice {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            match cli(&[
                "streams",
                "apply",
                "--replicas",
                "3",
                "--clusters",
                "c1:10s,c2:10s",
                // Logs kept small: JetStream refuses to place a stream whose byte
                // limit exceeds the free disk (the default is 5 GiB).
                "--logs-max-bytes",
                "268435456",
            ]) {
                Ok(_) => break,
                Err(e) if Instant::now() < until => {
                    tracing::debug!("streams apply: {e:#}; again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
        let pipelines = dir.join("pipelines.yaml");
        std::fs::write(&pipelines, PIPELINES)?;
        cli(&["pipelines", "apply", "-f", &pipelines.display().to_string()])?;

        // The Kubernetes API doubles (containers print a line and exit after 200 ms).
        let mut apis = Vec::new();
        for _ in CLUSTERS {
            apis.push(KubeApi::start_simulated(Duration::from_millis(200)).await);
        }

        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let service_env = |role: &Role| {
            let mut env = admin_env(role);
            env.push(("RUST_LOG".into(), "info".into()));
            env
        };
        let mut ingests = Vec::new();
        for i in 1..=2 {
            let (port, admin_port) = (reserve_port(), reserve_port());
            let mut env = service_env(&Role::Ingest);
            env.push((
                "SLUICE_GITHUB_WEBHOOK_SECRET".into(),
                sluice_tests::ingest::GITHUB_SECRET.into(),
            ));
            env.push((
                "SLUICE_GITLAB_WEBHOOK_TOKEN".into(),
                sluice_tests::ingest::GITLAB_TOKEN.into(),
            ));
            ingests.push(
                Service::new(
                    &format!("ingest-{i}"),
                    &sluice,
                    admin_port,
                    services::strings(&[
                        "ingest",
                        "--listen",
                        &format!("127.0.0.1:{port}"),
                        "--admin-listen",
                        &format!("127.0.0.1:{admin_port}"),
                        "--stream-replicas",
                        "3",
                    ]),
                    env,
                    &logs,
                )
                .with_webhooks(port),
            );
        }
        let mut dispatchers = Vec::new();
        for i in 1..=2 {
            let port = reserve_port();
            dispatchers.push(Service::new(
                &format!("dispatcher-{i}"),
                &sluice,
                port,
                services::strings(&[
                    "dispatcher",
                    "--admin-listen",
                    &format!("127.0.0.1:{port}"),
                    "--stream-replicas",
                    "3",
                ]),
                service_env(&Role::Dispatcher),
                &logs,
            ));
        }
        let mut runners = Vec::new();
        for (c, cluster) in CLUSTERS.iter().enumerate() {
            let port = reserve_port();
            let kube_dir = dir.join(format!("kube-{cluster}"));
            std::fs::create_dir_all(&kube_dir)?;
            let kubeconfig = apis[c].write_kubeconfig(&kube_dir);
            let mut env = service_env(&Role::Runner((*cluster).to_owned()));
            env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
            runners.push(Service::new(
                &format!("runner-{cluster}"),
                &sluice,
                port,
                services::strings(&[
                    "runner",
                    "--cluster",
                    cluster,
                    "--executor",
                    "kubernetes",
                    "--runner-id",
                    &format!("{cluster}-a"),
                    "--admin-listen",
                    &format!("127.0.0.1:{port}"),
                    "--max-running",
                    "500",
                    "--ack-wait",
                    "10s",
                ]),
                env,
                &logs,
            ));
        }
        let mut env = Env {
            dir,
            nodes,
            js,
            ingests,
            dispatchers,
            runners,
            apis,
            http,
            seen: Default::default(),
        };
        for s in env.services_mut() {
            s.spawn()?;
        }
        let all: Vec<&Service> = env.services().collect();
        services::wait_ready(&env.http, &all, Duration::from_secs(90))
            .await
            .map_err(anyhow::Error::msg)?;
        env.seen.start(&env.js).await?;
        Ok(env)
    }

    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.ingests
            .iter()
            .chain(&self.dispatchers)
            .chain(&self.runners)
    }

    pub fn services_mut(&mut self) -> impl Iterator<Item = &mut Service> {
        self.ingests
            .iter_mut()
            .chain(&mut self.dispatchers)
            .chain(&mut self.runners)
    }

    /// Each ingest's webhooks.
    pub fn ingest_urls(&self) -> Vec<String> {
        self.ingests
            .iter()
            .map(|s| s.webhooks().to_owned())
            .collect()
    }

    /// Each ingest's admin endpoints (`/readyz`).
    pub fn ingest_admin_urls(&self) -> Vec<String> {
        self.ingests.iter().map(|s| s.admin.clone()).collect()
    }

    /// The node (index into `nodes`) that leads `stream`'s replica group now.
    pub async fn leader(&self, stream: &str) -> anyhow::Result<usize> {
        let mut handle = self.js.get_stream(stream).await?;
        let info = handle.info().await?;
        let name = info
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .context("no leader")?;
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .with_context(|| format!("leader {name} is not a node"))
    }

    pub fn shutdown(&mut self) {
        for s in self.services_mut() {
            s.kill();
        }
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

/// Waits until the node's `/healthz` answers 200, or has said only what `tolerated`
/// accepts for a few seconds (see [`services::nats_healthy_unless`]).
pub async fn wait_healed(
    http: &reqwest::Client,
    node: &Node,
    deadline: Duration,
    tolerated: fn(&str) -> bool,
) -> anyhow::Result<services::Health> {
    services::nats_healthy_unless(http, &node.monitor(), deadline, tolerated)
        .await
        .with_context(|| format!("{} not healthy", node.name))
}

/// Waits until the node's `/healthz` answers 200: its JetStream is up and current.
pub async fn wait_healthy(
    http: &reqwest::Client,
    node: &Node,
    deadline: Duration,
) -> anyhow::Result<Duration> {
    services::nats_healthy(http, &node.monitor(), deadline)
        .await
        .with_context(|| format!("{} not healthy", node.name))
}
