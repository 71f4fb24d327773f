//! One watch over all the cluster's Pods, fanned out to the runs that wait on them:
//! 5,000 runs in flight cost one watch connection, not 5,000 polls.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// What a run knows of its Pod.
#[derive(Debug, Clone, Default)]
pub enum PodView {
    /// Not seen yet.
    #[default]
    Unknown,
    Present(Arc<PodState>),
    /// Deleted (by the runner on cancel, or by someone else).
    Gone,
}

#[derive(Debug, Default)]
pub struct PodWatch {
    subscribers: Mutex<HashMap<String, watch::Sender<PodView>>>,
}

/// A run's view of its Pod; unsubscribes when dropped.
#[derive(Debug)]
pub struct Subscription {
    name: String,
    watch: Arc<PodWatch>,
    pub rx: watch::Receiver<PodView>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Ok(mut subs) = self.watch.subscribers.lock() {
            if subs
                .get(&self.name)
                .is_some_and(|tx| tx.receiver_count() <= 1)
            {
                subs.remove(&self.name);
            }
        }
    }
}

/// What runs need of a Pod: its creation time and status. The rest (the spec with
/// every container's script and env, labels, managed fields) is most of a Pod's size
/// and is dropped, so thousands of runs in flight hold thousands of small statuses,
/// not thousands of Pods.
#[derive(Debug, Clone, Default)]
pub struct PodState {
    /// Seconds since the epoch.
    pub created: Option<i64>,
    pub status: Option<PodStatus>,
}

impl From<Pod> for PodState {
    fn from(pod: Pod) -> Self {
        let status = pod.status.map(|mut status| {
            // Nothing here reads images, addresses or QoS.
            for c in status
                .init_container_statuses
                .iter_mut()
                .chain(status.container_statuses.iter_mut())
                .flatten()
            {
                c.image = String::new();
                c.image_id = String::new();
                c.container_id = None;
                c.last_state = None;
                c.allocated_resources = None;
                c.resources = None;
                c.volume_mounts = None;
                c.user = None;
                c.allocated_resources_status = None;
            }
            status.ephemeral_container_statuses = None;
            status.host_ip = None;
            status.host_ips = None;
            status.pod_ip = None;
            status.pod_ips = None;
            status.qos_class = None;
            status.start_time = None;
            status.nominated_node_name = None;
            status.resource_claim_statuses = None;
            status.resize = None;
            status
        });
        PodState {
            created: pod
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second()),
            status,
        }
    }
}

fn slim(pod: Pod) -> Arc<PodState> {
    Arc::new(PodState::from(pod))
}

impl PodWatch {
    /// Subscribes to the Pod `name`, before it is created so no update is missed.
    pub fn subscribe(self: &Arc<Self>, name: &str) -> Subscription {
        let rx = match self.subscribers.lock() {
            Ok(mut subs) => subs
                .entry(name.to_owned())
                .or_insert_with(|| watch::channel(PodView::Unknown).0)
                .subscribe(),
            Err(_) => watch::channel(PodView::Unknown).1,
        };
        Subscription {
            name: name.to_owned(),
            watch: self.clone(),
            rx,
        }
    }

    /// Seeds a subscriber with what a create or get returned, unless the watch was
    /// faster.
    pub fn seed(&self, pod: Pod) {
        let Some(name) = pod.metadata.name.clone() else {
            return;
        };
        if let Some(tx) = self.sender(&name) {
            tx.send_if_modified(|view| {
                if matches!(view, PodView::Unknown) {
                    *view = PodView::Present(slim(pod));
                    true
                } else {
                    false
                }
            });
        }
    }

    fn sender(&self, name: &str) -> Option<watch::Sender<PodView>> {
        self.subscribers.lock().ok()?.get(name).cloned()
    }

    fn publish(&self, name: &str, view: PodView) {
        if let Some(tx) = self.sender(name) {
            tx.send_replace(view);
        }
    }

    /// Follows the Pods labelled `selector` until `shutdown`. Watch drops and `410
    /// Gone` are handled by kube-runtime's watcher (re-list, then watch again), with
    /// backoff.
    pub async fn run(
        self: Arc<Self>,
        api: Api<Pod>,
        selector: String,
        shutdown: CancellationToken,
    ) {
        let config = watcher::Config::default().labels(&selector);
        let mut events = watcher::watcher(api, config).default_backoff().boxed();
        // Pods seen during a re-list: subscribers whose Pod is missing from it were
        // deleted while the watch was down.
        let mut relisted: Option<(HashSet<String>, time::OffsetDateTime)> = None;
        loop {
            let event = tokio::select! {
                () = shutdown.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                None => return,
                Some(Err(e)) => tracing::warn!(error = %e, "watching Pods failed; retrying"),
                Some(Ok(Event::Apply(pod) | Event::InitApply(pod))) => {
                    if let (Some(name), Some((seen, _))) = (&pod.metadata.name, &mut relisted) {
                        seen.insert(name.clone());
                    }
                    if let Some(name) = pod.metadata.name.clone() {
                        self.publish(&name, PodView::Present(slim(pod)));
                    }
                }
                Some(Ok(Event::Delete(pod))) => {
                    if let Some(name) = &pod.metadata.name {
                        self.publish(name, PodView::Gone);
                    }
                }
                Some(Ok(Event::Init)) => {
                    relisted = Some((HashSet::new(), time::OffsetDateTime::now_utc()));
                }
                Some(Ok(Event::InitDone)) => {
                    if let Some((seen, started)) = relisted.take() {
                        self.missing_from_relist(&seen, started);
                    }
                }
            }
        }
    }

    fn missing_from_relist(&self, seen: &HashSet<String>, list_started: time::OffsetDateTime) {
        let Ok(subs) = self.subscribers.lock() else {
            return;
        };
        for (name, tx) in subs.iter() {
            if seen.contains(name) {
                continue;
            }
            tx.send_if_modified(|view| {
                // Only Pods that existed before the list began: one created since may
                // simply have missed it.
                let PodView::Present(pod) = view else {
                    return false;
                };
                let created = pod.created;
                let before = created.is_some_and(|c| c < list_started.unix_timestamp() - 5);
                if before {
                    *view = PodView::Gone;
                }
                before
            });
        }
    }
}
