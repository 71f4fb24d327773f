//! Server-sent event streams: a run's log as it is stored, and the run list's changes.
//!
//! Each log event's id is the stream sequence of the log chunk it carries, so a browser
//! that reconnects (a dropped connection, a reload that passes the last id on) sends
//! `Last-Event-ID` and gets exactly the chunks stored after it: no gap, no repeat.

use std::convert::Infallible;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::{Stream, StreamExt};
use sluice_core::run::LogChunk;
use sluice_core::{bus, subjects};
use tokio::sync::broadcast::error::RecvError;

use crate::index::RunFilter;
use crate::pages::RunRow;
use crate::{ansi, AppState, Result};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/runs/{run_id}/log/live", get(log_stream))
        .route("/runs/live", get(runs_stream))
}

#[derive(Debug, serde::Deserialize)]
struct After {
    /// The sequence the page was rendered up to; `Last-Event-ID` takes precedence.
    #[serde(default)]
    after: u64,
}

/// What one log event carries: the chunk's step and its lines as styled segments.
#[derive(Debug, serde::Serialize)]
struct LogEvent {
    step: String,
    lines: Vec<Vec<ansi::Segment>>,
}

/// The sequence to resume after: the `Last-Event-ID` header, else `?after=`.
fn resume_after(headers: &HeaderMap, query: u64) -> Option<u64> {
    match headers.get("last-event-id") {
        Some(v) => v.to_str().ok()?.trim().parse().ok(),
        None => Some(query),
    }
}

async fn log_stream(
    State(s): State<AppState>,
    Path(run_id): Path<String>,
    Query(q): Query<After>,
    headers: HeaderMap,
) -> Result<Response> {
    let Some(after) = resume_after(&headers, q.after) else {
        return Ok(StatusCode::BAD_REQUEST.into_response());
    };
    if run_id.is_empty()
        || !run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
    {
        return Ok(StatusCode::NOT_FOUND.into_response());
    }
    let policy = match after {
        0 => DeliverPolicy::All,
        n => DeliverPolicy::ByStartSequence {
            start_sequence: n + 1,
        },
    };
    let messages = bus::follow(
        &s.js,
        subjects::LOGS_STREAM,
        subjects::logs_of_run(&run_id),
        policy,
    )
    .await?;
    let events = messages
        .take_until(s.shutdown.clone().cancelled_owned())
        .filter_map(|m| async move {
            let m = match m {
                Ok(m) => m,
                Err(error) => {
                    tracing::warn!(%error, "a log stream failed");
                    return None;
                }
            };
            let sequence = m.info().ok()?.stream_sequence;
            let chunk = serde_json::from_slice::<LogChunk>(&m.payload).ok()?;
            let data = LogEvent {
                step: chunk.step,
                lines: chunk
                    .lines
                    .iter()
                    .map(|l| ansi::segments(&l.text))
                    .collect(),
            };
            let event = Event::default()
                .id(sequence.to_string())
                .event("log")
                .json_data(&data)
                .ok()?;
            Some(Ok::<_, Infallible>(event))
        });
    Ok(sse(events))
}

/// Each change of a run that matches the page's filter, as the row it now shows.
async fn runs_stream(State(s): State<AppState>, Query(filter): Query<RunFilter>) -> Response {
    let changes = s.index.subscribe();
    let index = s.index.clone();
    let events = futures::stream::unfold(changes, |mut changes| async move {
        match changes.recv().await {
            Ok(id) => Some((Ok(id), changes)),
            // A slow page missed changes: it reloads rather than show a wrong list.
            Err(RecvError::Lagged(_)) => Some((Err(()), changes)),
            Err(RecvError::Closed) => None,
        }
    })
    .take_until(s.shutdown.clone().cancelled_owned())
    .filter_map(move |change| {
        let event = match change {
            Ok(id) => index.get(&id).filter(|r| filter.matches(r)).and_then(|r| {
                Event::default()
                    .event("run")
                    .json_data(RunRow::new(&r))
                    .ok()
            }),
            Err(()) => Some(Event::default().event("reload").data("lagged")),
        };
        futures::future::ready(event.map(Ok::<_, Infallible>))
    });
    sse(events)
}

fn sse(events: impl Stream<Item = Result<Event, Infallible>> + Send + 'static) -> Response {
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_id_wins_over_the_query() {
        let mut h = HeaderMap::new();
        assert_eq!(resume_after(&h, 7), Some(7));
        h.insert("last-event-id", "42".parse().expect("header"));
        assert_eq!(resume_after(&h, 7), Some(42));
        h.insert("last-event-id", "x".parse().expect("header"));
        assert_eq!(resume_after(&h, 7), None);
    }
}
