//! `sluice_runs_pending{cluster}`: each cluster's backlog, read from its runners' durable
//! consumer on the runs stream (requests stored and not yet delivered to a runner).
//!
//! The dispatcher reports it, not the runners: a cluster whose runners are all down is
//! exactly the one whose backlog must still be seen. Every replica reports the same
//! number; queries take `max by (cluster)`.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use futures::TryStreamExt;
use sluice_core::subjects;
use tokio_util::sync::CancellationToken;

use crate::metrics::{ClusterLabel, Metrics};
use crate::{Error, Result};

/// How often the backlog is read: well inside Prometheus's usual 15–30 s scrape.
pub const INTERVAL: Duration = Duration::from_secs(5);

/// Refreshes the gauge every `interval` until `shutdown`. A failed read leaves the last
/// values in place and is retried at the next tick.
pub async fn watch(
    js: jetstream::Context,
    metrics: Metrics,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shown = BTreeMap::new();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match read(&js).await {
            Ok(consumers) => {
                let now = backlog(&consumers);
                show(&metrics, &shown, &now);
                shown = now;
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the clusters' backlog yet"),
        }
    }
}

/// `(consumer name, requests not yet delivered)` of every consumer on the runs stream.
async fn read(js: &jetstream::Context) -> Result<Vec<(String, u64)>> {
    let stream = js
        .get_stream(subjects::RUNS_STREAM)
        .await
        .map_err(|e| Error::nats("runs stream", e))?;
    stream
        .consumers()
        .map_ok(|info| (info.name, info.num_pending))
        .try_collect()
        .await
        .map_err(|e| Error::nats("runs stream consumers", e))
}

/// Each cluster's backlog, from the consumers that are runners' groups.
pub fn backlog(consumers: &[(String, u64)]) -> BTreeMap<String, u64> {
    consumers
        .iter()
        .filter_map(|(name, pending)| {
            subjects::runner_consumer_cluster(name).map(|cluster| (cluster.to_owned(), *pending))
        })
        .collect()
}

/// Sets the gauge to `now`, dropping clusters whose consumer is gone (a removed
/// cluster must not keep its last backlog forever).
fn show(metrics: &Metrics, before: &BTreeMap<String, u64>, now: &BTreeMap<String, u64>) {
    for cluster in before.keys().filter(|c| !now.contains_key(*c)) {
        metrics.runs_pending.remove(&ClusterLabel {
            cluster: cluster.clone(),
        });
    }
    for (cluster, pending) in now {
        metrics
            .runs_pending
            .get_or_create(&ClusterLabel {
                cluster: cluster.clone(),
            })
            .set(i64::try_from(*pending).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_runner_groups_count_and_a_removed_cluster_disappears() {
        let read = |pairs: &[(&str, u64)]| -> Vec<(String, u64)> {
            pairs.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect()
        };
        let first = backlog(&read(&[
            ("sluice-runner-eu-1", 7),
            ("sluice-runner-us-2", 0),
            ("an-operators-own-consumer", 99),
        ]));
        assert_eq!(
            first,
            BTreeMap::from([("eu-1".to_owned(), 7), ("us-2".to_owned(), 0)])
        );
        let metrics = Metrics::default();
        show(&metrics, &BTreeMap::new(), &first);
        let second = backlog(&read(&[("sluice-runner-eu-1", 3)]));
        show(&metrics, &first, &second);
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register("sluice_runs_pending", "", metrics.runs_pending.clone());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).unwrap();
        assert!(
            out.contains("sluice_runs_pending{cluster=\"eu-1\"} 3"),
            "{out}"
        );
        assert!(!out.contains("us-2"), "{out}");
    }
}
