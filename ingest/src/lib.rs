//! `sluice ingest`: verifies webhook signatures and stores every event in JetStream
//! before it answers the forge.
//!
//! [`serve`] runs the service on a bound listener until the shutdown token trips;
//! the `sluice` binary and the tests both start it through here.
#![forbid(unsafe_code)]

mod error;
pub mod http;
pub mod metrics;
pub mod normalize;
pub mod publish;
pub mod refusals;
pub mod secrets;
pub mod server;
pub mod verify;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sluice_core::admin::{Admin, Check};
use sluice_core::nats::NatsOptions;
use sluice_core::streams::{self, StreamSettings};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use error::{Error, PublishError, Result};
pub use secrets::{SecretSources, Secrets};

/// Default `--listen`: every interface, port 8080.
pub const LISTEN: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
    std::net::Ipv4Addr::UNSPECIFIED,
    8080,
));
/// Default `--max-body-bytes`: the forges' own cap, 25 MiB.
pub const MAX_BODY_BYTES: usize = 25 * 1024 * 1024;
/// Default `--publish-timeout`: nearly all of the forges' 10 s, so that a slow
/// acknowledgement under a spike is waited for rather than answered 503 while it is
/// stored; the wait never goes past [`publish::ANSWER_WITHIN`] from the request's
/// arrival.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(8);
/// Default `--shed-after`: a request that would be answered later than this after its
/// arrival, because JetStream must first store the events ahead of it, is answered 503
/// at once, unsent. Queueing that long means JetStream is behind the offered rate, not
/// busy for a moment; answering within it keeps the forge's view of a spike (which
/// delivery failed) immediate and exact.
pub const SHED_AFTER: Duration = Duration::from_secs(1);
/// Default `--read-timeout`: time a client has to send its body.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `--signature-tolerance`: Standard Webhooks' 5 minutes either way.
pub const SIGNATURE_TOLERANCE: Duration = Duration::from_secs(300);
/// Default `--shutdown-grace`: time requests in flight get to finish after SIGTERM.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// Default `--header-timeout`: the forges send a request's headers at once, so a
/// client still sending them after this is broken or holding a connection on purpose.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `--idle-timeout`: longer than the 60 s idle timeout of common load
/// balancers, so that the balancer, not ingest, closes an idle kept-alive connection
/// (the side that closes second can race a request the other is sending).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// Default `--max-connections`: well above what forges and a load balancer open, and
/// under the usual 1,024 open files of a process that has not raised its limit.
pub const MAX_CONNECTIONS: usize = 900;
/// What `Retry-After` says on a 503.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Default `--queue-wait`: a connection over the cap is answered 503 after this if no
/// slot frees, leaving the rest of the forge's 10 s to a request that gets one.
pub const QUEUE_WAIT: Duration = Duration::from_secs(3);

/// Everything `sluice ingest` is configured with.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Where webhooks are served, under the connection cap.
    pub listen: SocketAddr,
    /// Where [`run`] serves `/healthz`, `/readyz` and `/metrics`
    /// (`sluice_core::admin::DEFAULT_ADMIN_LISTEN` by default), outside the webhooks'
    /// connection cap: a spike that fills every webhook slot must not fail the
    /// kubelet's probes (a failed liveness probe restarts ingest mid-spike) or
    /// Prometheus's scrape. `None` serves them beside the webhooks.
    pub admin_listen: Option<SocketAddr>,
    pub nats: NatsOptions,
    pub secrets: Secrets,
    pub streams: StreamSettings,
    pub max_body_bytes: usize,
    /// Time allowed for JetStream to acknowledge an event before answering 503.
    pub publish_timeout: Duration,
    /// The longest predicted wait for JetStream a request is admitted to
    /// ([`SHED_AFTER`]).
    pub shed_after: Duration,
    /// Time allowed to receive a request body.
    pub read_timeout: Duration,
    pub tolerance: Duration,
    pub allow_sha1: bool,
    /// How long in-flight requests may take to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// Time allowed for a request's headers ([`HEADER_TIMEOUT`]).
    pub header_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request ([`IDLE_TIMEOUT`]).
    pub idle_timeout: Duration,
    /// Connections served at once ([`MAX_CONNECTIONS`]).
    pub max_connections: usize,
    /// Time a connection over the cap waits for a slot ([`QUEUE_WAIT`]).
    pub queue_wait: Duration,
}

impl IngestConfig {
    /// Defaults for everything but where to listen, the bus and the secrets.
    pub fn new(listen: SocketAddr, nats: NatsOptions, secrets: Secrets) -> Self {
        IngestConfig {
            listen,
            admin_listen: Some(
                sluice_core::admin::DEFAULT_ADMIN_LISTEN
                    .parse()
                    .expect("the default admin address parses"),
            ),
            nats,
            secrets,
            streams: StreamSettings::default(),
            max_body_bytes: MAX_BODY_BYTES,
            publish_timeout: PUBLISH_TIMEOUT,
            shed_after: SHED_AFTER,
            read_timeout: READ_TIMEOUT,
            tolerance: SIGNATURE_TOLERANCE,
            allow_sha1: false,
            shutdown_grace: SHUTDOWN_GRACE,
            header_timeout: HEADER_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
            queue_wait: QUEUE_WAIT,
        }
    }

    /// Refuses limits that would make ingest refuse or close every connection (the
    /// command line refuses them before this, with the flag's name).
    fn check(&self) -> Result<()> {
        let invalid = |setting, requirement| {
            Err(Error::InvalidSetting {
                setting,
                requirement,
            })
        };
        if self.max_body_bytes == 0 {
            return invalid("the largest body", "must be at least 1 byte");
        }
        if self.publish_timeout.is_zero() {
            return invalid("the publish timeout", "must be longer than zero");
        }
        if self.shed_after.is_zero() {
            return invalid("the shed-after wait", "must be longer than zero");
        }
        if self.read_timeout.is_zero() {
            return invalid("the read timeout", "must be longer than zero");
        }
        if self.tolerance.is_zero() {
            return invalid("the signature tolerance", "must be longer than zero");
        }
        if self.header_timeout.is_zero() {
            return invalid("the header timeout", "must be longer than zero");
        }
        if self.idle_timeout.is_zero() {
            return invalid("the idle timeout", "must be longer than zero");
        }
        if self.queue_wait >= publish::ANSWER_WITHIN {
            return invalid(
                "the queue wait",
                "must be shorter than the 9 s ingest answers within",
            );
        }
        if self.max_connections == 0 || self.max_connections > tokio::sync::Semaphore::MAX_PERMITS {
            return invalid("max connections", "must be at least 1");
        }
        Ok(())
    }
}

/// Binds `config.listen` (and `config.admin_listen`) and serves until `shutdown` trips.
pub async fn run(config: IngestConfig, shutdown: CancellationToken) -> Result<()> {
    // Refuse bad settings before taking the ports.
    config.check()?;
    let bind = |what, addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { what, addr, source })
    };
    let listener = bind("webhooks", config.listen).await?;
    let admin = match config.admin_listen {
        Some(addr) => Some(bind("the admin endpoints", addr).await?),
        None => None,
    };
    serve(listener, admin, config, shutdown).await
}

/// Serves webhooks on `listener` and the admin endpoints on `admin` (beside the
/// webhooks when `None`) until `shutdown` trips, then stops accepting, lets in-flight
/// requests finish their publish, and returns within `config.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    admin_listener: Option<TcpListener>,
    config: IngestConfig,
    shutdown: CancellationToken,
) -> Result<()> {
    config.check()?;
    for (name, set) in [
        ("github", &config.secrets.github),
        ("gitlab", &config.secrets.gitlab),
        ("generic", &config.secrets.generic),
    ] {
        if set.is_empty() {
            tracing::warn!(endpoint = %format!("/webhooks/{name}"), "no secret configured: this endpoint refuses every request");
        }
    }
    let client = sluice_core::nats::connect(&config.nats).await?;
    let publisher =
        publish::Publisher::new(client.clone(), config.publish_timeout, config.shed_after);
    let metrics = metrics::Metrics::default();
    let mut admin = Admin::new(env!("CARGO_PKG_VERSION"));
    metrics.register(admin.registry("sluice_ingest"), &publisher.backlog_view());
    admin.nats(client.clone());
    let provisioned = admin.check("streams", "streams not provisioned yet");
    let probe_js = publisher.jetstream().clone();
    admin.probe("events stream", move || {
        let js = probe_js.clone();
        async move {
            streams::check_writable(&js, &[sluice_core::subjects::EVENTS_STREAM])
                .await
                .map_err(|e| e.to_string())
        }
    });
    let state = Arc::new(http::AppState {
        secrets: config.secrets,
        publisher,
        metrics,
        limits: http::Limits {
            max_body_bytes: config.max_body_bytes,
            read_timeout: config.read_timeout,
            tolerance: config.tolerance,
            allow_sha1: config.allow_sha1,
            retry_after: RETRY_AFTER,
        },
        refusals: Default::default(),
    });

    let addr = listener.local_addr().map_err(Error::Serve)?;
    // The admin endpoints and the refusals' report outlive the drain after `shutdown`
    // (its timeouts and in-flight figures stay scrapeable); stopped after it.
    let after_drain = CancellationToken::new();
    let (admin_task, admin_beside) = match admin_listener {
        Some(l) => {
            let admin_addr = l.local_addr().map_err(Error::Serve)?;
            (
                Some(admin.serve_on(l, admin_addr, after_drain.clone())),
                None,
            )
        }
        None => (None, Some(admin.router())),
    };
    let report = {
        let (state, stop) = (state.clone(), after_drain.clone());
        tokio::spawn(async move { refusals::report_every_second(&state.refusals, stop).await })
    };
    let provisioning = tokio::spawn(provision(
        state.clone(),
        provisioned,
        config.streams,
        shutdown.clone(),
    ));
    tracing::info!(%addr, nats = %config.nats.url, "ingest listening");
    let limits = server::ConnectionLimits {
        header_timeout: config.header_timeout,
        idle_timeout: config.idle_timeout,
        max_connections: config.max_connections,
        queue_wait: config.queue_wait,
        retry_after: RETRY_AFTER,
    };
    let connections = state.metrics.connections.clone();
    let load = state.clone();
    let app = match admin_beside {
        Some(routes) => http::router(state).merge(routes),
        None => http::router(state),
    };
    let server = server::serve(
        listener,
        app,
        limits,
        connections,
        move || load.publisher.in_flight(),
        shutdown.clone(),
    );
    let grace = config.shutdown_grace;
    tokio::select! {
        () = server => {},
        () = async { shutdown.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "shutdown grace period over with requests still in flight");
        }
    }
    provisioning.abort();
    after_drain.cancel();
    // The last refusals reported; a probe or scrape in flight finishes.
    let _ = tokio::time::timeout(Duration::from_secs(1), report).await;
    if let Some(task) = admin_task {
        let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
    }
    // Whatever was acknowledged is stored; flushing only settles the connection.
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
    tracing::info!("ingest stopped");
    Ok(())
}

/// Checks the streams ingest writes (creating them only when missing, never changing
/// them), retrying until NATS answers. Until then `/readyz` says not ready and webhooks
/// are answered 503, so nothing is lost meanwhile.
async fn provision(
    state: Arc<http::AppState>,
    provisioned: Check,
    settings: StreamSettings,
    shutdown: CancellationToken,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let js = state.publisher.jetstream();
        match streams::prepare(js, &settings, NEEDS).await {
            Ok(differences) => {
                streams::report("ingest", &differences);
                provisioned.ready();
                tracing::info!("streams ready");
                return;
            }
            Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "cannot provision streams yet"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// What ingest writes: events, and oversized bodies beside them.
const NEEDS: streams::Needs = streams::Needs {
    streams: &[sluice_core::subjects::EVENTS_STREAM],
    buckets: &[],
    object_stores: &[sluice_core::subjects::PAYLOADS_BUCKET],
};
