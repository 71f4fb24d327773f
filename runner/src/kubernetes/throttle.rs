//! A client-side rate limit towards the Kubernetes API, with retries on throttling
//! and server errors. Every HTTP request the runner makes — creates, deletes, lists,
//! watch and log-stream starts, and each retry — takes a token first, so a burst of
//! runs can never exceed the budget a cluster admin gave the runner.

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use kube::client::Body;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::metrics::KubeMetrics;

/// A token bucket: `rate` tokens a second, up to `burst` at once. Waiters are served
/// in the order they arrive.
#[derive(Debug)]
pub struct TokenBucket {
    interval: Duration,
    /// How far ahead of now the schedule may run: `burst - 1` intervals.
    tolerance: Duration,
    /// When the next token is due at the steady rate (GCRA's theoretical arrival time).
    next: std::sync::Mutex<Instant>,
    /// Requests of the first rank waiting for their token, and a signal when none are.
    urgent: std::sync::atomic::AtomicUsize,
    no_urgent: tokio::sync::Notify,
}

/// Which requests go first when tokens are short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rank {
    /// Everything but log streams: Pod creates and deletes, lists, the watch.
    First,
    /// Log stream starts wait while a request of the first rank waits. A log opened
    /// late is still read in full from its start; a Pod created late is a run started
    /// late — and under a burst of runs, every created Pod would otherwise also put a
    /// log stream in the queue before the next Pod.
    Later,
}

impl TokenBucket {
    pub fn new(rate: NonZeroU32, burst: NonZeroU32) -> Self {
        let interval = Duration::from_secs(1) / rate.get();
        TokenBucket {
            interval,
            tolerance: interval * (burst.get() - 1),
            next: std::sync::Mutex::new(Instant::now()),
            urgent: std::sync::atomic::AtomicUsize::new(0),
            no_urgent: tokio::sync::Notify::new(),
        }
    }

    /// Waits for a token, after every waiting request of a higher rank.
    pub async fn acquire(&self, rank: Rank) {
        use std::sync::atomic::Ordering;
        match rank {
            Rank::First => {
                self.urgent.fetch_add(1, Ordering::AcqRel);
                let _done = Urgent(self);
                self.take().await;
            }
            Rank::Later => {
                loop {
                    // Registered before the check, so a signal in between is not lost.
                    let signal = self.no_urgent.notified();
                    tokio::pin!(signal);
                    signal.as_mut().enable();
                    if self.urgent.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    signal.await;
                }
                self.take().await;
            }
        }
    }

    async fn take(&self) {
        let wait_until = {
            let mut next = match self.next.lock() {
                Ok(n) => n,
                Err(poisoned) => poisoned.into_inner(),
            };
            let now = Instant::now();
            let due = (*next).max(now);
            *next = due + self.interval;
            due.checked_sub(self.tolerance).unwrap_or(now)
        };
        if wait_until > Instant::now() {
            tokio::time::sleep_until(wait_until).await;
        }
    }
}

/// Counts a first-rank request out when its token came (or its wait was dropped).
struct Urgent<'a>(&'a TokenBucket);

impl Drop for Urgent<'_> {
    fn drop(&mut self) {
        if self
            .0
            .urgent
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.no_urgent.notify_waiters();
        }
    }
}

/// The layer: wraps the kube client's HTTP stack.
#[derive(Debug, Clone)]
pub struct Throttle {
    bucket: Arc<TokenBucket>,
    max_retries: u32,
    metrics: KubeMetrics,
}

impl Throttle {
    /// Counts every request it sends, and the time each waited for its token, in
    /// `metrics`.
    pub fn new(rate: NonZeroU32, burst: NonZeroU32, metrics: KubeMetrics) -> Self {
        Throttle {
            bucket: Arc::new(TokenBucket::new(rate, burst)),
            max_retries: 8,
            metrics,
        }
    }
}

impl<S> Layer<S> for Throttle {
    type Service = Throttled<S>;

    fn layer(&self, inner: S) -> Throttled<S> {
        Throttled {
            // kube's stack is a boxed service that cannot be cloned; calls only need it
            // for the instant it takes to start a request.
            inner: Arc::new(Mutex::new(inner)),
            bucket: self.bucket.clone(),
            max_retries: self.max_retries,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug)]
pub struct Throttled<S> {
    inner: Arc<Mutex<S>>,
    bucket: Arc<TokenBucket>,
    max_retries: u32,
    metrics: KubeMetrics,
}

fn retryable(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// The server's `Retry-After` in seconds (the API server sends whole seconds), capped.
fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get("retry-after")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs.min(60)))
}

fn backoff(attempt: u32) -> Duration {
    (Duration::from_millis(100) * 2u32.saturating_pow(attempt)).min(Duration::from_secs(10))
}

fn copy(req: &Request<Body>) -> Option<Request<Body>> {
    let body = req.body().try_clone()?;
    let mut copy = Request::builder()
        .method(req.method().clone())
        .uri(req.uri().clone())
        .version(req.version())
        .body(body)
        .ok()?;
    *copy.headers_mut() = req.headers().clone();
    *copy.extensions_mut() = req.extensions().clone();
    Some(copy)
}

impl<S, B> Service<Request<Body>> for Throttled<S>
where
    S: Service<Request<Body>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is awaited per call, after the token: being ready now says
        // nothing about when the token comes.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (inner, bucket, max_retries, metrics) = (
            self.inner.clone(),
            self.bucket.clone(),
            self.max_retries,
            self.metrics.clone(),
        );
        Box::pin(async move {
            // kube-rs names each request's kind in its extensions.
            let kind = req.extensions().get::<&'static str>().copied();
            let rank = match kind {
                Some("log_stream") => Rank::Later,
                _ => Rank::First,
            };
            let mut req = req;
            let mut attempt = 0;
            loop {
                let again = (attempt < max_retries).then(|| copy(&req)).flatten();
                let waited = Instant::now();
                bucket.acquire(rank).await;
                metrics
                    .rate_limited_seconds
                    .inc_by(waited.elapsed().as_secs_f64());
                let sent = {
                    let mut service = inner.lock().await;
                    match service.ready().await {
                        Ok(ready) => ready.call(req),
                        Err(e) => {
                            metrics.request(kind, None);
                            return Err(e.into());
                        }
                    }
                };
                let response = match sent.await {
                    Ok(response) => response,
                    Err(e) => {
                        metrics.request(kind, None);
                        return Err(e.into());
                    }
                };
                let status = response.status();
                metrics.request(kind, Some(status.as_u16()));
                match again {
                    Some(next) if retryable(status) => {
                        let wait =
                            retry_after(response.headers()).unwrap_or_else(|| backoff(attempt));
                        tracing::debug!(%status, attempt, ?wait, "Kubernetes API asked to retry");
                        drop(response);
                        tokio::time::sleep(wait).await;
                        req = next;
                        attempt += 1;
                    }
                    _ => return Ok(response),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bucket(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket::new(
            NonZeroU32::new(rate).expect("rate"),
            NonZeroU32::new(burst).expect("burst"),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_allows_the_burst_then_the_rate() {
        let bucket = bucket(20, 40);
        let start = Instant::now();
        for _ in 0..40 {
            bucket.acquire(Rank::First).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO, "the burst is free");
        for _ in 0..20 {
            bucket.acquire(Rank::First).await;
        }
        // 20 more at 20/s: the last is due one second (less one interval) later.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(950) && elapsed <= Duration::from_millis(1000),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_refills_at_most_the_burst() {
        let bucket = bucket(10, 5);
        tokio::time::sleep(Duration::from_secs(60)).await;
        let start = Instant::now();
        for _ in 0..5 {
            bucket.acquire(Rank::First).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        bucket.acquire(Rank::First).await;
        assert_eq!(start.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn log_streams_wait_while_pod_requests_wait() {
        let bucket = Arc::new(bucket(10, 1));
        bucket.acquire(Rank::First).await; // the burst is spent
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let waiter = |rank: Rank, name: &'static str| {
            let (bucket, order) = (bucket.clone(), order.clone());
            tokio::spawn(async move {
                bucket.acquire(rank).await;
                order.lock().unwrap().push(name);
            })
        };
        // Two Pod requests wait, a log stream asks, a third Pod request comes: the
        // log goes after all three.
        let mut pods = vec![waiter(Rank::First, "pod-1"), waiter(Rank::First, "pod-2")];
        tokio::task::yield_now().await;
        let log = waiter(Rank::Later, "log");
        tokio::task::yield_now().await;
        pods.push(waiter(Rank::First, "pod-3"));
        for p in pods {
            p.await.unwrap();
        }
        log.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["pod-1", "pod-2", "pod-3", "log"]);
    }

    #[tokio::test(start_paused = true)]
    async fn every_request_and_its_wait_for_a_token_are_counted() {
        let metrics = KubeMetrics::default();
        let throttle = Throttle::new(
            NonZeroU32::new(10).expect("rate"),
            NonZeroU32::new(1).expect("burst"),
            metrics.clone(),
        );
        let api = tower::service_fn(|_: Request<Body>| async {
            Ok::<_, std::convert::Infallible>(Response::new(()))
        });
        let mut throttled = throttle.layer(api);
        for _ in 0..3 {
            throttled
                .call(Request::new(Body::empty()))
                .await
                .expect("answered");
        }
        // A burst of one at 10/s: the second and third requests waited 100 ms each.
        let waited = metrics.rate_limited_seconds.get();
        assert!((waited - 0.2).abs() < 0.005, "{waited}");
        let answered = metrics
            .requests
            .get_or_create(&crate::metrics::KubeRequest {
                verb: "other",
                code: "200".into(),
            })
            .get();
        assert_eq!(answered, 3);
    }

    #[test]
    fn retries_throttling_and_server_errors_only() {
        assert!(retryable(StatusCode::TOO_MANY_REQUESTS));
        assert!(retryable(StatusCode::INTERNAL_SERVER_ERROR));
        assert!(retryable(StatusCode::SERVICE_UNAVAILABLE));
        assert!(!retryable(StatusCode::CONFLICT));
        assert!(!retryable(StatusCode::NOT_FOUND));
        assert!(!retryable(StatusCode::GONE));
    }
}
