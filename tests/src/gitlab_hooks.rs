//! An HTTP double of GitLab's project hook events API (17.4+) for one project hook:
//! it makes deliveries to a real ingest the way GitLab does (`X-Gitlab-Token`,
//! `X-Gitlab-Event`, an `Idempotency-Key` and an `X-Gitlab-Event-UUID` that every
//! resend of the event keeps), logs what each was answered, lists the log newest first
//! (`GET /projects/:id/hooks/:hook_id/events`, paged by `page` with `x-next-page` and a
//! `Link` header, the token redacted in the listed headers), and resends an event
//! (`POST …/events/:hook_event_id/resend`) by posting its original request with its
//! original headers again and logging the attempt as a new event. Faults on demand:
//! a 2xx lost on its way back, an event that can never get through, a resend rate
//! limit.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::json;
use time::OffsetDateTime;

use crate::deliveries::Received;
use crate::ingest::GITLAB_TOKEN;

/// The project the hook belongs to, as `--recover-hooks` names it.
pub const PROJECT: &str = "acme/app";
/// The hook's id.
pub const HOOK_ID: u64 = 7;
/// The API token the double accepts (`PRIVATE-TOKEN`).
pub const API_TOKEN: &str = "glpat-test-api-token-4e1d";

/// One logged attempt (a hook event).
#[derive(Debug, Clone)]
struct Logged {
    id: u64,
    /// The `Idempotency-Key`, shared by every attempt of one event.
    key: String,
    kind: String,
    body: Vec<u8>,
    created_at: OffsetDateTime,
    /// 0: no answer (GitLab lists `internal error`).
    status: u16,
    resend: bool,
}

#[derive(Debug, Default)]
struct Log {
    logged: Vec<Logged>,
    next_id: u64,
    received: Vec<Received>,
    /// Keys no attempt gets through for.
    unreachable: Vec<String>,
    /// Resend requests answered 429 before any is served.
    rate_limited: u32,
    page_size: usize,
}

/// The running double.
#[derive(Debug, Clone)]
pub struct GitLabHooks {
    pub addr: SocketAddr,
    state: Arc<Mutex<Log>>,
    ingest: String,
    http: reqwest::Client,
}

impl GitLabHooks {
    /// Serves on a loopback port; deliveries go to `ingest_url` (`…/webhooks/gitlab`);
    /// the listing pages `page_size` events at a time (GitLab's `per_page` is capped
    /// by it).
    pub async fn start(ingest_url: &str, page_size: usize) -> GitLabHooks {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let hooks = GitLabHooks {
            addr: listener.local_addr().expect("addr"),
            state: Arc::new(Mutex::new(Log {
                next_id: 500,
                page_size,
                ..Log::default()
            })),
            ingest: ingest_url.to_owned(),
            http: reqwest::Client::new(),
        };
        let app = Router::new()
            .route("/api/v4/projects/{project}/hooks/{hook}/events", get(list))
            .route(
                "/api/v4/projects/{project}/hooks/{hook}/events/{id}/resend",
                post(resend),
            )
            .with_state(hooks.clone());
        // Served until the test's runtime ends.
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        hooks
    }

    /// `http://127.0.0.1:<port>/api/v4`: the API URL.
    pub fn uri(&self) -> String {
        format!("http://{}/api/v4", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.state.lock().expect("double state")
    }

    /// Delivers `body` as a `kind` event (`Push Hook`, …) with idempotency key `key`,
    /// as GitLab does, and returns what ingest answered (0: it could not be reached).
    pub async fn deliver(&self, key: &str, kind: &str, body: &[u8]) -> u16 {
        let status = self.post_to_ingest(key, kind, body).await;
        self.log(key, kind, body, OffsetDateTime::now_utc(), status, false);
        status
    }

    /// Delivers it, but logs `reported` as the answer: the real one was lost on its way
    /// back (ingest stored it; GitLab saw a timeout).
    pub async fn deliver_answer_lost(
        &self,
        key: &str,
        kind: &str,
        body: &[u8],
        reported: u16,
    ) -> u16 {
        let status = self.post_to_ingest(key, kind, body).await;
        self.log(key, kind, body, OffsetDateTime::now_utc(), reported, false);
        status
    }

    /// Logs a failed delivery made at `at` that never reached ingest.
    pub fn failed_at(&self, key: &str, kind: &str, body: &[u8], at: OffsetDateTime) {
        self.log(key, kind, body, at, 503, false);
    }

    /// No attempt of `key` ever gets through (GitLab logs `internal error`).
    pub fn unreachable(&self, key: &str) {
        self.lock().unreachable.push(key.to_owned());
    }

    /// The next `n` resend requests are answered 429 (Retry-After: 1).
    pub fn rate_limit(&self, n: u32) {
        self.lock().rate_limited = n;
    }

    /// Every API request received.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// Resends GitLab made, by idempotency key.
    pub fn resends(&self) -> HashMap<String, u32> {
        let log = self.lock();
        let mut by_key = HashMap::new();
        for l in log.logged.iter().filter(|l| l.resend) {
            *by_key.entry(l.key.clone()).or_insert(0) += 1;
        }
        by_key
    }

    fn log(
        &self,
        key: &str,
        kind: &str,
        body: &[u8],
        at: OffsetDateTime,
        status: u16,
        resend: bool,
    ) {
        let mut log = self.lock();
        log.next_id += 1;
        let id = log.next_id;
        log.logged.push(Logged {
            id,
            key: key.to_owned(),
            kind: kind.to_owned(),
            body: body.to_vec(),
            created_at: at,
            status,
            resend,
        });
    }

    /// The headers GitLab sends with every attempt of the event `key`; the token is
    /// `[REDACTED]` unless `token` says to send it.
    fn headers(key: &str, kind: &str, token: bool) -> Vec<(&'static str, String)> {
        vec![
            ("Content-Type", "application/json".into()),
            ("User-Agent", "GitLab/17.4.0".into()),
            ("Idempotency-Key", key.into()),
            ("X-Gitlab-Event", kind.into()),
            (
                "X-Gitlab-Webhook-UUID",
                "3b0c0d4e-5f60-4718-8293-a4b5c6d7e8f9".into(),
            ),
            ("X-Gitlab-Instance", "https://gitlab.example.com".into()),
            // GitLab's event UUID differs from the key: ingest takes the key first.
            ("X-Gitlab-Event-UUID", format!("uuid-{key}")),
            (
                "X-Gitlab-Token",
                if token {
                    GITLAB_TOKEN.into()
                } else {
                    "[REDACTED]".into()
                },
            ),
        ]
    }

    async fn post_to_ingest(&self, key: &str, kind: &str, body: &[u8]) -> u16 {
        if self.lock().unreachable.iter().any(|k| k == key) {
            return 0;
        }
        let mut request = self.http.post(&self.ingest).body(body.to_vec());
        for (name, value) in Self::headers(key, kind, true) {
            request = request.header(name, value);
        }
        request
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0)
    }

    /// Whether the request carries the API token; records it either way.
    fn authorized(&self, headers: &HeaderMap, method: &'static str, target: String) -> bool {
        let ok = headers
            .get("private-token")
            .is_some_and(|v| v.as_bytes() == API_TOKEN.as_bytes());
        self.lock().received.push(Received {
            at: Instant::now(),
            method,
            target,
            answered: if ok { 200 } else { 401 },
        });
        ok
    }
}

fn known(project: &str, hook: u64) -> bool {
    // axum hands the path segment over decoded: `acme%2Fapp` is `acme/app`.
    project == PROJECT && hook == HOOK_ID
}

#[derive(Deserialize)]
struct ListQuery {
    page: Option<usize>,
    per_page: Option<usize>,
}

async fn list(
    State(hooks): State<GitLabHooks>,
    Path((project, hook)): Path<(String, u64)>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    let page = q.page.unwrap_or(1).max(1);
    if !hooks.authorized(&headers, "GET", page.to_string()) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"message": "401 Unauthorized"}),
        );
    }
    if !known(&project, hook) {
        return json_response(StatusCode::NOT_FOUND, &json!({"message": "404 Not found"}));
    }
    let log = hooks.lock();
    let per_page = q.per_page.unwrap_or(20).clamp(1, 100).min(log.page_size);
    let mut newest_first: Vec<&Logged> = log.logged.iter().collect();
    newest_first.sort_by_key(|l| std::cmp::Reverse((l.created_at, l.id)));
    let total = newest_first.len();
    let pages = total.div_ceil(per_page).max(1);
    let items: Vec<serde_json::Value> = newest_first
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|l| {
            let request_headers: serde_json::Map<String, serde_json::Value> =
                GitLabHooks::headers(&l.key, &l.kind, false)
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.into()))
                    .collect();
            json!({
                "id": l.id,
                "url": hooks.ingest,
                "trigger": trigger(&l.kind),
                "request_headers": request_headers,
                "request_data": serde_json::from_slice::<serde_json::Value>(&l.body).unwrap_or_default(),
                "response_headers": {},
                "response_body": "",
                "response_status": if l.status == 0 { "internal error".to_owned() } else { l.status.to_string() },
                "execution_duration": 0.012,
                "created_at": l.created_at.format(&time::format_description::well_known::Rfc3339).expect("rfc3339"),
            })
        })
        .collect();
    let mut response = json_response(StatusCode::OK, &serde_json::Value::Array(items));
    let next = if page < pages {
        (page + 1).to_string()
    } else {
        String::new()
    };
    let base = format!(
        "{}/projects/{}/hooks/{hook}/events",
        hooks.uri(),
        PROJECT.replace('/', "%2F")
    );
    let mut links = Vec::new();
    if !next.is_empty() {
        links.push(format!(
            "<{base}?page={next}&per_page={per_page}>; rel=\"next\""
        ));
    }
    links.push(format!(
        "<{base}?page=1&per_page={per_page}>; rel=\"first\""
    ));
    links.push(format!(
        "<{base}?page={pages}&per_page={per_page}>; rel=\"last\""
    ));
    for (name, value) in [
        ("x-page", page.to_string()),
        ("x-per-page", per_page.to_string()),
        ("x-next-page", next),
        ("x-total", total.to_string()),
        ("x-total-pages", pages.to_string()),
        ("link", links.join(", ")),
    ] {
        response
            .headers_mut()
            .insert(name, HeaderValue::from_str(&value).expect("header"));
    }
    response
}

async fn resend(
    State(hooks): State<GitLabHooks>,
    Path((project, hook, id)): Path<(String, u64, u64)>,
    headers: HeaderMap,
) -> Response {
    if !hooks.authorized(&headers, "POST", id.to_string()) {
        return json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"message": "401 Unauthorized"}),
        );
    }
    let original = {
        let mut log = hooks.lock();
        let original = log.logged.iter().find(|l| l.id == id).cloned();
        if original.is_some() && known(&project, hook) && log.rate_limited > 0 {
            log.rate_limited -= 1;
            if let Some(r) = log.received.last_mut() {
                r.answered = 429;
            }
            let mut r = json_response(
                StatusCode::TOO_MANY_REQUESTS,
                &json!({"message": {"error": "This endpoint has been requested too many times. Try again later."}}),
            );
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            return r;
        }
        original
    };
    let Some(original) = original.filter(|_| known(&project, hook)) else {
        if let Some(r) = hooks.lock().received.last_mut() {
            r.answered = 404;
        }
        return json_response(StatusCode::NOT_FOUND, &json!({"message": "404 Not found"}));
    };
    let status = hooks
        .post_to_ingest(&original.key, &original.kind, &original.body)
        .await;
    hooks.log(
        &original.key,
        &original.kind,
        &original.body,
        OffsetDateTime::now_utc(),
        status,
        true,
    );
    json_response(StatusCode::CREATED, &json!({"response_status": status}))
}

/// GitLab's trigger name for an `X-Gitlab-Event` kind.
fn trigger(kind: &str) -> &'static str {
    match kind {
        "Push Hook" => "push_hooks",
        "Tag Push Hook" => "tag_push_hooks",
        "Merge Request Hook" => "merge_request_hooks",
        "Note Hook" => "note_hooks",
        _ => "push_hooks",
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    (
        status,
        [("content-type", "application/json")],
        serde_json::to_vec(body).expect("json"),
    )
        .into_response()
}
