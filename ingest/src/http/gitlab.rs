//! `POST /webhooks/gitlab`: `X-Gitlab-Token`, or a GitLab signing token (Standard
//! Webhooks headers).

use std::time::Instant;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::Response;
use sha2::{Digest, Sha256};
use sluice_core::Provider;

use super::{
    body_kind, delivery_id, header_str, now_unix, read_body, refuse, same_target, store, AppState,
    Endpoint, Reject,
};
use crate::normalize::{self, Malformed};
use crate::verify::{self, Failure, StandardHeaders};

/// GitLab's endpoint.
pub(super) struct Gitlab;

impl Endpoint for Gitlab {
    const PROVIDER: Provider = Provider::Gitlab;

    fn claimed_delivery(headers: &HeaderMap) -> Option<&str> {
        header_str(headers, "x-gitlab-event-uuid")
            .or_else(|| header_str(headers, "idempotency-key"))
    }

    async fn handle(
        state: &AppState,
        headers: &HeaderMap,
        body: Body,
        received: Instant,
    ) -> Result<Response, Reject> {
        body_kind(headers, false)?;
        let body = read_body(headers, body, &state.limits).await?;
        // With default secrets only, the target selects nothing: the body is then
        // parsed once, after verification.
        let by_target = state.secrets.gitlab.selects_by_target();
        let target = by_target.then(|| normalize::gitlab_target(&body)).flatten();
        let secrets = state.secrets.gitlab.for_repo(target.as_deref());
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
                state.limits.tolerance.as_secs(),
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
        let parsed: normalize::GitlabPayload =
            serde_json::from_slice(&body).map_err(Malformed::from)?;
        if by_target {
            same_target(target.as_deref(), parsed.repo())?;
        }
        let event = normalize::gitlab(event_name, delivery, parsed);
        store(state, event, &body, received).await
    }
}
