//! The runner's Prometheus metrics (`tests/golden/metrics/runner.txt` lists them;
//! `docs/operations.md` says what each means). Labels are low-cardinality: a cluster, a
//! result, a verb, a status code, a reason — never a run id.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RunResult {
    pub cluster: String,
    /// `succeeded`, `failed`, `cancelled` or `error`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeRequest {
    /// `create`, `get`, `list`, `watch`, `delete`, `patch` or `log`.
    pub verb: &'static str,
    /// The HTTP status code, or `error` when no answer came.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: &'static str,
}

/// Every metric the runner exports; cheap to clone (each is a shared handle).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub runs_in_flight: Family<ClusterLabel, Gauge>,
    pub runs: Family<RunResult, Counter>,
    pub pickup_seconds: Histogram,
    pub run_seconds: Family<ResultLabel, Histogram>,
    pub kube_requests: Family<KubeRequest, Counter>,
    pub kube_rate_limited_seconds: Counter<f64, AtomicU64>,
    pub pod_create_errors: Family<Reason, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            runs_in_flight: Family::default(),
            runs: Family::default(),
            // 10 ms to ~5.5 min: a run waits milliseconds when a slot is free, minutes in
            // a backlog.
            pickup_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            // 1 s to ~9 h.
            run_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 2.0, 16))
            }),
            kube_requests: Family::default(),
            kube_rate_limited_seconds: Counter::default(),
            pod_create_errors: Family::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric under `registry` (the admin surface's `sluice_runner`
    /// prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "runs_in_flight",
            "Runs this replica holds now (pulled and not yet final)",
            self.runs_in_flight.clone(),
        );
        registry.register(
            "runs",
            "Runs finished by this replica, by cluster and result",
            self.runs.clone(),
        );
        registry.register(
            "pickup_duration_seconds",
            "From a run request's creation to this replica taking it",
            self.pickup_seconds.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "From taking a run to its final state, by result",
            self.run_seconds.clone(),
        );
        registry.register(
            "kube_requests",
            "Requests to the Kubernetes API, by verb and status code",
            self.kube_requests.clone(),
        );
        registry.register(
            "kube_rate_limited_seconds",
            "Time requests spent waiting on the client-side API rate limit",
            self.kube_rate_limited_seconds.clone(),
        );
        registry.register(
            "pod_create_errors",
            "Pod creations the API refused or failed, by reason",
            self.pod_create_errors.clone(),
        );
    }
}
