//! Applying (server-side apply, field manager `sluice`), waiting for rollouts with
//! the reason when one is stuck, and uninstalling by label.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, Secret as SecretObject};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::ApiResource;

use super::material::Existing;
use super::object::{all_kinds, Object};
use super::render::{kind_order, FIELD_MANAGER, SELECTOR};

/// How often rollouts are looked at.
const POLL: Duration = Duration::from_secs(2);

fn api(
    client: &kube::Client,
    resource: &ApiResource,
    namespace: Option<&str>,
) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    }
}

/// The values of Sluice's Secrets already in the namespace.
pub async fn existing_secrets(
    client: &kube::Client,
    namespace: &str,
    names: &[&str],
) -> anyhow::Result<Existing> {
    let secrets: Api<SecretObject> = Api::namespaced(client.clone(), namespace);
    let mut out = Existing::new();
    for name in names {
        if let Some(s) = secrets
            .get_opt(name)
            .await
            .with_context(|| format!("cannot read Secret {name}"))?
        {
            let data = s
                .data
                .unwrap_or_default()
                .into_iter()
                .filter_map(|(k, v)| String::from_utf8(v.0).ok().map(|v| (k, v)))
                .collect();
            out.insert((*name).to_owned(), data);
        }
    }
    Ok(out)
}

/// What one apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Created,
    Configured,
    Unchanged,
}

/// Applies one object; tells whether it was new, changed or already so.
pub async fn apply_one(client: &kube::Client, object: &Object) -> anyhow::Result<Outcome> {
    let api = api(client, &object.api_resource(), object.namespace());
    let before = api
        .get_opt(object.name())
        .await
        .with_context(|| format!("cannot read {}", object.id()))?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let after = api
        .patch(object.name(), &params, &Patch::Apply(object.to_dynamic()))
        .await
        .with_context(|| format!("cannot apply {}", object.id()))?;
    Ok(match before {
        None => Outcome::Created,
        Some(b) if b.metadata.resource_version == after.metadata.resource_version => {
            Outcome::Unchanged
        }
        Some(_) => Outcome::Configured,
    })
}

/// Applies every object in order, waiting for NATS before the streams Job, the Job
/// before the services, and the services at the end. Returns how many changed.
pub async fn apply_all(
    client: &kube::Client,
    objects: &[Object],
    timeout: Duration,
    out: &mut impl Write,
) -> anyhow::Result<usize> {
    let mut changed = 0;
    let mut pending: Vec<&Object> = Vec::new();
    let mut last_kind = None;
    for object in objects {
        // Before the first Job and the first Deployment: what came before is ready.
        let kind = object.kind();
        if last_kind != Some(kind) && matches!(kind, "Job" | "Deployment") {
            for p in pending.drain(..) {
                wait_ready(client, p, timeout, out).await?;
            }
        }
        last_kind = Some(kind);
        let outcome = apply_one(client, object).await?;
        if outcome != Outcome::Unchanged {
            changed += 1;
        }
        let word = match outcome {
            Outcome::Created => "created",
            Outcome::Configured => "configured",
            Outcome::Unchanged => "unchanged",
        };
        writeln!(out, "  {word:<10} {}", object.id())?;
        if matches!(kind, "StatefulSet" | "Job" | "Deployment") {
            pending.push(object);
        }
    }
    for p in pending {
        wait_ready(client, p, timeout, out).await?;
    }
    Ok(changed)
}

/// Readiness of a workload from its status: `Ok(None)` when ready, `Ok(Some(progress))`
/// while not, `Err(why)` when it failed for good.
pub fn readiness(kind: &str, o: &serde_json::Value) -> Result<Option<String>, String> {
    let status = &o["status"];
    let want = o["spec"]["replicas"].as_i64().unwrap_or(1);
    let int = |k: &str| status[k].as_i64().unwrap_or(0);
    match kind {
        "Job" => {
            let conditions = status["conditions"].as_array().cloned().unwrap_or_default();
            let has = |t: &str| {
                conditions
                    .iter()
                    .any(|c| c["type"] == t && c["status"] == "True")
            };
            if has("Complete") {
                Ok(None)
            } else if has("Failed") {
                Err(conditions
                    .iter()
                    .find(|c| c["type"] == "Failed")
                    .and_then(|c| c["message"].as_str())
                    .unwrap_or("failed")
                    .to_owned())
            } else {
                Ok(Some(format!("{} failed attempts", int("failed"))))
            }
        }
        _ => {
            let observed =
                int("observedGeneration") >= o["metadata"]["generation"].as_i64().unwrap_or(0);
            let ready = int("readyReplicas");
            if observed && ready >= want && int("updatedReplicas") >= want {
                Ok(None)
            } else {
                Ok(Some(format!("{ready}/{want} ready")))
            }
        }
    }
}

async fn wait_ready(
    client: &kube::Client,
    object: &Object,
    timeout: Duration,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let api = api(client, &object.api_resource(), object.namespace());
    let deadline = Instant::now() + timeout;
    let mut shown = String::new();
    loop {
        let current = api
            .get(object.name())
            .await
            .with_context(|| format!("cannot read {}", object.id()))?;
        let json = serde_json::to_value(&current)?;
        match readiness(object.kind(), &json) {
            Ok(None) => {
                writeln!(out, "  ready      {}", object.id())?;
                return Ok(());
            }
            Ok(Some(progress)) => {
                if progress != shown {
                    writeln!(out, "  waiting    {}: {progress}", object.id())?;
                    shown = progress;
                }
            }
            Err(why) => bail!(
                "{} failed: {why}; see `kubectl -n {} logs job/{}`",
                object.id(),
                object.namespace().unwrap_or_default(),
                object.name()
            ),
        }
        if Instant::now() >= deadline {
            let reasons = why_not_ready(client, object, &json).await;
            bail!(
                "{} is not ready after {}: {shown}{}; see `kubectl -n {} describe {}`",
                object.id(),
                sluice_core::pipeline::HumanDuration(timeout),
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", reasons.join("; "))
                },
                object.namespace().unwrap_or_default(),
                object.id().to_lowercase()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The workload's failing conditions and its Pods' reasons: an image that cannot be
/// pulled, a Pod that cannot be scheduled.
async fn why_not_ready(
    client: &kube::Client,
    object: &Object,
    json: &serde_json::Value,
) -> Vec<String> {
    let mut reasons: Vec<String> = json["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["status"] == "False")
        .map(|c| {
            format!(
                "{}: {}",
                c["reason"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or("")
            )
        })
        .collect();
    let labels = json["spec"]["selector"]["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), object.namespace().unwrap_or("default"));
    if let Ok(list) = pods.list(&ListParams::default().labels(&labels)).await {
        for pod in list.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let status = pod.status.unwrap_or_default();
            for c in status.conditions.unwrap_or_default() {
                if c.type_ == "PodScheduled" && c.status == "False" {
                    reasons.push(format!(
                        "Pod {name}: {}: {}",
                        c.reason.unwrap_or_default(),
                        c.message.unwrap_or_default()
                    ));
                }
            }
            for cs in status.container_statuses.unwrap_or_default() {
                if let Some(w) = cs.state.and_then(|s| s.waiting) {
                    reasons.push(format!(
                        "Pod {name}: {}: {}",
                        w.reason.unwrap_or_default(),
                        w.message.unwrap_or_default()
                    ));
                }
            }
        }
    }
    reasons
}

/// `sluice uninstall`: the runners first (they hand their runs back on the way out),
/// then every object with Sluice's label in reverse apply order; volumes only with
/// `delete_data`. Running it again finds nothing and says so.
pub async fn uninstall(
    client: &kube::Client,
    namespace: &str,
    delete_data: bool,
    timeout: Duration,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let mut removed = 0;
    let mut kinds = all_kinds();
    kinds.retain(|k| k.kind != "Namespace");
    kinds.sort_by_key(|k| std::cmp::Reverse(kind_order(&k.kind)));
    // KEDA's ScaledObject first, so nothing scales the runners while they drain.
    let (scalers, kinds): (Vec<_>, Vec<_>) = kinds.into_iter().partition(|k| k.group == "keda.sh");
    removed += delete_labelled(client, namespace, &scalers, out).await?;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let runner_selector = format!("{SELECTOR},app.kubernetes.io/component=runner");
    let runners = deployments
        .list(&ListParams::default().labels(&runner_selector))
        .await
        .context("cannot list the runners' Deployments")?;
    for d in &runners.items {
        let name = d.metadata.name.clone().unwrap_or_default();
        deployments
            .delete(&name, &DeleteParams::foreground())
            .await?;
        writeln!(out, "  deleted    Deployment/{name} (draining its runners)")?;
        removed += 1;
    }
    if !runners.items.is_empty() {
        let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
        let deadline = Instant::now() + timeout;
        loop {
            let left = pods
                .list(&ListParams::default().labels(&runner_selector))
                .await?
                .items
                .len();
            if left == 0 {
                break;
            }
            if Instant::now() >= deadline {
                bail!("{left} runner Pods still running after {}: run `sluice uninstall` again once they are gone (`kubectl -n {namespace} get pods -l {runner_selector}`)", sluice_core::pipeline::HumanDuration(timeout));
            }
            tokio::time::sleep(POLL).await;
        }
    }
    removed += delete_labelled(client, namespace, &kinds, out).await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    // NATS's volumes carry Sluice's labels; the runners' caches are labelled as the
    // runner's own (managed-by sluice).
    let data = claims
        .list(&ListParams::default().labels("app.kubernetes.io/managed-by=sluice"))
        .await
        .context("cannot list PersistentVolumeClaims")?;
    if delete_data {
        for c in &data.items {
            let name = c.metadata.name.clone().unwrap_or_default();
            claims.delete(&name, &DeleteParams::background()).await?;
            writeln!(out, "  deleted    PersistentVolumeClaim/{name}")?;
            removed += 1;
        }
    } else if !data.items.is_empty() {
        writeln!(
            out,
            "Kept {} PersistentVolumeClaims (NATS's streams, pipelines' caches): `sluice uninstall --delete-data` removes them.",
            data.items.len()
        )?;
    }
    if removed == 0 {
        writeln!(
            out,
            "Nothing to remove: no object of Sluice's in namespace {namespace}."
        )?;
    } else {
        writeln!(out, "Removed {removed} objects. The namespace {namespace} is kept (`kubectl delete namespace {namespace}` removes it).")?;
    }
    Ok(())
}

/// Deletes every object of these kinds with Sluice's label; a kind the cluster does
/// not serve (KEDA's, without KEDA) has none. Returns how many were deleted.
async fn delete_labelled(
    client: &kube::Client,
    namespace: &str,
    kinds: &[ApiResource],
    out: &mut impl Write,
) -> anyhow::Result<usize> {
    let mut removed = 0;
    for kind in kinds {
        let api = api(client, kind, Some(namespace));
        let list = match api.list(&ListParams::default().labels(SELECTOR)).await {
            Ok(l) => l,
            Err(kube::Error::Api(e)) if e.code == 404 && kind.group == "keda.sh" => continue,
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("cannot list {}", kind.plural)))
            }
        };
        for o in list.items {
            let name = o.metadata.name.clone().unwrap_or_default();
            api.delete(&name, &DeleteParams::background()).await?;
            writeln!(out, "  deleted    {}/{name}", kind.kind)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn readiness_follows_status() {
        let d = |gen: i64, observed: i64, ready: i64| {
            json!({ "metadata": { "generation": gen }, "spec": { "replicas": 2 },
                    "status": { "observedGeneration": observed, "readyReplicas": ready, "updatedReplicas": 2 } })
        };
        assert_eq!(readiness("Deployment", &d(1, 1, 2)), Ok(None));
        assert_eq!(
            readiness("Deployment", &d(2, 1, 2)),
            Ok(Some("2/2 ready".into()))
        );
        assert_eq!(
            readiness("StatefulSet", &d(1, 1, 1)),
            Ok(Some("1/2 ready".into()))
        );
        let job = |t: &str| json!({ "status": { "conditions": [{ "type": t, "status": "True", "message": "BackoffLimitExceeded" }] } });
        assert_eq!(readiness("Job", &job("Complete")), Ok(None));
        assert!(readiness("Job", &job("Failed")).is_err());
    }
}
