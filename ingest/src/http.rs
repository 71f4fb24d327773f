//! The HTTP surface: one handler per provider, plus health, readiness and metrics.
//!
//! Each webhook handler follows the same order, so that nothing a client sends is
//! trusted before it is verified: bound the body, check its type, read it, verify the
//! signature, only then report a malformed payload, normalize, store, answer.

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use http_body_util::BodyExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sluice_core::envelope::kind;
use sluice_core::{Event, Provider};
use time::OffsetDateTime;
use tracing::Instrument;

use crate::metrics::{Metrics, ProviderLabel, VerifyFailure};
use crate::normalize::{self, Malformed};
use crate::publish::{PublishError, Publisher};
use crate::secrets::Secrets;
use crate::verify::{self, Failure, StandardHeaders};

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
    /// Set once the streams have been provisioned.
    pub provisioned: AtomicBool,
}

/// The ingest router.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/webhooks/github", post(github))
        .route("/webhooks/gitlab", post(gitlab))
        .route("/webhooks/generic", post(generic))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
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

/// Runs one webhook handler and counts its outcome.
async fn answer(
    state: &AppState,
    provider: Provider,
    handler: impl std::future::Future<Output = Result<Response, Reject>>,
) -> Response {
    state.metrics.in_flight.inc();
    // Decrement even if the client goes away and the handler is dropped mid-way.
    let _in_flight = InFlight(&state.metrics);
    match handler.await {
        Ok(response) => response,
        Err(reject) => {
            state.metrics.request(provider.as_str(), reject.outcome);
            reject.into_response()
        }
    }
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

fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

// === Storing and answering ===

async fn store(state: &AppState, event: Event, raw: &[u8]) -> Result<Response, Reject> {
    let provider = event.provider.as_str();
    let id = event.id.clone();
    let is_ping = event.kind == kind::PING;
    match state.publisher.publish(event, raw).await {
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
            tracing::warn!(event_id = %id, error = %e, "event not stored, answering 503");
            let outcome = match e {
                PublishError::Timeout(_) => "timeout",
                _ => "unavailable",
            };
            Err(Reject {
                retry_after: Some(state.limits.retry_after),
                ..Reject::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    outcome,
                    "the event could not be stored; retry later",
                )
            })
        }
    }
}

// === GitHub ===

async fn github(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let delivery = header_str(&headers, "x-github-delivery")
        .unwrap_or("-")
        .to_owned();
    let span = tracing::info_span!("webhook", provider = "github", delivery_id = %delivery);
    answer(
        &state,
        Provider::Github,
        github_inner(&state, &headers, body),
    )
    .instrument(span)
    .await
}

async fn github_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Reject> {
    let body_kind = body_kind(headers, true)?;
    let body = read_body(headers, body, &state.limits).await?;
    let payload: Result<Cow<'_, [u8]>, Malformed> = match body_kind {
        BodyKind::Json => Ok(Cow::Borrowed(&body[..])),
        BodyKind::Form => form_payload(&body),
    };
    let parsed = match &payload {
        Ok(bytes) => {
            serde_json::from_slice::<normalize::GithubPayload>(bytes).map_err(Malformed::from)
        }
        Err(m) => Err(Malformed(m.0.clone())),
    };
    let repo = parsed.as_ref().ok().and_then(|p| p.repo().or(p.org()));
    let secrets = state.secrets.github.for_repo(repo);
    let verified = if let Some(sig) = header_str(headers, "x-hub-signature-256") {
        verify::github_sha256(secrets, sig, &body)
    } else if let Some(sig) = header_str(headers, "x-hub-signature") {
        if state.limits.allow_sha1 {
            verify::github_sha1(secrets, sig, &body)
        } else {
            Err(Failure::Sha1Disabled)
        }
    } else {
        Err(Failure::Missing)
    };
    verified.map_err(|f| refuse(state, Provider::Github, f))?;

    let event_name = header_str(headers, "x-github-event")
        .ok_or_else(|| Reject::bad_request("missing X-GitHub-Event header"))?;
    let delivery = delivery_id(
        header_str(headers, "x-github-delivery"),
        "X-GitHub-Delivery",
    )?;
    let parsed = parsed?;
    let payload = payload?;
    let event = normalize::github(event_name, delivery, parsed);
    store(state, event, &payload).await
}

/// GitHub's form-encoded deliveries carry the JSON in the `payload` field.
fn form_payload(body: &[u8]) -> Result<Cow<'_, [u8]>, Malformed> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| Cow::Owned(v.into_owned().into_bytes()))
        .ok_or_else(|| Malformed("form-encoded body without a `payload` field".into()))
}

// === GitLab ===

async fn gitlab(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let delivery = header_str(&headers, "x-gitlab-event-uuid")
        .or_else(|| header_str(&headers, "idempotency-key"))
        .unwrap_or("-")
        .to_owned();
    let span = tracing::info_span!("webhook", provider = "gitlab", delivery_id = %delivery);
    answer(
        &state,
        Provider::Gitlab,
        gitlab_inner(&state, &headers, body),
    )
    .instrument(span)
    .await
}

async fn gitlab_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Reject> {
    body_kind(headers, false)?;
    let body = read_body(headers, body, &state.limits).await?;
    let parsed = serde_json::from_slice::<normalize::GitlabPayload>(&body).map_err(Malformed::from);
    let repo = parsed.as_ref().ok().and_then(|p| p.repo());
    let secrets = state.secrets.gitlab.for_repo(repo);
    let verified = if let Some(signature) = header_str(headers, "webhook-signature") {
        // GitLab's signing tokens use the Standard Webhooks scheme.
        let standard = StandardHeaders {
            id: header_str(headers, "webhook-id")
                .ok_or_else(|| refuse(state, Provider::Gitlab, Failure::Malformed))?,
            timestamp: header_str(headers, "webhook-timestamp")
                .ok_or_else(|| refuse(state, Provider::Gitlab, Failure::Malformed))?,
            signature,
        };
        verify::standard(
            secrets,
            standard,
            &body,
            now_unix(),
            state.limits.tolerance.as_secs() as i64,
        )
    } else if let Some(token) = header_str(headers, "x-gitlab-token") {
        verify::gitlab_token(secrets, token)
    } else {
        Err(Failure::Missing)
    };
    verified.map_err(|f| refuse(state, Provider::Gitlab, f))?;

    let event_name = header_str(headers, "x-gitlab-event")
        .ok_or_else(|| Reject::bad_request("missing X-Gitlab-Event header"))?;
    // GitLab resends a delivery with the same Idempotency-Key / event UUID. Without
    // either, the body's digest stands in, so a resent identical body is a duplicate.
    let digest;
    let delivery = match header_str(headers, "idempotency-key")
        .or_else(|| header_str(headers, "x-gitlab-event-uuid"))
        .or_else(|| header_str(headers, "webhook-id"))
    {
        Some(id) => delivery_id(Some(id), "Idempotency-Key")?,
        None => {
            digest = hex::encode(Sha256::digest(&body));
            &digest
        }
    };
    let event = normalize::gitlab(event_name, delivery, parsed?);
    store(state, event, &body).await
}

// === Standard Webhooks ===

async fn generic(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let delivery = header_str(&headers, "webhook-id").unwrap_or("-").to_owned();
    let span = tracing::info_span!("webhook", provider = "generic", delivery_id = %delivery);
    answer(
        &state,
        Provider::Generic,
        generic_inner(&state, &headers, body),
    )
    .instrument(span)
    .await
}

async fn generic_inner(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, Reject> {
    body_kind(headers, false)?;
    let body = read_body(headers, body, &state.limits).await?;
    let parsed =
        serde_json::from_slice::<normalize::GenericPayload>(&body).map_err(Malformed::from);
    let repo = parsed.as_ref().ok().and_then(|p| p.repo());
    let secrets = state.secrets.generic.for_repo(repo);
    let (Some(id), Some(timestamp), Some(signature)) = (
        header_str(headers, "webhook-id"),
        header_str(headers, "webhook-timestamp"),
        header_str(headers, "webhook-signature"),
    ) else {
        return Err(refuse(state, Provider::Generic, Failure::Missing));
    };
    let standard = StandardHeaders {
        id,
        timestamp,
        signature,
    };
    verify::standard(
        secrets,
        standard,
        &body,
        now_unix(),
        state.limits.tolerance.as_secs() as i64,
    )
    .map_err(|f| refuse(state, Provider::Generic, f))?;
    let delivery = delivery_id(Some(id), "webhook-id")?;
    let event = normalize::generic(delivery, parsed?)?;
    store(state, event, &body).await
}

// === Health ===

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if !state.provisioned.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "streams not provisioned yet\n",
        )
            .into_response();
    }
    let js = state.publisher.jetstream();
    let check = tokio::time::timeout(Duration::from_secs(2), sluice_core::streams::check(js)).await;
    match check {
        Ok(Ok(())) => (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(e)) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "JetStream did not answer in 2s\n",
        )
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
        .into_response()
}
