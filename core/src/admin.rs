//! The admin endpoints of every long-running service, from one builder so that no
//! service wires its own: `GET /healthz` (the process answers), `GET /readyz` (it can do
//! its job: NATS connected, its streams and consumers there, its loops consuming) and
//! `GET /metrics` (Prometheus text format, with `sluice_build_info` and
//! `sluice_nats_connected` beside the service's own metrics).
//!
//! A service builds an [`Admin`], registers its metrics under its prefix
//! ([`Admin::registry`]), adds what readiness depends on — the NATS client
//! ([`Admin::nats`]), checks its loops flip ([`Admin::check`]) and probes that ask
//! JetStream ([`Admin::probe`]) — and then either serves it on its own port
//! ([`Admin::serve`]) or merges [`Admin::router`] into its HTTP router (ingest).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State as NatsState;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Where `--admin-listen` binds by default: every interface, so the kubelet's probes and
/// Prometheus reach it; the port of the Pod specs, ServiceMonitors and docs.
pub const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9464";

/// How long `/readyz` waits for one probe before it counts as failed: well under the
/// kubelet's default probe timeout, so a hung JetStream shows as not ready, not as a
/// probe that timed out.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/metrics` answers with: OpenMetrics text, which Prometheus negotiates.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type ProbeFn =
    dyn Fn() -> Pin<Box<dyn Future<Output = std::result::Result<(), String>> + Send>> + Send + Sync;

/// The admin surface of one service, being built.
pub struct Admin {
    registry: Registry,
    nats_connected: Gauge,
    nats: Option<async_nats::Client>,
    checks: Checks,
    probes: Vec<(String, Arc<ProbeFn>)>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("checks", &self.checks)
            .field(
                "probes",
                &self.probes.iter().map(|p| &p.0).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Admin {
    /// A new admin surface for a service of this `version` (the binary's), with the
    /// metrics every service exports already registered.
    pub fn new(version: &str) -> Admin {
        let mut registry = Registry::default();
        registry.register(
            "sluice_build",
            "The running build: its version, as a label",
            Info::new(vec![("version".to_owned(), version.to_owned())]),
        );
        let nats_connected = Gauge::default();
        registry.register(
            "sluice_nats_connected",
            "1 while the service's NATS connection is up, 0 while it is reconnecting",
            nats_connected.clone(),
        );
        Admin {
            registry,
            nats_connected,
            nats: None,
            checks: Checks::default(),
            probes: Vec::new(),
        }
    }

    /// The registry the service adds its own metrics to, under `prefix` (`sluice_runner`:
    /// a metric registered as `runs` is exported as `sluice_runner_runs_total`).
    pub fn registry(&mut self, prefix: &str) -> &mut Registry {
        self.registry.sub_registry_with_prefix(prefix)
    }

    /// The registry at the top, for metrics whose names the contract fixes without the
    /// service's prefix (`sluice_runs_pending`, `sluice_reporter_…`).
    pub fn root_registry(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Readiness and `sluice_nats_connected` follow this client's connection.
    pub fn nats(&mut self, client: async_nats::Client) -> &mut Admin {
        self.nats = Some(client);
        self
    }

    /// A check the service flips itself (a consumer loop: consuming or not), failing with
    /// `why` until it is first marked ready.
    pub fn check(&mut self, name: &str, why: &str) -> Check {
        self.checks.add(name, why)
    }

    /// A check made at each `/readyz`: `probe` answers `Err(reason)` when the service
    /// cannot work (a stream missing); one that takes longer than [`PROBE_TIMEOUT`] fails.
    pub fn probe<F, Fut>(&mut self, name: &str, probe: F) -> &mut Admin
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
    {
        let probe: Arc<ProbeFn> = Arc::new(move || Box::pin(probe()));
        self.probes.push((name.to_owned(), probe));
        self
    }

    /// The three routes, to serve alone or to merge into a service's own router.
    pub fn router(self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .route("/metrics", get(metrics))
            .with_state(Arc::new(Served {
                registry: self.registry,
                nats_connected: self.nats_connected,
                nats: self.nats,
                checks: self.checks,
                probes: self.probes,
            }))
    }

    /// Binds `listen` and serves the routes until `shutdown` is cancelled. Returns the
    /// bound address (port 0 picks one) and the server's task.
    pub async fn serve(
        self,
        listen: SocketAddr,
        shutdown: CancellationToken,
    ) -> Result<(SocketAddr, JoinHandle<()>)> {
        let fail = |source| Error::Listen {
            what: "the admin endpoints",
            addr: listen,
            source,
        };
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(fail)?;
        let addr = listener.local_addr().map_err(fail)?;
        Ok((addr, self.serve_on(listener, addr, shutdown)))
    }

    /// Serves the routes on `listener`, bound at `addr`, until `shutdown` is cancelled;
    /// the server's task.
    pub fn serve_on(
        self,
        listener: tokio::net::TcpListener,
        addr: SocketAddr,
        shutdown: CancellationToken,
    ) -> JoinHandle<()> {
        let router = self.router();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await;
            if let Err(error) = served {
                tracing::error!(%error, "the admin endpoints stopped");
            }
        });
        tracing::info!(%addr, "admin endpoints (/healthz, /readyz, /metrics) listening");
        task
    }
}

// === impl Checks ===

/// The checks a service flips; `None` is passing, `Some(reason)` failing.
#[derive(Debug, Clone, Default)]
struct Checks(Arc<Mutex<BTreeMap<String, Option<String>>>>);

impl Checks {
    fn add(&self, name: &str, why: &str) -> Check {
        self.lock().insert(name.to_owned(), Some(why.to_owned()));
        Check {
            name: name.to_owned(),
            checks: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Option<String>>> {
        // A panic while holding it cannot leave the map half-written: each write is one
        // insert.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn snapshot(&self) -> Vec<(String, Option<String>)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// One readiness check a service flips: its consumer loop marks it ready while it
/// consumes and failing, with the reason, while it recovers.
#[derive(Debug, Clone)]
pub struct Check {
    name: String,
    checks: Checks,
}

impl Check {
    pub fn ready(&self) {
        self.checks.lock().insert(self.name.clone(), None);
    }

    pub fn failing(&self, why: impl Into<String>) {
        self.checks
            .lock()
            .insert(self.name.clone(), Some(why.into()));
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.checks.lock().get(&self.name), Some(None))
    }
}

// === Serving ===

struct Served {
    registry: Registry,
    nats_connected: Gauge,
    nats: Option<async_nats::Client>,
    checks: Checks,
    probes: Vec<(String, Arc<ProbeFn>)>,
}

impl Served {
    /// Refreshed at each scrape and probe: the client knows its state, no task needed.
    fn nats_state(&self) -> Option<NatsState> {
        let state = self.nats.as_ref().map(async_nats::Client::connection_state);
        self.nats_connected
            .set(i64::from(matches!(state, Some(NatsState::Connected))));
        state
    }
}

/// One failed check in `/readyz`'s answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failed {
    pub check: String,
    pub reason: String,
}

/// `/readyz`'s answer body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub ready: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<Failed>,
}

/// Ready when NATS is connected (if the service uses it), every check passes and every
/// probe answered `Ok`. The NATS check comes first: while it is down, the probes say
/// nothing new, so they are not asked.
pub fn verdict(
    nats: Option<NatsState>,
    checks: &[(String, Option<String>)],
    probes: &[(String, std::result::Result<(), String>)],
) -> Verdict {
    let mut failed = Vec::new();
    if let Some(state) = nats {
        if state != NatsState::Connected {
            failed.push(Failed {
                check: "nats".into(),
                reason: format!("NATS connection {state}; reconnecting"),
            });
        }
    }
    for (check, why) in checks {
        if let Some(reason) = why {
            failed.push(Failed {
                check: check.clone(),
                reason: reason.clone(),
            });
        }
    }
    for (check, answer) in probes {
        if let Err(reason) = answer {
            failed.push(Failed {
                check: check.clone(),
                reason: reason.clone(),
            });
        }
    }
    Verdict {
        ready: failed.is_empty(),
        failed,
    }
}

async fn readyz(State(served): State<Arc<Served>>) -> Response {
    let nats = served.nats_state();
    let mut answers = Vec::new();
    if !nats.as_ref().is_some_and(|s| *s != NatsState::Connected) {
        for (name, probe) in &served.probes {
            let answer = match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
                Ok(answer) => answer,
                Err(_) => Err(format!("no answer within {}s", PROBE_TIMEOUT.as_secs_f64())),
            };
            answers.push((name.clone(), answer));
        }
    }
    let verdict = verdict(nats, &served.checks.snapshot(), &answers);
    let code = if verdict.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::to_string(&verdict).unwrap_or_default() + "\n";
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn metrics(State(served): State<Arc<Served>>) -> Response {
    served.nats_state();
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &served.registry);
    ([(header::CONTENT_TYPE, OPENMETRICS)], out).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, why: Option<&str>) -> (String, Option<String>) {
        (name.to_owned(), why.map(str::to_owned))
    }

    #[test]
    fn ready_only_when_everything_passes() {
        let all_good = verdict(
            Some(NatsState::Connected),
            &[check("consumer:events", None)],
            &[("streams".into(), Ok(()))],
        );
        assert_eq!(
            all_good,
            Verdict {
                ready: true,
                failed: vec![]
            }
        );
        // A service without NATS (none given) is judged on its checks alone.
        assert!(verdict(None, &[], &[]).ready);
    }

    #[test]
    fn each_failure_is_named_with_its_reason() {
        let v = verdict(
            Some(NatsState::Disconnected),
            &[
                check("consumer:events", Some("the pull stream ended; recovering")),
                check("consumer:statuses", None),
            ],
            &[("streams".into(), Err("no stream SLUICE_EVENTS".into()))],
        );
        assert!(!v.ready);
        let names: Vec<&str> = v.failed.iter().map(|f| f.check.as_str()).collect();
        assert_eq!(names, ["nats", "consumer:events", "streams"]);
        assert_eq!(v.failed[1].reason, "the pull stream ended; recovering");
        assert_eq!(
            serde_json::to_value(&v).unwrap()["failed"][2],
            serde_json::json!({"check": "streams", "reason": "no stream SLUICE_EVENTS"})
        );
    }

    #[test]
    fn a_check_fails_until_marked_ready_and_again_when_told() {
        let checks = Checks::default();
        let c = checks.add("consumer:events", "not started");
        assert!(!c.is_ready());
        assert_eq!(
            checks.snapshot(),
            vec![check("consumer:events", Some("not started"))]
        );
        c.ready();
        assert!(c.is_ready());
        c.failing("the pull stream ended");
        assert_eq!(
            checks.snapshot(),
            vec![check("consumer:events", Some("the pull stream ended"))]
        );
    }

    #[test]
    fn metrics_every_service_exports_are_registered() {
        let admin = Admin::new("1.2.3");
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &admin.registry).unwrap();
        assert!(
            out.contains("sluice_build_info{version=\"1.2.3\"} 1"),
            "{out}"
        );
        assert!(out.contains("sluice_nats_connected 0"), "{out}");
    }
}
