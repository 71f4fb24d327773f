//! The Sluice dashboard: server-rendered pages of runs, their logs, dispatch decisions,
//! pipelines and clusters, read from JetStream. It only reads (its NATS credential is
//! [`sluice_core::roles::Role::Dashboard`]): several replicas can serve behind one
//! Service, each folding the status stream into its own [`index::RunIndex`].
#![forbid(unsafe_code)]

mod actions;
pub mod ansi;
pub mod groups;
pub mod index;
mod live;
mod pages;
pub mod read;

use std::net::SocketAddr;
use std::sync::Arc;

use async_nats::jetstream;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use sluice_core::admin::Admin;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use actions::Actions;

/// Where `--listen` binds by default.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8090";

/// Lines of each step the run page opens with; earlier ones are paged in on demand.
pub const LOG_TAIL: usize = 500;

/// Runs per page of `/runs`.
pub const PAGE_SIZE: usize = 50;

/// Every page's Content-Security-Policy: only this origin's own script and style, no
/// inline code, nothing framed, forms posting only here.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The dashboard's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] sluice_core::Error),
    #[error("rendering a page")]
    Render(#[from] askama::Error),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        // The detail goes to the log; the page says only that reading failed.
        tracing::error!(error = %self, source = ?std::error::Error::source(&self), "a page failed");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "The dashboard could not read JetStream; see its log.\n",
        )
            .into_response()
    }
}

/// What the handlers share.
#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn only_same_site_requests_may_write() {
        assert!(same_site(&headers(&[])));
        assert!(same_site(&headers(&[
            ("host", "d:8090"),
            ("origin", "http://d:8090")
        ])));
        assert!(same_site(&headers(&[("sec-fetch-site", "same-origin")])));
        assert!(!same_site(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(!same_site(&headers(&[("sec-fetch-site", "same-site")])));
        assert!(!same_site(&headers(&[
            ("host", "d:8090"),
            ("origin", "null")
        ])));
        assert!(!same_site(&headers(&[
            ("host", "d:8090"),
            ("origin", "http://evil:8090")
        ])));
    }
}

#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// Cancel and rerun, when `--allow-actions` offers them.
    pub actions: Option<Arc<Actions>>,
    pub index: Arc<index::RunIndex>,
    /// Where the chunks of the logs opened last are.
    pub logs: Arc<read::LogMaps>,
    pub shutdown: CancellationToken,
}

/// A started dashboard: its address and its tasks.
#[derive(Debug)]
pub struct Dashboard {
    pub addr: SocketAddr,
    server: JoinHandle<()>,
    follower: JoinHandle<()>,
}

impl Dashboard {
    /// Waits until both the server and the index have stopped (after `shutdown`).
    pub async fn wait(self) {
        let _ = self.server.await;
        let _ = self.follower.await;
    }
}

/// Binds `listen`, starts folding the status stream and serves the pages and the admin
/// endpoints (`/healthz`, `/readyz` — ready once the stored states are all read —,
/// `/metrics`) until `shutdown`. Open server-sent event streams end with it. With
/// `actions`, run pages offer cancel and rerun to whom they allow.
pub async fn start(
    client: async_nats::Client,
    listen: SocketAddr,
    actions: Option<Actions>,
    shutdown: CancellationToken,
) -> Result<Dashboard> {
    let js = jetstream::new(client.clone());
    let index = Arc::new(index::RunIndex::default());
    let mut admin = Admin::new(env!("CARGO_PKG_VERSION"));
    admin.nats(client.clone());
    let ready = admin.check("runs", "the stored run states are not all read yet");
    let follower = {
        let (index, js, shutdown) = (index.clone(), js.clone(), shutdown.clone());
        tokio::spawn(async move { index.follow(&js, ready, shutdown).await })
    };
    let state = AppState {
        client,
        js,
        actions: actions.map(Arc::new),
        index,
        logs: Arc::default(),
        shutdown: shutdown.clone(),
    };
    let router = router(state).merge(admin.router());
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::Listen {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: listen,
        source,
    })?;
    let server = tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "the dashboard stopped");
        }
    });
    tracing::info!(%addr, "dashboard listening");
    Ok(Dashboard {
        addr,
        server,
        follower,
    })
}

fn router(state: AppState) -> Router {
    let mut routes = pages::routes().merge(live::routes());
    if state.actions.is_some() {
        routes = routes.merge(actions::routes());
    }
    routes
        .with_state(state)
        .layer(axum::middleware::from_fn(same_site_writes_only))
        .layer(axum::middleware::map_response(security_headers))
}

/// Refuses, with 403, any request but a read (GET, HEAD) that a browser says comes from
/// another site (`Sec-Fetch-Site`), or whose `Origin` is not this host: a page elsewhere
/// cannot make a visitor's browser post here.
async fn same_site_writes_only(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use axum::http::Method;
    if matches!(*request.method(), Method::GET | Method::HEAD) || same_site(request.headers()) {
        return next.run(request).await;
    }
    tracing::warn!(method = %request.method(), uri = %request.uri(), "a cross-site request was refused");
    (StatusCode::FORBIDDEN, "cross-site requests are refused\n").into_response()
}

fn same_site(headers: &axum::http::HeaderMap) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if !matches!(site, "same-origin" | "none") {
            return false;
        }
    }
    match (text("origin"), text("host")) {
        (None, _) => true,
        (Some(origin), Some(host)) => {
            origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                == Some(host)
        }
        (Some(_), None) => false,
    }
}

/// Headers on every answer: the CSP, no sniffing, no framing, no referrer to forges.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
