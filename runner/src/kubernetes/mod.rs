//! The Kubernetes executor: one Pod per run (see [`pod`]), watched through one shared
//! watch, with each container's log shipped as it is written.
//!
//! A run request stays unacknowledged until its final state is stored, so a runner
//! that dies mid-run gets its requests redelivered (to itself after a restart, or to
//! another replica): the Pod name, derived from the run id, makes that delivery find
//! and adopt the Pod instead of creating a second, and the logs resume after the
//! last line already stored.

mod logs;
pub mod pod;
mod throttle;
mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ContainerStatus, PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod,
    TypedLocalObjectReference, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::{Api, Client, ResourceExt};
use sluice_core::run::{RunRequest, RunState, RunStep};
use tokio_util::compat::FuturesAsyncReadCompatExt;
use tokio_util::sync::CancellationToken;

use crate::executor::{child_step, sleep_until, Outcome, Segment};
use crate::report::Reporter;
use crate::{Error, Result};
use logs::LogClients;
pub use logs::STREAMS_PER_CONNECTION;
pub use throttle::TokenBucket;
use watch::{PodState, PodView, PodWatch};

/// How the runner makes Pods.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// Where run Pods go; default: the kubeconfig context's or service account's.
    pub namespace: String,
    /// The image of steps that name none.
    pub default_image: String,
    /// The image of the built-in clone step: needs `sh` and `git`.
    pub clone_image: String,
    /// A Secret with a `.git-credentials` file, used by the clone step only.
    pub clone_secret: Option<String>,
    /// The service account of run Pods when the pipeline names none.
    pub service_account: Option<String>,
    /// The user (and group) containers run as; 0 allows root.
    pub run_as_user: i64,
    pub cache_storage_class: Option<String>,
    pub cache_size: String,
    pub cache_access_mode: String,
    /// How long a run may wait for its next container to start (no node yet, image
    /// pull) before it fails.
    pub pending_timeout: Duration,
    /// How long finished Pods are kept (for `kubectl describe`).
    pub delete_after: Duration,
    /// Kubernetes API requests per second, and burst.
    pub qps: u32,
    pub burst: u32,
    /// Container logs followed over one HTTP/2 connection at most (see `logs.rs`).
    pub log_streams_per_connection: usize,
}

impl Default for KubeSettings {
    fn default() -> Self {
        KubeSettings {
            namespace: "default".into(),
            default_image: "docker.io/library/alpine:3.22".into(),
            clone_image: "docker.io/alpine/git:2.49.1".into(),
            clone_secret: None,
            service_account: None,
            run_as_user: 1000,
            cache_storage_class: None,
            cache_size: "10Gi".into(),
            cache_access_mode: "ReadWriteOnce".into(),
            pending_timeout: Duration::from_secs(600),
            delete_after: Duration::from_secs(600),
            qps: 20,
            burst: 40,
            log_streams_per_connection: logs::STREAMS_PER_CONNECTION,
        }
    }
}

/// Runs steps in Pods.
#[derive(Clone)]
pub struct KubeExecutor {
    client: Client,
    logs: Arc<LogClients>,
    /// Pod creates under way, at most the rate limit's burst: the rest could not be
    /// sent sooner anyway, and a spike of thousands of runs then waits without
    /// thousands of Pod specs built in memory.
    creates: Arc<tokio::sync::Semaphore>,
    settings: Arc<KubeSettings>,
    pods: Arc<PodWatch>,
    /// Cancelled when the runner stops: runs in hand are handed back, Pods untouched.
    handoff: CancellationToken,
}

impl std::fmt::Debug for KubeExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeExecutor")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

// Calls made once or rarely per run (API requests, publishes) are boxed where they
// are awaited: a future is as large as its largest await point, and with thousands of
// runs in flight each would otherwise carry, for its whole life, room for a request it
// made once.

/// Why a segment's Pod stopped short of success.
type Stop = Outcome;

impl KubeExecutor {
    /// A client for `config` (from `kube::Config::infer()`: in-cluster service account
    /// or `KUBECONFIG`, as kubectl finds them), rate-limited as `settings` say.
    pub fn new(mut config: kube::Config, settings: KubeSettings) -> Result<Self> {
        // The throttle retries, after taking a token; kube's own retry would not.
        config.default_retry = false;
        // One budget for every request, log streams' included.
        let throttle = throttle::Throttle::new(settings.qps, settings.burst);
        let logs = LogClients::new(
            config.clone(),
            throttle.clone(),
            settings.namespace.clone(),
            settings.log_streams_per_connection,
        )?;
        let client = kube::client::ClientBuilder::try_from(config)
            .map_err(|e| Error::Config(format!("Kubernetes client: {e}")))?
            .with_layer(&throttle)
            .build();
        Ok(KubeExecutor {
            client,
            logs: Arc::new(logs),
            creates: Arc::new(tokio::sync::Semaphore::new(settings.burst.max(1) as usize)),
            settings: Arc::new(settings),
            pods: Arc::new(PodWatch::default()),
            handoff: CancellationToken::new(),
        })
    }

    fn api(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.settings.namespace)
    }

    /// Starts the shared Pod watch for `cluster`, until `shutdown`; from then on, runs
    /// in hand are handed back (see [`KubeExecutor::run`]).
    pub fn start(&self, cluster: &str, shutdown: CancellationToken) -> tokio::task::JoinHandle<()> {
        let selector = format!("{}={cluster}", pod::LABEL_CLUSTER);
        let handoff = self.handoff.clone();
        let watch = self
            .pods
            .clone()
            .run(self.api(), selector, shutdown.clone());
        tokio::spawn(async move {
            tokio::join!(watch, async {
                shutdown.cancelled().await;
                handoff.cancel();
            });
        })
    }

    /// Lists the cluster's Pods at start-up: unfinished ones are adopted when their
    /// requests are redelivered; finished ones whose final state is stored are
    /// removed once `delete_after` has passed.
    pub async fn sweep<F>(&self, cluster: &str, finished: impl Fn(String) -> F)
    where
        F: std::future::Future<Output = bool> + Send,
    {
        let selector = format!("{}={cluster}", pod::LABEL_CLUSTER);
        let pods = match self
            .api()
            .list(&ListParams::default().labels(&selector))
            .await
        {
            Ok(p) => p.items,
            Err(e) => return tracing::warn!(error = %e, "cannot list this cluster's Pods"),
        };
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let (mut unfinished, mut deleted) = (0, 0);
        for p in pods {
            let Some(name) = p.metadata.name.clone() else {
                continue;
            };
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            if !matches!(phase, Some("Succeeded" | "Failed")) {
                unfinished += 1;
                continue;
            }
            let ended = last_finish(&p).unwrap_or(0);
            let old = now - ended >= self.settings.delete_after.as_secs() as i64;
            let run = p.labels().get(pod::LABEL_RUN).cloned().unwrap_or_default();
            if old && finished(run).await && self.delete(&name).await {
                deleted += 1;
            }
        }
        tracing::info!(
            unfinished,
            deleted,
            "Pods of this cluster: unfinished ones are adopted as their runs are redelivered"
        );
    }

    async fn delete(&self, name: &str) -> bool {
        match Box::pin(self.api().delete(name, &DeleteParams::default())).await {
            Ok(_) => true,
            Err(kube::Error::Api(s)) if s.code == 404 => true,
            Err(e) => {
                tracing::warn!(pod = name, error = %e, "cannot delete a Pod");
                false
            }
        }
    }

    /// Removes the run's Pods once `delete_after` has passed (its final state is
    /// stored by then).
    pub fn finished(&self, req: &RunRequest) {
        let names: Vec<String> = crate::executor::segments(&req.steps)
            .iter()
            .enumerate()
            .filter(|(_, s)| matches!(s, Segment::Pods(_)))
            .map(|(i, _)| pod::pod_name(&req.run_id, i))
            .collect();
        let (this, delay) = (self.clone(), self.settings.delete_after);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            for name in names {
                this.delete(&name).await;
            }
        });
    }

    /// Runs `req` to its end — or, when the runner stops first, returns state `queued`:
    /// the run goes back to the queue with its Pod still running, every log line read
    /// so far shipped, for a replica to adopt.
    pub async fn run(
        &self,
        req: &RunRequest,
        reporter: &Reporter,
        cancel: &CancellationToken,
    ) -> Outcome {
        let claim = match &req.cache {
            Some(cache) => {
                Box::pin(self.ensure_cache(&cache.key, cache.fallback_key.as_deref(), req)).await
            }
            None => None,
        };
        let mut started = false;
        for (index, segment) in crate::executor::segments(&req.steps)
            .into_iter()
            .enumerate()
        {
            let stop = match segment {
                Segment::Pods(steps) => {
                    self.run_pod(
                        req,
                        index,
                        steps,
                        claim.as_deref(),
                        reporter,
                        cancel,
                        &mut started,
                    )
                    .await
                }
                Segment::Child(step) => {
                    if !started {
                        reporter.status(None, RunState::Running, None, None).await;
                        started = true;
                    }
                    // The child runs elsewhere; waiting for it can resume anywhere.
                    tokio::select! {
                        stop = Box::pin(child_step(reporter, step, cancel)) => stop,
                        () = self.handoff.cancelled() => Some(handed_back()),
                    }
                }
            };
            if let Some(outcome) = stop {
                return outcome;
            }
        }
        Outcome {
            state: RunState::Succeeded,
            message: None,
        }
    }

    /// The cache claim for `key`, created on first use from a copy of the default
    /// branch's (`fallback`) when that exists. A cache is a speed-up: when it cannot be
    /// had, the run goes on without one and says so.
    async fn ensure_cache(
        &self,
        key: &str,
        fallback: Option<&str>,
        req: &RunRequest,
    ) -> Option<String> {
        let api: Api<PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &self.settings.namespace);
        let name = pod::cache_claim_name(key);
        match api.get_opt(&name).await {
            Ok(Some(_)) => return Some(name),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(run_id = %req.run_id, error = %e, "cannot read the cache claim; running without cache");
                return None;
            }
        }
        let source = match fallback.map(pod::cache_claim_name) {
            Some(f) if f != name => match api.get_opt(&f).await {
                Ok(Some(_)) => Some(f),
                _ => None,
            },
            _ => None,
        };
        let claim = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([
                    (pod::LABEL_MANAGED_BY.to_owned(), "sluice".to_owned()),
                    (pod::LABEL_CLUSTER.to_owned(), req.cluster.clone()),
                ])),
                annotations: Some(BTreeMap::from([(
                    "sluice.dev/cache-key".to_owned(),
                    key.to_owned(),
                )])),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec![self.settings.cache_access_mode.clone()]),
                storage_class_name: self.settings.cache_storage_class.clone(),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_owned(),
                        Quantity(self.settings.cache_size.clone()),
                    )])),
                    ..Default::default()
                }),
                // A new branch starts from a copy of the default branch's cache (CSI
                // volume cloning).
                data_source: source.map(|s| TypedLocalObjectReference {
                    api_group: None,
                    kind: "PersistentVolumeClaim".into(),
                    name: s,
                }),
                ..Default::default()
            }),
            status: None,
        };
        match api.create(&PostParams::default(), &claim).await {
            Ok(_) => Some(name),
            Err(kube::Error::Api(s)) if s.code == 409 => Some(name),
            Err(e) => {
                tracing::warn!(run_id = %req.run_id, error = %e, "cannot create the cache claim; running without cache");
                None
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_pod(
        &self,
        req: &RunRequest,
        segment: usize,
        steps: &[RunStep],
        claim: Option<&str>,
        reporter: &Reporter,
        cancel: &CancellationToken,
        started: &mut bool,
    ) -> Option<Stop> {
        let api = self.api();
        let name = pod::pod_name(&req.run_id, segment);
        // Subscribed before the create, so no update can slip between.
        let mut sub = self.pods.subscribe(&name);
        let adopted = match Box::pin(self.create_or_adopt(&api, req, segment, steps, claim)).await {
            Ok(adopted) => adopted,
            Err(outcome) => return Some(outcome),
        };
        if segment == 0 {
            reporter
                .status(None, RunState::Scheduled, None, Some(format!("Pod {name}")))
                .await;
        }

        let containers = pod::container_names(req, steps);
        let step_names: Vec<String> = containers
            .iter()
            .map(|c| match (c.as_str(), segment) {
                (pod::CLONE_CONTAINER, 0) => "clone".to_owned(),
                (pod::CLONE_CONTAINER, n) => format!("clone-{n}"),
                (step, _) => step.to_owned(),
            })
            .collect();
        let timeouts: Vec<Option<Duration>> = containers
            .iter()
            .map(|c| {
                steps
                    .iter()
                    .find(|s| &s.name == c)
                    .and_then(|s| s.timeout_secs.map(Duration::from_secs))
            })
            .collect();
        let mut progress = vec![Progress::default(); containers.len()];
        let mut waiting_since = tokio::time::Instant::now();

        loop {
            let view = sub.rx.borrow_and_update().clone();
            let pod = match view {
                PodView::Unknown => None,
                PodView::Gone => {
                    self.finish_logs(&mut progress).await;
                    return Some(if cancel.is_cancelled() {
                        cancelled()
                    } else {
                        error(format!("Pod {name} was deleted before the run finished"))
                    });
                }
                PodView::Present(pod) => Some(pod),
            };
            let mut next_deadline: Option<tokio::time::Instant> = None;
            if let Some(pod) = &pod {
                let states = container_states(pod, &containers);
                let mut any_running = false;
                for (i, state) in states.iter().enumerate() {
                    let p = &mut progress[i];
                    let is_step = containers[i] != pod::CLONE_CONTAINER;
                    if matches!(state, CState::Running { .. } | CState::Terminated { .. })
                        && p.log.is_none()
                    {
                        p.log = Some(tokio::spawn(follow_log(LogFollow {
                            logs: self.logs.clone(),
                            pod_name: name.clone(),
                            container: containers[i].clone(),
                            step: step_names[i].clone(),
                            reporter: reporter.clone(),
                            adopted,
                            pod: sub.rx.clone(),
                            handoff: self.handoff.clone(),
                        })));
                    }
                    if let CState::Running { started_at } = state {
                        any_running = true;
                        if !p.running_reported {
                            p.running_reported = true;
                            waiting_since = tokio::time::Instant::now();
                            if is_step && !*started {
                                *started = true;
                                reporter.status(None, RunState::Running, None, None).await;
                            }
                            if is_step {
                                reporter
                                    .status(Some(&step_names[i]), RunState::Running, None, None)
                                    .await;
                            }
                        }
                        if let Some(limit) = timeouts[i] {
                            let ran = started_at.map(since).unwrap_or_default();
                            if ran >= limit {
                                return Some(
                                    self.stop(
                                        &name,
                                        &mut progress,
                                        reporter,
                                        &step_names[i],
                                        format!("timed out after {limit:?}"),
                                    )
                                    .await,
                                );
                            }
                            let at = tokio::time::Instant::now() + (limit - ran);
                            next_deadline = Some(next_deadline.map_or(at, |d| d.min(at)));
                        }
                    }
                    if let CState::Terminated { code, reason } = state {
                        if !p.final_reported {
                            p.final_reported = true;
                            waiting_since = tokio::time::Instant::now();
                            if let Some(log) = p.log.take() {
                                let _ = log.await;
                            }
                            let ok = *code == 0;
                            // Killed for the run's activeDeadlineSeconds: the Pod says so.
                            let deadline = pod.status.as_ref().and_then(|s| s.reason.as_deref())
                                == Some("DeadlineExceeded");
                            let message = (!ok).then(|| match reason.as_deref() {
                                _ if deadline => "the run's timeout was reached".to_owned(),
                                Some("OOMKilled") => format!("exited with {code} (out of memory)"),
                                _ => format!("exited with {code}"),
                            });
                            if is_step {
                                if !*started {
                                    *started = true;
                                    reporter.status(None, RunState::Running, None, None).await;
                                }
                                // Ran and ended between two looks: it still ran.
                                if !p.running_reported {
                                    p.running_reported = true;
                                    reporter
                                        .status(Some(&step_names[i]), RunState::Running, None, None)
                                        .await;
                                }
                                let state = if ok {
                                    RunState::Succeeded
                                } else {
                                    RunState::Failed
                                };
                                reporter
                                    .status(
                                        Some(&step_names[i]),
                                        state,
                                        Some(*code),
                                        message.clone(),
                                    )
                                    .await;
                            }
                            if !ok {
                                self.finish_logs(&mut progress).await;
                                return Some(if deadline {
                                    Outcome {
                                        state: RunState::Failed,
                                        message,
                                    }
                                } else if is_step {
                                    Outcome {
                                        state: RunState::Failed,
                                        message: message
                                            .map(|m| format!("step {}: {m}", step_names[i])),
                                    }
                                } else {
                                    error(format!(
                                        "cloning {} failed: {}",
                                        req.clone_url.as_deref().unwrap_or("the source"),
                                        message.unwrap_or_default()
                                    ))
                                });
                            }
                        }
                    }
                }
                match pod_phase(pod) {
                    Some("Succeeded") if progress.iter().all(|p| p.final_reported) => {
                        self.finish_logs(&mut progress).await;
                        return None;
                    }
                    Some("Failed") => {
                        self.finish_logs(&mut progress).await;
                        let reason = pod.status.as_ref().and_then(|s| s.reason.clone());
                        return Some(match reason.as_deref() {
                            Some("DeadlineExceeded") => Outcome {
                                state: RunState::Failed,
                                message: Some("the run's timeout was reached".into()),
                            },
                            _ => error(format!(
                                "Pod {name} failed: {}",
                                pod_message(pod).unwrap_or_else(|| "no reason given".into())
                            )),
                        });
                    }
                    _ => {}
                }
                if !any_running {
                    // Waiting for a node, an image, or the next container.
                    let limit = self.settings.pending_timeout;
                    if waiting_since.elapsed() >= limit {
                        let why = waiting_reason(pod, &states)
                            .unwrap_or_else(|| "no reason given".into());
                        self.delete(&name).await;
                        self.finish_logs(&mut progress).await;
                        return Some(error(format!(
                            "no container started within {limit:?} (pending timeout): {why}"
                        )));
                    }
                    let at = waiting_since + limit;
                    next_deadline = Some(next_deadline.map_or(at, |d| d.min(at)));
                }
            }
            tokio::select! {
                changed = sub.rx.changed() => {
                    if changed.is_err() {
                        return Some(error("the Pod watch stopped".into()));
                    }
                }
                () = cancel.cancelled() => {
                    self.delete(&name).await;
                    self.finish_logs(&mut progress).await;
                    return Some(cancelled());
                }
                () = self.handoff.cancelled() => {
                    // The followers stop too, after shipping what they read: the
                    // adopter resumes after the last stored line.
                    self.finish_logs(&mut progress).await;
                    return Some(handed_back());
                }
                () = sleep_until(next_deadline) => {}
            }
        }
    }

    /// Creates the segment's Pod, or adopts it when it exists (a redelivered request);
    /// `Ok(true)` when adopted. Awaited boxed: the Pods it handles are large and a run
    /// waiting on its Pod should not carry room for them.
    async fn create_or_adopt(
        &self,
        api: &Api<Pod>,
        req: &RunRequest,
        segment: usize,
        steps: &[RunStep],
        claim: Option<&str>,
    ) -> std::result::Result<bool, Outcome> {
        let name = pod::pod_name(&req.run_id, segment);
        // Waiters are served in order, so runs keep their pickup order.
        let _permit = self.creates.acquire().await;
        // The spec is dropped once sent: the run does not need it again.
        let created = {
            let spec = pod::build(req, segment, steps, &self.settings, claim);
            Box::pin(api.create(&PostParams::default(), &spec)).await
        };
        match created {
            Ok(created) => {
                self.pods.seed(created);
                Ok(false)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tracing::info!(run_id = %req.run_id, pod = %name, "Pod already exists; adopting it");
                match Box::pin(api.get_opt(&name)).await {
                    Ok(Some(existing)) => self.pods.seed(existing),
                    Ok(None) => {
                        return Err(error(format!("Pod {name} vanished while being adopted")))
                    }
                    Err(e) => return Err(error(format!("cannot read Pod {name}: {e}"))),
                }
                Ok(true)
            }
            Err(e) => Err(error(format!("cannot create Pod {name}: {e}"))),
        }
    }

    /// Ends a run whose step ran out of time: the Pod goes, the step fails.
    async fn stop(
        &self,
        name: &str,
        progress: &mut [Progress],
        reporter: &Reporter,
        step: &str,
        message: String,
    ) -> Outcome {
        self.delete(name).await;
        self.finish_logs(progress).await;
        reporter
            .status(Some(step), RunState::Failed, None, Some(message.clone()))
            .await;
        Outcome {
            state: RunState::Failed,
            message: Some(format!("step {step}: {message}")),
        }
    }

    async fn finish_logs(&self, progress: &mut [Progress]) {
        for p in progress.iter_mut() {
            if let Some(log) = p.log.take() {
                let _ = tokio::time::timeout(Duration::from_secs(10), log).await;
            }
        }
    }
}

#[derive(Debug, Default)]
struct Progress {
    log: Option<tokio::task::JoinHandle<()>>,
    running_reported: bool,
    final_reported: bool,
}

impl Clone for Progress {
    fn clone(&self) -> Self {
        Progress::default()
    }
}

fn error(message: String) -> Outcome {
    Outcome {
        state: RunState::Error,
        message: Some(message),
    }
}

fn handed_back() -> Outcome {
    Outcome {
        state: RunState::Queued,
        message: Some("handed back: the runner is stopping".into()),
    }
}

fn cancelled() -> Outcome {
    Outcome {
        state: RunState::Cancelled,
        message: Some("cancelled".into()),
    }
}

fn since(t: k8s_openapi::jiff::Timestamp) -> Duration {
    let now = time::OffsetDateTime::now_utc();
    let then = time::OffsetDateTime::from_unix_timestamp_nanos(t.as_nanosecond()).unwrap_or(now);
    (now - then).try_into().unwrap_or_default()
}

/// A container as the runner sees it.
#[derive(Debug, Clone, PartialEq)]
enum CState {
    NotStarted,
    Waiting {
        reason: Option<String>,
        message: Option<String>,
    },
    Running {
        started_at: Option<k8s_openapi::jiff::Timestamp>,
    },
    Terminated {
        code: i32,
        reason: Option<String>,
    },
}

fn pod_phase(pod: &PodState) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

fn pod_message(pod: &PodState) -> Option<String> {
    let status = pod.status.as_ref()?;
    match (&status.reason, &status.message) {
        (Some(r), Some(m)) => Some(format!("{r}: {m}")),
        (Some(r), None) => Some(r.clone()),
        (None, Some(m)) => Some(m.clone()),
        (None, None) => None,
    }
}

/// The states of `names`, from the Pod's init and regular container statuses.
fn container_states(pod: &PodState, names: &[String]) -> Vec<CState> {
    let status = pod.status.as_ref();
    let all: Vec<&ContainerStatus> = status
        .into_iter()
        .flat_map(|s| {
            s.init_container_statuses
                .iter()
                .flatten()
                .chain(s.container_statuses.iter().flatten())
        })
        .collect();
    names
        .iter()
        .map(|name| {
            let Some(state) = all
                .iter()
                .find(|c| &c.name == name)
                .and_then(|c| c.state.as_ref())
            else {
                return CState::NotStarted;
            };
            if let Some(t) = &state.terminated {
                CState::Terminated {
                    code: t.exit_code,
                    reason: t.reason.clone(),
                }
            } else if let Some(r) = &state.running {
                CState::Running {
                    started_at: r.started_at.as_ref().map(|t| t.0),
                }
            } else if let Some(w) = &state.waiting {
                CState::Waiting {
                    reason: w.reason.clone(),
                    message: w.message.clone(),
                }
            } else {
                CState::NotStarted
            }
        })
        .collect()
}

/// Why nothing runs: a container's waiting reason (image pull), else the scheduler's.
fn waiting_reason(pod: &PodState, states: &[CState]) -> Option<String> {
    for s in states {
        if let CState::Waiting {
            reason: Some(r),
            message,
        } = s
        {
            if r != "PodInitializing" {
                return Some(match message {
                    Some(m) => format!("{r}: {m}"),
                    None => r.clone(),
                });
            }
        }
    }
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or("Unschedulable"),
                c.message.as_deref().unwrap_or("not scheduled")
            )
        })
}

/// When the Pod's last container finished, in Unix seconds.
fn last_finish(pod: &Pod) -> Option<i64> {
    let status = pod.status.as_ref()?;
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0.as_second())
        .max()
}

/// One container's log to follow.
struct LogFollow {
    logs: Arc<LogClients>,
    pod_name: String,
    container: String,
    step: String,
    reporter: Reporter,
    /// Resume after the lines already stored.
    adopted: bool,
    pod: tokio::sync::watch::Receiver<PodView>,
    handoff: CancellationToken,
}

/// Ships one container's log to `SLUICE_LOGS` as it is written. Resumes after the
/// lines already stored when the run was adopted, and re-opens the stream if it drops
/// while the container still runs.
async fn follow_log(f: LogFollow) {
    let LogFollow {
        logs,
        pod_name,
        container,
        step,
        reporter,
        adopted,
        pod,
        handoff,
    } = f;
    let (stored, next_seq) = if adopted {
        Box::pin(reporter.stored_log(&step)).await
    } else {
        (0, 0)
    };
    let mut log = reporter.log_writer(&step, next_seq);
    let mut read: u64 = 0;
    let mut delay = Duration::from_millis(200);
    let mut pod = pod;
    loop {
        let params = LogParams {
            container: Some(container.clone()),
            follow: true,
            ..Default::default()
        };
        let mut clean = false;
        // Held while the stream is open: it counts towards its connection's streams.
        let lease = logs.lease();
        match Box::pin(lease.log_stream(&pod_name, &params)).await {
            Ok(stream) => {
                let mut lines = crate::lines::Lines::new(stream.compat());
                loop {
                    // `next_line` keeps what it has read when the batch's time
                    // comes first, so no output is lost to the select.
                    let next = tokio::select! {
                        next = lines.next_line() => next,
                        () = sleep_until(log.due()) => {
                            log.flush().await;
                            continue;
                        }
                        () = handoff.cancelled() => {
                            log.flush().await;
                            return;
                        }
                    };
                    match next {
                        Ok(Some(text)) => {
                            read += 1;
                            if read > stored {
                                let stream = "stdout".to_owned();
                                log.line(sluice_core::run::LogLine { stream, text }).await;
                            }
                        }
                        Ok(None) => {
                            clean = true;
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(pod = %pod_name, container = %container, error = %e, "log stream broke");
                            break;
                        }
                    }
                }
            }
            Err(kube::Error::Api(s)) if s.code == 404 => break,
            Err(e) => {
                tracing::debug!(pod = %pod_name, container = %container, error = %e, "cannot open the log")
            }
        }
        drop(lease);
        // A follow ends when the container does; the watch may report the exit a
        // moment later. If the container still runs after that, the stream dropped.
        let ended = async {
            loop {
                let done = match &*pod.borrow_and_update() {
                    PodView::Present(p) => matches!(
                        container_states(p, std::slice::from_ref(&container)).first(),
                        Some(CState::Terminated { .. })
                    ),
                    PodView::Gone => true,
                    PodView::Unknown => false,
                };
                if done || pod.changed().await.is_err() {
                    return true;
                }
            }
        };
        let wait = if clean {
            Duration::from_secs(5)
        } else {
            Duration::ZERO
        };
        let done = tokio::time::timeout(wait, ended).await.unwrap_or(false);
        if done && clean {
            break;
        }
        if !done {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        // Re-open: a follow of a finished container returns its whole log and ends,
        // which catches lines written between the drop and the exit; lines already
        // read are skipped.
    }
    log.flush().await;
}

#[cfg(test)]
mod tests;
