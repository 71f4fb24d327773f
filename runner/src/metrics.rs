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
    /// The Kubernetes executor's: it counts them where it makes its requests, so the
    /// runner takes its handles ([`crate::Executor::kube_metrics`]).
    pub kube: KubeMetrics,
}

/// What the Kubernetes executor counts of its API requests.
#[derive(Debug, Clone, Default)]
pub struct KubeMetrics {
    pub requests: Family<KubeRequest, Counter>,
    pub rate_limited_seconds: Counter<f64, AtomicU64>,
    pub pod_create_errors: Family<Reason, Counter>,
}

impl KubeMetrics {
    /// Counts one request by kube-rs's name for it and its answer (`None`: no answer).
    pub fn request(&self, kind: Option<&str>, status: Option<u16>) {
        self.requests
            .get_or_create(&KubeRequest {
                verb: verb(kind),
                code: status.map_or_else(|| "error".to_owned(), |s| s.to_string()),
            })
            .inc();
    }

    /// Counts a Pod create that failed: the API's status code and message (`None`: no
    /// answer came).
    pub fn pod_create_error(&self, status: Option<(u16, &str)>) {
        self.pod_create_errors
            .get_or_create(&Reason {
                reason: pod_create_reason(status),
            })
            .inc();
    }
}

/// kube-rs names each request (its extension); the label keeps a few verbs.
fn verb(kind: Option<&str>) -> &'static str {
    match kind {
        Some("create") => "create",
        Some("get" | "get_metadata") => "get",
        Some("list" | "list_metadata") => "list",
        Some("watch" | "watch_metadata") => "watch",
        Some("delete" | "delete_collection") => "delete",
        Some("patch" | "patch_metadata") => "patch",
        Some("log_stream" | "log") => "log",
        _ => "other",
    }
}

/// A short reason for a failed Pod create, from the API's answer: what an operator
/// does next differs for each.
pub fn pod_create_reason(status: Option<(u16, &str)>) -> &'static str {
    let Some((code, message)) = status else {
        return "unreachable";
    };
    let message = message.to_ascii_lowercase();
    if message.contains("admission webhook") {
        "admission_webhook"
    } else if message.contains("exceeded quota") {
        "quota"
    } else {
        match code {
            401 | 403 => "forbidden",
            400 | 422 => "invalid",
            429 => "throttled",
            500..=599 => "server_error",
            _ => "other",
        }
    }
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
            kube: KubeMetrics::default(),
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
            self.kube.requests.clone(),
        );
        registry.register(
            "kube_rate_limited_seconds",
            "Time requests spent waiting on the client-side API rate limit",
            self.kube.rate_limited_seconds.clone(),
        );
        registry.register(
            "pod_create_errors",
            "Pod creations the API refused or failed, by reason",
            self.kube.pod_create_errors.clone(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_create_failures_get_the_reason_an_operator_acts_on() {
        let quota = "pods \"run-1\" is forbidden: exceeded quota: compute, requested: cpu=2";
        assert_eq!(pod_create_reason(Some((403, quota))), "quota");
        assert_eq!(
            pod_create_reason(Some((403, "pods is forbidden: User cannot create"))),
            "forbidden"
        );
        assert_eq!(
            pod_create_reason(Some((
                400,
                "admission webhook \"policy.example\" denied the request"
            ))),
            "admission_webhook"
        );
        assert_eq!(pod_create_reason(Some((422, "Pod is invalid"))), "invalid");
        assert_eq!(pod_create_reason(Some((429, ""))), "throttled");
        assert_eq!(pod_create_reason(Some((503, ""))), "server_error");
        assert_eq!(pod_create_reason(None), "unreachable");
    }

    #[test]
    fn verbs_are_a_few_fixed_names() {
        assert_eq!(verb(Some("list_metadata")), "list");
        assert_eq!(verb(Some("log_stream")), "log");
        assert_eq!(verb(Some("approval")), "other");
        assert_eq!(verb(None), "other");
    }
}
