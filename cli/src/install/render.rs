//! Answers → the objects to apply, in apply order. Pure: no cluster, no files; the
//! credentials come in as [`Material`], and without it no Secret is rendered (the
//! GitOps manifests in `deploy/install/` hold none).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret as SecretObject;
use k8s_openapi::ByteString;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::object::{typed, Object};
use super::values::{
    dashboard_port, Secret, Values, NATS_CLIENT_PORT, NATS_MONITOR_PORT, NATS_NODES,
};

/// The field manager of every apply, and the value of `app.kubernetes.io/managed-by`.
pub const FIELD_MANAGER: &str = "sluice";
/// Every object the install makes carries this label; uninstall finds them by it.
pub const PART_OF: (&str, &str) = ("app.kubernetes.io/part-of", "sluice");
/// The selector uninstall uses.
pub const SELECTOR: &str = "app.kubernetes.io/part-of=sluice";
/// The port ingest receives webhooks on (and serves its health and metrics).
pub const INGEST_PORT: u16 = 8080;
const NATS_CLUSTER_PORT: u16 = 6222;
/// The user the Sluice image runs as.
pub const IMAGE_USER: i64 = 65532;
/// NATS's user (the official image has none of its own): as high as the others.
const NATS_USER: i64 = IMAGE_USER;
const NKEY_DIR: &str = "/var/run/secrets/sluice-nats";
/// Where the dashboard's actions token is mounted.
const DASHBOARD_TOKEN_DIR: &str = "/var/run/secrets/sluice-dashboard";

/// The admin endpoints' port of ingest, the dispatcher and the runner.
pub fn admin_port() -> u16 {
    sluice_core::admin::DEFAULT_ADMIN_LISTEN
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("the admin listen address has a port")
}

/// What Secrets are made from: the credentials and webhook secrets. Kept apart from
/// [`Values`] so the manifests can be rendered without any of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Material {
    /// The `accounts { … }` block NATS includes: the users' public keys and
    /// permissions (control plane with the installed NATS only).
    pub accounts_conf: Option<String>,
    /// Seeds by role name (`admin`, `ingest`, `dispatcher`, `runner-<cluster>`).
    pub seeds: BTreeMap<String, Secret>,
    pub github_webhook_secret: Secret,
    pub gitlab_webhook_token: Secret,
    pub webhook_signing_secret: Secret,
    pub github_token: Option<Secret>,
    pub gitlab_token: Option<Secret>,
    /// The token that allows the dashboard's actions (with `dashboard_actions` only).
    pub dashboard_actions_token: Option<Secret>,
}

/// Names of the Secrets, for the wizard's summary and the docs.
pub mod names {
    pub const NATS_ACCOUNTS: &str = "sluice-nats-accounts";
    pub const WEBHOOKS: &str = "sluice-ingest-webhooks";
    pub const FORGE: &str = "sluice-dispatcher-forge";
    /// The dashboard's actions token (key `token`), with `dashboard_actions` only.
    pub const DASHBOARD_ACTIONS: &str = "sluice-dashboard-actions";

    /// The Secret holding one role's seed (key `nkey`).
    pub fn seed(role: &str) -> String {
        let role = role.strip_prefix("runner-").map_or(role, |_| "runner");
        format!("sluice-nats-{role}")
    }
}

/// Every object of the install, in apply order.
pub fn render(values: &Values, material: Option<&Material>) -> Vec<Object> {
    let r = Renderer { v: values };
    let mut out: Vec<Object> = vec![r.namespace()];
    if values.installs_nats() {
        out.extend(r.nats(material));
    }
    if values.hosts.control_plane() {
        out.extend(r.streams_job());
        out.extend(r.ingest());
        out.extend(r.dispatcher());
        out.extend(r.dashboard());
    }
    if values.hosts.runner() {
        out.extend(r.runner());
    }
    if let Some(m) = material {
        out.extend(r.secrets(m));
    }
    out.sort_by_key(|o| kind_order(o.kind()));
    out
}

/// The smoke run's objects, applied after the install when `smoke` is asked for: a
/// one-step pipeline for this cluster (ConfigMap `sluice-smoke`), and a Job in the
/// cluster that applies it with the admin seed, starts it with a manual event
/// `delivery`, follows its log and waits for its result; each step one container
/// of the `sluice` image, in order (the image has no shell). The installer needs no
/// route to NATS: it reads the Job's Pod and its logs from the API server.
pub fn smoke(values: &Values, delivery: &str, timeout_secs: u64) -> Vec<Object> {
    let r = Renderer { v: values };
    let mut out = r.smoke(delivery, timeout_secs);
    out.sort_by_key(|o| kind_order(o.kind()));
    out
}

/// The smoke pipeline's name.
pub const SMOKE_PIPELINE: &str = "sluice-smoke";
/// The smoke Job's containers, in the order they run: apply the pipeline, start it,
/// follow its log, wait for its result.
pub const SMOKE_STEPS: [&str; 4] = ["apply", "start", "logs", "result"];
const SMOKE_DIR: &str = "/etc/sluice-smoke";

/// The id of the smoke run that the manual event `delivery` starts (run ids are
/// derived from the event and the pipeline).
pub fn smoke_run_id(delivery: &str) -> String {
    sluice_core::run::run_id(
        &format!("{}:{delivery}", sluice_core::Provider::Manual.as_str()),
        SMOKE_PIPELINE,
        0,
    )
}

/// The smoke Job's name for `delivery`.
pub fn smoke_job_name(delivery: &str) -> String {
    format!("sluice-smoke-{}", short_hash(delivery.as_bytes()))
}

/// Apply order: what others refer to first; workloads once their configuration,
/// credentials and policies exist; NATS before what connects to it.
pub fn kind_order(kind: &str) -> usize {
    [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Secret",
        "Service",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "StatefulSet",
        "Job",
        "Deployment",
        // After the Deployment it scales.
        "ScaledObject",
        "Ingress",
    ]
    .iter()
    .position(|k| *k == kind)
    .unwrap_or(usize::MAX)
}

struct Renderer<'a> {
    v: &'a Values,
}

// === impl Renderer: shared pieces ===

impl Renderer<'_> {
    fn selector(&self, component: &str) -> Value {
        json!({
            "app.kubernetes.io/name": "sluice",
            "app.kubernetes.io/instance": "sluice",
            "app.kubernetes.io/component": component,
        })
    }

    fn labels(&self, component: &str) -> Value {
        let mut l = self.selector(component);
        let m = l.as_object_mut().expect("map");
        m.insert(PART_OF.0.into(), PART_OF.1.into());
        m.insert(
            "app.kubernetes.io/version".into(),
            env!("CARGO_PKG_VERSION").into(),
        );
        m.insert("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into());
        if component == "runner" {
            m.insert("sluice.dev/cluster".into(), self.v.cluster.clone().into());
        }
        l
    }

    fn meta(&self, name: &str, component: &str) -> Value {
        json!({
            "name": name,
            "namespace": self.v.namespace,
            "labels": self.labels(component),
        })
    }

    fn pod_security(&self, user: i64) -> Value {
        json!({
            "runAsNonRoot": true,
            "runAsUser": user,
            "runAsGroup": user,
            "fsGroup": user,
            "seccompProfile": { "type": "RuntimeDefault" },
        })
    }

    fn container_security(&self) -> Value {
        json!({
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "runAsNonRoot": true,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        })
    }

    fn resources(&self, cpu: &str, memory: &str, cpu_limit: &str, memory_limit: &str) -> Value {
        json!({
            "requests": { "cpu": cpu, "memory": memory },
            "limits": { "cpu": cpu_limit, "memory": memory_limit },
        })
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<Value> {
        pairs
            .iter()
            .map(|(k, v)| json!({ "name": k, "value": v }))
            .collect()
    }

    fn secret_env(name: &str, secret: &str, key: &str) -> Value {
        json!({
            "name": name,
            "valueFrom": { "secretKeyRef": { "name": secret, "key": key, "optional": true } },
        })
    }

    /// The NKey seed of `role`, mounted read-only.
    fn seed_volume(&self, role: &str) -> (Value, Value) {
        (
            json!({
                "name": "nats-seed",
                "secret": { "secretName": names::seed(role), "defaultMode": 0o400 },
            }),
            json!({ "name": "nats-seed", "mountPath": NKEY_DIR, "readOnly": true }),
        )
    }

    fn nats_env(&self) -> Vec<Value> {
        Self::env(&[
            ("SLUICE_NATS_URL", &self.v.nats_url_for_services()),
            ("SLUICE_NATS_NKEY", &format!("{NKEY_DIR}/nkey")),
            ("SLUICE_LOG_FORMAT", "json"),
        ])
    }

    fn http_probe(path: &str, port: &str, period: u32, failures: u32) -> Value {
        json!({
            "httpGet": { "path": path, "port": port },
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 3,
        })
    }

    fn service_account(&self, name: &str, component: &str, token: bool) -> Object {
        typed::<k8s_openapi::api::core::v1::ServiceAccount>(json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": self.meta(name, component),
            "automountServiceAccountToken": token,
        }))
        .into()
    }

    fn pdb(&self, name: &str, component: &str) -> Object {
        typed::<k8s_openapi::api::policy::v1::PodDisruptionBudget>(json!({
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": self.meta(name, component),
            "spec": {
                "maxUnavailable": 1,
                "selector": { "matchLabels": self.selector(component) },
            },
        }))
        .into()
    }

    fn dns_egress() -> Value {
        json!({
            "to": [{
                "namespaceSelector": { "matchLabels": { "kubernetes.io/metadata.name": "kube-system" } },
                "podSelector": { "matchLabels": { "k8s-app": "kube-dns" } },
            }],
            "ports": [
                { "protocol": "UDP", "port": 53 },
                { "protocol": "TCP", "port": 53 },
            ],
        })
    }

    /// Egress to NATS: its Pods when installed here, else its address range and port.
    fn nats_egress(&self) -> Value {
        if self.v.installs_nats() {
            json!({
                "to": [{ "podSelector": { "matchLabels": self.selector("nats") } }],
                "ports": [{ "protocol": "TCP", "port": NATS_CLIENT_PORT }],
            })
        } else {
            json!({
                "to": [{ "ipBlock": { "cidr": self.v.nats_cidr } }],
                "ports": [{ "protocol": "TCP", "port": self.v.nats_port() }],
            })
        }
    }

    fn network_policy(&self, component: &str, ingress: Vec<Value>, egress: Vec<Value>) -> Object {
        typed::<k8s_openapi::api::networking::v1::NetworkPolicy>(json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": self.meta(&format!("sluice-{component}"), component),
            "spec": {
                "podSelector": { "matchLabels": self.selector(component) },
                "policyTypes": ["Ingress", "Egress"],
                "ingress": ingress,
                "egress": egress,
            },
        }))
        .into()
    }

    /// `replicas` none: left to an autoscaler (KEDA), so an apply never resets it.
    #[allow(clippy::too_many_arguments)]
    fn deployment(
        &self,
        component: &str,
        replicas: Option<i32>,
        service_account: &str,
        token: bool,
        container: Value,
        volumes: Vec<Value>,
        grace: u32,
    ) -> Object {
        let name = format!("sluice-{component}");
        let mut deployment = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": self.meta(&name, component),
            "spec": {
                "selector": { "matchLabels": self.selector(component) },
                "strategy": {
                    "type": "RollingUpdate",
                    "rollingUpdate": { "maxUnavailable": 0, "maxSurge": 1 },
                },
                "template": {
                    "metadata": { "labels": self.labels(component) },
                    "spec": {
                        "serviceAccountName": service_account,
                        "automountServiceAccountToken": token,
                        "enableServiceLinks": false,
                        "terminationGracePeriodSeconds": grace,
                        "securityContext": self.pod_security(IMAGE_USER),
                        "topologySpreadConstraints": [self.spread(component)],
                        "containers": [container],
                        "volumes": volumes,
                    },
                },
            },
        });
        if let Some(n) = replicas {
            deployment["spec"]["replicas"] = n.into();
        }
        typed::<k8s_openapi::api::apps::v1::Deployment>(deployment).into()
    }

    /// Replicas on different nodes where the cluster has them.
    fn spread(&self, component: &str) -> Value {
        json!({
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": { "matchLabels": self.selector(component) },
        })
    }

    fn sluice_container(&self, name: &str, args: &[&str], env: Vec<Value>) -> Value {
        json!({
            "name": name,
            "image": self.v.image,
            "imagePullPolicy": "IfNotPresent",
            "args": args,
            "env": env,
            "securityContext": self.container_security(),
        })
    }
}

// === impl Renderer: the parts ===

impl Renderer<'_> {
    fn namespace(&self) -> Object {
        typed::<k8s_openapi::api::core::v1::Namespace>(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": self.v.namespace,
                "labels": {
                    PART_OF.0: PART_OF.1,
                    "app.kubernetes.io/managed-by": FIELD_MANAGER,
                    // Every Pod here, Sluice's and the runs', must meet the restricted
                    // Pod Security Standard.
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            },
        }))
        .into()
    }

    /// The NATS configuration, without users: they come from the
    /// `sluice-nats-accounts` Secret, included from the same folder.
    pub fn nats_conf(&self) -> String {
        let ns = &self.v.namespace;
        let routes: String = (0..NATS_NODES)
            .map(|i| format!("    nats://sluice-nats-{i}.sluice-nats-headless.{ns}.svc:{NATS_CLUSTER_PORT}\n"))
            .collect();
        format!(
            r#"# NATS for Sluice, rendered by `sluice install`. The users and their permissions are
# in accounts.conf (the sluice-nats-accounts Secret, from `sluice nats init`).
server_name: $POD_NAME
listen: "0.0.0.0:{NATS_CLIENT_PORT}"
http: "0.0.0.0:{NATS_MONITOR_PORT}"
pid_file: "/var/run/nats/nats.pid"
# On SIGTERM (the preStop hook), clients are moved to the other nodes over this time
# before the server stops.
lame_duck_grace_period: 10s
lame_duck_duration: 30s

jetstream {{
  store_dir: "/data/jetstream"
  # Every stored message is on disk before JetStream acknowledges it, and ingest
  # answers a forge only after that acknowledgement.
  sync_interval: always
}}

cluster {{
  name: sluice
  listen: "0.0.0.0:{NATS_CLUSTER_PORT}"
  routes: [
{routes}  ]
}}

include "accounts.conf"
"#
        )
    }

    fn nats(&self, material: Option<&Material>) -> Vec<Object> {
        let component = "nats";
        let conf = self.nats_conf();
        let mut annotations = json!({ "sluice.dev/config-hash": short_hash(conf.as_bytes()) });
        // New users (`sluice cluster add`) reach the nodes by a rolling restart.
        if let Some(accounts) = material.and_then(|m| m.accounts_conf.as_ref()) {
            annotations["sluice.dev/accounts-hash"] = short_hash(accounts.as_bytes()).into();
        }
        let mut claim_spec = json!({
            "accessModes": ["ReadWriteOnce"],
            "resources": { "requests": { "storage": self.v.nats_storage_size } },
        });
        if let Some(class) = &self.v.storage_class {
            claim_spec["storageClassName"] = class.clone().into();
        }
        let ports = json!([
            { "name": "client", "containerPort": NATS_CLIENT_PORT },
            { "name": "cluster", "containerPort": NATS_CLUSTER_PORT },
            { "name": "monitor", "containerPort": NATS_MONITOR_PORT },
        ]);
        let service_ports = |names: &[&str]| -> Vec<Value> {
            [
                ("client", NATS_CLIENT_PORT),
                ("cluster", NATS_CLUSTER_PORT),
                ("monitor", NATS_MONITOR_PORT),
            ]
            .iter()
            .filter(|(n, _)| names.contains(n))
            .map(|(n, p)| json!({ "name": n, "port": p, "targetPort": n, "appProtocol": if *n == "monitor" { "http" } else { "tcp" } }))
            .collect()
        };
        let part_of_sluice = json!({ "podSelector": { "matchLabels": { PART_OF.0: PART_OF.1 } } });
        vec![
            self.service_account("sluice-nats", component, false),
            typed::<k8s_openapi::api::core::v1::ConfigMap>(json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": self.meta("sluice-nats-config", component),
                "data": { "nats.conf": conf },
            }))
            .into(),
            typed::<k8s_openapi::api::core::v1::Service>(json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": self.meta("sluice-nats", component),
                "spec": {
                    "selector": self.selector(component),
                    "ports": service_ports(&["client", "monitor"]),
                },
            }))
            .into(),
            typed::<k8s_openapi::api::core::v1::Service>(json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": self.meta("sluice-nats-headless", component),
                "spec": {
                    "clusterIP": "None",
                    // Routes must resolve before the nodes are ready: they become ready
                    // by finding each other.
                    "publishNotReadyAddresses": true,
                    "selector": self.selector(component),
                    "ports": service_ports(&["client", "cluster", "monitor"]),
                },
            }))
            .into(),
            self.network_policy(
                component,
                vec![
                    json!({ "from": [part_of_sluice], "ports": [{ "protocol": "TCP", "port": NATS_CLIENT_PORT }] }),
                    json!({
                        "from": [{ "podSelector": { "matchLabels": self.selector(component) } }],
                        "ports": [{ "protocol": "TCP", "port": NATS_CLUSTER_PORT }],
                    }),
                    // The monitoring endpoint: Prometheus and KEDA's scaler read it.
                    json!({
                        "from": [{ "namespaceSelector": {} }],
                        "ports": [{ "protocol": "TCP", "port": NATS_MONITOR_PORT }],
                    }),
                ],
                vec![
                    json!({
                        "to": [{ "podSelector": { "matchLabels": self.selector(component) } }],
                        "ports": [{ "protocol": "TCP", "port": NATS_CLUSTER_PORT }],
                    }),
                    Self::dns_egress(),
                ],
            ),
            self.pdb("sluice-nats", component),
            typed::<k8s_openapi::api::apps::v1::StatefulSet>(json!({
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": self.meta("sluice-nats", component),
                "spec": {
                    "replicas": NATS_NODES,
                    "serviceName": "sluice-nats-headless",
                    // The nodes form their cluster by finding each other: start them
                    // together rather than one after another becoming ready.
                    "podManagementPolicy": "Parallel",
                    "selector": { "matchLabels": self.selector(component) },
                    "template": {
                        "metadata": {
                            "labels": self.labels(component),
                            // A changed configuration rolls the nodes one at a time.
                            "annotations": annotations,
                        },
                        "spec": {
                            "serviceAccountName": "sluice-nats",
                            "automountServiceAccountToken": false,
                            "enableServiceLinks": false,
                            "terminationGracePeriodSeconds": 60,
                            "securityContext": self.pod_security(NATS_USER),
                            "topologySpreadConstraints": [self.spread(component)],
                            "containers": [{
                                "name": "nats",
                                "image": self.v.nats_image,
                                "imagePullPolicy": "IfNotPresent",
                                "command": ["/nats-server", "--config", "/etc/nats/nats.conf"],
                                "env": [{
                                    "name": "POD_NAME",
                                    "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } },
                                }],
                                "ports": ports,
                                "startupProbe": {
                                    "httpGet": { "path": "/healthz?js-enabled-only=true", "port": "monitor" },
                                    "periodSeconds": 10,
                                    "failureThreshold": 90,
                                    "timeoutSeconds": 5,
                                },
                                "livenessProbe": {
                                    "httpGet": { "path": "/healthz?js-enabled-only=true", "port": "monitor" },
                                    "periodSeconds": 30,
                                    "failureThreshold": 3,
                                    "timeoutSeconds": 5,
                                },
                                "readinessProbe": {
                                    "httpGet": { "path": "/healthz?js-server-only=true", "port": "monitor" },
                                    "periodSeconds": 10,
                                    "failureThreshold": 3,
                                    "timeoutSeconds": 5,
                                },
                                "lifecycle": {
                                    "preStop": {
                                        "exec": { "command": ["/nats-server", "--signal", "ldm=/var/run/nats/nats.pid"] },
                                    },
                                },
                                "resources": self.resources("250m", "512Mi", "2", "2Gi"),
                                "securityContext": self.container_security(),
                                "volumeMounts": [
                                    { "name": "config", "mountPath": "/etc/nats", "readOnly": true },
                                    { "name": "data", "mountPath": "/data" },
                                    { "name": "run", "mountPath": "/var/run/nats" },
                                ],
                            }],
                            "volumes": [
                                {
                                    "name": "config",
                                    "projected": {
                                        "defaultMode": 0o444,
                                        "sources": [
                                            { "configMap": { "name": "sluice-nats-config" } },
                                            { "secret": { "name": names::NATS_ACCOUNTS } },
                                        ],
                                    },
                                },
                                { "name": "run", "emptyDir": { "sizeLimit": "1Mi" } },
                            ],
                        },
                    },
                    "volumeClaimTemplates": [{
                        "apiVersion": "v1",
                        "kind": "PersistentVolumeClaim",
                        "metadata": { "name": "data", "labels": self.labels(component) },
                        "spec": claim_spec,
                    }],
                    "persistentVolumeClaimRetentionPolicy": {
                        "whenDeleted": "Retain",
                        "whenScaled": "Retain",
                    },
                },
            }))
            .into(),
        ]
    }

    /// `sluice streams apply` as a Job, named after its arguments so a changed setting
    /// or image runs it again (a Job's Pod template cannot be changed).
    fn streams_job(&self) -> Vec<Object> {
        let component = "streams";
        let clusters = self.v.served_clusters().join(",");
        let replicas = self.v.stream_replicas.to_string();
        let args = [
            "streams",
            "apply",
            "--replicas",
            replicas.as_str(),
            "--clusters",
            clusters.as_str(),
        ];
        let name = format!(
            "sluice-streams-{}",
            short_hash(format!("{} {}", self.v.image, args.join(" ")).as_bytes())
        );
        let (volume, mount) = self.seed_volume("admin");
        let mut container = self.sluice_container("streams", &args, self.nats_env());
        container["volumeMounts"] = json!([mount]);
        container["resources"] = self.resources("50m", "64Mi", "500m", "128Mi");
        vec![
            self.service_account("sluice-streams", component, false),
            self.network_policy(
                component,
                vec![],
                vec![self.nats_egress(), Self::dns_egress()],
            ),
            typed::<k8s_openapi::api::batch::v1::Job>(json!({
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": self.meta(&name, component),
                "spec": {
                    "backoffLimit": 10,
                    "activeDeadlineSeconds": 900,
                    "template": {
                        "metadata": { "labels": self.labels(component) },
                        "spec": {
                            "restartPolicy": "OnFailure",
                            "serviceAccountName": "sluice-streams",
                            "automountServiceAccountToken": false,
                            "enableServiceLinks": false,
                            "securityContext": self.pod_security(IMAGE_USER),
                            "containers": [container],
                            "volumes": [volume],
                        },
                    },
                },
            }))
            .into(),
        ]
    }

    fn ingest(&self) -> Vec<Object> {
        let component = "ingest";
        let port = INGEST_PORT.to_string();
        let replicas = self.v.stream_replicas.to_string();
        let mut env = self.nats_env();
        env.extend(Self::env(&[
            ("SLUICE_INGEST_LISTEN", &format!("0.0.0.0:{port}")),
            (
                "SLUICE_ADMIN_LISTEN",
                sluice_core::admin::DEFAULT_ADMIN_LISTEN,
            ),
            ("SLUICE_STREAM_REPLICAS", &replicas),
        ]));
        if let Some(wait) = self.v.ingest_shed_after {
            env.extend(Self::env(&[(
                "SLUICE_INGEST_SHED_AFTER",
                &wait.to_string(),
            )]));
        }
        env.push(Self::secret_env(
            "SLUICE_GITHUB_WEBHOOK_SECRET",
            names::WEBHOOKS,
            "github",
        ));
        env.push(Self::secret_env(
            "SLUICE_GITLAB_WEBHOOK_TOKEN",
            names::WEBHOOKS,
            "gitlab",
        ));
        env.push(Self::secret_env(
            "SLUICE_WEBHOOK_SIGNING_SECRET",
            names::WEBHOOKS,
            "generic",
        ));
        let (volume, mount) = self.seed_volume("ingest");
        let mut container = self.sluice_container("ingest", &["ingest"], env);
        // The probes and Prometheus on their own port, outside the webhooks' connection
        // cap: a spike that fills every slot must not fail them (and restart ingest).
        container["ports"] = json!([
            { "name": "http", "containerPort": INGEST_PORT },
            { "name": "admin", "containerPort": admin_port() },
        ]);
        container["livenessProbe"] = Self::http_probe("/healthz", "admin", 10, 3);
        container["readinessProbe"] = Self::http_probe("/readyz", "admin", 5, 2);
        container["resources"] = self.resources("100m", "64Mi", "1", "256Mi");
        container["volumeMounts"] = json!([mount]);
        let mut ingress = json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "Ingress",
            "metadata": self.meta("sluice-ingest", component),
            "spec": {
                "tls": [{ "hosts": [self.v.ingest_host], "secretName": "sluice-ingest-tls" }],
                "rules": [{
                    "host": self.v.ingest_host,
                    "http": { "paths": [{
                        "path": "/webhooks",
                        "pathType": "Prefix",
                        "backend": { "service": { "name": "sluice-ingest", "port": { "name": "http" } } },
                    }] },
                }],
            },
        });
        if let Some(class) = &self.v.ingress_class {
            ingress["spec"]["ingressClassName"] = class.clone().into();
        }
        vec![
            self.service_account("sluice-ingest", component, false),
            typed::<k8s_openapi::api::core::v1::Service>(json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": self.meta("sluice-ingest", component),
                "spec": {
                    "selector": self.selector(component),
                    "ports": [{ "name": "http", "port": INGEST_PORT, "targetPort": "http", "appProtocol": "http" }],
                },
            }))
            .into(),
            self.network_policy(
                component,
                vec![json!({ "ports": [
                    { "protocol": "TCP", "port": INGEST_PORT },
                    { "protocol": "TCP", "port": admin_port() },
                ] })],
                vec![self.nats_egress(), Self::dns_egress()],
            ),
            self.pdb("sluice-ingest", component),
            self.deployment(
                component,
                Some(self.v.ingest_replicas),
                "sluice-ingest",
                false,
                container,
                vec![volume],
                30,
            ),
            typed::<k8s_openapi::api::networking::v1::Ingress>(ingress).into(),
        ]
    }

    fn dispatcher(&self) -> Vec<Object> {
        let component = "dispatcher";
        let replicas = self.v.stream_replicas.to_string();
        let mut env = self.nats_env();
        env.extend(Self::env(&[
            (
                "SLUICE_ADMIN_LISTEN",
                sluice_core::admin::DEFAULT_ADMIN_LISTEN,
            ),
            ("SLUICE_DEFAULT_CLUSTER", &self.v.cluster),
            ("SLUICE_STREAM_REPLICAS", &replicas),
            // Commit statuses link to the run's page on the dashboard.
            (
                "SLUICE_STATUS_LINK_BASE_URL",
                &self.v.status_link_base_url(),
            ),
        ]));
        env.push(Self::secret_env(
            "SLUICE_GITHUB_TOKEN",
            names::FORGE,
            "github-token",
        ));
        env.push(Self::secret_env(
            "SLUICE_GITLAB_TOKEN",
            names::FORGE,
            "gitlab-token",
        ));
        let (volume, mount) = self.seed_volume("dispatcher");
        let mut container = self.sluice_container("dispatcher", &["dispatcher"], env);
        container["ports"] = json!([{ "name": "admin", "containerPort": admin_port() }]);
        container["livenessProbe"] = Self::http_probe("/healthz", "admin", 10, 3);
        container["readinessProbe"] = Self::http_probe("/readyz", "admin", 5, 2);
        container["resources"] = self.resources("100m", "128Mi", "1", "512Mi");
        container["volumeMounts"] = json!([mount]);
        vec![
            self.service_account("sluice-dispatcher", component, false),
            self.network_policy(
                component,
                vec![json!({ "ports": [{ "protocol": "TCP", "port": admin_port() }] })],
                vec![
                    self.nats_egress(),
                    Self::dns_egress(),
                    // The forges' APIs: changed files and commit statuses.
                    json!({ "ports": [{ "protocol": "TCP", "port": 443 }] }),
                ],
            ),
            self.pdb("sluice-dispatcher", component),
            self.deployment(
                component,
                Some(self.v.dispatcher_replicas),
                "sluice-dispatcher",
                false,
                container,
                vec![volume],
                30,
            ),
        ]
    }

    /// The dashboard: a stateless reader of the streams (each replica folds them into
    /// its own index), so several replicas serve behind one Service. Read-only unless
    /// `dashboard_actions`, which mounts the actions token. No Ingress: it has no login
    /// of its own, so what reaches it from outside is the operator's proxy to choose.
    fn dashboard(&self) -> Vec<Object> {
        let component = "dashboard";
        let port = dashboard_port();
        let mut env = self.nats_env();
        env.extend(Self::env(&[(
            "SLUICE_DASHBOARD_LISTEN",
            &format!("0.0.0.0:{port}"),
        )]));
        // The read-only role's seed cannot cancel or rerun; the acting one's can.
        let role = super::material::dashboard_role(self.v).name();
        let (seed, seed_mount) = self.seed_volume(&role);
        let mut volumes = vec![seed];
        let mut mounts = vec![seed_mount];
        if self.v.dashboard_actions {
            env.extend(Self::env(&[
                ("SLUICE_DASHBOARD_ALLOW_ACTIONS", "true"),
                (
                    "SLUICE_DASHBOARD_ACTIONS_TOKEN_FILE",
                    &format!("{DASHBOARD_TOKEN_DIR}/token"),
                ),
            ]));
            if let Some(header) = &self.v.dashboard_trusted_user_header {
                env.extend(Self::env(&[(
                    "SLUICE_DASHBOARD_TRUSTED_USER_HEADER",
                    header,
                )]));
            }
            volumes.push(json!({
                "name": "actions-token",
                "secret": { "secretName": names::DASHBOARD_ACTIONS, "defaultMode": 0o400 },
            }));
            mounts.push(json!({ "name": "actions-token", "mountPath": DASHBOARD_TOKEN_DIR, "readOnly": true }));
        }
        let mut container = self.sluice_container("dashboard", &["dashboard"], env);
        container["ports"] = json!([{ "name": "http", "containerPort": port }]);
        container["livenessProbe"] = Self::http_probe("/healthz", "http", 10, 3);
        // Not ready until the stored states and decisions are read into its index.
        container["readinessProbe"] = Self::http_probe("/readyz", "http", 5, 2);
        // Its index of 100,000 runs takes about 110 MiB (docs/BENCHMARKS.md).
        container["resources"] = self.resources("100m", "128Mi", "1", "1Gi");
        container["volumeMounts"] = json!(mounts);
        vec![
            self.service_account("sluice-dashboard", component, false),
            typed::<k8s_openapi::api::core::v1::Service>(json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": self.meta("sluice-dashboard", component),
                "spec": {
                    "selector": self.selector(component),
                    "ports": [{ "name": "http", "port": port, "targetPort": "http", "appProtocol": "http" }],
                },
            }))
            .into(),
            // Users (through whatever proxy or Ingress the operator puts in front) and
            // Prometheus reach its one port; it reaches only NATS.
            self.network_policy(
                component,
                vec![json!({ "ports": [{ "protocol": "TCP", "port": port }] })],
                vec![self.nats_egress(), Self::dns_egress()],
            ),
            self.pdb("sluice-dashboard", component),
            self.deployment(
                component,
                Some(self.v.dashboard_replicas),
                "sluice-dashboard",
                false,
                container,
                volumes,
                30,
            ),
        ]
    }

    /// The verbs the runner uses, exactly (docs/runner.md): nothing else, nothing
    /// cluster-wide.
    pub fn runner_rules() -> Value {
        json!([
            { "apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "watch", "delete"] },
            { "apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"] },
            { "apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["create", "get"] },
            // The values of the Secrets a run's steps name, to mask them in its logs:
            // `get` by name only, never `list` or `watch` (which would read them all).
            { "apiGroups": [""], "resources": ["secrets"], "verbs": ["get"] },
        ])
    }

    fn runner(&self) -> Vec<Object> {
        let component = "runner";
        let max_running = self.v.max_running.to_string();
        let mut env = self.nats_env();
        env.extend(Self::env(&[
            ("SLUICE_CLUSTER", &self.v.cluster),
            (
                "SLUICE_ADMIN_LISTEN",
                sluice_core::admin::DEFAULT_ADMIN_LISTEN,
            ),
            ("SLUICE_POD_SERVICE_ACCOUNT", "sluice-build"),
            ("SLUICE_MAX_RUNNING", &max_running),
        ]));
        for (name, field) in [
            ("SLUICE_NAMESPACE", "metadata.namespace"),
            ("SLUICE_RUNNER_ID", "metadata.name"),
        ] {
            env.push(json!({ "name": name, "valueFrom": { "fieldRef": { "fieldPath": field } } }));
        }
        let (volume, mount) = self.seed_volume(&format!("runner-{}", self.v.cluster));
        let mut container = self.sluice_container("runner", &["runner"], env);
        container["ports"] = json!([{ "name": "admin", "containerPort": admin_port() }]);
        container["livenessProbe"] = Self::http_probe("/healthz", "admin", 10, 3);
        container["readinessProbe"] = Self::http_probe("/readyz", "admin", 5, 2);
        container["resources"] = self.resources("100m", "64Mi", "1", "256Mi");
        container["volumeMounts"] = json!([mount]);
        let api_server = json!({
            "to": [{ "ipBlock": { "cidr": self.v.api_server_cidr } }],
            "ports": [
                { "protocol": "TCP", "port": 443 },
                { "protocol": "TCP", "port": 6443 },
            ],
        });
        let mut out = vec![
            self.service_account("sluice-runner", component, true),
            // Run Pods get this account, without its token (a pipeline naming a
            // runtime.service_account gets that one, with its token).
            self.service_account("sluice-build", component, false),
            typed::<k8s_openapi::api::rbac::v1::Role>(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": self.meta("sluice-runner", component),
                "rules": Self::runner_rules(),
            }))
            .into(),
            typed::<k8s_openapi::api::rbac::v1::RoleBinding>(json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": self.meta("sluice-runner", component),
                "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "sluice-runner" },
                "subjects": [{ "kind": "ServiceAccount", "name": "sluice-runner", "namespace": self.v.namespace }],
            }))
            .into(),
            // Nothing connects to a runner but Prometheus on the admin port; it connects
            // out only to NATS, the API server and DNS.
            self.network_policy(
                component,
                vec![json!({ "ports": [{ "protocol": "TCP", "port": admin_port() }] })],
                vec![self.nats_egress(), api_server, Self::dns_egress()],
            ),
            self.pdb("sluice-runner", component),
            // A stopping runner hands its runs back at once (their Pods keep running
            // and another replica adopts them), so it needs little time.
            // With KEDA the replicas are its to set: an apply must not reset them.
            self.deployment(
                component,
                (!self.v.keda).then_some(self.v.runner_replicas),
                "sluice-runner",
                true,
                container,
                vec![volume],
                30,
            ),
        ];
        if self.v.keda {
            out.push(self.scaled_object());
        }
        out
    }

    /// KEDA's ScaledObject for the runner, as deploy/keda/runner-scaledobject.yaml
    /// explains it: the nats-jetstream scaler on the cluster's durable consumer
    /// (pending plus unacknowledged runs), one replica per `max_running` of them,
    /// never fewer than one (a runner is what watches the running Pods).
    fn scaled_object(&self) -> Object {
        let component = "runner";
        typed::<super::object::ScaledObject>(json!({
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": self.meta("sluice-runner", component),
            "spec": {
                "scaleTargetRef": { "name": "sluice-runner" },
                "minReplicaCount": 1,
                "maxReplicaCount": self.v.keda_max_replicas,
                "pollingInterval": 15,
                "cooldownPeriod": 300,
                // The trigger unreadable three times running: hold the usual replicas.
                "fallback": { "failureThreshold": 3, "replicas": self.v.runner_replicas },
                "advanced": {
                    "horizontalPodAutoscalerConfig": {
                        "behavior": { "scaleDown": { "stabilizationWindowSeconds": 300 } },
                    },
                },
                "triggers": [{
                    "type": "nats-jetstream",
                    "metadata": {
                        "natsServerMonitoringEndpoint": self.v.keda_monitoring_endpoint(),
                        "useHttps": "false",
                        "account": sluice_core::roles::ACCOUNT,
                        "stream": sluice_core::subjects::RUNS_STREAM,
                        "consumer": sluice_core::subjects::runner_consumer(&self.v.cluster),
                        "lagThreshold": self.v.max_running.to_string(),
                        "activationLagThreshold": "0",
                    },
                }],
            },
        }))
        .into()
    }

    /// The one-step smoke pipeline, for this cluster.
    pub fn smoke_pipeline(&self) -> String {
        format!(
            "# The smoke pipeline of `sluice install --smoke`: one step on cluster {cluster}.\nname: {SMOKE_PIPELINE}\nruntime:\n  cluster: {cluster}\ntimeout: 10m\nsteps:\n  - name: hello\n    image: {image}\n    timeout: 5m\n    commands:\n      - echo \"Sluice runs on cluster {cluster}\"\n",
            cluster = self.v.cluster,
            image = self.v.smoke_image,
        )
    }

    fn smoke(&self, delivery: &str, timeout_secs: u64) -> Vec<Object> {
        let component = "smoke";
        let run = smoke_run_id(delivery);
        let file = format!("{SMOKE_DIR}/pipeline.yaml");
        let (seed, seed_mount) = self.seed_volume("admin");
        let steps: [(&str, Vec<&str>); 4] = [
            ("apply", vec!["pipelines", "apply", "-f", &file]),
            (
                "start",
                vec![
                    "events",
                    "publish",
                    "--kind",
                    "smoke",
                    "--pipeline",
                    SMOKE_PIPELINE,
                    "--id",
                    delivery,
                ],
            ),
            ("logs", vec!["runs", "logs", "--follow", &run]),
            ("result", vec!["runs", "get", "--wait", &run]),
        ];
        let mut containers: Vec<Value> = steps
            .iter()
            .map(|(name, args)| {
                let mut c = self.sluice_container(name, args, self.nats_env());
                c["env"] = json!(Self::env(&[
                    ("SLUICE_NATS_URL", &self.v.nats_url_for_services()),
                    ("SLUICE_NATS_NKEY", &format!("{NKEY_DIR}/nkey")),
                ]));
                c["resources"] = self.resources("50m", "32Mi", "500m", "128Mi");
                c["volumeMounts"] = if *name == "apply" {
                    json!([seed_mount, { "name": "pipeline", "mountPath": SMOKE_DIR, "readOnly": true }])
                } else {
                    json!([seed_mount])
                };
                c
            })
            .collect();
        let result = containers.pop().expect("four steps");
        vec![
            self.service_account("sluice-smoke", component, false),
            typed::<k8s_openapi::api::core::v1::ConfigMap>(json!({
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": self.meta("sluice-smoke", component),
                "data": { "pipeline.yaml": self.smoke_pipeline() },
            }))
            .into(),
            self.network_policy(
                component,
                vec![],
                vec![self.nats_egress(), Self::dns_egress()],
            ),
            typed::<k8s_openapi::api::batch::v1::Job>(json!({
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": self.meta(&smoke_job_name(delivery), component),
                "spec": {
                    // One attempt: a second would start a second run of the event's
                    // pipeline only if the first never started, and hide why.
                    "backoffLimit": 0,
                    "activeDeadlineSeconds": timeout_secs,
                    "ttlSecondsAfterFinished": 3600,
                    "template": {
                        "metadata": { "labels": self.labels(component) },
                        "spec": {
                            "restartPolicy": "Never",
                            "serviceAccountName": "sluice-smoke",
                            "automountServiceAccountToken": false,
                            "enableServiceLinks": false,
                            "securityContext": self.pod_security(IMAGE_USER),
                            "initContainers": containers,
                            "containers": [result],
                            "volumes": [
                                seed,
                                { "name": "pipeline", "configMap": { "name": "sluice-smoke" } },
                            ],
                        },
                    },
                },
            }))
            .into(),
        ]
    }

    fn secrets(&self, m: &Material) -> Vec<Object> {
        let mut out = Vec::new();
        let secret = |name: &str, component: &str, data: Vec<(&str, &Secret)>| -> Object {
            let mut s: SecretObject = typed(json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": self.meta(name, component),
                "type": "Opaque",
            }));
            s.data = Some(
                data.into_iter()
                    .map(|(k, v)| (k.to_owned(), ByteString(v.expose().as_bytes().to_vec())))
                    .collect(),
            );
            s.into()
        };
        if self.v.installs_nats() {
            if let Some(accounts) = &m.accounts_conf {
                out.push(secret(
                    names::NATS_ACCOUNTS,
                    "nats",
                    vec![("accounts.conf", &Secret::new(accounts.clone()))],
                ));
            }
        }
        let mut roles: Vec<(String, &str)> = Vec::new();
        if self.v.hosts.control_plane() {
            roles.extend([
                ("admin".to_owned(), "streams"),
                ("ingest".to_owned(), "ingest"),
                ("dispatcher".to_owned(), "dispatcher"),
                (super::material::dashboard_role(self.v).name(), "dashboard"),
            ]);
        }
        if self.v.hosts.runner() {
            roles.push((format!("runner-{}", self.v.cluster), "runner"));
        }
        for (role, component) in roles {
            if let Some(seed) = m.seeds.get(&role) {
                out.push(secret(&names::seed(&role), component, vec![("nkey", seed)]));
            }
        }
        if self.v.hosts.control_plane() {
            out.push(secret(
                names::WEBHOOKS,
                "ingest",
                vec![
                    ("github", &m.github_webhook_secret),
                    ("gitlab", &m.gitlab_webhook_token),
                    ("generic", &m.webhook_signing_secret),
                ],
            ));
            let mut tokens = Vec::new();
            if let Some(t) = &m.github_token {
                tokens.push(("github-token", t));
            }
            if let Some(t) = &m.gitlab_token {
                tokens.push(("gitlab-token", t));
            }
            out.push(secret(names::FORGE, "dispatcher", tokens));
            if self.v.dashboard_actions {
                if let Some(token) = &m.dashboard_actions_token {
                    out.push(secret(
                        names::DASHBOARD_ACTIONS,
                        "dashboard",
                        vec![("token", token)],
                    ));
                }
            }
        }
        out
    }
}

fn short_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    hex_prefix(&digest[..4])
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `accounts { … }` block NATS includes, from the users `sluice nats init` wrote.
pub fn accounts_conf(users: &[sluice_core::roles::User]) -> String {
    format!(
        "# Rendered by `sluice install` from the seeds of `sluice nats init`: public keys only.\naccounts {{\n  {account}: {{\n    jetstream: enabled\n    users: [\n{users}    ]\n  }}\n}}\n",
        account = sluice_core::roles::ACCOUNT,
        users = sluice_core::roles::render_users(users),
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sluice_core::pipeline::HumanDuration;

    use super::super::values::Hosts;
    use super::*;

    fn material() -> Material {
        Material {
            accounts_conf: Some("accounts {}\n".into()),
            seeds: [
                "admin",
                "ingest",
                "dispatcher",
                "dashboard",
                "dashboard-actions",
                "runner-default",
            ]
            .iter()
            .map(|r| (r.to_string(), Secret::new(format!("SU{r}"))))
            .collect(),
            github_webhook_secret: Secret::new("gh"),
            gitlab_webhook_token: Secret::new("gl"),
            webhook_signing_secret: Secret::new("whsec_x"),
            github_token: None,
            gitlab_token: None,
            dashboard_actions_token: Some(Secret::new("dash-token")),
        }
    }

    fn ids(objects: &[Object]) -> Vec<String> {
        objects.iter().map(Object::id).collect()
    }

    #[test]
    fn each_answer_set_renders_its_parts_in_apply_order() {
        for hosts in [Hosts::ControlPlane, Hosts::Runner, Hosts::Both] {
            let v = Values {
                hosts,
                nats_url: (hosts == Hosts::Runner).then(|| "tls://nats.example.com:4222".into()),
                ..Values::default()
            };
            let objects = render(&v, Some(&material()));
            let order: Vec<usize> = objects.iter().map(|o| kind_order(o.kind())).collect();
            assert!(
                order.windows(2).all(|w| w[0] <= w[1]),
                "{:?}",
                ids(&objects)
            );
            let has = |id: &str| objects.iter().any(|o| o.id() == id);
            assert_eq!(has("StatefulSet/sluice-nats"), hosts.control_plane());
            assert_eq!(has("Deployment/sluice-ingest"), hosts.control_plane());
            assert_eq!(has("Deployment/sluice-runner"), hosts.runner());
            assert_eq!(has("Secret/sluice-nats-runner"), hosts.runner());
            assert_eq!(has("Secret/sluice-nats-admin"), hosts.control_plane());
            assert!(!objects.iter().any(|o| o.kind() == "ClusterRole"));
            for o in &objects {
                assert_eq!(
                    o.meta()
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(PART_OF.0))
                        .map(String::as_str),
                    Some(PART_OF.1),
                    "{}",
                    o.id()
                );
                if o.kind() != "Namespace" {
                    assert_eq!(o.namespace(), Some("sluice"), "{}", o.id());
                }
            }
        }
    }

    /// Every answer set the tests and the manifests cover, with the dashboard's
    /// actions and KEDA on as well as off.
    fn answer_sets() -> Vec<Values> {
        let mut sets: Vec<Values> = super::super::manifests::answer_sets()
            .into_iter()
            .map(|(_, v, _)| v)
            .collect();
        sets.push(Values {
            dashboard_actions: true,
            keda: true,
            ..Values::default()
        });
        sets.push(Values {
            hosts: Hosts::ControlPlane,
            nats_url: Some("tls://nats.example.com:4222".into()),
            dashboard_actions: true,
            ..Values::default()
        });
        sets
    }

    fn pod_templates(o: &Object) -> Option<Value> {
        let json = o.to_json();
        match o.kind() {
            "Deployment" | "StatefulSet" | "Job" => Some(json["spec"]["template"].clone()),
            _ => None,
        }
    }

    #[test]
    fn every_workload_is_locked_down_probed_limited_and_has_its_policy() {
        for v in answer_sets() {
            let mut all = render(&v, Some(&material()));
            all.extend(smoke(&v, "install-smoke-1", 300));
            let policies: Vec<Value> = all
                .iter()
                .filter(|o| o.kind() == "NetworkPolicy")
                .map(|o| o.to_json()["spec"]["podSelector"]["matchLabels"].clone())
                .collect();
            let budgets: Vec<Value> = all
                .iter()
                .filter(|o| o.kind() == "PodDisruptionBudget")
                .map(|o| o.to_json()["spec"]["selector"]["matchLabels"].clone())
                .collect();
            for o in &all {
                let Some(template) = pod_templates(o) else {
                    continue;
                };
                let id = format!("{} ({:?})", o.id(), v.hosts);
                let labels = &template["metadata"]["labels"];
                let component = labels["app.kubernetes.io/component"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{id}: a component label"));
                let spec = &template["spec"];
                assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{id}");
                assert!(
                    spec["securityContext"]["runAsUser"].as_i64() > Some(0),
                    "{id}"
                );
                // Only the runner talks to the API server.
                assert_eq!(
                    spec["automountServiceAccountToken"],
                    component == "runner",
                    "{id}"
                );
                let containers: Vec<&Value> = spec["containers"]
                    .as_array()
                    .into_iter()
                    .chain(spec["initContainers"].as_array())
                    .flatten()
                    .collect();
                assert!(!containers.is_empty(), "{id}");
                for c in containers {
                    let sc = &c["securityContext"];
                    assert_eq!(sc["readOnlyRootFilesystem"], true, "{id}");
                    assert_eq!(sc["allowPrivilegeEscalation"], false, "{id}");
                    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{id}");
                    for side in ["requests", "limits"] {
                        for r in ["cpu", "memory"] {
                            assert!(c["resources"][side][r].is_string(), "{id}: {side}.{r}");
                        }
                    }
                    if o.kind() != "Job" {
                        for (probe, path) in
                            [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]
                        {
                            let get = &c[probe]["httpGet"];
                            // Sluice's own endpoints; NATS has its /healthz variants.
                            if c["image"] == v.image.as_str() {
                                assert_eq!(get["path"], path, "{id}: {probe}");
                            } else {
                                assert!(get["path"].is_string(), "{id}: {probe}");
                            }
                            let port = &get["port"];
                            assert!(
                                c["ports"]
                                    .as_array()
                                    .is_some_and(|ps| ps.iter().any(|p| &p["name"] == port)),
                                "{id}: {probe} on a declared port"
                            );
                        }
                    }
                }
                let selects = |selector: &Value| {
                    selector
                        .as_object()
                        .is_some_and(|m| m.iter().all(|(k, want)| &labels[k] == want))
                };
                assert!(
                    policies.iter().any(selects),
                    "{id}: no NetworkPolicy selects its Pods"
                );
                if o.kind() != "Job" {
                    assert!(budgets.iter().any(selects), "{id}: no PodDisruptionBudget");
                }
            }
        }
    }

    /// The object `id` (`Kind/name`) among `objects`, as JSON.
    fn find(objects: &[Object], id: &str) -> Value {
        objects
            .iter()
            .find(|o| o.id() == id)
            .unwrap_or_else(|| panic!("{id}"))
            .to_json()
    }

    /// The value of `name` in a Deployment's first container's environment.
    fn env(deployment: &Value, name: &str) -> Option<Value> {
        deployment["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    }

    #[test]
    fn ingests_probes_and_metrics_are_on_the_admin_port_its_service_does_not_expose() {
        let objects = render(&Values::default(), Some(&material()));
        let ingest = find(&objects, "Deployment/sluice-ingest");
        let c = &ingest["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["livenessProbe"]["httpGet"]["port"], "admin");
        assert_eq!(c["readinessProbe"]["httpGet"]["port"], "admin");
        assert_eq!(
            c["ports"],
            json!([
                { "name": "http", "containerPort": INGEST_PORT },
                { "name": "admin", "containerPort": admin_port() },
            ])
        );
        assert_eq!(
            env(&ingest, "SLUICE_ADMIN_LISTEN"),
            Some(json!(sluice_core::admin::DEFAULT_ADMIN_LISTEN))
        );
        // The Service (behind the Ingress) carries webhooks only.
        let service = find(&objects, "Service/sluice-ingest");
        let ports: Vec<&Value> = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0]["name"], "http");
        // The policy lets the kubelet's probes and Prometheus in.
        let policy = find(&objects, "NetworkPolicy/sluice-ingest");
        let allowed: Vec<&Value> = policy["spec"]["ingress"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| &p["port"])
            .collect();
        assert_eq!(allowed, [&json!(INGEST_PORT), &json!(admin_port())]);
    }

    #[test]
    fn ingests_shed_wait_and_the_proxys_user_header_are_set_only_when_given() {
        let objects = render(&Values::default(), Some(&material()));
        let ingest = find(&objects, "Deployment/sluice-ingest");
        assert_eq!(env(&ingest, "SLUICE_INGEST_SHED_AFTER"), None);
        let v = Values {
            ingest_shed_after: Some(HumanDuration(Duration::from_millis(500))),
            dashboard_actions: true,
            dashboard_trusted_user_header: Some("X-Forwarded-User".into()),
            ..Values::default()
        };
        v.validate().expect("valid");
        let objects = render(&v, Some(&material()));
        assert_eq!(
            env(
                &find(&objects, "Deployment/sluice-ingest"),
                "SLUICE_INGEST_SHED_AFTER"
            ),
            Some(json!("500ms"))
        );
        let dashboard = find(&objects, "Deployment/sluice-dashboard");
        assert_eq!(
            env(&dashboard, "SLUICE_DASHBOARD_TRUSTED_USER_HEADER"),
            Some(json!("X-Forwarded-User"))
        );
        // The token stays: a request that comes without the proxy's header may use it.
        assert!(env(&dashboard, "SLUICE_DASHBOARD_ACTIONS_TOKEN_FILE").is_some());
    }

    #[test]
    fn the_dashboard_reads_only_unless_actions_are_on_and_statuses_link_to_it() {
        let objects = render(&Values::default(), Some(&material()));
        let dashboard = find(&objects, "Deployment/sluice-dashboard");
        assert_eq!(dashboard["spec"]["replicas"], 2);
        assert_eq!(
            dashboard["metadata"]["labels"]["app.kubernetes.io/component"],
            "dashboard"
        );
        assert_eq!(env(&dashboard, "SLUICE_DASHBOARD_ALLOW_ACTIONS"), None);
        assert_eq!(
            env(&dashboard, "SLUICE_DASHBOARD_LISTEN"),
            Some(json!("0.0.0.0:8090"))
        );
        // Its own credential, the dashboard role's seed.
        let volumes = &dashboard["spec"]["template"]["spec"]["volumes"];
        assert_eq!(volumes.as_array().map(Vec::len), Some(1), "{volumes:#}");
        assert_eq!(volumes[0]["secret"]["secretName"], "sluice-nats-dashboard");
        let seed = find(&objects, "Secret/sluice-nats-dashboard");
        assert_eq!(
            seed["metadata"]["labels"]["app.kubernetes.io/component"],
            "dashboard"
        );
        assert!(!objects
            .iter()
            .any(|o| o.id() == "Secret/sluice-dashboard-actions"));
        let service = find(&objects, "Service/sluice-dashboard");
        assert_eq!(service["spec"]["ports"][0]["port"], 8090);
        // No Ingress of its own: it has no login.
        assert!(!objects
            .iter()
            .any(|o| o.kind() == "Ingress" && o.id().contains("dashboard")));
        let policy = find(&objects, "NetworkPolicy/sluice-dashboard");
        assert_eq!(
            policy["spec"]["ingress"],
            json!([{ "ports": [{ "protocol": "TCP", "port": 8090 }] }])
        );
        let dispatcher = find(&objects, "Deployment/sluice-dispatcher");
        assert_eq!(
            env(&dispatcher, "SLUICE_STATUS_LINK_BASE_URL"),
            Some(json!("http://sluice-dashboard.sluice.svc:8090"))
        );

        let acting = Values {
            dashboard_actions: true,
            dashboard_url: Some("https://ci.example.com/".into()),
            ..Values::default()
        };
        let objects = render(&acting, Some(&material()));
        let dashboard = find(&objects, "Deployment/sluice-dashboard");
        assert_eq!(
            env(&dashboard, "SLUICE_DASHBOARD_ALLOW_ACTIONS"),
            Some(json!("true"))
        );
        let token_file = env(&dashboard, "SLUICE_DASHBOARD_ACTIONS_TOKEN_FILE").expect("file");
        let mounts = &dashboard["spec"]["template"]["spec"]["containers"][0]["volumeMounts"];
        assert!(
            mounts.as_array().expect("mounts").iter().any(|m| {
                token_file
                    .as_str()
                    .is_some_and(|f| f.starts_with(m["mountPath"].as_str().unwrap_or("-")))
                    && m["readOnly"] == true
            }),
            "{mounts:#}"
        );
        // The acting role's seed, and not the read-only one's.
        let volumes = &dashboard["spec"]["template"]["spec"]["volumes"];
        assert!(
            volumes
                .as_array()
                .expect("volumes")
                .iter()
                .any(|v| v["secret"]["secretName"] == "sluice-nats-dashboard-actions"),
            "{volumes:#}"
        );
        assert!(objects
            .iter()
            .any(|o| o.id() == "Secret/sluice-nats-dashboard-actions"));
        assert!(!objects
            .iter()
            .any(|o| o.id() == "Secret/sluice-nats-dashboard"));
        let secret = objects
            .iter()
            .find(|o| o.id() == "Secret/sluice-dashboard-actions")
            .expect("the token's Secret");
        let yaml = super::super::object::to_yaml_stream(std::slice::from_ref(secret));
        assert!(yaml.contains("token:"), "{yaml}");
        assert_eq!(
            env(
                &find(&objects, "Deployment/sluice-dispatcher"),
                "SLUICE_STATUS_LINK_BASE_URL"
            ),
            Some(json!("https://ci.example.com"))
        );
        // The GitOps manifests (no material) name the Secret, hold none.
        let gitops = render(&acting, None);
        assert!(!gitops.iter().any(|o| o.kind() == "Secret"));
    }

    #[test]
    fn without_material_no_secret_is_rendered() {
        let objects = render(&Values::default(), None);
        assert!(!objects.iter().any(|o| o.kind() == "Secret"));
        let yaml = super::super::object::to_yaml_stream(&objects);
        assert!(yaml.contains("sync_interval: always"));
    }

    #[test]
    fn the_runner_role_has_exactly_the_runners_verbs() {
        let objects = render(&Values::default(), None);
        let role = objects
            .iter()
            .find(|o| o.id() == "Role/sluice-runner")
            .expect("role");
        let json = role.to_json();
        assert_eq!(json["rules"], Renderer::runner_rules());
        // Secrets: read one by one (to mask their values), never listed or watched.
        let secrets: Vec<&serde_json::Value> = json["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .filter(|r| {
                r["resources"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|x| x == "secrets"))
            })
            .collect();
        assert_eq!(secrets.len(), 1, "{secrets:?}");
        assert_eq!(secrets[0]["verbs"], serde_json::json!(["get"]));
        assert_eq!(secrets[0]["apiGroups"], serde_json::json!([""]));
        assert_eq!(
            role.to_json()["kind"],
            "Role",
            "namespaced, not a ClusterRole"
        );
        let build = objects
            .iter()
            .find(|o| o.id() == "ServiceAccount/sluice-build")
            .expect("sa");
        assert_eq!(build.to_json()["automountServiceAccountToken"], false);
    }

    fn keda_values() -> Values {
        Values {
            keda: true,
            ..Values::default()
        }
    }

    #[test]
    fn with_keda_the_runner_gets_deploy_kedas_scaled_object_and_no_fixed_replicas() {
        let objects = render(&keda_values(), None);
        let find = |id: &str| {
            objects
                .iter()
                .find(|o| o.id() == id)
                .unwrap_or_else(|| panic!("{id}"))
                .to_json()
        };
        let runner = find("Deployment/sluice-runner");
        assert!(runner["spec"].get("replicas").is_none(), "{runner:#}");
        assert_eq!(find("Deployment/sluice-ingest")["spec"]["replicas"], 2);
        let rendered = find("ScaledObject/sluice-runner");
        // The same object as the hand-applied deploy/keda/runner-scaledobject.yaml,
        // for the same answers (cluster default in namespace sluice).
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/keda/runner-scaledobject.yaml"
        );
        let text = std::fs::read_to_string(path).expect("deploy/keda");
        let file: Value = serde_saphyr::from_str(&text).expect("YAML");
        assert_eq!(rendered["spec"], file["spec"]);
        assert_eq!(rendered["apiVersion"], file["apiVersion"]);
        let last = objects.iter().map(Object::kind).collect::<Vec<_>>();
        assert!(
            last.iter().position(|k| *k == "ScaledObject")
                > last.iter().position(|k| *k == "Deployment"),
            "{last:?}"
        );
        // A runner-only cluster reads its remote NATS's monitoring port.
        let remote = Values {
            hosts: Hosts::Runner,
            cluster: "eu-1".into(),
            nats_url: Some("tls://nats.example.com:4222".into()),
            max_running: 20,
            keda_max_replicas: 4,
            ..keda_values()
        };
        let so = render(&remote, None)
            .into_iter()
            .find(|o| o.kind() == "ScaledObject")
            .expect("ScaledObject")
            .to_json();
        let trigger = &so["spec"]["triggers"][0]["metadata"];
        assert_eq!(
            trigger["natsServerMonitoringEndpoint"],
            "nats.example.com:8222"
        );
        assert_eq!(trigger["consumer"], "sluice-runner-eu-1");
        assert_eq!(trigger["lagThreshold"], "20");
        assert_eq!(so["spec"]["maxReplicaCount"], 4);
        assert!(!render(&Values::default(), None)
            .iter()
            .any(|o| o.kind() == "ScaledObject"));
    }

    /// KEDA's CRD schema, strict, through scripts/lint-monitoring's validator (the
    /// schema is read from ../shared/schemas/keda/, never copied here).
    #[test]
    fn the_scaled_object_validates_against_kedas_crd_schema() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let schema = std::env::var_os("SLUICE_KEDA_SCHEMA")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| root.join("../shared/schemas/keda/keda.sh_scaledobjects.yaml"));
        let python_ok = std::process::Command::new("python3")
            .args(["-c", "import yaml, jsonschema"])
            .status()
            .is_ok_and(|s| s.success());
        if !schema.exists() || !python_ok {
            eprintln!(
                "skipped: needs KEDA's CRD at {} and python3 with yaml and jsonschema (scripts/install-deps)",
                schema.display()
            );
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        for (name, v) in [
            ("both", keda_values()),
            (
                "runner",
                Values {
                    hosts: Hosts::Runner,
                    cluster: "eu-1".into(),
                    nats_url: Some("tls://nats.example.com:4222".into()),
                    ..keda_values()
                },
            ),
        ] {
            let file = dir.path().join(format!("{name}.yaml"));
            let yaml = super::super::object::to_yaml_stream(&render(&v, None));
            std::fs::write(&file, yaml).expect("write");
            let out = std::process::Command::new("python3")
                .arg(root.join("scripts/lint-monitoring"))
                .arg("validate-keda")
                .arg(&file)
                .env("SLUICE_KEDA_SCHEMA", &schema)
                .output()
                .expect("lint-monitoring");
            assert!(
                out.status.success(),
                "{name}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    #[test]
    fn the_nats_configuration_is_accepted_by_nats_server() {
        // The real server checks the rendered file with the accounts include.
        let Ok(server) = std::env::var("SLUICE_NATS_SERVER") else {
            eprintln!("SLUICE_NATS_SERVER not set; skipped");
            return;
        };
        let dir = tempfile::tempdir().expect("tmp");
        let r = Renderer {
            v: &Values::default(),
        };
        let conf = r
            .nats_conf()
            .replace(
                "/data/jetstream",
                &dir.path().join("js").display().to_string(),
            )
            .replace(
                "/var/run/nats/nats.pid",
                &dir.path().join("pid").display().to_string(),
            );
        std::fs::write(dir.path().join("nats.conf"), conf).expect("write");
        let users = vec![sluice_core::roles::User {
            role: sluice_core::roles::Role::Admin,
            public_key: nkeys::KeyPair::new_user().public_key(),
        }];
        std::fs::write(dir.path().join("accounts.conf"), accounts_conf(&users)).expect("write");
        let out = std::process::Command::new(server)
            .arg("-t")
            .arg("-c")
            .arg(dir.path().join("nats.conf"))
            .env("POD_NAME", "sluice-nats-0")
            .output()
            .expect("nats-server");
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
