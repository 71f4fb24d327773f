//! Helpers the delivery reconciler's tests share, whichever forge's double they use.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use sluice_core::subjects;
use sluice_dispatcher::recover::decide::Record;
use sluice_dispatcher::recover::{Reconciler, Summary};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::ingest::{stored_events, Ingest};
use crate::wait_for;

/// One pass at `now`.
pub async fn pass(r: &Reconciler, now: OffsetDateTime) -> Summary {
    r.reconcile(now, &CancellationToken::new())
        .await
        .expect("a pass")
}

/// How many stored events carry each id.
pub async fn events_by_id(js: &jetstream::Context) -> HashMap<String, usize> {
    let mut by_id = HashMap::new();
    for (_, event) in stored_events(js).await {
        *by_id.entry(event.id).or_insert(0) += 1;
    }
    by_id
}

/// The reconciler's record of `forge`'s delivery `guid`, if it has one.
pub async fn record(js: &jetstream::Context, forge: &str, guid: &str) -> Option<Record> {
    let kv = js
        .get_key_value(subjects::DELIVERIES_BUCKET)
        .await
        .expect("bucket");
    let entry = kv.get(format!("{forge}.{guid}")).await.expect("read")?;
    Some(serde_json::from_slice(&entry).expect("a record"))
}

/// Until ingest is ready again (after NATS came back).
pub async fn ingest_ready(ingest: &Ingest) {
    let ready = ingest.admin_url("/readyz");
    wait_for("ingest to reconnect", Duration::from_secs(30), || async {
        let r = reqwest::get(&ready).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
}
