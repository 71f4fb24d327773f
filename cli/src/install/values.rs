//! Every answer `sluice install` takes, with its default in one place. Answers come
//! from flags and `SLUICE_INSTALL_*` variables, then a `--values` file (YAML), then
//! these defaults; the wizard starts from the result and lets the operator change it.

use std::fmt;
use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sluice_core::pipeline::HumanDuration;

/// The image `scripts/build-image` builds.
pub const DEFAULT_IMAGE: &str = "ghcr.io/sluice-ci/sluice:0.1.0";
/// The NATS server image: the version `scripts/install-nats` tests against.
pub const DEFAULT_NATS_IMAGE: &str = "docker.io/library/nats:2.12.8";
/// Where Sluice is installed.
pub const DEFAULT_NAMESPACE: &str = "sluice";
/// The cluster name runs go to when a pipeline names none (the dispatcher's default).
pub const DEFAULT_CLUSTER: &str = "default";
/// The folder `sluice nats init` writes the credentials to; created when missing.
pub const DEFAULT_NATS_DIR: &str = "sluice-nats";
/// JetStream's volume per NATS node.
pub const DEFAULT_NATS_STORAGE: &str = "10Gi";
/// Replicas of ingest, the dispatcher and a cluster's runner: two, so one can be
/// restarted or rescheduled while the other serves.
pub const DEFAULT_REPLICAS: i32 = 2;
/// NATS nodes: three, for R3 streams that survive one node.
pub const NATS_NODES: i32 = 3;
/// The host of the example Ingress for webhooks.
pub const DEFAULT_INGEST_HOST: &str = "sluice.example.com";
/// Where runners may reach the Kubernetes API server and, in a runner-only cluster,
/// NATS: anywhere, on those ports only. Narrow it to the real addresses.
pub const DEFAULT_EGRESS_CIDR: &str = "0.0.0.0/0";
/// Runs a runner replica executes at once (the runner's own default).
pub const DEFAULT_MAX_RUNNING: u32 = 50;
/// With KEDA: the most runner replicas it may scale to (docs/operations.md sizes it:
/// replicas times --kube-qps is what the runners may ask of the API server).
pub const DEFAULT_KEDA_MAX_REPLICAS: i32 = 10;
/// The image of the smoke pipeline's one step (it needs `sh` and `echo`).
pub const DEFAULT_SMOKE_IMAGE: &str = "docker.io/library/alpine:3.20";
/// NATS's monitoring port, which KEDA's nats-jetstream scaler reads.
pub const NATS_MONITOR_PORT: u16 = 8222;

/// The port the dashboard serves its pages and `/healthz`, `/readyz`, `/metrics` on:
/// the port of its own default listen address.
pub fn dashboard_port() -> u16 {
    sluice_dashboard::DEFAULT_LISTEN
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("the dashboard's listen address has a port")
}

/// What this cluster hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Hosts {
    /// NATS (unless an existing one is named), ingest and the dispatcher.
    ControlPlane,
    /// A runner for this cluster, connecting out to NATS elsewhere.
    Runner,
    /// Everything: the control plane and this cluster's runner.
    Both,
}

impl Hosts {
    pub fn control_plane(self) -> bool {
        matches!(self, Hosts::ControlPlane | Hosts::Both)
    }

    pub fn runner(self) -> bool {
        matches!(self, Hosts::Runner | Hosts::Both)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hosts::ControlPlane => "control-plane",
            Hosts::Runner => "runner",
            Hosts::Both => "both",
        }
    }
}

impl fmt::Display for Hosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A secret answer: never printed, never serialized.
#[derive(Clone)]
pub struct Secret(pub SecretString);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(SecretString::from(s.into()))
    }

    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Secret) -> bool {
        self.expose() == other.expose()
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}

/// Every answer of the install.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Values {
    /// The kubeconfig context to install into (none: the current one).
    pub context: Option<String>,
    pub namespace: String,
    pub hosts: Hosts,
    /// This cluster's name, as pipelines' `runtime.cluster` names it.
    pub cluster: String,
    /// Control plane: the clusters whose runners it serves (their consumers and
    /// credentials); this cluster's is always among them when it hosts a runner.
    pub clusters: Vec<String>,
    pub image: String,
    pub nats_image: String,
    /// An existing NATS to use instead of installing one (control plane), or the NATS
    /// a runner-only cluster connects to.
    pub nats_url: Option<String>,
    /// Control plane: the `sluice nats init` folder (created when missing).
    pub nats_dir: PathBuf,
    /// Runner-only: this cluster's runner seed (`runner-<cluster>.nk`, from
    /// `sluice cluster add`).
    pub nats_seed: Option<PathBuf>,
    pub nats_storage_size: String,
    /// Storage class of NATS's volumes (none: the cluster's default class).
    pub storage_class: Option<String>,
    pub ingest_replicas: i32,
    pub dispatcher_replicas: i32,
    pub dashboard_replicas: i32,
    pub runner_replicas: i32,
    pub max_running: u32,
    /// Host name of the example Ingress that routes webhooks to ingest.
    pub ingest_host: String,
    /// Ingest's `--shed-after`: a webhook that JetStream's backlog would leave
    /// unanswered longer than this after its arrival is answered 503 at once (none:
    /// ingest's default, 1 s).
    pub ingest_shed_after: Option<HumanDuration>,
    pub ingress_class: Option<String>,
    /// The dashboard's URL as its users reach it (your Ingress or proxy in front of the
    /// Service `sluice-dashboard`): commit statuses link to `<URL>/runs/<run id>`.
    /// None: the in-cluster Service URL, which only works from inside the cluster.
    pub dashboard_url: Option<String>,
    /// Offer cancel and rerun on the dashboard's run pages to holders of the token in
    /// the Secret `sluice-dashboard-actions` (off: the dashboard only reads).
    pub dashboard_actions: bool,
    /// With `dashboard_actions`: the header in which the authenticating proxy in front
    /// of the dashboard names the signed-in user (`--trusted-user-header`); the
    /// dashboard trusts it as is, so nothing may reach it but through that proxy.
    pub dashboard_trusted_user_header: Option<String>,
    /// Where runners may reach the API server (ports 443 and 6443).
    pub api_server_cidr: String,
    /// Runner-only: where runners may reach NATS (its port only).
    pub nats_cidr: String,
    /// Replicas of each stream and bucket (`sluice streams apply --replicas`): 3 for
    /// the installed NATS cluster, 1 for a single existing server.
    pub stream_replicas: u32,
    /// Scale the runner with a KEDA ScaledObject on the cluster's queue (KEDA must be
    /// installed: its CRD `scaledobjects.keda.sh`). Off by default: KEDA then owns the
    /// runner's replicas.
    pub keda: bool,
    /// With `keda`: the most replicas KEDA scales the runner to.
    pub keda_max_replicas: i32,
    /// With `keda`: the NATS monitoring endpoint (host:port) KEDA reads; none: the
    /// installed NATS's Service, else the NATS URL's host on port 8222.
    pub keda_monitoring_endpoint: Option<String>,
    /// After the install, run a one-step pipeline on this cluster and report its
    /// result (a cluster with the control plane: it holds the admin seed).
    pub smoke: bool,
    /// The image of the smoke pipeline's step.
    pub smoke_image: String,
    /// Generated when not given (and kept from the cluster on a later run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub github_webhook_secret: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gitlab_webhook_token: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_signing_secret: Option<Secret>,
    /// Forge tokens for commit statuses and changed files (optional).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub github_token: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gitlab_token: Option<Secret>,
    /// With `dashboard_actions`: the token that allows actions (generated when not
    /// given, and kept from the cluster on a later run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dashboard_actions_token: Option<Secret>,
}

impl Default for Values {
    fn default() -> Values {
        Values {
            context: None,
            namespace: DEFAULT_NAMESPACE.into(),
            hosts: Hosts::Both,
            cluster: DEFAULT_CLUSTER.into(),
            clusters: Vec::new(),
            image: DEFAULT_IMAGE.into(),
            nats_image: DEFAULT_NATS_IMAGE.into(),
            nats_url: None,
            nats_dir: PathBuf::from(DEFAULT_NATS_DIR),
            nats_seed: None,
            nats_storage_size: DEFAULT_NATS_STORAGE.into(),
            storage_class: None,
            ingest_replicas: DEFAULT_REPLICAS,
            dispatcher_replicas: DEFAULT_REPLICAS,
            dashboard_replicas: DEFAULT_REPLICAS,
            runner_replicas: DEFAULT_REPLICAS,
            max_running: DEFAULT_MAX_RUNNING,
            ingest_host: DEFAULT_INGEST_HOST.into(),
            ingest_shed_after: None,
            ingress_class: None,
            dashboard_url: None,
            dashboard_actions: false,
            dashboard_trusted_user_header: None,
            api_server_cidr: DEFAULT_EGRESS_CIDR.into(),
            nats_cidr: DEFAULT_EGRESS_CIDR.into(),
            stream_replicas: NATS_NODES as u32,
            keda: false,
            keda_max_replicas: DEFAULT_KEDA_MAX_REPLICAS,
            keda_monitoring_endpoint: None,
            smoke: false,
            smoke_image: DEFAULT_SMOKE_IMAGE.into(),
            github_webhook_secret: None,
            gitlab_webhook_token: None,
            webhook_signing_secret: None,
            github_token: None,
            gitlab_token: None,
            dashboard_actions_token: None,
        }
    }
}

/// The in-cluster NATS Service's client port.
pub const NATS_CLIENT_PORT: u16 = 4222;

impl Values {
    /// Reads a values file: YAML with Sluice's limits; unknown keys are refused.
    pub fn from_yaml(file: &str, text: &str) -> Result<Values, String> {
        sluice_core::yaml::check_size(text).map_err(|e| format!("{file}: {e}"))?;
        serde_saphyr::from_str_with_options(text, sluice_core::yaml::options())
            .map_err(|e| format!("{file}: {}", e.without_snippet()))
    }

    /// Whether NATS is installed here.
    pub fn installs_nats(&self) -> bool {
        self.hosts.control_plane() && self.nats_url.is_none()
    }

    /// The clusters the control plane serves: the listed ones plus this one when it
    /// hosts a runner, sorted, each once.
    pub fn served_clusters(&self) -> Vec<String> {
        let mut all = self.clusters.clone();
        if self.hosts.runner() || all.is_empty() {
            all.push(self.cluster.clone());
        }
        all.sort();
        all.dedup();
        all
    }

    /// The URL services and runners connect to.
    pub fn nats_url_for_services(&self) -> String {
        match &self.nats_url {
            Some(url) => url.clone(),
            None => format!(
                "nats://sluice-nats.{}.svc:{NATS_CLIENT_PORT}",
                self.namespace
            ),
        }
    }

    /// The NATS monitoring endpoint (host:port) KEDA's scaler reads: the answer, else
    /// the installed NATS's Service, else the NATS URL's (first) host on port 8222.
    pub fn keda_monitoring_endpoint(&self) -> String {
        if let Some(endpoint) = &self.keda_monitoring_endpoint {
            return endpoint.clone();
        }
        let host = match &self.nats_url {
            None => format!("sluice-nats.{}.svc.cluster.local", self.namespace),
            Some(url) => {
                let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
                let host_port = rest.split(['/', ',']).next().unwrap_or("");
                let host_port = host_port.rsplit_once('@').map_or(host_port, |(_, h)| h);
                match host_port.rsplit_once(':') {
                    Some((h, p)) if p.parse::<u16>().is_ok() => h.to_owned(),
                    _ => host_port.to_owned(),
                }
            }
        };
        format!("{host}:{NATS_MONITOR_PORT}")
    }

    /// The dashboard's Service inside the cluster.
    pub fn dashboard_service_url(&self) -> String {
        format!(
            "http://sluice-dashboard.{}.svc:{}",
            self.namespace,
            dashboard_port()
        )
    }

    /// Where commit statuses link to (the dispatcher's `--status-link-base-url`): the
    /// dashboard's URL as given (without a trailing `/`), else its in-cluster Service.
    pub fn status_link_base_url(&self) -> String {
        match &self.dashboard_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => self.dashboard_service_url(),
        }
    }

    /// The NATS port runners reach (runner-only clusters' egress).
    pub fn nats_port(&self) -> u16 {
        let url = self.nats_url.as_deref().unwrap_or("");
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let host_port = rest.split(['/', ',']).next().unwrap_or("");
        let default = if url.starts_with("wss://") {
            443
        } else if url.starts_with("ws://") {
            80
        } else {
            NATS_CLIENT_PORT
        };
        host_port
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(default)
    }

    /// Every problem with the answers, each naming the value and what to do.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, message: String| {
            if !ok {
                errors.push(message);
            }
        };
        check(
            is_dns_label(&self.namespace),
            format!(
                "namespace `{}`: use at most 63 lower-case letters, digits and `-` (--namespace, SLUICE_INSTALL_NAMESPACE or `namespace:`)",
                self.namespace
            ),
        );
        for cluster in std::iter::once(&self.cluster).chain(&self.clusters) {
            check(
                sluice_core::pipeline::Name::parse(cluster).is_ok(),
                format!(
                    "cluster `{cluster}`: use at most 63 lower-case letters, digits and `-` (--cluster/--clusters or `cluster:`/`clusters:`)"
                ),
            );
        }
        check(
            !self.image.trim().is_empty() && !self.image.contains(char::is_whitespace),
            format!(
                "image `{}`: name an image, e.g. {DEFAULT_IMAGE} (--image or `image:`)",
                self.image
            ),
        );
        for (name, n) in [
            ("ingest_replicas", self.ingest_replicas),
            ("dispatcher_replicas", self.dispatcher_replicas),
            ("dashboard_replicas", self.dashboard_replicas),
            ("runner_replicas", self.runner_replicas),
        ] {
            check(
                (1..=100).contains(&n),
                format!("{name} {n}: must be 1 to 100 (a runner at 0 replicas could not adopt running Pods)"),
            );
        }
        check(
            (1..=5).contains(&self.stream_replicas),
            format!(
                "stream_replicas {}: must be 1 to 5 (3 for a NATS cluster, 1 for one server)",
                self.stream_replicas
            ),
        );
        check(
            self.max_running >= 1,
            "max_running 0: must be at least 1".to_owned(),
        );
        check(
            is_quantity(&self.nats_storage_size),
            format!(
                "nats_storage_size `{}`: give a size such as 10Gi (--nats-storage-size or `nats_storage_size:`)",
                self.nats_storage_size
            ),
        );
        for (name, cidr) in [
            ("api_server_cidr", &self.api_server_cidr),
            ("nats_cidr", &self.nats_cidr),
        ] {
            check(
                is_cidr(cidr),
                format!("{name} `{cidr}`: give an IPv4 or IPv6 range such as 10.0.0.0/8"),
            );
        }
        if let Some(url) = &self.nats_url {
            check(
                ["nats://", "tls://", "ws://", "wss://"]
                    .iter()
                    .any(|s| url.starts_with(s)),
                format!("nats_url `{url}`: use nats://, tls://, ws:// or wss:// (--existing-nats-url or `nats_url:`)"),
            );
        }
        if let Some(url) = &self.dashboard_url {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            check(
                rest.is_some_and(|r| {
                    !r.is_empty()
                        && !r.starts_with('/')
                        && !r.contains(['?', '#'])
                        && !r.contains(|c: char| c.is_whitespace() || c.is_control())
                }),
                format!("dashboard_url `{url}`: give the URL users open the dashboard at, such as https://sluice-dashboard.example.com (--dashboard-url or `dashboard_url:`)"),
            );
        }
        if let Some(HumanDuration(wait)) = self.ingest_shed_after {
            check(
                !wait.is_zero() && wait <= sluice_ingest::PUBLISH_TIMEOUT,
                format!(
                    "ingest_shed_after `{}`: must be longer than zero and at most {} (ingest's publish timeout), e.g. 1s (--ingest-shed-after or `ingest_shed_after:`)",
                    HumanDuration(wait),
                    HumanDuration(sluice_ingest::PUBLISH_TIMEOUT)
                ),
            );
        }
        if let Some(name) = &self.dashboard_trusted_user_header {
            check(
                is_header_name(name),
                format!("dashboard_trusted_user_header `{name}`: give the header your proxy sets, such as X-Forwarded-User, and not one a browser sends itself (Authorization, Cookie, Host, Origin) (--dashboard-trusted-user-header or `dashboard_trusted_user_header:`)"),
            );
            check(
                self.dashboard_actions,
                "dashboard_trusted_user_header: the proxy's user only matters with dashboard actions (--dashboard-actions or `dashboard_actions: true`)".to_owned(),
            );
        }
        if self.hosts == Hosts::Runner {
            check(
                self.nats_url.is_some(),
                "nats_url: a runner-only cluster needs the NATS URL its runners connect to (--existing-nats-url, SLUICE_INSTALL_NATS_URL or `nats_url:`)".to_owned(),
            );
            check(
                self.nats_seed.is_some(),
                format!(
                    "nats_seed: a runner-only cluster needs its runner seed, runner-{}.nk from `sluice cluster add {} --out DIR` (--nats-seed, SLUICE_INSTALL_NATS_SEED or `nats_seed:`)",
                    self.cluster, self.cluster
                ),
            );
        }
        if self.keda {
            check(
                self.hosts.runner(),
                "keda: only a cluster that hosts a runner scales it with KEDA (--hosts runner or both, or keda: false)".to_owned(),
            );
            check(
                (1..=100).contains(&self.keda_max_replicas),
                format!(
                    "keda_max_replicas {}: must be 1 to 100 (--keda-max-replicas or `keda_max_replicas:`)",
                    self.keda_max_replicas
                ),
            );
            let endpoint = self.keda_monitoring_endpoint();
            check(
                !endpoint.contains("://")
                    && !endpoint.contains(char::is_whitespace)
                    && endpoint
                        .rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                format!(
                    "keda_monitoring_endpoint `{endpoint}`: give NATS's monitoring listener as host:port, e.g. nats.example.com:8222 (--keda-monitoring-endpoint or `keda_monitoring_endpoint:`)"
                ),
            );
        }
        if self.smoke {
            check(
                self.hosts.control_plane(),
                format!(
                    "smoke: a runner-only cluster holds no credential that may apply pipelines or start runs; run the smoke from the control plane's install, or start a pipeline with `runtime.cluster: {}` there (docs/install.md#the-smoke-run)",
                    self.cluster
                ),
            );
            check(
                !self.smoke_image.trim().is_empty() && !self.smoke_image.contains(char::is_whitespace),
                format!("smoke_image `{}`: name an image with sh, e.g. {DEFAULT_SMOKE_IMAGE} (--smoke-image or `smoke_image:`)", self.smoke_image),
            );
        }
        if let Some(host) = Some(&self.ingest_host) {
            check(
                !host.is_empty() && host.split('.').all(|l| is_dns_label(l) || l == "*"),
                format!("ingest_host `{host}`: give a host name such as {DEFAULT_INGEST_HOST}"),
            );
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

fn is_dns_label(s: &str) -> bool {
    sluice_core::pipeline::Name::parse(s).is_ok()
}

/// An HTTP field name (RFC 9110's token) other than those a browser sends itself or
/// that carry credentials: a proxy sets the user's header, the client must not.
fn is_header_name(s: &str) -> bool {
    const TCHAR: &str = "!#$%&'*+-.^_`|~";
    const REFUSED: [&str; 4] = ["authorization", "cookie", "host", "origin"];
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || TCHAR.contains(c))
        && !REFUSED.contains(&s.to_ascii_lowercase().as_str())
}

fn is_quantity(s: &str) -> bool {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let suffix = &s[digits.len()..];
    !digits.is_empty()
        && digits.parse::<f64>().is_ok_and(|n| n > 0.0)
        && ["", "Ki", "Mi", "Gi", "Ti", "Pi", "K", "M", "G", "T", "P"].contains(&suffix)
}

fn is_cidr(s: &str) -> bool {
    let Some((ip, bits)) = s.split_once('/') else {
        return false;
    };
    match (ip.parse::<std::net::IpAddr>(), bits.parse::<u8>()) {
        (Ok(std::net::IpAddr::V4(_)), Ok(b)) => b <= 32,
        (Ok(std::net::IpAddr::V6(_)), Ok(b)) => b <= 128,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_a_file_overrides_them() {
        Values::default().validate().expect("defaults");
        let v = Values::from_yaml(
            "v.yaml",
            "namespace: ci\nhosts: control-plane\nclusters: [eu-1, us-1]\ngithub_webhook_secret: s3cret\n",
        )
        .expect("parse");
        assert_eq!(v.namespace, "ci");
        assert_eq!(v.hosts, Hosts::ControlPlane);
        assert_eq!(v.image, DEFAULT_IMAGE);
        assert_eq!(v.served_clusters(), ["eu-1", "us-1"]);
        assert!(!format!("{v:?}").contains("s3cret"));
        assert!(!serde_saphyr::to_string(&v)
            .expect("yaml")
            .contains("s3cret"));
        let unknown = Values::from_yaml("v.yaml", "namespce: ci\n").expect_err("typo");
        assert!(unknown.contains("namespce"), "{unknown}");
    }

    #[test]
    fn each_bad_value_is_named_with_what_to_do() {
        let v = Values {
            namespace: "Sluice".into(),
            hosts: Hosts::Runner,
            runner_replicas: 0,
            nats_storage_size: "lots".into(),
            api_server_cidr: "10.0.0.0".into(),
            ..Values::default()
        };
        let errors = v.validate().expect_err("invalid").join("\n");
        for needle in [
            "namespace `Sluice`",
            "runner_replicas 0",
            "nats_storage_size `lots`",
            "api_server_cidr `10.0.0.0`",
            "nats_url: a runner-only cluster",
            "runner-default.nk from `sluice cluster add default",
        ] {
            assert!(errors.contains(needle), "{needle} in {errors}");
        }
    }

    #[test]
    fn the_shed_wait_and_the_proxys_header_are_checked_with_what_to_do() {
        let v = Values::from_yaml(
            "v.yaml",
            "ingest_shed_after: 500ms\ndashboard_actions: true\ndashboard_trusted_user_header: X-Forwarded-User\n",
        )
        .expect("parse");
        assert_eq!(
            v.ingest_shed_after,
            Some(HumanDuration(std::time::Duration::from_millis(500)))
        );
        v.validate().expect("valid");
        let bad =
            Values::from_yaml("v.yaml", "ingest_shed_after: soon\n").expect_err("no duration");
        assert!(bad.contains("soon"), "{bad}");
        for (v, needle) in [
            (
                Values {
                    ingest_shed_after: Some(HumanDuration(std::time::Duration::ZERO)),
                    ..Values::default()
                },
                "ingest_shed_after `0s`: must be longer than zero and at most 8s",
            ),
            (
                Values {
                    ingest_shed_after: Some(HumanDuration(std::time::Duration::from_secs(9))),
                    ..Values::default()
                },
                "ingest_shed_after `9s`",
            ),
            (
                Values {
                    dashboard_trusted_user_header: Some("X-Forwarded-User".into()),
                    ..Values::default()
                },
                "only matters with dashboard actions",
            ),
            (
                Values {
                    dashboard_actions: true,
                    dashboard_trusted_user_header: Some("X Forwarded User".into()),
                    ..Values::default()
                },
                "dashboard_trusted_user_header `X Forwarded User`: give the header your proxy sets",
            ),
            (
                // A header the browser sends itself could name anyone.
                Values {
                    dashboard_actions: true,
                    dashboard_trusted_user_header: Some("Cookie".into()),
                    ..Values::default()
                },
                "dashboard_trusted_user_header `Cookie`",
            ),
        ] {
            let errors = v.validate().expect_err(needle).join("\n");
            assert!(errors.contains(needle), "{needle} in {errors}");
        }
    }

    #[test]
    fn statuses_link_to_the_dashboards_url_else_its_service() {
        let v = Values::default();
        assert_eq!(
            v.status_link_base_url(),
            format!("http://sluice-dashboard.sluice.svc:{}", dashboard_port())
        );
        assert_eq!(dashboard_port(), 8090);
        let given = Values {
            dashboard_url: Some("https://ci.example.com/".into()),
            ..Values::default()
        };
        given.validate().expect("valid");
        assert_eq!(given.status_link_base_url(), "https://ci.example.com");
        for bad in [
            "ci.example.com",
            "ftp://ci",
            "https://",
            "https://ci?x=1",
            "https://c i",
        ] {
            let v = Values {
                dashboard_url: Some(bad.into()),
                ..Values::default()
            };
            let errors = v.validate().expect_err(bad).join("\n");
            assert!(
                errors.contains(&format!("dashboard_url `{bad}`")),
                "{errors}"
            );
        }
    }

    #[test]
    fn the_nats_port_follows_the_url() {
        let port = |url: &str| {
            Values {
                nats_url: Some(url.into()),
                ..Values::default()
            }
            .nats_port()
        };
        assert_eq!(port("tls://nats.example.com:7422"), 7422);
        assert_eq!(port("tls://nats.example.com"), 4222);
        assert_eq!(port("wss://nats.example.com/ws"), 443);
    }

    #[test]
    fn kedas_monitoring_endpoint_is_the_installed_nats_or_the_urls_host() {
        let endpoint = |url: Option<&str>| {
            Values {
                nats_url: url.map(str::to_owned),
                ..Values::default()
            }
            .keda_monitoring_endpoint()
        };
        assert_eq!(endpoint(None), "sluice-nats.sluice.svc.cluster.local:8222");
        assert_eq!(
            endpoint(Some("tls://nats.example.com:4222")),
            "nats.example.com:8222"
        );
        assert_eq!(
            endpoint(Some("nats://u:p@10.0.0.1,10.0.0.2")),
            "10.0.0.1:8222"
        );
        let v = Values {
            hosts: Hosts::ControlPlane,
            keda: true,
            keda_max_replicas: 0,
            ..Values::default()
        };
        let errors = v.validate().expect_err("invalid").join("\n");
        assert!(
            errors.contains("keda: only a cluster that hosts a runner"),
            "{errors}"
        );
        assert!(errors.contains("keda_max_replicas 0"), "{errors}");
    }
}
