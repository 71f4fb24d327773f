//! Reruns asked for over [`subjects::RERUN`] (by the dashboard). The dashboard's NATS
//! credential may not store events — a web page's credential that could would let
//! whoever took it start any pipeline on any commit — so it asks, and a dispatcher,
//! whose credential may, stores the rerun's event: only ever for an event already
//! stored, and a pipeline the registry holds.

use std::sync::Arc;

use async_nats::jetstream;
use futures::StreamExt;
use sluice_core::run::{RerunAnswer, RerunRequest};
use sluice_core::{bus, subjects};
use tokio_util::sync::CancellationToken;

use crate::registry::Registry;

/// Answers rerun requests, one dispatcher of the queue group each, until `shutdown`.
/// The subscription is renewed by the client after a reconnect.
pub async fn serve(
    client: async_nats::Client,
    js: jetstream::Context,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
) {
    let mut requests = match client
        .queue_subscribe(subjects::RERUN, subjects::RERUN_QUEUE.into())
        .await
    {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(%error, "cannot subscribe to rerun requests; reruns from the dashboard will fail");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => break,
            m = requests.next() => match m {
                Some(m) => m,
                None => break,
            },
        };
        let Some(reply) = message.reply.clone() else {
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

async fn answer(js: &jetstream::Context, registry: &Registry, payload: &[u8]) -> RerunAnswer {
    let refused = |reason: String| RerunAnswer::Refused { reason };
    let Ok(request) = serde_json::from_slice::<RerunRequest>(payload) else {
        return refused("the rerun request could not be read".into());
    };
    if registry.current().get(&request.pipeline).is_none() {
        return refused(format!(
            "pipeline {} is not registered any more",
            request.pipeline
        ));
    }
    match bus::rerun(js, &request.event_id, &request.pipeline, request.first_seen).await {
        Ok(Some(run_id)) => {
            tracing::info!(
                run = %request.run_id,
                by = %request.by,
                new_run = %run_id,
                "rerun requested"
            );
            RerunAnswer::Started { run_id }
        }
        Ok(None) => refused(format!(
            "event {} is no longer stored (events are kept for 7 days)",
            request.event_id
        )),
        Err(error) => {
            tracing::warn!(%error, run = %request.run_id, "cannot store a rerun's event");
            refused("the rerun's event could not be stored; try again".into())
        }
    }
}
