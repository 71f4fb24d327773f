//! Reruns asked for over [`subjects::RERUN`] (by the dashboard). The dashboard's NATS
//! credential may not store events — a web page's credential that could would let
//! whoever took it start any pipeline on any commit — so it asks, and a dispatcher,
//! whose credential may, stores the rerun's event. The request names only a run: the
//! dispatcher reads that run's pipeline and event from the stored states itself, so a
//! request can repeat what ran, nothing else. And it answers only to a client inbox:
//! its credential may publish almost anywhere, and a reply subject is the requester's
//! choice.

use std::sync::Arc;

use async_nats::jetstream;
use futures::StreamExt;
use sluice_core::run::{RerunAnswer, RerunRequest};
use sluice_core::{bus, repo_pipelines, subjects};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// Joins the dispatchers' queue group on [`subjects::RERUN`]; before the dispatcher
/// consumes, so one that dispatches also answers. The client renews it after a
/// reconnect.
pub async fn subscribe(client: &async_nats::Client) -> crate::Result<async_nats::Subscriber> {
    client
        .queue_subscribe(subjects::RERUN, subjects::RERUN_QUEUE.into())
        .await
        .map_err(|e| crate::Error::Nats {
            what: format!("subscribe to {}", subjects::RERUN),
            source: e.into(),
        })
}

/// Answers the rerun requests `requests` receives (one dispatcher of the queue group
/// each) until `shutdown`.
pub async fn serve(
    mut requests: async_nats::Subscriber,
    client: async_nats::Client,
    js: jetstream::Context,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => break,
            m = requests.next() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let Some(reply) = message.reply.clone().filter(|r| answerable(r)) else {
            tracing::warn!(reply = ?message.reply, "a rerun request without a client inbox to answer was dropped");
            continue;
        };
        let answer = answer(&js, &registry, &message.payload).await;
        let Ok(payload) = serde_json::to_vec(&answer) else {
            continue;
        };
        if let Err(error) = client.publish(reply, payload.into()).await {
            tracing::warn!(%error, "cannot answer a rerun request");
        }
    }
    let _ = requests.unsubscribe().await;
}

/// Whether a reply subject is a client's inbox (`_INBOX.<id>`, as every Sluice client's
/// requests use), the only place an answer goes: not a stream's subject, a bucket's key
/// or the JetStream API, and not the acknowledgement subject of a message a consumer
/// pushed here.
pub fn answerable(reply: &str) -> bool {
    reply
        .strip_prefix("_INBOX.")
        .is_some_and(|rest| !rest.is_empty() && !rest.contains(['*', '>', ' ']))
}

/// A run id that is one subject token (no wildcard, no dot), as every run id is.
fn run_id_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

async fn answer(js: &jetstream::Context, registry: &Registry, payload: &[u8]) -> RerunAnswer {
    let refused = |reason: String| RerunAnswer::Refused { reason };
    let Ok(request) = serde_json::from_slice::<RerunRequest>(payload) else {
        return refused("the rerun request could not be read".into());
    };
    if !run_id_token(&request.run_id) {
        return refused("no such run".into());
    }
    let view = match bus::run_view(js, None, &request.run_id).await {
        Ok(Some(view)) => view,
        Ok(None) => return refused("no such run".into()),
        Err(error) => {
            tracing::warn!(%error, "cannot read a run to rerun");
            return refused("the run could not be read; try again".into());
        }
    };
    let Some(event_id) = view.event_id.clone() else {
        return refused("the run names no event to run again".into());
    };
    // A repository pipeline is read again where its run read it; the rule and its
    // refusals are core's (`rerun_source`), the same as `sluice runs rerun`'s.
    if !repo_pipelines::is_repo_pipeline(&view.pipeline)
        && registry.current().get(&view.pipeline).is_none()
    {
        return refused(format!(
            "pipeline {} is not registered any more",
            view.pipeline
        ));
    }
    match bus::rerun(js, &event_id, &view.pipeline, view.first_seen).await {
        Ok(RerunAnswer::Started { run_id }) => {
            tracing::info!(
                run = %request.run_id,
                by = ?request.by,
                new_run = %run_id,
                "rerun requested"
            );
            RerunAnswer::Started { run_id }
        }
        Ok(refusal) => refusal,
        Err(error) => {
            tracing::warn!(%error, run = %request.run_id, "cannot store a rerun's event");
            refused("the rerun's event could not be stored; try again".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{answerable, run_id_token};

    #[test]
    fn a_run_id_is_one_subject_token() {
        assert!(run_id_token("4f1c2a9e0b7d3c5a8e21"));
        for bad in ["", ">", "*", "a.b", "a b", &"x".repeat(201)] {
            assert!(!run_id_token(bad), "{bad}");
        }
    }

    #[test]
    fn only_a_client_inbox_is_answered() {
        assert!(answerable("_INBOX.abc123.def"));
        for reply in [
            "",
            "_INBOX.",
            "_INBOX",
            "sluice.runs.a",
            "$KV.SLUICE_PIPELINES.app",
            "$JS.API.CONSUMER.DELETE.SLUICE_EVENTS.sluice-dispatcher",
            "$JS.ACK.SLUICE_LOGS.x.1.2.3.4.5",
            "_INBOX_a.x",
            "_INBOX.>",
        ] {
            assert!(!answerable(reply), "{reply}");
        }
    }
}
