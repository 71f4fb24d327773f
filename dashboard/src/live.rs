//! Server-sent event streams: a run's log as it is stored, its state and its steps'
//! states as they change, and the run list's changes.
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
use sluice_core::run::{LogChunk, RunView, StatusUpdate};
use sluice_core::{bus, subjects};
use tokio::sync::broadcast::error::RecvError;

use crate::index::{Position, RunFilter, RunSummary};
use crate::pages::{duration, valid_token, RunRow, Times};
use crate::{ansi, groups, AppState, Result};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/runs/{run_id}/log/live", get(log_stream))
        .route("/runs/{run_id}/live", get(state_stream))
        .route("/runs/live", get(runs_stream))
}

#[derive(Debug, serde::Deserialize)]
struct After {
    /// The sequence the page was rendered up to; `Last-Event-ID` takes precedence.
    #[serde(default)]
    after: u64,
}

/// What one log event carries: the chunk's step and its lines as styled segments,
/// each with the group marker it is, if any.
#[derive(Debug, serde::Serialize)]
struct LogEvent {
    step: String,
    lines: Vec<LiveLine>,
}

#[derive(Debug, serde::Serialize)]
struct LiveLine {
    segments: Vec<ansi::Segment>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<groups::Mark>,
}

/// The `Last-Event-ID` a reconnecting browser sends: `Ok(None)` without one, `Err`
/// when it is not one this stream sent.
fn last_event_id<T: std::str::FromStr>(headers: &HeaderMap) -> std::result::Result<Option<T>, ()> {
    headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or(())
        })
        .transpose()
}

/// The sequence to resume after: the `Last-Event-ID` header, else `?after=`.
fn resume_after(headers: &HeaderMap, query: u64) -> Option<u64> {
    last_event_id(headers).ok().map(|h| h.unwrap_or(query))
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
                    .map(|l| LiveLine {
                        segments: ansi::segments(&l.text),
                        group: groups::mark(&l.text),
                    })
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

/// What one state event carries: the run's state and each step's, as the page's
/// header and step summaries show them.
#[derive(Debug, serde::Serialize)]
struct StateEvent {
    state: &'static str,
    message: String,
    /// The run is final: nothing more will change.
    #[serde(rename = "final")]
    is_final: bool,
    steps: Vec<StepEvent>,
}

#[derive(Debug, serde::Serialize)]
struct StepEvent {
    name: String,
    state: &'static str,
    exit_code: Option<i32>,
    duration: String,
    message: String,
}

fn state_event(view: &RunView, times: &Times) -> StateEvent {
    StateEvent {
        state: view.state.as_str(),
        message: view.message.clone().unwrap_or_default(),
        is_final: view.state.is_final(),
        steps: view
            .steps
            .iter()
            .map(|st| StepEvent {
                name: st.name.clone(),
                state: st.state.as_str(),
                exit_code: st.exit_code,
                duration: duration(times.steps.get(&st.name).copied().unwrap_or_default()),
                message: st.message.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

/// The run's state and its steps' after each stored change (once the stored ones are
/// all read, then after each new one), folded from its status subjects.
async fn state_stream(State(s): State<AppState>, Path(run_id): Path<String>) -> Result<Response> {
    if !valid_token(&run_id) {
        return Ok(StatusCode::NOT_FOUND.into_response());
    }
    let messages = bus::follow(
        &s.js,
        subjects::STATUS_STREAM,
        subjects::status_of_run(&run_id),
        DeliverPolicy::All,
    )
    .await?;
    let events = messages
        .take_until(s.shutdown.clone().cancelled_owned())
        .scan((None::<RunView>, Times::default()), |(view, times), m| {
            let event = match m {
                Ok(m) => {
                    let pending = m.info().map(|i| i.pending).unwrap_or_default();
                    if let Ok(u) = serde_json::from_slice::<StatusUpdate>(&m.payload) {
                        view.get_or_insert_with(|| RunView::new(&u)).apply(&u);
                        times.apply(&u);
                    }
                    // Stored states are folded together: one event once all are in.
                    match (&*view, pending) {
                        (Some(v), 0) => Event::default()
                            .event("state")
                            .json_data(state_event(v, times))
                            .ok(),
                        _ => None,
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "a state stream failed");
                    None
                }
            };
            futures::future::ready(Some(event))
        })
        .filter_map(|e| futures::future::ready(e.map(Ok::<_, Infallible>)));
    Ok(sse(events))
}

/// Where a run list's stream starts: the index position its page was rendered at.
#[derive(Debug, serde::Deserialize)]
struct Since {
    #[serde(default)]
    after: Option<String>,
}

/// The run list's changes. Each event's id is the index position after its change,
/// and a list that names one (`?after=` from its page, `Last-Event-ID` on a
/// reconnect) first gets the runs changed since, as they are now: a run that changes
/// between the page and the stream's start is not missed.
async fn runs_stream(
    State(s): State<AppState>,
    Query(filter): Query<RunFilter>,
    Query(since): Query<Since>,
    headers: HeaderMap,
) -> Response {
    let query = since.after.map(|a| a.parse::<Position>());
    let after = match (last_event_id::<Position>(&headers), query) {
        (Ok(Some(header)), _) => Some(header),
        (Ok(None), None) => None,
        (Ok(None), Some(Ok(query))) => Some(query),
        (Err(()), _) | (Ok(None), Some(Err(_))) => return StatusCode::BAD_REQUEST.into_response(),
    };
    // Subscribed before the replay is read: whatever changes meanwhile is in one or the
    // other, and what is in both is sent once.
    let changes = s.index.subscribe();
    let (replay, upto) = match after.map(|a| s.index.changed_since(a, &filter)) {
        None => (Vec::new(), Position::default()),
        Some(Some((runs, upto))) => (runs, upto),
        Some(None) => {
            let reload = Event::default().event("reload").data("too many changes");
            return sse(futures::stream::once(futures::future::ready(Ok(reload))));
        }
    };
    let replay = futures::stream::iter(replay.into_iter().filter_map(|r| run_event(r.changed, &r)));
    let index = s.index.clone();
    let live = futures::stream::unfold(changes, |mut changes| async move {
        match changes.recv().await {
            Ok(change) => Some((Ok(change), changes)),
            // A slow page missed changes: it reloads rather than show a wrong list.
            Err(RecvError::Lagged(_)) => Some((Err(()), changes)),
            Err(RecvError::Closed) => None,
        }
    })
    .filter_map(move |change| {
        let event = match change {
            Ok((at, _)) if upto.covers(at) => None,
            Ok((n, id)) => index
                .get(&id)
                .filter(|r| filter.matches(r))
                .and_then(|r| run_event(n, &r)),
            Err(()) => Some(Event::default().event("reload").data("lagged")),
        };
        futures::future::ready(event)
    });
    let events = replay
        .chain(live)
        .take_until(s.shutdown.clone().cancelled_owned())
        .map(Ok::<_, Infallible>);
    sse(events)
}

fn run_event(change: Position, r: &RunSummary) -> Option<Event> {
    Event::default()
        .event("run")
        .id(change.to_string())
        .json_data(RunRow::new(r))
        .ok()
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
