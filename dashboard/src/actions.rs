//! Cancel and rerun, offered only with `--allow-actions`: POSTs from the run page (the
//! same-site check of [`crate::router`] refuses them from other sites), each allowed
//! by a bearer token or by the user name a trusted proxy puts in a header, and logged
//! with who did it. A cancel goes to the run's cluster; a rerun is asked of a
//! dispatcher, which alone may store the event ([`sluice_core::run::RerunRequest`]).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, HeaderName, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::post;
use axum::Router;
use sluice_core::bus;
use sluice_core::run::{RerunAnswer, RerunRequest, RunView};
use subtle::ConstantTimeEq;

use crate::AppState;

/// How long a rerun waits for a dispatcher's answer.
const RERUN_ANSWER: Duration = Duration::from_secs(10);

/// A form's body is one short field at most.
const MAX_FORM_BYTES: usize = 4096;

/// The longest user name taken from the proxy's header.
const MAX_USER: usize = 256;

/// Who may act, as `sluice dashboard --allow-actions` was told.
pub struct Actions {
    token: Option<Vec<u8>>,
    user_header: Option<HeaderName>,
}

impl std::fmt::Debug for Actions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Actions")
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("user_header", &self.user_header)
            .finish()
    }
}

impl Actions {
    /// Actions allowed to holders of `token` (a bearer token, or typed into the page),
    /// and to whoever the proxy names in `user_header`; at least one of them.
    pub fn new(token: Option<String>, user_header: Option<&str>) -> Result<Actions, String> {
        let token = token.map(|t| t.trim().to_owned());
        if token.as_deref().is_some_and(str::is_empty) {
            return Err("the actions token file is empty".into());
        }
        let user_header = user_header
            .map(|h| {
                HeaderName::try_from(h.trim())
                    .map_err(|_| format!("`{h}` is not an HTTP header name"))
            })
            .transpose()?;
        if token.is_none() && user_header.is_none() {
            return Err(
                "--allow-actions needs --actions-token-file or --trusted-user-header: actions are never open to anyone"
                    .into(),
            );
        }
        Ok(Actions {
            token: token.map(String::into_bytes),
            user_header,
        })
    }

    /// Whether the page asks for the token (no proxy names the user).
    pub(crate) fn asks_for_token(&self) -> bool {
        self.token.is_some() && self.user_header.is_none()
    }
}

/// Who is acting, or `None` when the request is not allowed: `user:<name>` for the
/// user the trusted proxy names (one value of its header, on a request the browser says
/// is same-origin: the proxy's session cookie goes with any request, so the origin must
/// be shown, not merely not contradicted), else `token` for the right token in
/// `Authorization: Bearer` or in the form, compared in constant time.
pub(crate) fn authorize(
    actions: &Actions,
    headers: &HeaderMap,
    form_token: Option<&str>,
) -> Option<String> {
    if let Some(name) = &actions.user_header {
        let mut values = headers.get_all(name).iter();
        let user = match (values.next(), values.next()) {
            (Some(one), None) => one
                .to_str()
                .ok()
                .map(str::trim)
                .filter(|u| !u.is_empty() && u.len() <= MAX_USER),
            // None, or a client's value beside the proxy's: nobody.
            _ => None,
        };
        if let Some(user) = user {
            return same_origin(headers).then(|| format!("user:{user}"));
        }
    }
    let expected = actions.token.as_deref()?;
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token);
    let given = bearer.or(form_token)?.trim().as_bytes();
    bool::from(given.ct_eq(expected)).then(|| "token".to_owned())
}

/// Whether the browser says the request comes from this origin: `Sec-Fetch-Site:
/// same-origin`, or an `Origin` naming this host.
fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if text(HeaderName::from_static("sec-fetch-site")) == Some("same-origin") {
        return true;
    }
    match (text(header::ORIGIN), text(header::HOST)) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/runs/{run_id}/cancel", post(cancel))
        .route("/runs/{run_id}/rerun", post(rerun))
        .layer(DefaultBodyLimit::max(MAX_FORM_BYTES))
}

fn answer(status: StatusCode, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message + "\n",
    )
        .into_response()
}

/// The run to act on, once the request is allowed; or the answer to give instead.
async fn prepare(
    s: &AppState,
    run_id: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, RunView), Response> {
    let Some(actions) = s.actions.as_deref() else {
        return Err(answer(StatusCode::NOT_FOUND, "actions are off".into()));
    };
    let form_token = form_urlencoded::parse(body)
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    let Some(who) = authorize(actions, headers, form_token.as_deref()) else {
        let mut refused = answer(
            StatusCode::UNAUTHORIZED,
            "not allowed: give the actions token, or sign in through the proxy".into(),
        );
        if actions.token.is_some() {
            refused.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        return Err(refused);
    };
    if !crate::pages::valid_token(run_id) {
        return Err(answer(StatusCode::NOT_FOUND, "no such run".into()));
    }
    match bus::run_view(&s.js, None, run_id).await {
        Ok(Some(view)) => Ok((who, view)),
        Ok(None) => Err(answer(StatusCode::NOT_FOUND, format!("no run {run_id}"))),
        Err(error) => {
            tracing::error!(%error, run = run_id, "cannot read a run for an action");
            Err(answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "the run could not be read; try again".into(),
            ))
        }
    }
}

async fn cancel(
    State(s): State<AppState>,
    Path(run_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (who, view) = match prepare(&s, &run_id, &headers, &body).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    if view.state.is_final() {
        return answer(
            StatusCode::CONFLICT,
            format!("run {run_id} already ended: {}", view.state.as_str()),
        );
    }
    let Some(cluster) = view.cluster else {
        return answer(
            StatusCode::CONFLICT,
            format!("run {run_id} has no cluster yet; try again in a moment"),
        );
    };
    let reason = format!("cancelled by {who} from the dashboard");
    let stored = bus::cancel(&s.js, &cluster, &run_id, &reason).await;
    if let Err(error) = stored {
        tracing::error!(%error, run = %run_id, by = %who, "a cancel from the dashboard was not stored");
        return answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "the cancel could not be stored; try again".into(),
        );
    }
    tracing::info!(action = "cancel", run = %run_id, %cluster, by = %who, "dashboard action");
    Redirect::to(&format!("/runs/{run_id}")).into_response()
}

async fn rerun(
    State(s): State<AppState>,
    Path(run_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (who, view) = match prepare(&s, &run_id, &headers, &body).await {
        Ok(found) => found,
        Err(refused) => return refused,
    };
    if view.event_id.is_none() {
        return answer(
            StatusCode::CONFLICT,
            format!("run {run_id} names no event to run again"),
        );
    }
    let request = RerunRequest {
        run_id: run_id.clone(),
        by: who.clone(),
    };
    match bus::request_rerun(&s.client, &request, RERUN_ANSWER).await {
        Ok(RerunAnswer::Started { run_id: new }) => {
            tracing::info!(action = "rerun", run = %run_id, new_run = %new, by = %who, "dashboard action");
            Redirect::to(&format!("/runs/{new}")).into_response()
        }
        Ok(RerunAnswer::Refused { reason }) => answer(StatusCode::CONFLICT, reason),
        Err(error) => {
            tracing::warn!(%error, run = %run_id, by = %who, "a rerun from the dashboard got no answer");
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "no dispatcher answered the rerun within 10 s; is one running? It may still start: look at the run list before asking again".into(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn the_token_is_taken_from_the_header_or_the_form() {
        let a = Actions::new(Some("s3cret\n".into()), None).expect("actions");
        assert!(a.asks_for_token());
        let ok = Some("token".to_owned());
        assert_eq!(
            authorize(&a, &headers(&[("authorization", "Bearer s3cret")]), None),
            ok
        );
        assert_eq!(authorize(&a, &headers(&[]), Some("s3cret")), ok);
        assert_eq!(
            authorize(&a, &headers(&[("authorization", "bearer s3cret")]), None),
            ok
        );
        for (h, form) in [
            (headers(&[]), None),
            (headers(&[("authorization", "Bearer s3cre")]), None),
            (headers(&[("authorization", "Bearer s3cret2")]), None),
            (headers(&[("authorization", "Basic s3cret")]), None),
            (headers(&[]), Some("")),
            (headers(&[]), Some("S3CRET")),
        ] {
            assert_eq!(authorize(&a, &h, form), None, "{h:?} {form:?}");
        }
        // A proxy header means nothing unless configured.
        assert_eq!(
            authorize(&a, &headers(&[("x-forwarded-user", "mallory")]), None),
            None
        );
    }

    #[test]
    fn the_trusted_proxy_names_the_user() {
        let a = Actions::new(None, Some("X-Forwarded-User")).expect("actions");
        assert!(!a.asks_for_token());
        let same = ("sec-fetch-site", "same-origin");
        let ada = Some("user:ada".to_owned());
        assert_eq!(
            authorize(&a, &headers(&[("x-forwarded-user", "ada"), same]), None),
            ada
        );
        let by_origin = headers(&[
            ("x-forwarded-user", "ada"),
            ("host", "d:8090"),
            ("origin", "https://d:8090"),
        ]);
        assert_eq!(authorize(&a, &by_origin, None), ada);
        // The proxy's cookie goes with any request: the origin must be shown.
        for h in [
            headers(&[("x-forwarded-user", "ada")]),
            headers(&[("x-forwarded-user", "ada"), ("sec-fetch-site", "none")]),
            headers(&[
                ("x-forwarded-user", "ada"),
                ("host", "d:8090"),
                ("origin", "https://evil:8090"),
            ]),
        ] {
            assert_eq!(authorize(&a, &h, None), None, "{h:?}");
        }
        // A client's value beside the proxy's is refused, not picked.
        let mut two = headers(&[same]);
        two.append("x-forwarded-user", "mallory".parse().expect("value"));
        two.append("x-forwarded-user", "ada".parse().expect("value"));
        assert_eq!(authorize(&a, &two, None), None);
        assert_eq!(
            authorize(&a, &headers(&[("x-forwarded-user", " "), same]), None),
            None
        );
        let long = "a".repeat(MAX_USER + 1);
        assert_eq!(
            authorize(&a, &headers(&[("x-forwarded-user", &long), same]), None),
            None
        );
        // No token configured: none is accepted.
        assert_eq!(
            authorize(&a, &headers(&[("authorization", "Bearer x")]), Some("x")),
            None
        );
    }

    #[test]
    fn actions_are_never_open_to_anyone() {
        assert!(Actions::new(None, None)
            .expect_err("refused")
            .contains("--actions-token-file"));
        assert!(Actions::new(Some(" \n".into()), None).is_err());
        assert!(Actions::new(None, Some("not a header")).is_err());
        let shown = format!("{:?}", Actions::new(Some("s3cret".into()), None));
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
