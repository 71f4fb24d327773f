//! The few ways every part of Sluice talks to JetStream, written once: publish and
//! await the ack, read a subject's stored messages to their end, follow a subject live,
//! and a run's state projection from its stored updates.

use async_nats::jetstream::{
    self,
    consumer::{pull::OrderedConfig, DeliverPolicy},
    message::PublishMessage,
    publish::PublishAck,
};
use futures::{Stream, StreamExt};

use crate::run::{RunState, RunView, StatusUpdate};
use crate::{subjects, Error, Result};

/// Publishes `payload` on `subject` with `Nats-Msg-Id` `msg_id` and waits until
/// JetStream has stored it. `ack.duplicate` tells a repeat of an id already stored.
pub async fn publish(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    payload: Vec<u8>,
) -> Result<PublishAck> {
    send(js, subject, Some(msg_id), payload).await
}

/// [`publish_json`] without a message id, for a subject whose stream keeps only its
/// last message: a newer message there must replace the stored one, not be dropped as
/// its duplicate (a redelivered event's new decision).
pub async fn publish_json_replacing(
    js: &jetstream::Context,
    subject: String,
    value: &impl serde::Serialize,
) -> Result<PublishAck> {
    let payload = serde_json::to_vec(value).map_err(|e| Error::bus("encode", e))?;
    send(js, subject, None, payload).await
}

async fn send(
    js: &jetstream::Context,
    subject: String,
    msg_id: Option<&str>,
    payload: Vec<u8>,
) -> Result<PublishAck> {
    let mut message = PublishMessage::build().payload(payload.into());
    if let Some(id) = msg_id {
        message = message.message_id(id);
    }
    let pending = js
        .send_publish(subject.clone(), message)
        .await
        .map_err(|e| Error::bus(format!("publish on {subject}"), e))?;
    pending
        .await
        .map_err(|e| Error::bus(format!("ack of {subject}"), e))
}

/// [`publish`] of a value encoded as JSON.
pub async fn publish_json(
    js: &jetstream::Context,
    subject: String,
    msg_id: &str,
    value: &impl serde::Serialize,
) -> Result<PublishAck> {
    let payload = serde_json::to_vec(value).map_err(|e| Error::bus("encode", e))?;
    publish(js, subject, msg_id, payload).await
}

/// Calls `each` with every message stored on `subject` (wildcards allowed) of
/// `stream`, oldest first, up to what was there when the read began: an ordered
/// consumer bounded by its pending count, so the read ends even while more is being
/// written. Returns how many messages were read.
pub async fn read_subject(
    js: &jetstream::Context,
    stream: &str,
    subject: String,
    mut each: impl FnMut(&jetstream::Message),
) -> Result<u64> {
    let (consumer, pending) = ordered(js, stream, subject, DeliverPolicy::All).await?;
    if pending == 0 {
        return Ok(0);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Error::bus(format!("read {stream}"), e))?
        .take(pending as usize);
    let mut read = 0;
    while let Some(m) = messages.next().await {
        each(&m.map_err(|e| Error::bus(format!("read {stream}"), e))?);
        read += 1;
    }
    Ok(read)
}

/// Every message on `subject` from `policy` on, then each new one as it is stored,
/// until the caller stops reading. An ordered consumer: it recreates itself after a
/// gap or a reconnect, so nothing is skipped or repeated.
pub async fn follow(
    js: &jetstream::Context,
    stream: &str,
    subject: String,
    policy: DeliverPolicy,
) -> Result<impl Stream<Item = Result<jetstream::Message>>> {
    let (consumer, _) = ordered(js, stream, subject, policy).await?;
    let stream_name = stream.to_owned();
    let messages = consumer
        .messages()
        .await
        .map_err(|e| Error::bus(format!("follow {stream}"), e))?;
    Ok(messages.map(move |m| m.map_err(|e| Error::bus(format!("follow {stream_name}"), e))))
}

/// An ordered consumer on `subject` and how many messages it has to deliver now.
///
/// Named, so the create request's API subject carries the filter
/// (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`) and a credential can be allowed
/// to read only its own subjects; the stream is opened without a stream-info request
/// and the count comes from the create answer, so neither needs a permission either.
pub async fn ordered(
    js: &jetstream::Context,
    stream: &str,
    subject: String,
    policy: DeliverPolicy,
) -> Result<(jetstream::consumer::Consumer<OrderedConfig>, u64)> {
    let handle = js
        .get_stream_no_info(stream)
        .await
        .map_err(|e| Error::bus(format!("stream {stream}"), e))?;
    let consumer = handle
        .create_consumer(OrderedConfig {
            name: Some(reader_name(js)),
            filter_subject: subject,
            deliver_policy: policy,
            ..Default::default()
        })
        .await
        .map_err(|e| Error::bus(format!("read {stream}"), e))?;
    let pending = consumer.cached_info().num_pending;
    Ok((consumer, pending))
}

/// A fresh, unguessable name for a reader's ordered consumer (the random token of a
/// new inbox), so no other client can pull from it.
fn reader_name(js: &jetstream::Context) -> String {
    let inbox = js.client().new_inbox();
    let token = inbox.rsplit('.').next().unwrap_or_default();
    format!("sluice-read-{token}")
}

/// A run as its stored state changes tell it; `None` when nothing is stored yet.
/// `cluster` narrows the read to the run's own subject (a runner may read no other);
/// without it, the run is found on whichever cluster it ran.
pub async fn run_view(
    js: &jetstream::Context,
    cluster: Option<&str>,
    run_id: &str,
) -> Result<Option<RunView>> {
    let subject = match cluster {
        Some(c) => subjects::status(c, run_id),
        None => subjects::status_of_run(run_id),
    };
    let mut view: Option<RunView> = None;
    read_subject(js, subjects::STATUS_STREAM, subject, |m| {
        if let Ok(u) = serde_json::from_slice::<StatusUpdate>(&m.payload) {
            view.get_or_insert_with(|| RunView::new(&u)).apply(&u);
        }
    })
    .await?;
    Ok(view)
}

/// The run's final state, when one is stored.
///
/// With the run's cluster known, the run's last stored state is read first, one direct
/// get that any replica answers: it settles the question for a run with no state yet
/// (every run request a runner takes) and for one whose last state is final (see
/// [`settled_by_last`]). Only otherwise are the run's states read in full, through an
/// ordered consumer — which costs the cluster a consumer created and deleted, and was
/// a consumer per run started when it was the only way.
pub async fn final_state(
    js: &jetstream::Context,
    cluster: Option<&str>,
    run_id: &str,
) -> Result<Option<RunState>> {
    if let Some(cluster) = cluster {
        if let Some(settled) = last_state(js, cluster, run_id).await {
            return Ok(settled);
        }
    }
    Ok(run_view(js, cluster, run_id)
        .await?
        .and_then(|v| v.final_state()))
}

/// What the run's last stored update says of its final state, when that is enough:
/// no update at all means no final state; a run-level final state last is the one a
/// full read ends with too ([`RunView::apply`] lets a later final state replace an
/// earlier one, and nothing else replace a final one). A step's update or a state
/// that is not final may follow an earlier final state: `None`, read them all.
fn settled_by_last(last: Option<&StatusUpdate>) -> Option<Option<RunState>> {
    match last {
        None => Some(None),
        Some(u) if u.step.is_none() && u.state.is_final() => Some(Some(u.state)),
        Some(_) => None,
    }
}

/// How long a direct get may take before the full read is used instead: a credential
/// that lacks the permission gets no answer at all.
const DIRECT_GET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// [`settled_by_last`] of the run's last stored update; `None` when that does not
/// settle it or the update cannot be read this way.
async fn last_state(
    js: &jetstream::Context,
    cluster: &str,
    run_id: &str,
) -> Option<Option<RunState>> {
    let stream = js.get_stream_no_info(subjects::STATUS_STREAM).await.ok()?;
    let subject = subjects::status(cluster, run_id);
    let got = tokio::time::timeout(
        DIRECT_GET_TIMEOUT,
        stream.direct_get_last_for_subject(subject.as_str()),
    )
    .await;
    match got {
        Ok(Ok(message)) => {
            let update = serde_json::from_slice::<StatusUpdate>(&message.payload).ok()?;
            settled_by_last(Some(&update))
        }
        Ok(Err(e)) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
            settled_by_last(None)
        }
        // A status stream not yet given `allow_direct` (each service's start-up report
        // names the difference and `sluice streams apply`), a credential without the
        // permission (the client logs the violation), a slow cluster: the full read
        // answers instead.
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {DIRECT_GET_TIMEOUT:?}"),
            };
            tracing::debug!(run_id, error = %why, "run's last state not read directly; reading its states in full");
            None
        }
    }
}

/// How far around the time a run was first seen its event is searched: from an hour
/// before (the event is stored before its run's first state, a queued delivery long
/// before) to ten minutes after (clocks), so a search reads a bounded slice of the
/// stream however old the run.
const EVENT_BEFORE: std::time::Duration = std::time::Duration::from_secs(3600);
const EVENT_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// Asks `cluster`'s runners to cancel `run_id`, giving `reason`; stored once per run
/// (the request's message id is the run's), so asking twice is one cancel.
pub async fn cancel(
    js: &jetstream::Context,
    cluster: &str,
    run_id: &str,
    reason: &str,
) -> Result<PublishAck> {
    let request = crate::run::CancelRequest {
        run_id: run_id.to_owned(),
        reason: reason.to_owned(),
        at: time::OffsetDateTime::now_utc(),
    };
    publish_json(
        js,
        subjects::cancel(cluster),
        &subjects::cancel_id(run_id),
        &request,
    )
    .await
}

/// The stored event `event_id` of a run first seen at `around`, or `None` when it is no
/// longer stored (or not within the searched slice).
pub async fn find_event(
    js: &jetstream::Context,
    event_id: &str,
    around: time::OffsetDateTime,
) -> Result<Option<crate::Event>> {
    let (consumer, pending) = ordered(
        js,
        subjects::EVENTS_STREAM,
        "sluice.events.>".into(),
        DeliverPolicy::ByStartTime {
            start_time: around - EVENT_BEFORE,
        },
    )
    .await?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| Error::bus("read events", e))?
        .take(pending as usize);
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| Error::bus("read events", e))?;
        if m.info().is_ok_and(|i| i.published > around + EVENT_AFTER) {
            break;
        }
        let Ok(event) = serde_json::from_slice::<crate::Event>(&m.payload) else {
            continue;
        };
        if event.id == event_id {
            return Ok(Some(event));
        }
    }
    Ok(None)
}

/// The decision recorded for `event_id` (what `sluice events why` prints); `None` when
/// none is stored, or the stored one was written in a shape this version cannot read.
pub async fn decision(
    js: &jetstream::Context,
    event_id: &str,
) -> Result<Option<crate::run::Decision>> {
    let stream = js
        .get_stream_no_info(subjects::DECISIONS_STREAM)
        .await
        .map_err(|e| Error::bus("open the decisions stream", e))?;
    match stream
        .get_last_raw_message_by_subject(subjects::decision(event_id).as_str())
        .await
    {
        Ok(msg) => Ok(serde_json::from_slice(&msg.payload).ok()),
        Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
            Ok(None)
        }
        Err(e) => Err(Error::bus("read a decision", e)),
    }
}

/// Stores the event that reruns `pipeline` for the stored event `event_id`
/// ([`crate::run::rerun_event`]) and answers with the id of the run it starts, or why
/// there is none (safe to show). The dispatcher plans it as a new delivery: an applied
/// pipeline as it is now, a repository pipeline as its run read it
/// ([`crate::repo_pipelines::rerun_source`]), commit statuses to the forge.
pub async fn rerun(
    js: &jetstream::Context,
    event_id: &str,
    pipeline: &str,
    around: time::OffsetDateTime,
) -> Result<crate::run::RerunAnswer> {
    use crate::run::RerunAnswer;
    let Some(original) = find_event(js, event_id, around).await? else {
        return Ok(RerunAnswer::Refused {
            reason: format!(
                "event {event_id} is no longer stored (events are kept for 7 days): it cannot be rerun"
            ),
        });
    };
    let decision = if crate::repo_pipelines::is_repo_pipeline(pipeline) {
        decision(js, &original.id).await?
    } else {
        None
    };
    let pinned = match crate::repo_pipelines::rerun_source(&original, pipeline, decision.as_ref()) {
        Ok(pinned) => pinned,
        Err(reason) => return Ok(RerunAnswer::Refused { reason }),
    };
    let mut event = crate::run::rerun_event(&original, pipeline, time::OffsetDateTime::now_utc());
    event.repo_pipelines_at = pinned;
    publish_json(js, event.subject(), &event.id, &event).await?;
    Ok(RerunAnswer::Started {
        run_id: crate::run::rerun_id(&event, pipeline),
    })
}

/// Asks a dispatcher to rerun a run ([`subjects::RERUN`]) and waits up to `timeout` for
/// its answer: the dashboard's way, whose credential may not store events.
pub async fn request_rerun(
    client: &async_nats::Client,
    request: &crate::run::RerunRequest,
    timeout: std::time::Duration,
) -> Result<crate::run::RerunAnswer> {
    let payload = serde_json::to_vec(request).map_err(|e| Error::bus("encode", e))?;
    let answer = tokio::time::timeout(timeout, client.request(subjects::RERUN, payload.into()))
        .await
        .map_err(|_| Error::Timeout(timeout))?
        .map_err(|e| Error::bus("rerun request", e))?;
    serde_json::from_slice(&answer.payload).map_err(|e| Error::bus("rerun answer", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(state: RunState, step: Option<&str>) -> StatusUpdate {
        serde_json::from_value(serde_json::json!({
            "run_id": "r1",
            "pipeline": "p",
            "state": state,
            "step": step,
            "at": "2026-12-04T12:00:00Z",
        }))
        .expect("a status update")
    }

    #[test]
    fn the_last_update_settles_a_run_without_states_or_ending_final() {
        assert_eq!(settled_by_last(None), Some(None));
        for state in [RunState::Succeeded, RunState::Failed, RunState::Cancelled] {
            assert_eq!(
                settled_by_last(Some(&update(state, None))),
                Some(Some(state))
            );
        }
    }

    #[test]
    fn a_step_or_a_state_not_final_last_needs_the_full_read() {
        // Either may follow an earlier final state of the run.
        assert_eq!(
            settled_by_last(Some(&update(RunState::Running, None))),
            None
        );
        assert_eq!(
            settled_by_last(Some(&update(RunState::Succeeded, Some("test")))),
            None
        );
    }

    #[test]
    fn a_full_read_ends_with_the_final_state_the_last_update_names() {
        // What `settled_by_last` relies on: the fold of every update agrees with it
        // whenever it answers.
        let ups = [
            update(RunState::Scheduled, None),
            update(RunState::Cancelled, None),
            update(RunState::Running, Some("test")),
            update(RunState::Failed, None),
        ];
        for n in 1..=ups.len() {
            let view = RunView::fold(&ups[..n]).and_then(|v| v.final_state());
            if let Some(settled) = settled_by_last(ups[..n].last()) {
                assert_eq!(settled, view, "after {n} updates");
            }
        }
    }
}
