//! `POST /webhooks/github`: `X-Hub-Signature-256` over the raw body, JSON or
//! form-encoded (`payload=`) bodies.

use std::borrow::Cow;
use std::time::Instant;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::Response;
use sluice_core::Provider;

use super::{
    body_kind, delivery_id, header_str, read_body, refuse, same_target, store, AppState, BodyKind,
    Endpoint, Reject,
};
use crate::normalize::{self, Malformed};
use crate::verify::{self, Failure};

/// GitHub's endpoint.
pub(super) struct Github;

impl Endpoint for Github {
    const PROVIDER: Provider = Provider::Github;

    fn claimed_delivery(headers: &HeaderMap) -> Option<&str> {
        header_str(headers, "x-github-delivery")
    }

    async fn handle(
        state: &AppState,
        headers: &HeaderMap,
        body: Body,
        received: Instant,
    ) -> Result<Response, Reject> {
        let body_kind = body_kind(headers, true)?;
        let body = read_body(headers, body, &state.limits).await?;
        // A form body carries the JSON URL-encoded: decoding it is one copy at most as
        // large as the body, which the limit already bounds.
        let payload: Result<Cow<'_, [u8]>, Malformed> = match body_kind {
            BodyKind::Json => Ok(Cow::Borrowed(&body[..])),
            BodyKind::Form => form_payload(&body),
        };
        // With default secrets only, the target selects nothing: the body is then
        // parsed once, after verification.
        let by_target = state.secrets.github.selects_by_target();
        let target = by_target
            .then(|| payload.as_deref().ok().and_then(normalize::github_target))
            .flatten();
        let secrets = state.secrets.github.for_repo(target.as_deref());
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
        let payload = payload
            .as_deref()
            .map_err(|m| Reject::bad_request(m.0.clone()))?;
        let parsed: normalize::GithubPayload =
            serde_json::from_slice(payload).map_err(Malformed::from)?;
        if by_target {
            same_target(target.as_deref(), parsed.target())?;
        }
        let event = normalize::github(event_name, delivery, parsed);
        store(state, event, payload, received).await
    }
}

/// GitHub's form-encoded deliveries carry the JSON in the `payload` field.
fn form_payload(body: &[u8]) -> Result<Cow<'_, [u8]>, Malformed> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == "payload")
        .map(|(_, v)| Cow::Owned(v.into_owned().into_bytes()))
        .ok_or_else(|| Malformed("form-encoded body without a `payload` field".into()))
}
