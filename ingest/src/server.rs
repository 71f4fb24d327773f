//! The accept loop: at most `max_connections` connections at once, each closed when
//! its client is too slow with a request's headers or leaves it idle too long, and a
//! graceful drain on shutdown.
//!
//! hyper's own `header_read_timeout` is not used: its timer also runs while a kept-alive
//! connection waits for its next request, so a header timeout and a (longer) idle
//! timeout cannot be told apart with it. Each connection instead tracks its [`Phase`]
//! from what its socket reads and what its service answers, and a watchdog closes it
//! when the phase's deadline passes.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::metrics::{ConnectionMetrics, TimeoutPhase};

/// Limits on connections, as opposed to requests.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time a client has to send a request's headers: from accepting the connection for
    /// the first request, from the request's first byte for later ones.
    pub header_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

/// Serves `app` on `listener` until `shutdown` trips, then stops accepting, lets every
/// connection finish the request it is serving, and returns once all are closed. The
/// caller bounds how long that may take.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        let permit = match slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                // Not accepting leaves the next client in the kernel's backlog until a
                // slot frees, which every limit below guarantees happens.
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    permit = slots.clone().acquire_owned() => {
                        metrics.limited.inc();
                        permit.expect("the semaphore is never closed")
                    }
                }
            }
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: the listener itself is
                    // fine, so wait a moment instead of spinning on the error.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        connections.spawn(connection(
            stream,
            app.clone(),
            limits,
            metrics.clone(),
            permit,
            shutdown.clone(),
        ));
    }
    // Closing the listener refuses new connections while the open ones drain.
    drop(listener);
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it closes, times out, or drains after shutdown.
async fn connection(
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    _permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    serve_connection(stream, app, limits, metrics, shutdown).await;
}

/// Serves one connection on any byte stream exactly as the accept loop serves a TCP
/// one (the fuzz target feeds raw requests through it).
pub async fn serve_connection<S>(
    stream: S,
    app: Router,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    metrics.open.inc();
    let _open = Open(&metrics);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let busy = requests.busy();
        let app = app.clone();
        async move {
            let response = app.oneshot(request.map(axum::body::Body::new)).await;
            drop(busy);
            let response: Result<_, Infallible> = response;
            response
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(conn);
    let mut draining = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            phase = activity.expired(limits) => {
                metrics.timed_out.get_or_create(&TimeoutPhase { phase }).inc();
                tracing::debug!(phase, "connection closed: too slow");
                // Dropping the connection closes the socket.
                return;
            }
            () = shutdown.cancelled(), if !draining => {
                // Idle connections close now; a request in progress is answered first.
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    }
}

struct Open<'a>(&'a ConnectionMetrics);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.open.dec();
    }
}

// === Phases ===

/// Where a connection is, and so which deadline applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Receiving a request's headers since `since`.
    Head { since: Instant },
    /// A request is being served: its body and its publish have their own timeouts.
    Busy,
    /// Waiting for the next request since `since`.
    Idle { since: Instant },
}

impl Phase {
    /// The deadline of this phase and its metric label; `None` while busy.
    fn deadline(self, limits: ConnectionLimits) -> Option<(Instant, &'static str)> {
        match self {
            Phase::Head { since } => Some((since + limits.header_timeout, "header")),
            Phase::Idle { since } => Some((since + limits.idle_timeout, "idle")),
            Phase::Busy => None,
        }
    }
}

/// A connection's phase, shared by its socket, its service and its watchdog.
#[derive(Debug)]
struct Activity {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Activity {
            phase: Mutex::new(Phase::Head {
                since: Instant::now(),
            }),
            changed: Notify::new(),
        }
    }

    fn set(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner()) = phase;
        self.changed.notify_one();
    }

    fn get(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes arrived: on an idle connection they start the next request's headers.
    fn read_some(&self) {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if matches!(*phase, Phase::Idle { .. }) {
            *phase = Phase::Head {
                since: Instant::now(),
            };
            drop(phase);
            self.changed.notify_one();
        }
    }

    /// The headers are in and the request is being served until the guard is dropped.
    fn busy(self: &Arc<Self>) -> Busy {
        self.set(Phase::Busy);
        Busy(self.clone())
    }

    /// Resolves with the phase's label once the current phase outlives its deadline.
    async fn expired(&self, limits: ConnectionLimits) -> &'static str {
        loop {
            // Registered before the phase is read, so a change in between still wakes.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.get().deadline(limits) {
                Some((at, label)) if at <= Instant::now() => return label,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }
}

/// Marks the connection idle again when its request has been answered (or dropped).
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.set(Phase::Idle {
            since: Instant::now(),
        });
    }
}

/// The socket, reporting reads to the connection's [`Activity`].
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.read_some();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ConnectionLimits = ConnectionLimits {
        header_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        max_connections: 1,
    };

    #[test]
    fn each_phase_has_its_own_deadline() {
        let t = Instant::now();
        assert_eq!(
            Phase::Head { since: t }.deadline(LIMITS),
            Some((t + Duration::from_secs(5), "header"))
        );
        assert_eq!(
            Phase::Idle { since: t }.deadline(LIMITS),
            Some((t + Duration::from_secs(60), "idle"))
        );
        assert_eq!(Phase::Busy.deadline(LIMITS), None);
    }

    #[tokio::test(start_paused = true)]
    async fn phases_follow_reads_and_requests() {
        let activity = Arc::new(Activity::new());
        assert!(matches!(activity.get(), Phase::Head { .. }));
        // Bytes of the first request's headers do not restart its deadline.
        let first = activity.get();
        tokio::time::advance(Duration::from_secs(1)).await;
        activity.read_some();
        assert_eq!(activity.get(), first);
        let busy = activity.busy();
        assert_eq!(activity.get(), Phase::Busy);
        drop(busy);
        assert!(matches!(activity.get(), Phase::Idle { .. }));
        tokio::time::advance(Duration::from_secs(30)).await;
        activity.read_some();
        let Phase::Head { since } = activity.get() else {
            panic!("a read on an idle connection starts the next request's headers");
        };
        assert_eq!(since, Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_fires_at_the_current_phases_deadline() {
        let activity = Arc::new(Activity::new());
        let started = Instant::now();
        assert_eq!(activity.expired(LIMITS).await, "header");
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        let activity = Arc::new(Activity::new());
        let busy = activity.busy();
        let watchdog = tokio::spawn({
            let activity = activity.clone();
            async move { activity.expired(LIMITS).await }
        });
        // Busy: no deadline at all, however long the request takes.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(!watchdog.is_finished());
        let idle_from = Instant::now();
        drop(busy);
        assert_eq!(watchdog.await.expect("watchdog"), "idle");
        assert_eq!(idle_from.elapsed(), Duration::from_secs(60));
    }
}
