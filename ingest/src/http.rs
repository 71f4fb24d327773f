//! The webhook endpoints, one module per provider (health, readiness and metrics are
//! core's admin routes, merged beside them in `serve`).
//!
//! Each webhook endpoint follows the same order, so that nothing a client sends is
//! trusted before it is verified: bound the body, check its type, read it, read only
//! the name that selects the secret, verify the signature, then parse the payload
//! (once), normalize, store, answer. What every endpoint shares — the log span, the
//! in-flight gauge, the outcome metric and the error answer — is [`webhook`], written
//! once; an [`Endpoint`] only says how its provider is verified and normalized.

mod generic;
mod github;
mod gitlab;

use std::borrow::Cow;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use http_body_util::BodyExt;
use serde::Serialize;
use sluice_core::envelope::kind;
use sluice_core::{Event, Provider};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::metrics::{Metrics, ProviderLabel, VerifyFailure};
use crate::normalize::Malformed;
use crate::publish::Publisher;
use crate::refusals::RefusalLog;
use crate::secrets::Secrets;
use crate::server::Arrived;
use crate::verify::Failure;

/// Limits applied to every request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest body accepted; the forges cap theirs at 25 MiB.
    pub max_body_bytes: usize,
    /// Time allowed to receive a body.
    pub read_timeout: Duration,
    /// Standard Webhooks timestamp tolerance, either way.
    pub tolerance: Duration,
    /// Accept GitHub's legacy SHA-1 `X-Hub-Signature` when no SHA-256 one is sent.
    pub allow_sha1: bool,
    /// What `Retry-After` says when JetStream is unavailable.
    pub retry_after: Duration,
}

/// What every handler shares.
#[derive(Debug)]
pub struct AppState {
    pub secrets: Secrets,
    pub publisher: Publisher,
    pub metrics: Metrics,
    pub limits: Limits,
    /// Requests refused unsent, counted for the line a second that reports them.
    pub refusals: RefusalLog,
}

/// The ingest router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/webhooks/github", post(webhook::<github::Github>))
        .route("/webhooks/gitlab", post(webhook::<gitlab::Gitlab>))
        .route("/webhooks/generic", post(webhook::<generic::Generic>))
        .with_state(state)
}

// === Answers ===

/// A request refused, with the status, the metric outcome and a short message.
#[derive(Debug)]
struct Reject {
    status: StatusCode,
    outcome: &'static str,
    message: Cow<'static, str>,
    retry_after: Option<Duration>,
}

impl Reject {
    fn new(
        status: StatusCode,
        outcome: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Reject {
            status,
            outcome,
            message: message.into(),
            retry_after: None,
        }
    }

    fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Reject::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl From<Malformed> for Reject {
    fn from(m: Malformed) -> Self {
        Reject::bad_request(m.0)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
}

#[derive(Serialize)]
struct Accepted<'a> {
    event_id: &'a str,
    duplicate: bool,
}

impl IntoResponse for Reject {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            axum_json(&ErrorBody {
                error: &self.message,
            }),
        )
            .into_response();
        if let Some(after) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&after.as_secs().max(1).to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        response
    }
}

fn axum_json<T: Serialize>(value: &T) -> ([(header::HeaderName, &'static str); 1], Vec<u8>) {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    ([(header::CONTENT_TYPE, "application/json")], body)
}

/// One provider's webhook endpoint.
trait Endpoint {
    const PROVIDER: Provider;

    /// The delivery id the request claims, for the log span only (it is not verified).
    fn claimed_delivery(headers: &HeaderMap) -> Option<&str>;

    /// Reads, verifies, normalizes and stores one delivery.
    fn handle<'a>(
        state: &'a AppState,
        headers: &'a HeaderMap,
        body: Body,
        received: Instant,
    ) -> impl Future<Output = Result<Response, Reject>> + Send + 'a;
}

/// Every webhook request: runs its endpoint inside a span naming the provider and the
/// delivery, counts it in flight and counts its outcome.
async fn webhook<E: Endpoint>(
    State(state): State<Arc<AppState>>,
    arrived: Option<Extension<Arrived>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let span = tracing::info_span!(
        "webhook",
        provider = E::PROVIDER.as_str(),
        delivery_id = E::claimed_delivery(&headers).unwrap_or("-"),
    );
    // The forge's clock started about when the connection was accepted (a wait for a
    // connection slot included): the answer is due within its timeout. A router
    // served without `server` (tests, the fuzzer) has no arrival: now, then.
    let received = arrived.map_or_else(Instant::now, |Extension(Arrived(at))| at);
    state.metrics.in_flight.inc();
    // Decrement even if the client goes away and the handler is dropped mid-way.
    let _in_flight = InFlight(&state.metrics);
    let response = match E::handle(&state, &headers, body, received)
        .instrument(span)
        .await
    {
        Ok(response) => response,
        Err(reject) => {
            state.metrics.request(E::PROVIDER.as_str(), reject.outcome);
            reject.into_response()
        }
    };
    // What the forge waits, less the network: tells a slow ingest from a slow client.
    state
        .metrics
        .answer_seconds
        .observe(received.elapsed().as_secs_f64());
    response
}

struct InFlight<'a>(&'a Metrics);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.dec();
    }
}

// === Reading requests ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyKind {
    Json,
    Form,
}

fn body_kind(headers: &HeaderMap, allow_form: bool) -> Result<BodyKind, Reject> {
    let accepted = if allow_form {
        "application/json or application/x-www-form-urlencoded"
    } else {
        "application/json"
    };
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyKind::Json),
        "application/x-www-form-urlencoded" if allow_form => Ok(BodyKind::Form),
        _ => Err(Reject::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("unsupported Content-Type: send {accepted}"),
        )),
    }
}

/// Reads the body, never holding more than the limit: a declared length over the limit
/// is refused before reading, and a body that grows past it is dropped mid-stream.
async fn read_body(headers: &HeaderMap, body: Body, limits: &Limits) -> Result<Bytes, Reject> {
    let too_large = || {
        Reject::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("body larger than {} bytes", limits.max_body_bytes),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_body_bytes as u64) {
        return Err(too_large());
    }
    let limited = http_body_util::Limited::new(body, limits.max_body_bytes);
    match tokio::time::timeout(limits.read_timeout, limited.collect()).await {
        Err(_) => Err(Reject::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            "the body was not received in time",
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(_)) => Err(Reject::bad_request("the body could not be read")),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Delivery ids become message ids and object names: keep them short and plain.
fn delivery_id<'h>(value: Option<&'h str>, header_name: &str) -> Result<&'h str, Reject> {
    let id = value.ok_or_else(|| Reject::bad_request(format!("missing {header_name} header")))?;
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_.:@+=/".contains(c);
    if id.is_empty() || id.len() > 200 || !id.chars().all(plain) {
        return Err(Reject::bad_request(format!(
            "invalid {header_name}: at most 200 characters of A-Z a-z 0-9 - _ . : @ + = /"
        )));
    }
    Ok(id)
}

fn refuse(state: &AppState, provider: Provider, failure: Failure) -> Reject {
    state
        .metrics
        .verification_failures
        .get_or_create(&VerifyFailure {
            provider: provider.as_str(),
            reason: failure.label(),
        })
        .inc();
    tracing::warn!(%provider, reason = failure.label(), "webhook refused: verification failed");
    Reject::new(StatusCode::UNAUTHORIZED, "unauthorized", failure.message())
}

/// A verified payload must name the repository its secret was chosen by. Both names
/// are read from the same bytes and agree for any JSON; should the two readings ever
/// differ, the delivery is refused rather than stored under a repository whose secret
/// did not verify it.
fn same_target(selected: Option<&str>, parsed: Option<&str>) -> Result<(), Reject> {
    let same = match (selected, parsed) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        (None, None) => true,
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(Reject::bad_request(
            "the payload does not name its repository unambiguously",
        ))
    }
}

fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

// === Storing and answering ===

async fn store(
    state: &AppState,
    event: Event,
    raw: &[u8],
    received: Instant,
) -> Result<Response, Reject> {
    let provider = event.provider.as_str();
    let id = event.id.clone();
    let is_ping = event.kind == kind::PING;
    match state.publisher.publish(event, raw, received).await {
        Ok((stored, took)) => {
            state.metrics.publish_seconds.observe(took.as_secs_f64());
            if stored.by_reference {
                state.metrics.by_reference.inc();
            }
            let outcome = if stored.duplicate {
                state
                    .metrics
                    .duplicates
                    .get_or_create(&ProviderLabel { provider })
                    .inc();
                "duplicate"
            } else {
                "accepted"
            };
            state.metrics.request(provider, outcome);
            tracing::info!(event_id = %id, duplicate = stored.duplicate, by_reference = stored.by_reference, "event stored");
            // A ping is answered 200, as the forges expect of a hook that is set up.
            let status = if is_ping {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            Ok((
                status,
                axum_json(&Accepted {
                    event_id: &id,
                    duplicate: stored.duplicate,
                }),
            )
                .into_response())
        }
        Err(e) => {
            let status = e.status();
            if state.refusals.count(&e) {
                // Counted, and reported once a second (a spike sheds thousands).
                tracing::debug!(event_id = %id, error = %e, status = status.as_u16(), "event not stored");
            } else {
                tracing::warn!(event_id = %id, error = %e, retryable = e.is_retryable(), status = status.as_u16(), "event not stored");
            }
            Err(Reject {
                retry_after: e.is_retryable().then_some(state.limits.retry_after),
                ..Reject::new(status, e.metric_label(), e.message())
            })
        }
    }
}
