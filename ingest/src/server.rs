//! The accept loop: at most `max_connections` connections at once, each closed when
//! its client is too slow with a request's headers or leaves it idle too long, and a
//! graceful drain on shutdown.
//!
//! A connection beyond the cap waits in a small waiting room, accepted, for
//! `queue_wait` at most; if no slot frees by then it is answered 503 at once. With the
//! room full too, what happens depends on what holds the slots. When at least half of
//! them are requests being served — waiting on JetStream, which cannot keep up — a
//! connection is accepted only to be answered 503 at once (at most as many of those at
//! a time as the cap): left in the kernel's listen backlog it would overflow the
//! accept queue, the kernel would drop the handshake's last step, and the client would
//! send its request on a connection nobody accepts, unanswered until the forge gives
//! up (in a spike of 10,000 webhooks, 258 were). When the slots are held by clients
//! slow with their headers or idle instead (a slow-loris flood), new connections wait
//! in the backlog, as the slow ones are cut by their timeouts and the forge's
//! deliveries then get through rather than being refused.
//! Each request carries when it [`Arrived`], so the handler's budget starts at accept.
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
use http_body_util::BodyExt;
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
    /// Connections served at once; more wait in the waiting room, then the backlog.
    pub max_connections: usize,
    /// Time a connection accepted over the cap waits for a slot before it is
    /// answered 503.
    pub queue_wait: Duration,
    /// What `Retry-After` says on that 503.
    pub retry_after: Duration,
}

impl ConnectionLimits {
    /// Connections accepted over the cap to wait for a slot: a tenth of the cap, so
    /// that the default cap and its waiting room stay under 1,024 open files.
    pub fn waiting_room(&self) -> usize {
        (self.max_connections / 10).max(1)
    }
}

/// When a request arrived: for a connection's first request, when the connection was
/// accepted (waiting for a slot included); for a later one, when its first byte came.
/// A request extension, read by the webhook handlers to start their answer budget.
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub std::time::Instant);

/// How a connection was let in.
enum Admission {
    Slot(OwnedSemaphorePermit),
    Waiting(OwnedSemaphorePermit),
    /// Cap and waiting room full: answered 503 at once.
    Refused(OwnedSemaphorePermit),
}

/// Serves `app` on `listener` until `shutdown` trips, then stops accepting, lets every
/// connection finish the request it is serving, and returns once all are closed. The
/// caller bounds how long that may take. `store_waiting` counts the requests whose
/// publish waits on JetStream now.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    store_waiting: impl Fn() -> usize,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let room = Arc::new(Semaphore::new(limits.waiting_room()));
    // Refusals take a second or two at most (the request is drained, then 503), but
    // each holds a file: bounded like the slots.
    let refusing = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    'accepting: loop {
        let admission = loop {
            if let Ok(slot) = slots.clone().try_acquire_owned() {
                break Admission::Slot(slot);
            }
            if let Ok(place) = room.clone().try_acquire_owned() {
                break Admission::Waiting(place);
            }
            if store_bound(store_waiting(), limits.max_connections) {
                if let Ok(refusal) = refusing.clone().try_acquire_owned() {
                    break Admission::Refused(refusal);
                }
            }
            // The next client waits in the kernel's backlog until a slot frees (every
            // limit guarantees one does), or until the store becomes what holds the
            // slots and refusing at once is right.
            tokio::select! {
                () = shutdown.cancelled() => break 'accepting,
                slot = slots.clone().acquire_owned() => {
                    metrics.limited.inc();
                    break Admission::Slot(slot.expect("the semaphore is never closed"));
                }
                () = tokio::time::sleep(RECHECK) => {}
            }
        };
        let stream = tokio::select! {
            () = shutdown.cancelled() => break 'accepting,
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
        let accepted = Instant::now();
        let (app, metrics, shutdown) = (app.clone(), metrics.clone(), shutdown.clone());
        match admission {
            Admission::Refused(refusal) => {
                connections.spawn(async move {
                    metrics.refused.inc();
                    refuse(stream, limits).await;
                    drop(refusal);
                });
            }
            Admission::Slot(slot) => {
                connections.spawn(async move {
                    serve_accepted(stream, app, limits, metrics, accepted, shutdown).await;
                    drop(slot);
                });
            }
            Admission::Waiting(place) => {
                let slots = slots.clone();
                connections.spawn(async move {
                    let waited = tokio::select! {
                        () = shutdown.cancelled() => return,
                        waited = tokio::time::timeout_at(
                            accepted + limits.queue_wait,
                            slots.acquire_owned(),
                        ) => waited,
                    };
                    drop(place);
                    match waited {
                        Ok(slot) => {
                            metrics.limited.inc();
                            let slot = slot.expect("the semaphore is never closed");
                            serve_accepted(stream, app, limits, metrics, accepted, shutdown).await;
                            drop(slot);
                        }
                        Err(_) => {
                            metrics.refused.inc();
                            refuse(stream, limits).await;
                        }
                    }
                });
            }
        }
    }
    // Closing the listener refuses new connections while the open ones drain.
    drop(listener);
    connections.close();
    connections.wait().await;
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
    serve_accepted(stream, app, limits, metrics, Instant::now(), shutdown).await;
}

/// Serves one connection accepted at `accepted`.
async fn serve_accepted<S>(
    stream: S,
    app: Router,
    limits: ConnectionLimits,
    metrics: ConnectionMetrics,
    accepted: Instant,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    metrics.open.inc();
    let _open = Open(&metrics);
    let activity = Arc::new(Activity::new(accepted));
    let io = TokioIo::new(Watched {
        inner: stream,
        activity: activity.clone(),
    });
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
        let arrived = requests.arrived();
        let busy = requests.busy();
        request.extensions_mut().insert(Arrived(arrived.into_std()));
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

/// Answers a connection that found no slot in time: 503 with `Retry-After` to its
/// first request, then closes. The body is read first (bounded) so that closing with
/// it unread does not reset the connection before the client reads the answer; the
/// whole exchange is bounded by the header and a short read timeout.
async fn refuse(stream: TcpStream, limits: ConnectionLimits) {
    const MAX_DRAINED: usize = 1024 * 1024;
    const DRAIN_FOR: Duration = Duration::from_secs(1);
    let retry_after = limits.retry_after.as_secs().max(1).to_string();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let retry_after = retry_after.clone();
        async move {
            let body = http_body_util::Limited::new(request.into_body(), MAX_DRAINED);
            let _ = tokio::time::timeout(DRAIN_FOR, body.collect()).await;
            let response = hyper::Response::builder()
                .status(hyper::StatusCode::SERVICE_UNAVAILABLE)
                .header(hyper::header::RETRY_AFTER, retry_after)
                .header(hyper::header::CONTENT_TYPE, "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    br#"{"error":"ingest is at its connection limit (--max-connections): retry later"}"#,
                )));
            Ok::<_, hyper::http::Error>(response.expect("a valid response"))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    if tokio::time::timeout(limits.header_timeout + DRAIN_FOR, conn)
        .await
        .is_err()
    {
        tracing::debug!("a refused connection did not send its request in time");
    }
}

/// How often a full accept loop looks again at what holds its slots.
const RECHECK: Duration = Duration::from_millis(50);

/// Whether requests waiting on the store hold at least half of the
/// `max_connections` slots: then JetStream is what keeps them, and a connection that
/// finds the slots and the waiting room full is refused at once rather than left in
/// the listen backlog.
fn store_bound(store_waiting: usize, max_connections: usize) -> bool {
    store_waiting * 2 >= max_connections
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
    /// A connection accepted at `accepted`, waiting for its first request.
    fn new(accepted: Instant) -> Self {
        Activity {
            phase: Mutex::new(Phase::Head { since: accepted }),
            changed: Notify::new(),
        }
    }

    /// When the request now being read arrived: its phase's start while its headers
    /// are read (the connection's accept for the first one).
    fn arrived(&self) -> Instant {
        match self.get() {
            Phase::Head { since } => since,
            Phase::Busy | Phase::Idle { .. } => Instant::now(),
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
    #[test]
    fn refusing_at_once_needs_the_store_to_hold_half_the_slots() {
        assert!(!store_bound(0, 900));
        assert!(!store_bound(449, 900));
        assert!(store_bound(450, 900));
        assert!(store_bound(1, 1));
        assert!(!store_bound(0, 1));
    }

    use super::*;

    const LIMITS: ConnectionLimits = ConnectionLimits {
        header_timeout: Duration::from_secs(5),
        idle_timeout: Duration::from_secs(60),
        max_connections: 1,
        queue_wait: Duration::from_secs(3),
        retry_after: Duration::from_secs(10),
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
        let activity = Arc::new(Activity::new(Instant::now()));
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
        let activity = Arc::new(Activity::new(Instant::now()));
        let started = Instant::now();
        assert_eq!(activity.expired(LIMITS).await, "header");
        assert_eq!(started.elapsed(), Duration::from_secs(5));

        let activity = Arc::new(Activity::new(Instant::now()));
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
