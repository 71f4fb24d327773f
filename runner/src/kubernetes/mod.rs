//! The Kubernetes executor: one Pod per run (see [`pod`]), watched through one shared
//! watch, with each container's log shipped as it is written.
//!
//! A run request stays unacknowledged until its final state is stored, so a runner
//! that dies mid-run gets its requests redelivered (to itself after a restart, or to
//! another replica): the Pod name, derived from the run id, makes that delivery find
//! and adopt the Pod instead of creating a second, and the logs resume after the
//! last line already stored.

mod cache;
mod decide;
mod follow;
mod logs;
pub mod pod;
mod secrets;
mod status;
mod throttle;
mod watch;

use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use sluice_core::run::{RunRequest, RunState, RunStep};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::executor::{child_step, Outcome, Segment};
use crate::mask::Masker;
use crate::metrics::KubeMetrics;
use crate::report::Reporter;
use crate::wait::sleep_until;
use crate::{Error, Result};
use decide::{Decision, Effect, Next, Now, PodRun, Seen};
use follow::{follow_log, LogFollow};
use logs::LogClients;
pub use logs::STREAMS_PER_CONNECTION;
pub use throttle::TokenBucket;
use watch::{PodWatch, Subscription};

// === defaults (the CLI's flags point at these) ===

/// The image of steps that name none.
pub const DEFAULT_IMAGE: &str = "docker.io/library/alpine:3.22";
/// The image of the built-in clone step.
pub const CLONE_IMAGE: &str = "docker.io/alpine/git:2.49.1";
/// The user (and group) containers run as.
pub const RUN_AS_USER: i64 = 1000;
/// The size of each cache claim.
pub const CACHE_SIZE: &str = "10Gi";
/// The access mode of cache claims.
pub const CACHE_ACCESS_MODE: &str = "ReadWriteOnce";
/// How long a run may wait for its next container to start.
pub const PENDING_TIMEOUT: Duration = Duration::from_secs(600);
/// How long finished Pods are kept.
pub const DELETE_AFTER: Duration = Duration::from_secs(600);
/// Kubernetes API requests per second.
pub const QPS: u32 = 20;
/// Kubernetes API requests at once above the rate.
pub const BURST: u32 = 40;

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
    /// Kubernetes API requests per second, and burst; each at least 1.
    pub qps: u32,
    pub burst: u32,
    /// Container logs followed over one HTTP/2 connection at most (see `logs.rs`); at
    /// least 1.
    pub log_streams_per_connection: usize,
}

impl Default for KubeSettings {
    fn default() -> Self {
        KubeSettings {
            namespace: "default".into(),
            default_image: DEFAULT_IMAGE.into(),
            clone_image: CLONE_IMAGE.into(),
            clone_secret: None,
            service_account: None,
            run_as_user: RUN_AS_USER,
            cache_storage_class: None,
            cache_size: CACHE_SIZE.into(),
            cache_access_mode: CACHE_ACCESS_MODE.into(),
            pending_timeout: PENDING_TIMEOUT,
            delete_after: DELETE_AFTER,
            qps: QPS,
            burst: BURST,
            log_streams_per_connection: STREAMS_PER_CONNECTION,
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
    metrics: KubeMetrics,
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
    /// or `KUBECONFIG`, as kubectl finds them), rate-limited as `settings` say. A rate,
    /// burst or streams per connection of 0 is refused.
    pub fn new(mut config: kube::Config, settings: KubeSettings) -> Result<Self> {
        let qps = NonZeroU32::new(settings.qps).ok_or(at_least_one("qps"))?;
        let burst = NonZeroU32::new(settings.burst).ok_or(at_least_one("burst"))?;
        let per_connection = NonZeroUsize::new(settings.log_streams_per_connection)
            .ok_or(at_least_one("log_streams_per_connection"))?;
        // The throttle retries, after taking a token; kube's own retry would not.
        config.default_retry = false;
        // One budget for every request, log streams' included.
        let metrics = KubeMetrics::default();
        let throttle = throttle::Throttle::new(qps, burst, metrics.clone());
        let logs = LogClients::new(
            config.clone(),
            throttle.clone(),
            settings.namespace.clone(),
            per_connection,
        )?;
        let client = kube::client::ClientBuilder::try_from(config)
            .map_err(|source| Error::KubeClient {
                purpose: "Kubernetes client",
                source,
            })?
            .with_layer(&throttle)
            .build();
        Ok(KubeExecutor {
            client,
            logs: Arc::new(logs),
            creates: Arc::new(tokio::sync::Semaphore::new(burst.get() as usize)),
            settings: Arc::new(settings),
            pods: Arc::new(PodWatch::default()),
            handoff: CancellationToken::new(),
            metrics,
        })
    }

    /// What it counts of its API requests, for the runner's `/metrics`.
    pub fn metrics(&self) -> &KubeMetrics {
        &self.metrics
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
            let ended = status::last_finish(&p).unwrap_or(0);
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
        // Before anything runs: output that cannot be masked must not be produced.
        let mask = match Box::pin(self.masker(req)).await {
            Ok(mask) => Arc::new(mask),
            Err(outcome) => return outcome,
        };
        let claim = match &req.cache {
            Some(cache) => {
                let api = Api::namespaced(self.client.clone(), &self.settings.namespace);
                let (key, fallback) = (&cache.key, cache.fallback_key.as_deref());
                Box::pin(cache::ensure(&api, &self.settings, key, fallback, req)).await
            }
            None => None,
        };
        for (index, segment) in crate::executor::segments(&req.steps)
            .into_iter()
            .enumerate()
        {
            let stop = match segment {
                Segment::Pods(steps) => {
                    let segment = PodSegment {
                        index,
                        steps,
                        claim: claim.as_deref(),
                        mask: &mask,
                    };
                    self.run_pod(req, segment, reporter, cancel).await
                }
                Segment::Child(step) => {
                    // A later segment follows one that ran a step, which said so.
                    if index == 0 {
                        reporter.status(None, RunState::Running, None, None).await;
                    }
                    // The child runs elsewhere; waiting for it can resume anywhere.
                    tokio::select! {
                        stop = Box::pin(child_step(reporter, step, cancel)) => stop,
                        () = self.handoff.cancelled() => Some(decide::handed_back()),
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

    /// Runs one segment's Pod to its end: each look at the Pod is decided by
    /// [`PodRun::decide`], and this loop only performs what it says.
    async fn run_pod(
        &self,
        req: &RunRequest,
        segment: PodSegment<'_>,
        reporter: &Reporter,
        cancel: &CancellationToken,
    ) -> Option<Stop> {
        let PodSegment {
            index: segment,
            steps,
            claim,
            mask,
        } = segment;
        let name = pod::pod_name(&req.run_id, segment);
        // Subscribed before the create, so no update can slip between.
        let mut sub = self.pods.subscribe(&name);
        let adopted = match Box::pin(self.create_or_adopt(req, segment, steps, claim)).await {
            Ok(adopted) => adopted,
            Err(outcome) => return Some(outcome),
        };
        if segment == 0 {
            reporter
                .status(None, RunState::Scheduled, None, Some(format!("Pod {name}")))
                .await;
        }
        let pending = self.settings.pending_timeout;
        let mut run = PodRun::new(req, segment, steps, pending, tokio::time::Instant::now());
        let mut act = Act {
            executor: self,
            reporter,
            name,
            adopted,
            mask: mask.clone(),
            logs: std::iter::repeat_with(|| None)
                .take(run.containers().len())
                .collect(),
        };
        let mut watch_stopped = false;
        loop {
            let view = sub.rx.borrow_and_update().clone();
            let seen = Seen {
                pod: &view,
                cancelled: cancel.is_cancelled(),
                handed_off: self.handoff.is_cancelled(),
                watch_stopped,
            };
            let Decision { effects, next } = run.decide(seen, Now::current());
            drop(view);
            for effect in effects {
                act.perform(effect, &run, &sub).await;
            }
            let wake_at = match next {
                Next::End(stop) => return stop,
                Next::Wait { wake_at } => wake_at,
            };
            tokio::select! {
                changed = sub.rx.changed() => watch_stopped = changed.is_err(),
                () = cancel.cancelled() => {}
                () = self.handoff.cancelled() => {}
                () = sleep_until(wake_at) => {}
            }
        }
    }

    /// A masker for the values of every Secret the run's Pods mount, or the run's
    /// failure when one cannot be read (see [`secrets`]).
    async fn masker(&self, req: &RunRequest) -> std::result::Result<Masker, Outcome> {
        let names = secrets::names(req, self.settings.clone_secret.as_deref());
        if names.is_empty() {
            return Ok(Masker::default());
        }
        let namespace = &self.settings.namespace;
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        secrets::masker(&api, namespace, &names).await
    }

    /// Creates the segment's Pod, or adopts it when it exists (a redelivered request);
    /// `Ok(true)` when adopted. Awaited boxed: the Pods it handles are large and a run
    /// waiting on its Pod should not carry room for them.
    async fn create_or_adopt(
        &self,
        req: &RunRequest,
        segment: usize,
        steps: &[RunStep],
        claim: Option<&str>,
    ) -> std::result::Result<bool, Outcome> {
        let api = self.api();
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
                        return Err(decide::error(format!(
                            "Pod {name} vanished while being adopted"
                        )))
                    }
                    Err(e) => return Err(decide::error(format!("cannot read Pod {name}: {e}"))),
                }
                Ok(true)
            }
            Err(e) => {
                let answer = match &e {
                    kube::Error::Api(s) => Some((s.code, s.message.as_str())),
                    _ => None,
                };
                self.metrics.pod_create_error(answer);
                Err(decide::error(format!("cannot create Pod {name}: {e}")))
            }
        }
    }
}

fn at_least_one(setting: &'static str) -> Error {
    Error::Config {
        setting,
        problem: "must be at least 1".into(),
    }
}

/// One segment of a run that runs in a Pod.
struct PodSegment<'a> {
    index: usize,
    steps: &'a [RunStep],
    claim: Option<&'a str>,
    /// The run's secret values, masked in every container's log.
    mask: &'a Arc<Masker>,
}

/// Performs a segment's effects: the API calls, publishes and log followers
/// [`PodRun::decide`] asks for.
struct Act<'a> {
    executor: &'a KubeExecutor,
    reporter: &'a Reporter,
    name: String,
    /// Logs resume after the lines already stored.
    adopted: bool,
    mask: Arc<Masker>,
    /// Each container's log follower, while it runs.
    logs: Vec<Option<JoinHandle<()>>>,
}

impl Act<'_> {
    async fn perform(&mut self, effect: Effect, run: &PodRun, sub: &Subscription) {
        match effect {
            Effect::Publish {
                step,
                state,
                exit_code,
                message,
            } => {
                self.reporter
                    .status(step.as_deref(), state, exit_code, message)
                    .await;
            }
            Effect::FollowLog(i) => {
                let container = &run.containers()[i];
                self.logs[i] = Some(tokio::spawn(follow_log(LogFollow {
                    logs: self.executor.logs.clone(),
                    pod_name: self.name.clone(),
                    container: container.name.clone(),
                    step: container.step.clone(),
                    reporter: self.reporter.clone(),
                    adopted: self.adopted,
                    mask: self.mask.clone(),
                    pod: sub.rx.clone(),
                    handoff: self.executor.handoff.clone(),
                })));
            }
            Effect::AwaitLog(i) => {
                if let Some(log) = self.logs[i].take() {
                    let _ = log.await;
                }
            }
            Effect::FinishLogs => {
                for log in self.logs.iter_mut().filter_map(Option::take) {
                    let _ = tokio::time::timeout(Duration::from_secs(10), log).await;
                }
            }
            Effect::DeletePod => {
                self.executor.delete(&self.name).await;
            }
        }
    }
}

#[cfg(test)]
mod tests;
