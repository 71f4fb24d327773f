//! Checks before anything is written: the API server and its version, every
//! permission the install and the runner need (SelfSubjectAccessReview), the
//! namespace, a default StorageClass when volumes are needed, and for a runner-only
//! cluster its NATS credential and consumer. Each failure is one line saying what to
//! do; the install stops unless all pass.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::Resource as _;
use kube::api::{Api, ListParams, PostParams};

use super::object::{Object, ScaledObject};
use super::values::{Hosts, Values};

/// The oldest and newest Kubernetes minor versions the manifests are validated for.
pub const MIN_MINOR: u32 = 29;
pub const MAX_MINOR: u32 = 33;

/// One permission: a verb on a resource (`pods/log` for a subresource), in a
/// namespace or cluster-wide.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Access {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
}

impl Access {
    fn new(verb: &str, group: &str, resource: &str, namespace: Option<&str>) -> Access {
        Access {
            verb: verb.into(),
            group: group.into(),
            resource: resource.into(),
            namespace: namespace.map(str::to_owned),
        }
    }

    /// What to tell the operator when it is denied.
    pub fn denied_line(&self) -> String {
        let resource = if self.group.is_empty() {
            self.resource.clone()
        } else {
            let (r, sub) = self
                .resource
                .split_once('/')
                .map_or((self.resource.as_str(), None), |(r, s)| (r, Some(s)));
            format!(
                "{r}.{}{}",
                self.group,
                sub.map(|s| format!("/{s}")).unwrap_or_default()
            )
        };
        match &self.namespace {
            Some(ns) => format!(
                "cannot {} {resource} in namespace {ns}: ask a cluster admin to grant it (check with `kubectl auth can-i {} {resource} -n {ns}`)",
                self.verb, self.verb
            ),
            None => format!(
                "cannot {} {resource} (cluster-wide): ask a cluster admin to grant it (check with `kubectl auth can-i {} {resource}`)",
                self.verb, self.verb
            ),
        }
    }
}

/// Every permission the install needs for these objects, and the runner's own (a
/// Role can only grant what its creator holds). Nothing more.
pub fn needs(values: &Values, objects: &[Object], namespace_exists: bool) -> Vec<Access> {
    let ns = Some(values.namespace.as_str());
    let mut out = BTreeSet::new();
    let mut verbs_on = |verbs: &[&str], group: &str, resource: &str, ns: Option<&str>| {
        for v in verbs {
            out.insert(Access::new(v, group, resource, ns));
        }
    };
    verbs_on(&["get", "patch"], "", "namespaces", None);
    if !namespace_exists {
        verbs_on(&["create"], "", "namespaces", None);
    }
    for o in objects.iter().filter(|o| o.kind() != "Namespace") {
        // Server-side apply: create when missing, patch when present; get to tell
        // which, and to wait.
        verbs_on(&["get", "create", "patch"], &o.group(), &o.plural(), ns);
    }
    // The Secrets (not among the manifests): read first, to keep generated values.
    verbs_on(&["get", "create", "patch"], "", "secrets", ns);
    // Waiting on rollouts: the reasons of Pods that are not ready.
    verbs_on(&["list"], "", "pods", ns);
    if values.hosts.runner() {
        verbs_on(
            &["create", "get", "list", "watch", "delete"],
            "",
            "pods",
            ns,
        );
        verbs_on(&["get"], "", "pods/log", ns);
        verbs_on(&["create", "get"], "", "persistentvolumeclaims", ns);
    }
    if values.installs_nats() || values.hosts.runner() {
        verbs_on(&["list"], "storage.k8s.io", "storageclasses", None);
    }
    if values.smoke {
        // The smoke Job's result is read from its Pod's logs.
        verbs_on(&["get"], "", "pods/log", ns);
    }
    out.into_iter().collect()
}

/// The outcome: failures (each one line) and notes that do not stop the install.
#[derive(Debug, Default)]
pub struct Report {
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub namespace_exists: bool,
}

/// Runs every check.
pub async fn run(client: &kube::Client, values: &Values, objects: &[Object]) -> Report {
    let mut report = Report::default();
    match client.apiserver_version().await {
        Err(e) => {
            report.failures.push(format!(
                "cannot reach the Kubernetes API server ({e}): check the context (--context) and that `kubectl version` answers"
            ));
            return report;
        }
        Ok(info) => {
            let minor: u32 = info.minor.trim_end_matches('+').parse().unwrap_or(0);
            let major: u32 = info.major.parse().unwrap_or(0);
            if major != 1 || minor < MIN_MINOR {
                report.failures.push(format!(
                    "Kubernetes {} is older than 1.{MIN_MINOR}, the oldest version Sluice's manifests are validated for: upgrade the cluster",
                    info.git_version
                ));
            } else if minor > MAX_MINOR {
                report.notes.push(format!(
                    "Kubernetes {} is newer than 1.{MAX_MINOR}, the newest the manifests are validated for; they use only stable APIs",
                    info.git_version
                ));
            }
        }
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.get_opt(&values.namespace).await {
        Ok(found) => report.namespace_exists = found.is_some(),
        Err(e) => report.failures.push(format!(
            "cannot read namespace {} ({e}): ask a cluster admin for `get namespaces`",
            values.namespace
        )),
    }
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let checks = needs(values, objects, report.namespace_exists);
    let answers = futures::future::join_all(checks.iter().map(|a| {
        let reviews = reviews.clone();
        async move {
            let (resource, subresource) = match a.resource.split_once('/') {
                Some((r, s)) => (r.to_owned(), Some(s.to_owned())),
                None => (a.resource.clone(), None),
            };
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(a.verb.clone()),
                        group: Some(a.group.clone()),
                        resource: Some(resource),
                        subresource,
                        namespace: a.namespace.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            reviews.create(&PostParams::default(), &review).await
        }
    }))
    .await;
    for (access, answer) in checks.iter().zip(answers) {
        match answer {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(_) => report.failures.push(access.denied_line()),
            Err(e) => {
                report.failures.push(format!(
                    "cannot ask the API server what this account may do ({e}): SelfSubjectAccessReview must be allowed (it is to every authenticated user by default)"
                ));
                break;
            }
        }
    }
    if values.installs_nats() || values.hosts.runner() {
        storage(client, values, &mut report).await;
    }
    if values.keda {
        match keda(client).await {
            Keda::Served => {}
            Keda::Absent => report.failures.push(KEDA_MISSING.into()),
            Keda::Unserved(versions) => report.failures.push(format!(
                "KEDA's CRD scaledobjects.keda.sh serves {versions}, not {}: upgrade KEDA to 2.x (https://keda.sh/docs/latest/deploy/), or install without --keda",
                ScaledObject::API_VERSION
            )),
            Keda::Unknown(why) => report.notes.push(format!(
                "cannot tell whether KEDA is installed ({why}); the ScaledObject is applied anyway and fails if KEDA's CRD is missing"
            )),
        }
    }
    if values.hosts == Hosts::Runner {
        if let Err(line) = runner_nats(values).await {
            report.failures.push(line);
        }
    }
    report
}

/// KEDA's CRD, which the ScaledObject needs.
pub const KEDA_CRD: &str = "scaledobjects.keda.sh";

/// The line when `keda` is asked for and the cluster has no KEDA.
pub const KEDA_MISSING: &str = "KEDA is not installed in this cluster (no CustomResourceDefinition scaledobjects.keda.sh): install KEDA (https://keda.sh/docs/latest/deploy/) and run the install again, or install without --keda (`keda: false`)";

/// Whether the cluster serves KEDA's ScaledObject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keda {
    /// The CRD exists and serves `keda.sh/v1alpha1`.
    Served,
    /// No such CRD: KEDA is not installed.
    Absent,
    /// The CRD exists but serves only these other versions.
    Unserved(String),
    /// The API server would not say (e.g. no `get customresourcedefinitions`).
    Unknown(String),
}

/// Asks the API server for KEDA's CRD.
pub async fn keda(client: &kube::Client) -> Keda {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    match crds.get_opt(KEDA_CRD).await {
        Ok(None) => Keda::Absent,
        Ok(Some(crd)) => {
            let served: Vec<String> = crd
                .spec
                .versions
                .iter()
                .filter(|v| v.served)
                .map(|v| format!("{}/{}", crd.spec.group, v.name))
                .collect();
            if served.iter().any(|v| v == ScaledObject::API_VERSION) {
                Keda::Served
            } else {
                Keda::Unserved(served.join(", "))
            }
        }
        Err(e) => Keda::Unknown(e.to_string()),
    }
}

async fn storage(client: &kube::Client, values: &Values, report: &mut Report) {
    let classes: Api<StorageClass> = Api::all(client.clone());
    let list = match classes.list(&ListParams::default()).await {
        Ok(l) => l.items,
        // A denied list is already reported by the access review.
        Err(_) => return,
    };
    let is_default = |c: &StorageClass| {
        c.metadata.annotations.as_ref().is_some_and(|a| {
            [
                "storageclass.kubernetes.io/is-default-class",
                "storageclass.beta.kubernetes.io/is-default-class",
            ]
            .iter()
            .any(|k| a.get(*k).map(String::as_str) == Some("true"))
        })
    };
    match &values.storage_class {
        Some(name) if values.installs_nats() => {
            if !list.iter().any(|c| c.metadata.name.as_deref() == Some(name)) {
                report.failures.push(format!(
                    "storage class {name} does not exist: name one of `kubectl get storageclass` with --storage-class"
                ));
            }
        }
        _ if list.iter().any(is_default) => {}
        _ if values.installs_nats() => report.failures.push(
            "no default StorageClass, and NATS needs volumes: name one with --storage-class (see `kubectl get storageclass`), or mark one default (`kubectl annotate storageclass NAME storageclass.kubernetes.io/is-default-class=true`)".into(),
        ),
        _ => report.notes.push(
            "no default StorageClass: pipelines' caches will be skipped unless the runner is given --cache-storage-class".into(),
        ),
    }
}

/// A runner-only cluster: its seed reaches NATS, and its consumer exists.
async fn runner_nats(values: &Values) -> Result<(), String> {
    let (Some(url), Some(seed)) = (&values.nats_url, &values.nats_seed) else {
        return Ok(());
    };
    let role = sluice_core::roles::Role::Runner(values.cluster.clone());
    let options = sluice_core::nats::NatsOptions {
        nkey_file: Some(seed.clone()),
        inbox_prefix: Some(sluice_core::roles::inbox_prefix(&role)),
        ..sluice_core::nats::NatsOptions::new(url, "sluice-install")
    };
    let client = sluice_core::nats::connect_once(&options, Duration::from_secs(5))
        .await
        .map_err(|e| {
            let why = one_line(&e.to_string());
            if why.to_lowercase().contains("authorization") {
                format!(
                    "NATS at {url} refused the seed {} ({why}): use runner-{c}.nk from `sluice cluster add {c}` on the control plane, and re-run the control plane's install (its NATS then knows the user)",
                    seed.display(),
                    c = values.cluster
                )
            } else {
                format!(
                    "cannot reach NATS at {url} with {} ({why}): check the URL, that this machine can reach it, and that the seed is the one `sluice cluster add {}` wrote",
                    seed.display(),
                    values.cluster
                )
            }
        })?;
    let js = async_nats::jetstream::new(client);
    let consumer = sluice_core::subjects::runner_consumer(&values.cluster);
    js.get_consumer_from_stream::<async_nats::jetstream::consumer::pull::Config, _, _>(
        &consumer,
        sluice_core::subjects::RUNS_STREAM,
    )
    .await
    .map(|_| ())
    .map_err(|e| {
        let e = one_line(&e.to_string());
        format!(
            "cluster {}'s consumer {consumer} is not on NATS ({e}): on the control plane run `sluice streams apply --clusters …,{}` (or re-run `sluice install` there with the cluster in --clusters)",
            values.cluster, values.cluster
        )
    })
}

/// An error's text on one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::super::render::render;
    use super::*;

    #[test]
    fn the_runner_needs_exactly_its_role_and_nothing_cluster_wide_but_reads() {
        let values = Values {
            hosts: Hosts::Runner,
            nats_url: Some("tls://n:4222".into()),
            nats_seed: Some("s.nk".into()),
            ..Values::default()
        };
        let needs = needs(&values, &render(&values, None), true);
        let cluster_wide: Vec<String> = needs
            .iter()
            .filter(|a| a.namespace.is_none())
            .map(|a| format!("{} {}", a.verb, a.resource))
            .collect();
        assert_eq!(
            cluster_wide,
            ["get namespaces", "list storageclasses", "patch namespaces"]
        );
        for (verb, resource) in [
            ("watch", "pods"),
            ("get", "pods/log"),
            ("create", "persistentvolumeclaims"),
            ("create", "roles"),
        ] {
            assert!(
                needs
                    .iter()
                    .any(|a| a.verb == verb && a.resource == resource),
                "{verb} {resource}"
            );
        }
        assert!(!needs.iter().any(|a| a.resource.contains("statefulsets")));
        let line = Access::new(
            "create",
            "rbac.authorization.k8s.io",
            "roles",
            Some("sluice"),
        )
        .denied_line();
        assert!(
            line.contains("kubectl auth can-i create roles.rbac.authorization.k8s.io -n sluice"),
            "{line}"
        );
    }
}
