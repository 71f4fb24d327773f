//! An HTTP test double of the Kubernetes API, for the parts the runner uses: Pods
//! (create, get, list, watch from a resourceVersion, delete, log with follow),
//! PersistentVolumeClaims (create, get) and Secrets (get), in the real wire format (k8s-openapi types,
//! `Status` errors, newline-delimited watch events). The real kube-rs client talks to
//! it over a real socket.
//!
//! It also plays the kubelet: a created Pod goes Pending → Running → Succeeded or
//! Failed, and each container's command runs as a local process (images are
//! ignored), one after another as the kubelet runs init containers, so exit codes
//! and logs are real. See `tests/KUBE_API_DOUBLE.md` for what it does not emulate.
//!
//! Faults on demand: 429 and 5xx responses, slow responses, dropped watches, and
//! `410 Gone` for watches resumed from a compacted resourceVersion.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PersistentVolumeClaim, Pod, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

mod objects;
pub use objects::JobScript;

/// One request as the double received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub at: Instant,
    pub version: http::Version,
    pub method: Method,
    /// Path and query.
    pub uri: String,
    /// The response's status.
    pub status: u16,
}

/// A scheduled failure: the next `count` requests whose path contains `path` get
/// `status`.
#[derive(Debug, Clone)]
struct Failure {
    status: StatusCode,
    path: String,
    count: usize,
    retry_after: Option<u64>,
}

#[derive(Debug, Default)]
struct Faults {
    failures: VecDeque<Failure>,
    delay: Duration,
    /// New Pods stay unscheduled (no node fits) while set.
    unschedulable: bool,
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    kind: &'static str,
    pod: Pod,
}

/// One container's output: bytes so far, and whether it has exited.
#[derive(Debug)]
struct LogBuf {
    data: Mutex<Vec<u8>>,
    state: watch::Sender<(usize, bool)>,
}

impl LogBuf {
    fn new() -> Arc<Self> {
        Arc::new(LogBuf {
            data: Mutex::new(Vec::new()),
            state: watch::channel((0, false)).0,
        })
    }

    fn append(&self, line: &[u8]) {
        let len = {
            let mut data = self.data.lock().expect("log lock");
            data.extend_from_slice(line);
            data.push(b'\n');
            data.len()
        };
        self.state.send_replace((len, false));
    }

    fn close(&self) {
        let len = self.data.lock().expect("log lock").len();
        self.state.send_replace((len, true));
    }

    fn slice(&self, from: usize) -> Vec<u8> {
        let data = self.data.lock().expect("log lock");
        data.get(from..).unwrap_or_default().to_vec()
    }
}

#[derive(Debug)]
struct PodEntry {
    pod: Pod,
    logs: HashMap<String, Arc<LogBuf>>,
    kill: CancellationToken,
}

#[derive(Debug, Default)]
struct Inner {
    rv: u64,
    /// Watches may resume from resourceVersions after this one; older get `410 Gone`.
    compacted: u64,
    pods: BTreeMap<(String, String), PodEntry>,
    /// Every Pod name ever created, for asserting "one Pod per run", and when.
    created: Vec<String>,
    created_at: HashMap<String, Instant>,
    claims: BTreeMap<(String, String), PersistentVolumeClaim>,
    secrets: BTreeMap<(String, String), BTreeMap<String, String>>,
    /// Reads of those Secrets are refused, as for a Role without `get` on `secrets`.
    secret_reads_forbidden: bool,
    history: VecDeque<Change>,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Change>,
    faults: Mutex<Faults>,
    requests: Mutex<Vec<Recorded>>,
    /// Each accepted connection: the protocol agreed on (ALPN), and whether it is
    /// still open.
    connections: Mutex<Vec<(http::Version, bool)>>,
    watch_epoch: watch::Sender<u64>,
    /// Bumped to end every open log follow, as an API server or a proxy dropping it.
    log_epoch: watch::Sender<u64>,
    root: PathBuf,
    /// Load tests: containers print one line and run this long instead of running
    /// their commands.
    simulate: Option<Duration>,
    /// Everything but Pods and claims: what `sluice install` applies and reads.
    objects: Mutex<objects::Store>,
}

/// The running double.
#[derive(Debug)]
pub struct KubeApi {
    pub addr: SocketAddr,
    /// The certificate the double serves (self-signed), to trust.
    ca_pem: String,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    _root: tempfile::TempDir,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Ok(inner) = self.shared.inner.lock() {
            for entry in inner.pods.values() {
                entry.kill.cancel();
            }
        }
    }
}

impl KubeApi {
    pub async fn start() -> KubeApi {
        Self::start_inner(None, true).await
    }

    /// A double that does not offer HTTP/2, like a proxy that speaks only HTTP/1.1.
    pub async fn start_http1_only() -> KubeApi {
        Self::start_inner(None, false).await
    }

    /// A double whose kubelet does not run commands: every container prints one line
    /// and exits 0 after `run_for`. For load tests with thousands of Pods.
    pub async fn start_simulated(run_for: Duration) -> KubeApi {
        Self::start_inner(Some(run_for), true).await
    }

    async fn start_inner(simulate: Option<Duration>, http2: bool) -> KubeApi {
        let root = tempfile::tempdir().expect("temp dir");
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            changes: broadcast::channel(65_536).0,
            faults: Mutex::new(Faults::default()),
            requests: Mutex::new(Vec::new()),
            connections: Mutex::new(Vec::new()),
            watch_epoch: watch::channel(0).0,
            log_epoch: watch::channel(0).0,
            root: root.path().to_owned(),
            simulate,
            objects: Mutex::new(objects::Store::default()),
        });
        let app = Router::new()
            .route(
                "/api/v1/namespaces/{ns}/pods",
                get(pods_get).post(pod_create),
            )
            .route(
                "/api/v1/namespaces/{ns}/pods/{name}",
                get(pod_get).delete(pod_delete),
            )
            .route("/api/v1/namespaces/{ns}/pods/{name}/log", get(pod_log))
            .route(
                "/api/v1/namespaces/{ns}/secrets/{name}",
                get(secret_get).fallback(objects::handle),
            )
            .route(
                "/api/v1/namespaces/{ns}/persistentvolumeclaims",
                axum::routing::post(claim_create).get(objects::handle),
            )
            .route(
                "/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}",
                get(claim_get).delete(objects::handle),
            )
            .fallback(objects::handle)
            .layer(axum::middleware::from_fn_with_state(shared.clone(), faults))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (ca_pem, tls) = tls_config(http2);
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, tls, app, shared.clone(), shutdown.clone()));
        KubeApi {
            addr,
            ca_pem,
            shared,
            shutdown,
            _root: root,
        }
    }

    /// A kube-rs configuration pointing at the double, namespace `default`.
    pub fn config(&self) -> kube::Config {
        let mut config = kube::Config::new(self.url().parse().expect("double URL"));
        config.default_namespace = "default".into();
        config.root_cert = Some(vec![pem_der(&self.ca_pem)]);
        config
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A kubeconfig file pointing at the double (as `KUBECONFIG` for a `sluice runner`
    /// process), trusting its certificate.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        use base64::Engine;
        let path = dir.join("kubeconfig");
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let body = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: nobody\n    namespace: default\ncurrent-context: double\nusers:\n- name: nobody\n  user: {{}}\n",
            self.url()
        );
        std::fs::write(&path, body).expect("kubeconfig");
        path
    }

    /// The protocol of each connection accepted so far, in order — `HTTP_2` where
    /// both sides offered it (ALPN), `HTTP_11` otherwise — and whether it is open.
    pub fn connections(&self) -> Vec<(http::Version, bool)> {
        self.shared.connections.lock().expect("connections").clone()
    }

    /// The next `count` requests whose path contains `path` fail with `status`
    /// (with `Retry-After: 0` on 429, so retries are fast but real).
    pub fn fail_next(&self, count: usize, status: u16, path: &str) {
        let status = StatusCode::from_u16(status).expect("status");
        self.shared
            .faults
            .lock()
            .expect("faults")
            .failures
            .push_back(Failure {
                status,
                path: path.to_owned(),
                count,
                retry_after: (status == StatusCode::TOO_MANY_REQUESTS).then_some(0),
            });
    }

    /// Every response waits this long first.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.faults.lock().expect("faults").delay = delay;
    }

    /// While true, new Pods stay Pending with no node that fits.
    pub fn set_unschedulable(&self, on: bool) {
        self.shared.faults.lock().expect("faults").unschedulable = on;
    }

    /// Ends every open watch, as an API server restart or a load balancer would.
    /// Ends every open log follow (`follow=true`) cleanly while its container runs on:
    /// the client must open it again, and gets the whole log from its first line.
    pub fn drop_log_streams(&self) {
        self.shared.log_epoch.send_modify(|e| *e += 1);
    }

    pub fn drop_watches(&self) {
        self.shared.watch_epoch.send_modify(|e| *e += 1);
    }

    /// Forgets the change history: a watch resumed from an older resourceVersion
    /// gets `410 Gone` and the client must list again.
    pub fn compact(&self) {
        let mut inner = self.shared.inner.lock().expect("state");
        inner.compacted = inner.rv;
        inner.history.clear();
    }

    /// Stores a Secret whose keys steps get as env and files.
    pub fn put_secret(&self, name: &str, data: &[(&str, &str)]) {
        let data = data
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.shared
            .inner
            .lock()
            .expect("state")
            .secrets
            .insert(("default".into(), name.into()), data);
    }

    /// Refuses (403) reads of the Secrets stored with [`KubeApi::put_secret`] while set,
    /// as the API does when the runner's Role lacks `get` on `secrets`.
    pub fn forbid_secret_reads(&self, on: bool) {
        self.shared
            .inner
            .lock()
            .expect("state")
            .secret_reads_forbidden = on;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("requests").clone()
    }

    /// The Pods that exist now.
    pub fn pods(&self) -> Vec<Pod> {
        let inner = self.shared.inner.lock().expect("state");
        inner.pods.values().map(|e| e.pod.clone()).collect()
    }

    pub fn pod(&self, name: &str) -> Option<Pod> {
        let inner = self.shared.inner.lock().expect("state");
        inner
            .pods
            .get(&("default".to_owned(), name.to_owned()))
            .map(|e| e.pod.clone())
    }

    /// When each Pod was created (the create request reached the double).
    pub fn created_at(&self) -> HashMap<String, Instant> {
        self.shared.inner.lock().expect("state").created_at.clone()
    }

    /// Names of every Pod ever created (a name twice means a duplicate).
    pub fn created(&self) -> Vec<String> {
        self.shared.inner.lock().expect("state").created.clone()
    }

    pub fn claims(&self) -> Vec<PersistentVolumeClaim> {
        let inner = self.shared.inner.lock().expect("state");
        inner.claims.values().cloned().collect()
    }

    /// The host folder behind a claim (what its Pods wrote there).
    pub fn claim_dir(&self, name: &str) -> PathBuf {
        self.shared.root.join("claims").join(name)
    }
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response {
    let body = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code.as_u16(),
    });
    (
        code,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok_json(code: StatusCode, value: &impl serde::Serialize) -> Response {
    let body = serde_json::to_vec(value).expect("json");
    (code, [("content-type", "application/json")], body).into_response()
}

/// Records the request, then applies any scheduled fault.
async fn faults(
    State(shared): State<Arc<Shared>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let uri = req.uri().to_string();
    let (at, method, version) = (Instant::now(), req.method().clone(), req.version());
    let response = respond(&shared, req, next, &uri).await;
    shared.requests.lock().expect("requests").push(Recorded {
        at,
        version,
        method,
        uri,
        status: response.status().as_u16(),
    });
    response
}

async fn respond(
    shared: &Shared,
    req: axum::extract::Request,
    next: axum::middleware::Next,
    uri: &str,
) -> Response {
    let (failure, delay) = {
        let mut faults = shared.faults.lock().expect("faults");
        let mut hit = None;
        if let Some(f) = faults
            .failures
            .iter_mut()
            .find(|f| uri.contains(f.path.as_str()))
        {
            f.count -= 1;
            hit = Some(f.clone());
        }
        faults.failures.retain(|f| f.count > 0);
        (hit, faults.delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some(f) = failure {
        let mut response = status(f.status, "InjectedFault", "injected by the test double");
        if let Some(secs) = f.retry_after {
            response
                .headers_mut()
                .insert("retry-after", secs.to_string().parse().expect("header"));
        }
        return response;
    }
    next.run(req).await
}

fn matches_labels(pod: &Pod, selector: Option<&String>) -> bool {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    selector.split(',').all(|term| match term.split_once('=') {
        Some((k, v)) => labels.get(k.trim_end_matches('=')).map(String::as_str) == Some(v),
        None => labels.contains_key(term),
    })
}

fn record(inner: &mut Inner, shared: &Shared, kind: &'static str, pod: Pod) {
    let change = Change {
        rv: inner.rv,
        kind,
        pod,
    };
    inner.history.push_back(change.clone());
    if inner.history.len() > 100_000 {
        if let Some(old) = inner.history.pop_front() {
            inner.compacted = old.rv;
        }
    }
    let _ = shared.changes.send(change);
}

/// Applies `f` to a stored Pod as the kubelet would, bumping its resourceVersion.
fn update(shared: &Shared, ns: &str, name: &str, f: impl FnOnce(&mut Pod)) -> bool {
    let mut inner = shared.inner.lock().expect("state");
    inner.rv += 1;
    let rv = inner.rv;
    let Some(entry) = inner.pods.get_mut(&(ns.to_owned(), name.to_owned())) else {
        return false;
    };
    f(&mut entry.pod);
    entry.pod.metadata.resource_version = Some(rv.to_string());
    let pod = entry.pod.clone();
    record(&mut inner, shared, "MODIFIED", pod);
    true
}

async fn pods_get(
    State(shared): State<Arc<Shared>>,
    UrlPath(ns): UrlPath<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let selector = q.get("labelSelector");
    if q.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return pod_watch(
            shared,
            ns,
            selector.cloned(),
            q.get("resourceVersion").cloned(),
            q.get("timeoutSeconds").and_then(|t| t.parse().ok()),
        );
    }
    let inner = shared.inner.lock().expect("state");
    let items: Vec<&Pod> = inner
        .pods
        .iter()
        .filter(|((n, _), e)| n == &ns && matches_labels(&e.pod, selector))
        .map(|(_, e)| &e.pod)
        .collect();
    ok_json(
        StatusCode::OK,
        &json!({
            "kind": "PodList",
            "apiVersion": "v1",
            "metadata": { "resourceVersion": inner.rv.to_string() },
            "items": items,
        }),
    )
}

fn watch_line(kind: &str, object: &impl serde::Serialize) -> Bytes {
    let mut line = serde_json::to_vec(&json!({ "type": kind, "object": object })).expect("json");
    line.push(b'\n');
    Bytes::from(line)
}

fn pod_watch(
    shared: Arc<Shared>,
    ns: String,
    selector: Option<String>,
    from: Option<String>,
    timeout_secs: Option<u64>,
) -> Response {
    let mut epoch = shared.watch_epoch.subscribe();
    epoch.borrow_and_update();
    let (mut live, replay, gone) = {
        let inner = shared.inner.lock().expect("state");
        let from: u64 = from.and_then(|f| f.parse().ok()).unwrap_or(inner.rv);
        let live = shared.changes.subscribe();
        if from < inner.compacted {
            (live, Vec::new(), true)
        } else {
            let replay: Vec<Change> = inner
                .history
                .iter()
                .filter(|c| c.rv > from)
                .cloned()
                .collect();
            (live, replay, false)
        }
    };
    if gone {
        let expired = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": "too old resource version", "reason": "Expired", "code": 410,
        });
        let body = Body::from(watch_line("ERROR", &expired));
        return (StatusCode::OK, [("content-type", "application/json")], body).into_response();
    }
    let last_replayed = replay.last().map(|c| c.rv).unwrap_or(0);
    let wanted = move |c: &Change| {
        c.pod.metadata.namespace.as_deref() == Some(ns.as_str())
            && matches_labels(&c.pod, selector.as_ref())
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(1024);
    tokio::spawn(async move {
        for c in replay.iter().filter(|c| wanted(c)) {
            if tx.send(Ok(watch_line(c.kind, &c.pod))).await.is_err() {
                return;
            }
        }
        let until = tokio::time::Instant::now() + Duration::from_secs(timeout_secs.unwrap_or(1800));
        loop {
            let change = tokio::select! {
                change = live.recv() => change,
                _ = epoch.changed() => return,
                () = tokio::time::sleep_until(until) => return,
            };
            match change {
                Ok(c) if c.rv > last_replayed && wanted(&c) => {
                    if tx.send(Ok(watch_line(c.kind, &c.pod))).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                // Fell behind: end the watch; the client resumes or re-lists.
                Err(broadcast::error::RecvError::Lagged(_)) => return,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let body = Body::from_stream(tokio_stream(rx));
    (StatusCode::OK, [("content-type", "application/json")], body).into_response()
}

fn tokio_stream<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

async fn pod_create(
    State(shared): State<Arc<Shared>>,
    UrlPath(ns): UrlPath<String>,
    body: Bytes,
) -> Response {
    let mut pod: Pod = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("not a Pod: {e}"),
            )
        }
    };
    let Some(name) = pod.metadata.name.clone() else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name is required",
        );
    };
    let kill = CancellationToken::new();
    let created = {
        let mut inner = shared.inner.lock().expect("state");
        let key = (ns.clone(), name.clone());
        if inner.pods.contains_key(&key) {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("pods \"{name}\" already exists"),
            );
        }
        inner.rv += 1;
        pod.metadata.namespace = Some(ns.clone());
        pod.metadata.uid = Some(format!("uid-{}", inner.rv));
        pod.metadata.resource_version = Some(inner.rv.to_string());
        pod.metadata.creation_timestamp = Some(now());
        pod.status = Some(PodStatus {
            phase: Some("Pending".into()),
            ..Default::default()
        });
        inner.pods.insert(
            key,
            PodEntry {
                pod: pod.clone(),
                logs: HashMap::new(),
                kill: kill.clone(),
            },
        );
        inner.created.push(name.clone());
        inner.created_at.insert(name.clone(), Instant::now());
        record(&mut inner, &shared, "ADDED", pod.clone());
        pod
    };
    tokio::spawn(kubelet(shared.clone(), ns, name, kill));
    ok_json(StatusCode::CREATED, &created)
}

async fn pod_get(
    State(shared): State<Arc<Shared>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    let inner = shared.inner.lock().expect("state");
    match inner.pods.get(&(ns, name.clone())) {
        Some(e) => ok_json(StatusCode::OK, &e.pod),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods \"{name}\" not found"),
        ),
    }
}

/// A Secret stored with [`KubeApi::put_secret`], as a `v1 Secret` (`data` in base64);
/// any other is one `sluice install` applied, served from the object store.
async fn secret_get(
    State(shared): State<Arc<Shared>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    method: Method,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let found = {
        let inner = shared.inner.lock().expect("state");
        if inner.secret_reads_forbidden {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                &format!(
                    "secrets \"{name}\" is forbidden: User \"system:serviceaccount:sluice:sluice-runner\" \
                     cannot get resource \"secrets\" in API group \"\" in the namespace \"{ns}\""
                ),
            );
        }
        inner.secrets.get(&(ns.clone(), name.clone())).cloned()
    };
    let Some(data) = found else {
        return objects::handle(State(shared), method, uri, headers, body).await;
    };
    let secret = k8s_openapi::api::core::v1::Secret {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns),
            uid: Some(format!("uid-secret-{name}")),
            resource_version: Some("1".into()),
            ..Default::default()
        },
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k, k8s_openapi::ByteString(v.into_bytes())))
                .collect(),
        ),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    ok_json(StatusCode::OK, &secret)
}

async fn pod_delete(
    State(shared): State<Arc<Shared>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    let mut inner = shared.inner.lock().expect("state");
    let Some(mut entry) = inner.pods.remove(&(ns, name.clone())) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("pods \"{name}\" not found"),
        );
    };
    entry.kill.cancel();
    for log in entry.logs.values() {
        log.close();
    }
    inner.rv += 1;
    entry.pod.metadata.deletion_timestamp = Some(now());
    entry.pod.metadata.resource_version = Some(inner.rv.to_string());
    let pod = entry.pod.clone();
    record(&mut inner, &shared, "DELETED", pod.clone());
    ok_json(StatusCode::OK, &pod)
}

async fn pod_log(
    State(shared): State<Arc<Shared>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let container = q.get("container").cloned().unwrap_or_default();
    let follow = q.get("follow").is_some_and(|f| f == "true");
    let buf = {
        let inner = shared.inner.lock().expect("state");
        let Some(entry) = inner.pods.get(&(ns, name.clone())) else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("pods \"{name}\" not found"),
            );
        };
        match entry.logs.get(&container) {
            Some(b) => b.clone(),
            None => {
                return status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    &format!("container \"{container}\" in pod \"{name}\" is waiting to start: PodInitializing"),
                )
            }
        }
    };
    if !follow {
        return (StatusCode::OK, buf.slice(0)).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, Infallible>>(64);
    let mut dropped = shared.log_epoch.subscribe();
    tokio::spawn(async move {
        let mut state = buf.state.subscribe();
        let mut sent = 0;
        loop {
            let (len, closed) = *state.borrow_and_update();
            if len > sent {
                let bytes = buf.slice(sent);
                sent += bytes.len();
                if tx.send(Ok(Bytes::from(bytes))).await.is_err() {
                    return;
                }
            }
            if closed && sent >= len {
                return;
            }
            tokio::select! {
                changed = state.changed() => if changed.is_err() {
                    return;
                },
                _ = dropped.changed() => return,
            }
        }
    });
    (StatusCode::OK, Body::from_stream(tokio_stream(rx))).into_response()
}

async fn claim_create(
    State(shared): State<Arc<Shared>>,
    UrlPath(ns): UrlPath<String>,
    body: Bytes,
) -> Response {
    let mut claim: PersistentVolumeClaim = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                &format!("not a claim: {e}"),
            )
        }
    };
    let Some(name) = claim.metadata.name.clone() else {
        return status(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid",
            "metadata.name is required",
        );
    };
    let mut inner = shared.inner.lock().expect("state");
    if inner.claims.contains_key(&(ns.clone(), name.clone())) {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            &format!("persistentvolumeclaims \"{name}\" already exists"),
        );
    }
    let dir = shared.root.join("claims").join(&name);
    let _ = std::fs::create_dir_all(&dir);
    // Volume cloning: a claim with another claim as its data source starts as a copy.
    if let Some(source) = claim.spec.as_ref().and_then(|s| s.data_source.as_ref()) {
        if source.kind == "PersistentVolumeClaim" {
            copy_dir(&shared.root.join("claims").join(&source.name), &dir);
        }
    }
    inner.rv += 1;
    claim.metadata.namespace = Some(ns.clone());
    claim.metadata.resource_version = Some(inner.rv.to_string());
    claim.metadata.creation_timestamp = Some(now());
    inner.claims.insert((ns, name), claim.clone());
    ok_json(StatusCode::CREATED, &claim)
}

async fn claim_get(
    State(shared): State<Arc<Shared>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    let inner = shared.inner.lock().expect("state");
    match inner.claims.get(&(ns, name.clone())) {
        Some(c) => ok_json(StatusCode::OK, c),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("persistentvolumeclaims \"{name}\" not found"),
        ),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let Ok(entries) = std::fs::read_dir(from) else {
        return;
    };
    for entry in entries.flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            let _ = std::fs::create_dir_all(&target);
            copy_dir(&entry.path(), &target);
        } else {
            let _ = std::fs::copy(entry.path(), &target);
        }
    }
}

fn container_status(name: &str, state: ContainerState) -> ContainerStatus {
    ContainerStatus {
        name: name.to_owned(),
        image: String::new(),
        image_id: String::new(),
        ready: false,
        restart_count: 0,
        started: Some(state.running.is_some()),
        state: Some(state),
        ..Default::default()
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message,
        }),
        ..Default::default()
    }
}

/// Sets the status of container `index` (init containers first, then the rest).
fn set_container(pod: &mut Pod, index: usize, inits: usize, name: &str, state: ContainerState) {
    let status = pod.status.get_or_insert_with(Default::default);
    let list = if index < inits {
        status.init_container_statuses.get_or_insert_with(Vec::new)
    } else {
        status.container_statuses.get_or_insert_with(Vec::new)
    };
    match list.iter_mut().find(|c| c.name == name) {
        Some(c) => {
            c.started = Some(state.running.is_some());
            c.state = Some(state);
        }
        None => list.push(container_status(name, state)),
    }
}

/// The kubelet: schedules the Pod, runs its containers in order as local processes,
/// and records their states, exit codes and output.
async fn kubelet(shared: Arc<Shared>, ns: String, name: String, kill: CancellationToken) {
    // Scheduling: wait while no node fits.
    loop {
        let unschedulable = shared.faults.lock().expect("faults").unschedulable;
        if !unschedulable {
            break;
        }
        update(&shared, &ns, &name, |pod| {
            let status = pod.status.get_or_insert_with(Default::default);
            status.conditions = Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("0/3 nodes are available: 3 Insufficient cpu.".into()),
                ..Default::default()
            }]);
        });
        tokio::select! {
            () = kill.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
    let Some(pod) = shared
        .inner
        .lock()
        .expect("state")
        .pods
        .get(&(ns.clone(), name.clone()))
        .map(|e| e.pod.clone())
    else {
        return;
    };
    let spec = pod.spec.clone().unwrap_or_default();
    let inits = spec.init_containers.clone().unwrap_or_default();
    let all: Vec<_> = inits
        .iter()
        .chain(spec.containers.iter())
        .cloned()
        .collect();
    if let Some(run_for) = shared.simulate {
        return simulate(&shared, &ns, &name, &kill, &all, inits.len(), run_for).await;
    }
    let workdir = shared.root.join("pods").join(&name);
    let volumes = match prepare_volumes(&shared, &ns, &pod, &workdir) {
        Ok(v) => v,
        Err(e) => {
            update(&shared, &ns, &name, |pod| {
                let status = pod.status.get_or_insert_with(Default::default);
                status.phase = Some("Failed".into());
                status.message = Some(e.clone());
            });
            return;
        }
    };
    let deadline = spec
        .active_deadline_seconds
        .map(|s| tokio::time::Instant::now() + Duration::from_secs(s.max(0) as u64));
    update(&shared, &ns, &name, |pod| {
        let status = pod.status.get_or_insert_with(Default::default);
        status.start_time = Some(now());
        status.host_ip = Some("127.0.0.1".into());
        status.conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "True".into(),
            ..Default::default()
        }]);
        for (i, c) in all.iter().enumerate() {
            set_container(
                pod,
                i,
                inits.len(),
                &c.name,
                waiting("PodInitializing", None),
            );
        }
    });

    for (i, container) in all.iter().enumerate() {
        // Secrets must exist, as for the real kubelet.
        let mut env: Vec<(String, String)> = Vec::new();
        let mut missing = None;
        for from in container.env_from.iter().flatten() {
            if let Some(r) = &from.secret_ref {
                let inner = shared.inner.lock().expect("state");
                match inner.secrets.get(&(ns.clone(), r.name.clone())) {
                    Some(data) => env.extend(data.clone()),
                    None => missing = Some(r.name.clone()),
                }
            }
        }
        if let Some(secret) = missing {
            update(&shared, &ns, &name, |pod| {
                set_container(
                    pod,
                    i,
                    inits.len(),
                    &container.name,
                    waiting(
                        "CreateContainerConfigError",
                        Some(format!("secret \"{secret}\" not found")),
                    ),
                );
            });
            kill.cancelled().await;
            return;
        }
        for e in container.env.iter().flatten() {
            env.push((
                e.name.clone(),
                volumes.rewrite(e.value.as_deref().unwrap_or("")),
            ));
        }
        let log = LogBuf::new();
        let started = now();
        {
            let mut inner = shared.inner.lock().expect("state");
            if let Some(entry) = inner.pods.get_mut(&(ns.clone(), name.clone())) {
                entry.logs.insert(container.name.clone(), log.clone());
            }
        }
        if !update(&shared, &ns, &name, |pod| {
            let status = pod.status.get_or_insert_with(Default::default);
            if i >= inits.len() {
                status.phase = Some("Running".into());
            }
            set_container(
                pod,
                i,
                inits.len(),
                &container.name,
                ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: Some(started.clone()),
                    }),
                    ..Default::default()
                },
            );
        }) {
            return;
        }
        let command: Vec<String> = container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten())
            .map(|a| volumes.rewrite(a))
            .collect();
        let cwd = volumes.rewrite(container.working_dir.as_deref().unwrap_or("/"));
        let end = run_process(&command, &env, Path::new(&cwd), &log, &kill, deadline).await;
        log.close();
        let (code, reason, pod_failure) = match end {
            ProcessEnd::Exited(code) => (code, if code == 0 { "Completed" } else { "Error" }, None),
            ProcessEnd::Deadline => (137, "Error", Some("DeadlineExceeded")),
            ProcessEnd::Killed => return,
            ProcessEnd::CannotStart(e) => {
                log.append(e.as_bytes());
                (128, "StartError", None)
            }
        };
        let alive = update(&shared, &ns, &name, |pod| {
            set_container(
                pod,
                i,
                inits.len(),
                &container.name,
                ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: code,
                        reason: Some(reason.into()),
                        started_at: Some(started.clone()),
                        finished_at: Some(now()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
            let status = pod.status.get_or_insert_with(Default::default);
            if let Some(why) = pod_failure {
                status.phase = Some("Failed".into());
                status.reason = Some(why.into());
                status.message =
                    Some("Pod was active on the node longer than the specified deadline".into());
            } else if code != 0 {
                status.phase = Some("Failed".into());
            } else if i + 1 == all.len() {
                status.phase = Some("Succeeded".into());
            }
        });
        if !alive || code != 0 {
            return;
        }
    }
}

/// The load-test kubelet: each container prints a line and succeeds after `run_for`.
async fn simulate(
    shared: &Shared,
    ns: &str,
    name: &str,
    kill: &CancellationToken,
    all: &[k8s_openapi::api::core::v1::Container],
    inits: usize,
    run_for: Duration,
) {
    for (i, container) in all.iter().enumerate() {
        let log = LogBuf::new();
        let started = now();
        {
            let mut inner = shared.inner.lock().expect("state");
            if let Some(entry) = inner.pods.get_mut(&(ns.to_owned(), name.to_owned())) {
                entry.logs.insert(container.name.clone(), log.clone());
            }
        }
        update(shared, ns, name, |pod| {
            if i >= inits {
                pod.status.get_or_insert_with(Default::default).phase = Some("Running".into());
            }
            let state = ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(started.clone()),
                }),
                ..Default::default()
            };
            set_container(pod, i, inits, &container.name, state);
        });
        log.append(format!("simulated {}", container.name).as_bytes());
        tokio::select! {
            () = kill.cancelled() => return,
            () = tokio::time::sleep(run_for) => {}
        }
        log.close();
        update(shared, ns, name, |pod| {
            let state = ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: 0,
                    reason: Some("Completed".into()),
                    started_at: Some(started.clone()),
                    finished_at: Some(now()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            set_container(pod, i, inits, &container.name, state);
            if i + 1 == all.len() {
                pod.status.get_or_insert_with(Default::default).phase = Some("Succeeded".into());
            }
        });
    }
}

enum ProcessEnd {
    Exited(i32),
    Deadline,
    Killed,
    CannotStart(String),
}

async fn run_process(
    command: &[String],
    env: &[(String, String)],
    cwd: &Path,
    log: &Arc<LogBuf>,
    kill: &CancellationToken,
    deadline: Option<tokio::time::Instant>,
) -> ProcessEnd {
    let Some((program, args)) = command.split_first() else {
        return ProcessEnd::CannotStart(
            "no command: the double ignores images and their entrypoints".into(),
        );
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return ProcessEnd::CannotStart(format!("cannot start {program}: {e}")),
    };
    let group = child.id().and_then(|p| i32::try_from(p).ok());
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|o| Box::new(o) as Box<dyn AsyncRead + Send + Unpin>),
        child
            .stderr
            .take()
            .map(|e| Box::new(e) as Box<dyn AsyncRead + Send + Unpin>),
    ]
    .into_iter()
    .flatten()
    .map(|reader| {
        let log = log.clone();
        tokio::spawn(async move {
            // Bytes as written, like a container runtime's log: not necessarily
            // UTF-8, lines of any length.
            let mut reader = BufReader::new(reader);
            let mut line = Vec::new();
            while reader.read_until(b'\n', &mut line).await.unwrap_or(0) > 0 {
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                log.append(&line);
                line.clear();
            }
        })
    })
    .collect();
    let end = tokio::select! {
        status = child.wait() => ProcessEnd::Exited(status.ok().and_then(|s| s.code()).unwrap_or(137)),
        () = kill.cancelled() => ProcessEnd::Killed,
        () = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => ProcessEnd::Deadline,
    };
    if let Some(pid) = group {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.wait().await;
    for r in readers {
        let _ = r.await;
    }
    end
}

/// Mount paths mapped to host folders.
#[derive(Debug, Default)]
struct Volumes {
    /// (mount path, host path), longest mount path first.
    mounts: Vec<(String, PathBuf)>,
}

impl Volumes {
    /// Replaces mount paths in a command, env value or working dir with host folders.
    fn rewrite(&self, s: &str) -> String {
        let mut out = s.to_owned();
        for (mount, host) in &self.mounts {
            out = out.replace(mount.as_str(), &host.to_string_lossy());
        }
        out
    }
}

/// Makes the Pod's volumes as host folders: `emptyDir` per Pod, claims shared, Secrets
/// as files. A mount inside another mount becomes a symlink there.
fn prepare_volumes(
    shared: &Shared,
    ns: &str,
    pod: &Pod,
    workdir: &Path,
) -> Result<Volumes, String> {
    let spec = pod.spec.clone().unwrap_or_default();
    let mut sources: HashMap<String, PathBuf> = HashMap::new();
    for v in spec.volumes.iter().flatten() {
        let dir = if v.empty_dir.is_some() {
            workdir.join(&v.name)
        } else if let Some(c) = &v.persistent_volume_claim {
            let known = shared
                .inner
                .lock()
                .expect("state")
                .claims
                .contains_key(&(ns.to_owned(), c.claim_name.clone()));
            if !known {
                return Err(format!(
                    "persistentvolumeclaim \"{}\" not found",
                    c.claim_name
                ));
            }
            shared.root.join("claims").join(&c.claim_name)
        } else if let Some(s) = &v.secret {
            let dir = workdir.join("secrets").join(&v.name);
            let secret = s.secret_name.clone().unwrap_or_default();
            let data = shared
                .inner
                .lock()
                .expect("state")
                .secrets
                .get(&(ns.to_owned(), secret))
                .cloned()
                .unwrap_or_default();
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            for (k, value) in data {
                std::fs::write(dir.join(k), value).map_err(|e| e.to_string())?;
            }
            dir
        } else {
            return Err(format!(
                "volume {}: only emptyDir, persistentVolumeClaim and secret are emulated",
                v.name
            ));
        };
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        sources.insert(v.name.clone(), dir);
    }
    let mut mounts: BTreeMap<String, PathBuf> = BTreeMap::new();
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in containers {
        for m in c.volume_mounts.iter().flatten() {
            let Some(base) = sources.get(&m.name) else {
                return Err(format!("volume {} is not defined", m.name));
            };
            let host = match &m.sub_path {
                Some(sub) => base.join(sub),
                None => base.clone(),
            };
            std::fs::create_dir_all(&host).map_err(|e| e.to_string())?;
            mounts.insert(m.mount_path.clone(), host);
        }
    }
    // Nested mounts (a cache inside /workspace) are symlinks inside their parent.
    let paths: Vec<String> = mounts.keys().cloned().collect();
    let mut top = Vec::new();
    for path in &paths {
        let parent = paths
            .iter()
            .filter(|p| *p != path && path.starts_with(&format!("{p}/")))
            .max_by_key(|p| p.len());
        match parent {
            Some(parent) => {
                let link = mounts[parent].join(&path[parent.len() + 1..]);
                if let Some(dir) = link.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
                }
                let _ = std::fs::remove_dir(&link);
                std::os::unix::fs::symlink(&mounts[path], &link).map_err(|e| e.to_string())?;
            }
            None => top.push((path.clone(), mounts[path].clone())),
        }
    }
    top.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
    Ok(Volumes { mounts: top })
}

/// A self-signed certificate for 127.0.0.1 and a TLS configuration offering HTTP/2
/// and HTTP/1.1, as API servers do (or HTTP/1.1 only).
fn tls_config(http2: bool) -> (String, Arc<rustls::ServerConfig>) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("certificate");
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(rustls::pki_types::PrivatePkcs8KeyDer::from(
        cert.signing_key.serialize_der(),
    ));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.cert.der().clone()], key)
        .expect("TLS config");
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    (cert.cert.pem(), Arc::new(config))
}

fn pem_der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM")
}

/// Accepts TLS connections until `stop`, serving HTTP/1.1 or HTTP/2 as agreed; the
/// connections end with it.
async fn serve(
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    app: Router,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let tcp = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        let (acceptor, app, shared) = (acceptor.clone(), app.clone(), shared.clone());
        connections.spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let version = match stream.get_ref().1.alpn_protocol() {
                Some(b"h2") => http::Version::HTTP_2,
                _ => http::Version::HTTP_11,
            };
            let index = {
                let mut all = shared.connections.lock().expect("connections");
                all.push((version, true));
                all.len() - 1
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if version == http::Version::HTTP_11 {
                builder = builder.http1_only();
            }
            let _ = builder
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            shared.connections.lock().expect("connections")[index].1 = false;
        });
        while connections.try_join_next().is_some() {}
    }
}

/// Helper for tests: the streams of a Pod's containers' logs so far.
pub fn log_text(api: &KubeApi, pod: &str, container: &str) -> Option<String> {
    let inner = api.shared.inner.lock().expect("state");
    let entry = inner.pods.get(&("default".to_owned(), pod.to_owned()))?;
    let buf = entry.logs.get(container)?;
    Some(String::from_utf8_lossy(&buf.slice(0)).into_owned())
}
