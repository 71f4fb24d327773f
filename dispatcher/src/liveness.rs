//! Which clusters have a live runner, from the `SLUICE_RUNNERS` bucket: runners renew
//! `<cluster>.<runner id>` and the bucket expires entries that stop being renewed.
//! A pipeline with a list of clusters goes to the first one that has a runner.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::kv::{Operation, Store};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Live runner keys per cluster.
#[derive(Debug, Default)]
pub struct Liveness {
    runners: RwLock<HashMap<String, std::collections::HashSet<String>>>,
}

impl Liveness {
    /// True when some runner of `cluster` has a current heartbeat.
    pub fn is_alive(&self, cluster: &str) -> bool {
        self.runners
            .read()
            .map(|r| r.get(cluster).is_some_and(|s| !s.is_empty()))
            .unwrap_or(false)
    }

    fn apply(&self, key: &str, alive: bool) {
        let Some((cluster, runner)) = key.split_once('.') else {
            return;
        };
        if let Ok(mut r) = self.runners.write() {
            let set = r.entry(cluster.to_owned()).or_default();
            if alive {
                set.insert(runner.to_owned());
            } else {
                set.remove(runner);
            }
        }
    }
}

/// Follows the bucket until `shutdown`. Expired entries arrive as purges.
pub async fn watch(kv: Store, liveness: Arc<Liveness>, shutdown: CancellationToken) {
    let mut watch = match kv.watch_with_history(">").await {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch runners; clusters fall back in list order only");
            return;
        }
    };
    loop {
        let entry = tokio::select! {
            () = shutdown.cancelled() => return,
            entry = watch.next() => entry,
        };
        match entry {
            Some(Ok(e)) => liveness.apply(&e.key, e.operation == Operation::Put),
            Some(Err(e)) => tracing::warn!(error = %e, "runner watch error; continuing"),
            None => return,
        }
    }
}
