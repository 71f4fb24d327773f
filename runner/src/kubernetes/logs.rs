//! Connections for following container logs.
//!
//! kube-rs's client speaks HTTP/1.1, where every followed log holds a connection of
//! its own for as long as the container runs: with thousands of runs in flight that is
//! thousands of connections, each with its buffers and task (about 30 KB). Logs are
//! therefore followed through clients of our own that offer HTTP/2, which API servers
//! speak: one connection carries many log streams, each costing a few hundred bytes.
//! A server caps the streams of one connection (Go's default is 250), and a request
//! over the cap waits for a free stream instead of opening a connection, so each
//! connection carries at most `per_connection` logs and more are opened as needed.
//! Where HTTP/2 is not offered (a plain `http://` server, a proxy that speaks only
//! HTTP/1.1) the same code falls back to a connection per log, as before.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use k8s_openapi::api::core::v1::Pod;
use kube::api::LogParams;
use kube::client::ConfigExt;
use kube::Api;
use tower::{BoxError, ServiceBuilder};

use super::throttle::Throttle;
use crate::{Error, Result};

/// How many logs one connection carries at most: under the stream caps API servers
/// and proxies set (Go: 250, nginx: 128).
pub const STREAMS_PER_CONNECTION: usize = 100;

/// A pool of log connections.
pub struct LogClients {
    config: kube::Config,
    throttle: Throttle,
    namespace: String,
    per_connection: NonZeroUsize,
    slots: Mutex<Vec<Arc<Slot>>>,
}

impl std::fmt::Debug for LogClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogClients")
            .field("per_connection", &self.per_connection)
            .finish_non_exhaustive()
    }
}

struct Slot {
    api: Api<Pod>,
    open: AtomicUsize,
    /// Held by the first log opened on this slot until its connection is up, so the
    /// logs opened at the same moment share that connection instead of each opening
    /// one before HTTP/2 is known to be spoken.
    first: tokio::sync::Mutex<bool>,
}

/// One followed log's claim on a connection; released when dropped.
pub struct Lease {
    slot: Arc<Slot>,
}

impl Lease {
    /// Follows a container's log over this lease's connection.
    pub async fn log_stream(
        &self,
        pod: &str,
        params: &LogParams,
    ) -> kube::Result<impl futures::AsyncBufRead + use<>> {
        let mut first = self.slot.first.lock().await;
        if *first {
            drop(first);
            return Box::pin(self.slot.api.log_stream(pod, params)).await;
        }
        let stream = Box::pin(self.slot.api.log_stream(pod, params)).await;
        *first = true;
        stream
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.slot.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl LogClients {
    pub fn new(
        config: kube::Config,
        throttle: Throttle,
        namespace: String,
        per_connection: NonZeroUsize,
    ) -> Result<Self> {
        let clients = LogClients {
            config,
            throttle,
            namespace,
            per_connection,
            slots: Mutex::new(Vec::new()),
        };
        // Made now, so a configuration we cannot use fails at start-up, not at the
        // first log; and there is always a connection to fall back on.
        let first = clients.slot()?;
        clients.lock().push(first);
        Ok(clients)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        match self.slots.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn slot(&self) -> Result<Arc<Slot>> {
        Ok(Arc::new(Slot {
            api: Api::namespaced(self.client()?, &self.namespace),
            open: AtomicUsize::new(0),
            first: tokio::sync::Mutex::new(false),
        }))
    }

    /// A connection with room for one more log, held until the lease is dropped.
    pub fn lease(&self) -> Lease {
        let mut slots = self.lock();
        // Connections whose logs have all ended are let go (hyper closes the idle
        // connection), keeping one.
        let mut kept = false;
        slots.retain(|s| {
            let keep = s.open.load(Ordering::Acquire) > 0 || !kept;
            kept |= keep;
            keep
        });
        let free = slots
            .iter()
            .find(|s| s.open.load(Ordering::Acquire) < self.per_connection.get())
            .cloned();
        let slot = match free {
            Some(slot) => slot,
            None => match self.slot() {
                Ok(slot) => {
                    slots.push(slot.clone());
                    slot
                }
                Err(e) => {
                    // Credentials that worked at start-up failed (an exec plugin, say):
                    // over the cap on a working connection beats no log at all.
                    tracing::warn!(error = %e, "cannot make a new log connection; sharing one");
                    slots
                        .iter()
                        .min_by_key(|s| s.open.load(Ordering::Acquire))
                        .cloned()
                        .expect("one connection is always kept")
                }
            },
        };
        // Counted while the list is locked, so two callers never both take the last
        // free stream of a connection, and a connection is not let go as it is leased.
        slot.open.fetch_add(1, Ordering::AcqRel);
        Lease { slot }
    }

    /// A kube client with a connection of its own, HTTP/2 when the server offers it.
    fn client(&self) -> Result<kube::Client> {
        let config = &self.config;
        let fail = |source| Error::KubeClient {
            purpose: "Kubernetes client for logs",
            source,
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(config.connect_timeout);
        // Over HTTP/1.1 there are no pings: TCP keepalive finds a dead peer instead.
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls = config.rustls_client_config().map_err(fail)?;
        let mut builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        if let Some(name) = &config.tls_server_name {
            let name = rustls::pki_types::ServerName::try_from(name.clone()).map_err(|source| {
                Error::TlsServerName {
                    name: name.clone(),
                    source,
                }
            })?;
            builder =
                builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name));
        }
        let connector = builder.enable_all_versions().wrap_connector(http);
        let hyper = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            // A connection that died silently (a NAT or proxy dropped it) is found
            // within a minute, and its logs re-opened.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(20))
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        let service = ServiceBuilder::new()
            .layer(config.base_uri_layer())
            .option_layer(config.auth_layer().map_err(fail)?)
            .layer(config.extra_headers_layer().map_err(fail)?)
            .map_err(BoxError::from)
            .service(hyper);
        Ok(
            kube::client::ClientBuilder::new(service, config.default_namespace.clone())
                .with_layer(&self.throttle)
                .build(),
        )
    }
}
