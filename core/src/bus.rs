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
    Ok(read_view(js, subject).await?.0)
}

/// The run view of the updates stored on `subject`, with the stream sequence of the
/// last one read (0 for none).
async fn read_view(js: &jetstream::Context, subject: String) -> Result<(Option<RunView>, u64)> {
    let (mut view, mut read_to): (Option<RunView>, u64) = (None, 0);
    read_subject(js, subjects::STATUS_STREAM, subject, |m| {
        if let Ok(info) = m.info() {
            read_to = read_to.max(info.stream_sequence);
        }
        if let Ok(u) = serde_json::from_slice::<StatusUpdate>(&m.payload) {
            view.get_or_insert_with(|| RunView::new(&u)).apply(&u);
        }
    })
    .await?;
    Ok((view, read_to))
}

/// The run's final state, when one is stored: the check a runner makes before it
/// starts a run it was handed, so that a redelivered run that already finished (its
/// final state stored, the acknowledgement lost) is not run a second time.
///
/// Reads may be answered by any replica, and a replica catching up after a restart
/// answers direct gets once it is 90 % synchronised: a read alone can miss a final
/// state that was stored. So the stream leader is asked first for the sequence of the
/// run's last update ([`subject_last_seq`]). None at all — every run a runner takes
/// for the first time — settles it with no read. Otherwise only a read that reaches
/// that sequence counts: the run's last update, one direct get ([`settled_by_last`]),
/// or failing that its updates in full through an ordered consumer. A read from
/// behind is retried until [`CONSISTENT_READ_WITHIN`] has passed; then this fails, and
/// the caller must not take the run for unfinished.
pub async fn final_state(
    js: &jetstream::Context,
    cluster: &str,
    run_id: &str,
) -> Result<Option<RunState>> {
    let subject = subjects::status(cluster, run_id);
    let stored = subject_last_seq(js, &subject).await?;
    let deadline = tokio::time::Instant::now() + CONSISTENT_READ_WITHIN;
    let mut delay = std::time::Duration::from_millis(20);
    loop {
        if let Some(settled) = settled_by_last(stored, last_update(js, &subject, stored).await) {
            return Ok(settled);
        }
        let (view, read_to) = read_view(js, subject.clone()).await?;
        if read_to >= stored {
            return Ok(view.and_then(|v| v.final_state()));
        }
        if tokio::time::Instant::now() + delay > deadline {
            return Err(Error::bus(
                format!("read the states of run {run_id}"),
                format!(
                    "every read answered from behind the stream leader (at sequence {read_to}, \
                     its last update is at {stored}) for {CONSISTENT_READ_WITHIN:?}: a NATS \
                     node is still catching up"
                ),
            ));
        }
        tracing::debug!(run_id, read_to, stored, retry_in = ?delay, "run's states read from a replica behind the leader; reading again");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_millis(500));
    }
}

/// How long [`final_state`] waits for a replica to catch up with the leader before it
/// gives up: well within a run's ack wait, so the run is only delayed.
const CONSISTENT_READ_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// What the run's last update, as one replica read it, says of its final state when
/// that is enough; `stored` is the sequence the stream leader gave that update (0: the
/// run has none). No update at all then means no final state; a run-level final state
/// read at `stored` or later is the one a full read ends with too ([`RunView::apply`]
/// lets a later final state replace an earlier one, and nothing else replace a final
/// one). A read from behind `stored` — no update, or an older one — settles nothing,
/// nor does a step's update or a state that is not final, which may follow an earlier
/// final state: `None`, read them all.
fn settled_by_last(stored: u64, read: Option<(u64, StatusUpdate)>) -> Option<Option<RunState>> {
    if stored == 0 {
        return Some(None);
    }
    match read {
        Some((seq, u)) if seq >= stored && u.step.is_none() && u.state.is_final() => {
            Some(Some(u.state))
        }
        _ => None,
    }
}

/// The sequence of the last message the stream leader has stored on `subject`, 0 for
/// none. Asked as a publish expecting a last sequence no subject can have, which the
/// leader refuses with the real one and stores nothing: only the leader decides
/// publishes, so unlike a read the answer cannot come from a replica behind it, and it
/// needs no permission beyond publishing on the subject (a runner may read no stream's
/// info, which would name other clusters' runs).
async fn subject_last_seq(js: &jetstream::Context, subject: &str) -> Result<u64> {
    let what = || format!("ask the stream leader for the last update on {subject}");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        u64::MAX.to_string().as_str(),
    );
    let reply = js
        .client()
        .request_with_headers(subject.to_owned(), headers, Default::default())
        .await
        .map_err(|e| Error::bus(what(), e))?;
    refused_last_seq(&reply.payload).ok_or_else(|| {
        Error::bus(
            what(),
            format!(
                "unexpected answer {:?}",
                String::from_utf8_lossy(&reply.payload[..reply.payload.len().min(200)])
            ),
        )
    })
}

/// The subject's last sequence from a leader's refusal of a publish that expected
/// another ("wrong last sequence: N", JetStream error 10071); `None` for any other
/// answer, including the refusal without a number a leader gives while another
/// conditional publish on the subject is in flight.
fn refused_last_seq(reply: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Reply {
        error: Refusal,
    }
    #[derive(serde::Deserialize)]
    struct Refusal {
        err_code: u64,
        description: String,
    }
    let refusal = serde_json::from_slice::<Reply>(reply).ok()?.error;
    if refusal.err_code != 10071 {
        return None;
    }
    refusal
        .description
        .strip_prefix("wrong last sequence: ")?
        .parse()
        .ok()
}

/// How long a direct get may take before the full read is used instead: a credential
/// that lacks the permission gets no answer at all.
const DIRECT_GET_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// The run's last update with its sequence, read by one direct get when the leader has
/// one stored (`stored` > 0); `None` when there is none on the replica that answered,
/// or it cannot be read this way.
async fn last_update(
    js: &jetstream::Context,
    subject: &str,
    stored: u64,
) -> Option<(u64, StatusUpdate)> {
    if stored == 0 {
        return None;
    }
    let stream = js.get_stream_no_info(subjects::STATUS_STREAM).await.ok()?;
    let got = tokio::time::timeout(
        DIRECT_GET_TIMEOUT,
        stream.direct_get_last_for_subject(subject),
    )
    .await;
    match got {
        Ok(Ok(message)) => {
            let update = serde_json::from_slice::<StatusUpdate>(&message.payload).ok()?;
            Some((message.sequence, update))
        }
        // A replica behind the leader.
        Ok(Err(e)) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => None,
        // A status stream not yet given `allow_direct` (each service's start-up report
        // names the difference and `sluice streams apply`), a credential without the
        // permission (the client logs the violation), a slow cluster: the full read
        // answers instead.
        failed => {
            let why = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no answer within {DIRECT_GET_TIMEOUT:?}"),
            };
            tracing::debug!(subject, error = %why, "run's last state not read directly; reading its states in full");
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
        assert_eq!(settled_by_last(0, None), Some(None));
        for state in [RunState::Succeeded, RunState::Failed, RunState::Cancelled] {
            assert_eq!(
                settled_by_last(7, Some((7, update(state, None)))),
                Some(Some(state))
            );
        }
    }

    #[test]
    fn a_read_from_behind_the_leader_settles_nothing() {
        // The leader has the run's last update at 7; a replica catching up has not
        // (the check once took "no message" for "no state", and ran a finished run
        // again), or has only an earlier one.
        assert_eq!(settled_by_last(7, None), None);
        assert_eq!(
            settled_by_last(7, Some((5, update(RunState::Succeeded, None)))),
            None
        );
    }

    #[test]
    fn a_step_or_a_state_not_final_last_needs_the_full_read() {
        // Either may follow an earlier final state of the run.
        assert_eq!(
            settled_by_last(7, Some((7, update(RunState::Running, None)))),
            None
        );
        assert_eq!(
            settled_by_last(7, Some((7, update(RunState::Succeeded, Some("test"))))),
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
            let last = (n as u64, ups[n - 1].clone());
            if let Some(settled) = settled_by_last(n as u64, Some(last)) {
                assert_eq!(settled, view, "after {n} updates");
            }
        }
    }

    #[test]
    fn the_leaders_refusal_names_the_subjects_last_sequence() {
        // As nats-server 2.12 answers a publish expecting another last subject sequence.
        let refusal = |description: &str| {
            format!(
                r#"{{"error":{{"code":400,"err_code":10071,"description":"{description}"}},"stream":"SLUICE_STATUS","seq":0}}"#
            )
        };
        assert_eq!(
            refused_last_seq(refusal("wrong last sequence: 0").as_bytes()),
            Some(0)
        );
        assert_eq!(
            refused_last_seq(refusal("wrong last sequence: 18446744073709551614").as_bytes()),
            Some(u64::MAX - 1)
        );
        // Another conditional publish on the subject in flight: no number to trust.
        assert_eq!(
            refused_last_seq(refusal("wrong last sequence").as_bytes()),
            None
        );
        // A stored message, another refusal, no JSON: never a sequence.
        assert_eq!(
            refused_last_seq(br#"{"stream":"SLUICE_STATUS","seq":4}"#),
            None
        );
        let other =
            r#"{"error":{"code":503,"err_code":10077,"description":"wrong last sequence: 3"}}"#;
        assert_eq!(refused_last_seq(other.as_bytes()), None);
        assert_eq!(refused_last_seq(b"NATS/1.0 503"), None);
    }
}
