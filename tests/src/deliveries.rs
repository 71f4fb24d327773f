//! An HTTP double of GitHub's webhook deliveries API for the App's hook
//! (`/app/hook/deliveries`): it makes deliveries to a real ingest the way GitHub does
//! (signed, with `X-GitHub-Delivery`), remembers what each was answered, lists them
//! newest first in pages with a `Link` cursor, and performs a redelivery by posting the
//! original signed request again and listing the attempt as a new delivery with the
//! same guid. Faults on demand: a 2xx lost on its way back, a delivery that can never
//! get through, redeliveries refused, a secondary rate limit.

use std::collections::{HashMap, HashSet};
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

use crate::ingest::GITHUB_SECRET;

/// One delivery as the double remembers it.
#[derive(Debug, Clone)]
pub struct Made {
    pub id: u64,
    pub guid: String,
    pub event: String,
    pub body: Vec<u8>,
    pub delivered_at: OffsetDateTime,
    pub status_code: u16,
    pub redelivery: bool,
}

/// A request the double received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub method: &'static str,
    /// The listing's cursor, or the delivery id redelivered.
    pub target: String,
    pub answered: u16,
}

#[derive(Debug, Default)]
struct Hooks {
    made: Vec<Made>,
    next_id: u64,
    received: Vec<Received>,
    /// Guids no attempt gets through for (GitHub records a connection failure).
    unreachable: HashSet<String>,
    /// Guids whose redelivery GitHub refuses (422).
    refused: HashSet<String>,
    /// Redelivery requests answered with a secondary rate limit before any is served.
    rate_limited: u32,
    page_size: usize,
}

/// The running double.
#[derive(Debug, Clone)]
pub struct GitHubHooks {
    pub addr: SocketAddr,
    state: Arc<Mutex<Hooks>>,
    ingest: String,
    http: reqwest::Client,
}

#[derive(Clone)]
struct Shared {
    hooks: GitHubHooks,
}

impl GitHubHooks {
    /// Serves on a loopback port; deliveries go to `ingest_url` (`…/webhooks/github`);
    /// the listing pages `page_size` deliveries at a time.
    pub async fn start(ingest_url: &str, page_size: usize) -> GitHubHooks {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let hooks = GitHubHooks {
            addr: listener.local_addr().expect("addr"),
            state: Arc::new(Mutex::new(Hooks {
                next_id: 1000,
                page_size,
                ..Hooks::default()
            })),
            ingest: ingest_url.to_owned(),
            http: reqwest::Client::new(),
        };
        let app = Router::new()
            .route("/app/hook/deliveries", get(list))
            .route("/app/hook/deliveries/{id}/attempts", post(redeliver))
            .with_state(Shared {
                hooks: hooks.clone(),
            });
        // Served until the test's runtime ends.
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        hooks
    }

    /// `http://127.0.0.1:<port>`: the API URL.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn lock(&self) -> MutexGuard<'_, Hooks> {
        self.state.lock().expect("double state")
    }

    /// Delivers `body` as event `event` with delivery id `guid`, as GitHub does, and
    /// returns what ingest answered (0: it could not be reached).
    pub async fn deliver(&self, guid: &str, event: &str, body: &[u8]) -> u16 {
        let status = self.post_to_ingest(guid, event, body).await;
        self.record(guid, event, body, OffsetDateTime::now_utc(), status, false);
        status
    }

    /// Delivers it, but records `reported` as the answer: the real one was lost on
    /// its way back (ingest stored it; GitHub saw a timeout).
    pub async fn deliver_answer_lost(
        &self,
        guid: &str,
        event: &str,
        body: &[u8],
        reported: u16,
    ) -> u16 {
        let status = self.post_to_ingest(guid, event, body).await;
        self.record(
            guid,
            event,
            body,
            OffsetDateTime::now_utc(),
            reported,
            false,
        );
        status
    }

    /// Lists a failed delivery made at `at` that never reached ingest.
    pub fn failed_at(&self, guid: &str, event: &str, body: &[u8], at: OffsetDateTime) {
        self.record(guid, event, body, at, 503, false);
    }

    /// No attempt of `guid` ever gets through.
    pub fn unreachable(&self, guid: &str) {
        self.lock().unreachable.insert(guid.to_owned());
    }

    /// GitHub refuses to redeliver `guid`.
    pub fn refuse(&self, guid: &str) {
        self.lock().refused.insert(guid.to_owned());
    }

    /// The next `n` redelivery requests hit a secondary rate limit (Retry-After: 1).
    pub fn rate_limit(&self, n: u32) {
        self.lock().rate_limited = n;
    }

    /// Every request received.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// Redelivery requests GitHub served, by guid.
    pub fn redeliveries(&self) -> HashMap<String, u32> {
        let hooks = self.lock();
        let mut by_guid = HashMap::new();
        for m in hooks.made.iter().filter(|m| m.redelivery) {
            *by_guid.entry(m.guid.clone()).or_insert(0) += 1;
        }
        by_guid
    }

    fn record(
        &self,
        guid: &str,
        event: &str,
        body: &[u8],
        at: OffsetDateTime,
        status: u16,
        redelivery: bool,
    ) -> u64 {
        let mut hooks = self.lock();
        hooks.next_id += 1;
        let id = hooks.next_id;
        hooks.made.push(Made {
            id,
            guid: guid.to_owned(),
            event: event.to_owned(),
            body: body.to_vec(),
            delivered_at: at,
            status_code: status,
            redelivery,
        });
        id
    }

    async fn post_to_ingest(&self, guid: &str, event: &str, body: &[u8]) -> u16 {
        if self.lock().unreachable.contains(guid) {
            return 0;
        }
        let sent = self
            .http
            .post(&self.ingest)
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", guid)
            .header(
                "x-hub-signature-256",
                crate::sign::github_sha256(GITHUB_SECRET, body),
            )
            .body(body.to_vec())
            .send()
            .await;
        sent.map(|r| r.status().as_u16()).unwrap_or(0)
    }
}

#[derive(Deserialize)]
struct ListQuery {
    cursor: Option<String>,
}

async fn list(State(s): State<Shared>, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    let jwt = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.matches('.').count() == 2);
    let mut hooks = s.hooks.lock();
    let answered = if jwt { 200 } else { 401 };
    hooks.received.push(Received {
        at: Instant::now(),
        method: "GET",
        target: q.cursor.clone().unwrap_or_default(),
        answered,
    });
    if !jwt {
        return json_response(
            StatusCode::UNAUTHORIZED,
            &json!({"message": "A JSON web token could not be decoded"}),
        );
    }
    let offset: usize = q
        .cursor
        .as_deref()
        .and_then(|c| c.strip_prefix("o"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let mut newest_first: Vec<&Made> = hooks.made.iter().collect();
    newest_first.sort_by_key(|m| std::cmp::Reverse((m.delivered_at, m.id)));
    let page: Vec<serde_json::Value> = newest_first
        .iter()
        .skip(offset)
        .take(hooks.page_size)
        .map(|m| {
            json!({
                "id": m.id,
                "guid": m.guid,
                "delivered_at": m.delivered_at.format(&time::format_description::well_known::Rfc3339).expect("rfc3339"),
                "redelivery": m.redelivery,
                "duration": 0.1,
                "status": if (200..300).contains(&m.status_code) { "OK" } else { "Service Unavailable" },
                "status_code": m.status_code,
                "event": m.event,
                "action": null,
                "installation_id": 1,
                "repository_id": 2,
            })
        })
        .collect();
    let mut response = json_response(StatusCode::OK, &serde_json::Value::Array(page));
    let next = offset + hooks.page_size;
    if next < newest_first.len() {
        let link = format!(
            "<{}/app/hook/deliveries?per_page=100&cursor=o{next}>; rel=\"next\"",
            s.hooks.uri()
        );
        response
            .headers_mut()
            .insert("link", HeaderValue::from_str(&link).expect("header"));
    }
    response
}

async fn redeliver(State(s): State<Shared>, Path(id): Path<u64>) -> Response {
    let (original, answer) = {
        let mut hooks = s.hooks.lock();
        let original = hooks.made.iter().find(|m| m.id == id).cloned();
        let answer = match &original {
            None => 404,
            Some(_) if hooks.rate_limited > 0 => {
                hooks.rate_limited -= 1;
                403
            }
            Some(m) if hooks.refused.contains(&m.guid) => 422,
            Some(_) => 202,
        };
        hooks.received.push(Received {
            at: Instant::now(),
            method: "POST",
            target: id.to_string(),
            answered: answer,
        });
        (original, answer)
    };
    match (original, answer) {
        (Some(m), 202) => {
            let status = s.hooks.post_to_ingest(&m.guid, &m.event, &m.body).await;
            s.hooks.record(
                &m.guid,
                &m.event,
                &m.body,
                OffsetDateTime::now_utc(),
                status,
                true,
            );
            json_response(StatusCode::ACCEPTED, &json!({}))
        }
        (_, 403) => {
            let mut r = json_response(
                StatusCode::FORBIDDEN,
                &json!({"message": "You have exceeded a secondary rate limit"}),
            );
            r.headers_mut()
                .insert("retry-after", HeaderValue::from_static("1"));
            r
        }
        (_, 422) => json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &json!({"message": "Validation Failed"}),
        ),
        _ => json_response(StatusCode::NOT_FOUND, &json!({"message": "Not Found"})),
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
