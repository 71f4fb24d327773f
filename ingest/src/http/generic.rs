//! `POST /webhooks/generic`: Standard Webhooks (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature`), a JSON body with a `type`.

use std::time::Instant;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::Response;
use sluice_core::Provider;

use super::{
    body_kind, delivery_id, header_str, now_unix, read_body, refuse, same_target, store, AppState,
    Endpoint, Reject,
};
use crate::normalize::{self, Malformed};
use crate::verify::{self, Failure, StandardHeaders};

/// The Standard Webhooks endpoint.
pub(super) struct Generic;

impl Endpoint for Generic {
    const PROVIDER: Provider = Provider::Generic;

    fn claimed_delivery(headers: &HeaderMap) -> Option<&str> {
        header_str(headers, "webhook-id")
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
        let by_target = state.secrets.generic.selects_by_target();
        let target = by_target
            .then(|| normalize::generic_target(&body))
            .flatten();
        let secrets = state.secrets.generic.for_repo(target.as_deref());
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
            state.limits.tolerance.as_secs(),
        )
        .map_err(|f| refuse(state, Provider::Generic, f))?;
        let delivery = delivery_id(Some(id), "webhook-id")?;
        let parsed: normalize::GenericPayload =
            serde_json::from_slice(&body).map_err(Malformed::from)?;
        if by_target {
            same_target(target.as_deref(), parsed.repo())?;
        }
        let event = normalize::generic(delivery, parsed)?;
        store(state, event, &body, received).await
    }
}
