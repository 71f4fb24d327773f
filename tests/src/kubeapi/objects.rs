//! What `sluice install` uses of the API, beside Pods and claims: server-side apply
//! (`PATCH` with `application/apply-patch+yaml` and a `fieldManager`) of any kind,
//! get, list by label and delete; `SelfSubjectAccessReview` answered from a deny list;
//! `/version`; StorageClasses and Namespaces; Deployment, StatefulSet and Job status
//! as their controllers would write it, and the claims of a StatefulSet's
//! `volumeClaimTemplates`; CustomResourceDefinitions, with a custom resource's kind
//! served (applied, read, listed, deleted) only while its CRD exists, as an API
//! server serves it (KEDA's ScaledObject, after `install_keda()`).
//!
//! Objects are kept as JSON: apply replaces what the manager applied (one manager is
//! all the installer is), and the resourceVersion and generation move only when the
//! applied content changed, so a converged second apply is visible as no change.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use serde_json::{json, Value};

use super::{now, ok_json, status, Shared};

/// Where an object lives: `api/v1` or `apis/<group>/<version>`, the resource (plural),
/// the namespace (none for cluster-scoped ones) and the name.
pub type Key = (String, String, Option<String>, String);

/// The objects and the knobs tests turn.
#[derive(Debug)]
pub struct Store {
    pub objects: BTreeMap<Key, Value>,
    /// What was last applied to each object, to tell a converged apply from a change.
    pub applied: BTreeMap<Key, Value>,
    /// `(verb, resource)` pairs a `SelfSubjectAccessReview` answers "no" to; the
    /// resource as RBAC names it (`deployments`, `pods/log`).
    pub denied: BTreeSet<(String, String)>,
    /// `gitVersion` of `/version`.
    pub version: (u32, u32),
    /// While set, Deployments and StatefulSets report no ready replica, with a
    /// condition saying why, as a rollout stuck on an image pull does.
    pub hold_rollouts: Option<String>,
    /// Applies that changed something, and deletes, as `METHOD path`.
    pub writes: Vec<String>,
    /// Jobs whose name starts with the prefix run their Pod as scripted.
    pub job_scripts: Vec<(String, JobScript)>,
}

/// How the Job controller and kubelet play a Job: each container of its Pod (init
/// containers first) in order, with its exit code and log; the first non-zero exit
/// fails the Pod and the Job (`backoffLimit: 0`), containers after it never start.
/// With `finish: false` the Job stays active, its Pod running the first container.
#[derive(Debug, Clone)]
pub struct JobScript {
    /// (container, exit code, log), in the order the containers run.
    pub containers: Vec<(String, i32, String)>,
    pub finish: bool,
}

impl Default for Store {
    fn default() -> Store {
        let mut objects = BTreeMap::new();
        for ns in ["default", "kube-system"] {
            objects.insert(
                ("api/v1".into(), "namespaces".into(), None, ns.into()),
                json!({
                    "apiVersion": "v1", "kind": "Namespace",
                    "metadata": { "name": ns, "uid": format!("uid-{ns}"), "resourceVersion": "1",
                                  "labels": { "kubernetes.io/metadata.name": ns } },
                    "status": { "phase": "Active" },
                }),
            );
        }
        objects.insert(
            (
                "apis/storage.k8s.io/v1".into(),
                "storageclasses".into(),
                None,
                "standard".into(),
            ),
            json!({
                "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": { "name": "standard", "resourceVersion": "1",
                              "annotations": { "storageclass.kubernetes.io/is-default-class": "true" } },
                "provisioner": "rancher.io/local-path",
            }),
        );
        Store {
            objects,
            applied: BTreeMap::new(),
            denied: BTreeSet::new(),
            version: (1, 31),
            hold_rollouts: None,
            writes: Vec::new(),
            job_scripts: Vec::new(),
        }
    }
}

/// The path, split: prefix (`api/v1`, `apis/g/v`), namespace, resource, name.
fn parse(path: &str) -> Option<(String, Option<String>, String, Option<String>)> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (prefix, rest) = match parts.as_slice() {
        ["api", v, rest @ ..] => (format!("api/{v}"), rest),
        ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest),
        _ => return None,
    };
    match rest {
        ["namespaces", ns, resource] => {
            Some((prefix, Some(ns.to_string()), resource.to_string(), None))
        }
        ["namespaces", ns, resource, name] => Some((
            prefix,
            Some(ns.to_string()),
            resource.to_string(),
            Some(name.to_string()),
        )),
        [resource] => Some((prefix, None, resource.to_string(), None)),
        [resource, name] => Some((prefix, None, resource.to_string(), Some(name.to_string()))),
        _ => None,
    }
}

fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query().map(form_urlencoded).unwrap_or_default()
}

fn form_urlencoded(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Equality selectors (`k=v`, `k==v`, `k`), as the Pod list serves them.
pub fn labels_match(object: &Value, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = &object["metadata"]["labels"];
    selector.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => labels[k.trim_end_matches('=')].as_str() == Some(v),
        None => !labels[term].is_null(),
    })
}

fn not_found(resource: &str, name: &str) -> Response {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{resource} \"{name}\" not found"),
    )
}

/// Everything the Pod and claim routes do not serve.
pub async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if uri.path() == "/version" {
        let (major, minor) = shared.objects.lock().expect("objects").version;
        return ok_json(
            StatusCode::OK,
            &json!({
                "major": major.to_string(), "minor": minor.to_string(),
                "gitVersion": format!("v{major}.{minor}.0"), "gitCommit": "", "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc",
                "platform": "linux/amd64",
            }),
        );
    }
    let Some((prefix, ns, resource, name)) = parse(uri.path()) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("the double does not serve {uri}"),
        );
    };
    if resource == "persistentvolumeclaims" {
        return claims(&shared, &method, &uri, ns, name);
    }
    if let Some(missing) = unserved(&shared, &prefix, &resource) {
        return missing;
    }
    if resource == "selfsubjectaccessreviews" && method == Method::POST {
        return access_review(&shared, &body);
    }
    let q = query(&uri);
    match (method, name) {
        (Method::GET, Some(name)) => {
            let store = shared.objects.lock().expect("objects");
            match store
                .objects
                .get(&(prefix, resource.clone(), ns, name.clone()))
            {
                Some(o) => ok_json(StatusCode::OK, o),
                None => not_found(&resource, &name),
            }
        }
        (Method::GET, None) => {
            let store = shared.objects.lock().expect("objects");
            let items: Vec<&Value> = store
                .objects
                .iter()
                .filter(|((p, r, n, _), o)| {
                    *p == prefix
                        && *r == resource
                        && (ns.is_none() || *n == ns)
                        && labels_match(o, q.get("labelSelector"))
                })
                .map(|(_, o)| o)
                .collect();
            let rv = shared.inner.lock().expect("state").rv;
            ok_json(
                StatusCode::OK,
                &json!({ "apiVersion": "v1", "kind": "List", "metadata": { "resourceVersion": rv.to_string() }, "items": items }),
            )
        }
        (Method::PATCH, Some(name)) => {
            apply(&shared, &headers, &q, (prefix, resource, ns, name), &body)
        }
        (Method::DELETE, Some(name)) => {
            let mut store = shared.objects.lock().expect("objects");
            let key = (prefix, resource.clone(), ns, name.clone());
            store.applied.remove(&key);
            match store.objects.remove(&key) {
                Some(o) => {
                    store.writes.push(format!("DELETE {}", uri.path()));
                    ok_json(StatusCode::OK, &o)
                }
                None => not_found(&resource, &name),
            }
        }
        (method, _) => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("the double does not serve {method} {uri}"),
        ),
    }
}

/// Groups built into the API server; any other group is served only by a CRD.
fn built_in(group: &str) -> bool {
    !group.contains('.') || group.ends_with(".k8s.io")
}

/// `404` for a custom resource whose CRD does not exist or does not serve the
/// version, with the API server's own message.
fn unserved(shared: &Shared, prefix: &str, resource: &str) -> Option<Response> {
    let mut parts = prefix.split('/').skip(1);
    let (Some(group), Some(version)) = (parts.next(), parts.next()) else {
        return None;
    };
    if built_in(group) {
        return None;
    }
    let store = shared.objects.lock().expect("objects");
    let crd = store.objects.get(&(
        "apis/apiextensions.k8s.io/v1".to_owned(),
        "customresourcedefinitions".to_owned(),
        None,
        format!("{resource}.{group}"),
    ));
    let served = crd.is_some_and(|crd| {
        crd["spec"]["versions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["name"] == version && v["served"] == true)
    });
    (!served).then(|| {
        status(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        )
    })
}

fn apply(
    shared: &Shared,
    headers: &HeaderMap,
    q: &BTreeMap<String, String>,
    key: Key,
    body: &[u8],
) -> Response {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type != "application/apply-patch+yaml" {
        return status(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            &format!("the double serves server-side apply only, not {content_type:?}"),
        );
    }
    let Some(manager) = q.get("fieldManager").filter(|m| !m.is_empty()) else {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "fieldManager is required for apply patch",
        );
    };
    let applied: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("not an object: {e}"),
            )
        }
    };
    let (prefix, resource, ns, name) = &key;
    if applied["metadata"]["name"].as_str() != Some(name.as_str())
        || applied["kind"].as_str().is_none()
        || applied["apiVersion"].as_str().is_none()
    {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "apiVersion, kind and a metadata.name equal to the URL's are required",
        );
    }
    if let Some(ns) = ns {
        let body_ns = applied["metadata"]["namespace"].as_str();
        if body_ns.is_some_and(|b| b != ns) {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "the namespace of the object does not match the namespace of the request",
            );
        }
        let store = shared.objects.lock().expect("objects");
        let ns_key = (
            "api/v1".to_owned(),
            "namespaces".to_owned(),
            None,
            ns.clone(),
        );
        if !store.objects.contains_key(&ns_key) {
            return not_found("namespaces", ns);
        }
    }
    let mut store = shared.objects.lock().expect("objects");
    let previous = store.objects.get(&key).cloned();
    if let Some(previous) = previous
        .as_ref()
        .filter(|_| store.applied.get(&key) == Some(&applied))
    {
        return ok_json(StatusCode::OK, previous);
    }
    let rv = {
        let mut inner = shared.inner.lock().expect("state");
        inner.rv += 1;
        inner.rv
    };
    let mut stored = applied.clone();
    let meta = stored["metadata"]
        .as_object_mut()
        .expect("metadata is an object");
    if let Some(ns) = ns {
        meta.insert("namespace".into(), ns.clone().into());
    }
    let generation = previous
        .as_ref()
        .and_then(|p| p["metadata"]["generation"].as_i64())
        .unwrap_or(0)
        + 1;
    meta.insert("resourceVersion".into(), rv.to_string().into());
    meta.insert("generation".into(), generation.into());
    meta.insert(
        "uid".into(),
        previous.as_ref().map_or_else(
            || json!(format!("uid-{rv}")),
            |p| p["metadata"]["uid"].clone(),
        ),
    );
    meta.insert(
        "creationTimestamp".into(),
        previous.as_ref().map_or_else(
            || serde_json::to_value(now()).expect("time"),
            |p| p["metadata"]["creationTimestamp"].clone(),
        ),
    );
    meta.insert(
        "managedFields".into(),
        json!([{ "manager": manager, "operation": "Apply", "apiVersion": applied["apiVersion"] }]),
    );
    let script = store
        .job_scripts
        .iter()
        .find(|(prefix, _)| resource == "jobs" && name.starts_with(prefix.as_str()))
        .map(|(_, s)| s.clone());
    controllers(
        shared,
        &mut stored,
        resource,
        generation,
        store.hold_rollouts.clone(),
    );
    if let Some(script) = script {
        stored["status"] = run_job(shared, &stored, &script);
    }
    store
        .writes
        .push(format!("APPLY {prefix}/{resource}/{name}"));
    store.applied.insert(key.clone(), applied);
    store.objects.insert(key, stored.clone());
    let code = if previous.is_some() {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    ok_json(code, &stored)
}

/// Status as the controllers would write it at once: every replica ready (unless
/// rollouts are held), a Job complete, a StatefulSet's claims made.
fn controllers(
    shared: &Shared,
    o: &mut Value,
    resource: &str,
    generation: i64,
    hold: Option<String>,
) {
    match resource {
        "deployments" | "statefulsets" => {
            let replicas = o["spec"]["replicas"].as_i64().unwrap_or(1);
            let ready = if hold.is_some() { 0 } else { replicas };
            let mut status = json!({
                "observedGeneration": generation,
                "replicas": replicas,
                "readyReplicas": ready,
                "availableReplicas": ready,
                "updatedReplicas": replicas,
            });
            if let Some(why) = hold {
                status["conditions"] = json!([{
                    "type": "Available", "status": "False",
                    "reason": "MinimumReplicasUnavailable", "message": why,
                }]);
            }
            if resource == "statefulsets" {
                status["currentReplicas"] = replicas.into();
                status["currentRevision"] = "r1".into();
                status["updateRevision"] = "r1".into();
                make_claims(shared, o, replicas);
            }
            o["status"] = status;
        }
        "jobs" => {
            o["status"] = json!({
                "succeeded": 1,
                "conditions": [{ "type": "Complete", "status": "True" }],
            });
        }
        _ => {}
    }
}

/// Plays a scripted Job: makes its Pod (labelled as the Job controller labels it),
/// with each container's state and log, and returns the Job's status.
fn run_job(shared: &Shared, job: &Value, script: &JobScript) -> Value {
    use k8s_openapi::api::core::v1::{ContainerState, ContainerStateTerminated, Pod};
    let ns = job["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let job_name = job["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let uid = job["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let template = &job["spec"]["template"];
    let mut labels = template["metadata"]["labels"].clone();
    for (k, v) in [
        ("batch.kubernetes.io/job-name", &job_name),
        ("job-name", &job_name),
        ("batch.kubernetes.io/controller-uid", &uid),
        ("controller-uid", &uid),
    ] {
        labels[k] = v.clone().into();
    }
    let mut inner = shared.inner.lock().expect("state");
    inner.rv += 1;
    let rv = inner.rv;
    let pod_name = format!("{job_name}-{rv:05}");
    let mut pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod_name, "namespace": ns, "uid": format!("uid-{rv}"),
            "resourceVersion": rv.to_string(), "labels": labels,
            "creationTimestamp": serde_json::to_value(now()).expect("time"),
            "ownerReferences": [{ "apiVersion": "batch/v1", "kind": "Job", "name": job_name, "uid": uid, "controller": true, "blockOwnerDeletion": true }],
        },
        "spec": template["spec"],
        "status": { "phase": "Pending" },
    }))
    .expect("a Job's Pod template");
    let spec = pod.spec.clone().unwrap_or_default();
    let inits = spec.init_containers.clone().unwrap_or_default().len();
    let names: Vec<String> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .map(|c| c.name.clone())
        .collect();
    let mut logs = std::collections::HashMap::new();
    let mut failed = false;
    let mut running = false;
    for (i, name) in names.iter().enumerate() {
        let entry = script.containers.iter().find(|(c, _, _)| c == name);
        let state = match entry {
            _ if failed || running => super::waiting("PodInitializing", None),
            Some((_, code, log)) => {
                let buf = super::LogBuf::new();
                for line in log.lines() {
                    buf.append(line.as_bytes());
                }
                buf.close();
                logs.insert(name.clone(), buf);
                failed = *code != 0;
                ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: *code,
                        reason: Some(if *code == 0 { "Completed" } else { "Error" }.into()),
                        started_at: Some(now()),
                        finished_at: Some(now()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }
            }
            None if !script.finish => {
                running = true;
                logs.insert(name.clone(), super::LogBuf::new());
                ContainerState {
                    running: Some(k8s_openapi::api::core::v1::ContainerStateRunning {
                        started_at: Some(now()),
                    }),
                    ..Default::default()
                }
            }
            None => super::waiting("PodInitializing", None),
        };
        super::set_container(&mut pod, i, inits, name, state);
    }
    let status = pod.status.get_or_insert_with(Default::default);
    status.phase = Some(
        if failed {
            "Failed"
        } else if running {
            "Running"
        } else {
            "Succeeded"
        }
        .into(),
    );
    inner.pods.insert(
        (ns, pod_name.clone()),
        super::PodEntry {
            pod: pod.clone(),
            logs,
            kill: tokio_util::sync::CancellationToken::new(),
        },
    );
    inner.created.push(pod_name);
    super::record(&mut inner, shared, "ADDED", pod);
    if failed {
        json!({
            "failed": 1,
            "conditions": [
                { "type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit" },
                { "type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit" },
            ],
        })
    } else if running {
        json!({ "active": 1, "ready": 1 })
    } else {
        json!({
            "succeeded": 1,
            "conditions": [
                { "type": "SuccessCriteriaMet", "status": "True", "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods" },
                { "type": "Complete", "status": "True", "reason": "CompletionsReached", "message": "Reached expected number of succeeded pods" },
            ],
        })
    }
}

fn make_claims(shared: &Shared, set: &Value, replicas: i64) {
    let ns = set["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let set_name = set["metadata"]["name"].as_str().unwrap_or_default();
    let Some(templates) = set["spec"]["volumeClaimTemplates"].as_array() else {
        return;
    };
    let mut inner = shared.inner.lock().expect("state");
    for template in templates {
        for i in 0..replicas {
            let name = format!(
                "{}-{set_name}-{i}",
                template["metadata"]["name"].as_str().unwrap_or("data")
            );
            let key = (ns.clone(), name.clone());
            if inner.claims.contains_key(&key) {
                continue;
            }
            let mut claim: PersistentVolumeClaim =
                serde_json::from_value(template.clone()).expect("a claim template");
            claim.metadata.name = Some(name);
            claim.metadata.namespace = Some(ns.clone());
            inner.rv += 1;
            claim.metadata.resource_version = Some(inner.rv.to_string());
            inner.claims.insert(key, claim);
        }
    }
}

fn access_review(shared: &Shared, body: &[u8]) -> Response {
    let mut review: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("not a review: {e}"),
            )
        }
    };
    let attrs = &review["spec"]["resourceAttributes"];
    let verb = attrs["verb"].as_str().unwrap_or_default().to_owned();
    let mut resource = attrs["resource"].as_str().unwrap_or_default().to_owned();
    if let Some(sub) = attrs["subresource"].as_str().filter(|s| !s.is_empty()) {
        resource = format!("{resource}/{sub}");
    }
    let denied = shared
        .objects
        .lock()
        .expect("objects")
        .denied
        .contains(&(verb, resource));
    review["status"] = if denied {
        json!({ "allowed": false, "denied": true, "reason": "denied by the test double" })
    } else {
        json!({ "allowed": true })
    };
    ok_json(StatusCode::CREATED, &review)
}

/// Claims: listed by label and deleted here; created and read by the Pod side.
fn claims(
    shared: &Shared,
    method: &Method,
    uri: &Uri,
    ns: Option<String>,
    name: Option<String>,
) -> Response {
    let q = query(uri);
    let mut inner = shared.inner.lock().expect("state");
    match (method, name) {
        (&Method::GET, None) => {
            let items: Vec<Value> = inner
                .claims
                .iter()
                .filter(|((n, _), _)| ns.as_ref().is_none_or(|ns| ns == n))
                .map(|(_, c)| serde_json::to_value(c).expect("claim"))
                .filter(|c| labels_match(c, q.get("labelSelector")))
                .collect();
            ok_json(
                StatusCode::OK,
                &json!({ "apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": { "resourceVersion": inner.rv.to_string() }, "items": items }),
            )
        }
        (&Method::DELETE, Some(name)) => {
            match inner.claims.remove(&(ns.unwrap_or_default(), name.clone())) {
                Some(c) => {
                    drop(inner);
                    shared
                        .objects
                        .lock()
                        .expect("objects")
                        .writes
                        .push(format!("DELETE {}", uri.path()));
                    ok_json(StatusCode::OK, &c)
                }
                None => not_found("persistentvolumeclaims", &name),
            }
        }
        _ => status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            &format!("the double does not serve {method} {uri}"),
        ),
    }
}

// === impl KubeApi: what install tests turn and read ===

impl super::KubeApi {
    /// `SelfSubjectAccessReview`s for `verb` on `resource` (`deployments`,
    /// `pods/log`) answer "denied" from now on.
    pub fn deny(&self, verb: &str, resource: &str) {
        self.shared
            .objects
            .lock()
            .expect("objects")
            .denied
            .insert((verb.to_owned(), resource.to_owned()));
    }

    /// The version `/version` reports.
    pub fn set_version(&self, major: u32, minor: u32) {
        self.shared.objects.lock().expect("objects").version = (major, minor);
    }

    /// While `Some(why)`, applied Deployments and StatefulSets report no ready
    /// replica, with an `Available=False` condition carrying `why`.
    pub fn hold_rollouts(&self, why: Option<&str>) {
        self.shared.objects.lock().expect("objects").hold_rollouts = why.map(str::to_owned);
    }

    /// Installs KEDA's CustomResourceDefinition `scaledobjects.keda.sh` (served version
    /// `v1alpha1`, as KEDA 2.x ships it), so ScaledObjects can be applied.
    pub fn install_keda(&self) {
        let rv = {
            let mut inner = self.shared.inner.lock().expect("state");
            inner.rv += 1;
            inner.rv
        };
        let names = json!({
            "kind": "ScaledObject", "listKind": "ScaledObjectList", "plural": "scaledobjects",
            "singular": "scaledobject", "shortNames": ["so"],
        });
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {
                "name": "scaledobjects.keda.sh", "uid": format!("uid-{rv}"),
                "resourceVersion": rv.to_string(), "generation": 1,
                "creationTimestamp": serde_json::to_value(now()).expect("time"),
                "annotations": { "controller-gen.kubebuilder.io/version": "v0.16.5" },
                "labels": { "app.kubernetes.io/part-of": "keda-operator", "app.kubernetes.io/name": "keda-operator" },
            },
            "spec": {
                "group": "keda.sh",
                "names": names,
                "scope": "Namespaced",
                "versions": [{
                    "name": "v1alpha1", "served": true, "storage": true,
                    "schema": { "openAPIV3Schema": { "type": "object", "x-kubernetes-preserve-unknown-fields": true } },
                    "subresources": { "status": {} },
                }],
            },
            "status": {
                "acceptedNames": names,
                "storedVersions": ["v1alpha1"],
                "conditions": [
                    { "type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found" },
                    { "type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted" },
                ],
            },
        });
        self.shared.objects.lock().expect("objects").objects.insert(
            (
                "apis/apiextensions.k8s.io/v1".into(),
                "customresourcedefinitions".into(),
                None,
                "scaledobjects.keda.sh".into(),
            ),
            crd,
        );
    }

    /// Jobs applied from now on whose name starts with `prefix` get a Pod that runs as
    /// `script` says (see [`JobScript`]), and the Job the status that follows.
    pub fn script_jobs(&self, prefix: &str, script: JobScript) {
        self.shared
            .objects
            .lock()
            .expect("objects")
            .job_scripts
            .push((prefix.to_owned(), script));
    }

    /// Removes every StorageClass.
    pub fn remove_storage_classes(&self) {
        self.shared
            .objects
            .lock()
            .expect("objects")
            .objects
            .retain(|(_, resource, _, _), _| resource != "storageclasses");
    }

    /// Every stored object (besides Pods and claims), as the API returns it.
    pub fn objects(&self) -> Vec<Value> {
        self.shared
            .objects
            .lock()
            .expect("objects")
            .objects
            .values()
            .cloned()
            .collect()
    }

    /// What was last applied to each object (the body of its last changing apply).
    pub fn applied(&self) -> Vec<Value> {
        self.shared
            .objects
            .lock()
            .expect("objects")
            .applied
            .values()
            .cloned()
            .collect()
    }

    /// Applies that changed something, and deletes, in order (`APPLY …`, `DELETE …`).
    pub fn writes(&self) -> Vec<String> {
        self.shared.objects.lock().expect("objects").writes.clone()
    }
}
