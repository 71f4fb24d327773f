//! Keeping the dispatcher's consumer loops alive, and saying whether they are.
//!
//! A pull can end (its consumer deleted, JetStream gone, the server silent) or fail to
//! start; a loop that then returned would leave the process running and dispatching
//! nothing. So each loop is a *session* — open the durable consumer, pull, handle — that
//! [`keep_consuming`] starts again whenever it ends, after a capped exponential backoff,
//! until shutdown. [`Consuming`] records whether a session is pulling now, and
//! [`Consumers`] holds that for every loop of a dispatcher, for its readiness.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull::{MessagesError, MessagesErrorKind};
use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::Message;
use futures::{future, Stream, StreamExt};
use sluice_core::subjects;
use tokio_util::sync::CancellationToken;

use crate::{Error, Result};

/// The wait before the first new session after one ended.
pub const FIRST_RETRY: Duration = Duration::from_millis(100);
/// The longest wait between sessions: also how late dispatching may resume after NATS
/// came back, so seconds (a try is one request per consumer loop).
pub const MAX_RETRY: Duration = Duration::from_secs(5);
/// How often the server signals an idle pull; two missed end the session, so a server
/// that went away is noticed even when no message is due.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long one pull request lasts (the server wants more than twice the heartbeat).
pub const PULL_EXPIRES: Duration = Duration::from_secs(30);

// === impl Consuming ===

/// Whether one consumer loop is pulling now, and since when.
#[derive(Debug, Clone, Default)]
pub struct Consuming(Arc<Mutex<Option<Instant>>>);

impl Consuming {
    /// True while a session holds its pull open.
    pub fn is_consuming(&self) -> bool {
        self.since().is_some()
    }

    /// When the current session started pulling.
    pub fn since(&self) -> Option<Instant> {
        *self.lock()
    }

    /// Called by a session once its pull is open.
    pub(crate) fn start(&self) {
        *self.lock() = Some(Instant::now());
    }

    /// Marks the loop stopped; how long it had been pulling.
    fn stop(&self) -> Option<Duration> {
        self.lock().take().map(|since| since.elapsed())
    }

    fn lock(&self) -> MutexGuard<'_, Option<Instant>> {
        // An instant cannot be left half-written: a poisoned lock still holds a value.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

// === impl Consumers ===

/// Every consumer loop of one dispatcher and whether it is consuming: what its
/// readiness reports.
#[derive(Debug, Clone, Default)]
pub struct Consumers {
    /// `sluice-dispatcher` on `SLUICE_EVENTS`.
    pub events: Consuming,
    /// `sluice-dispatcher-groups` on `SLUICE_STATUS`: frees concurrency slots and
    /// relays child results.
    pub statuses: Consuming,
    /// `sluice-dispatcher-children` on `SLUICE_CHILDREN`.
    pub children: Consuming,
    /// `sluice-reporter` on `SLUICE_STATUS`; `None` when statuses are not reported.
    pub reporter: Option<Consuming>,
}

impl Consumers {
    /// The loops a dispatcher runs: the reporter's only when it reports statuses.
    pub fn new(reporting: bool) -> Self {
        Consumers {
            reporter: reporting.then(Consuming::default),
            ..Consumers::default()
        }
    }

    /// Each loop's durable consumer name with whether it is consuming now.
    pub fn states(&self) -> Vec<(&'static str, bool)> {
        let mut states = vec![
            (subjects::DISPATCHER_CONSUMER, self.events.is_consuming()),
            (
                subjects::DISPATCHER_STATUS_CONSUMER,
                self.statuses.is_consuming(),
            ),
            (
                subjects::DISPATCHER_CHILDREN_CONSUMER,
                self.children.is_consuming(),
            ),
        ];
        if let Some(reporter) = &self.reporter {
            states.push((subjects::REPORTER_CONSUMER, reporter.is_consuming()));
        }
        states
    }

    /// The names of the loops not consuming now; empty when every one is.
    pub fn stopped(&self) -> Vec<&'static str> {
        self.states()
            .into_iter()
            .filter(|(_, consuming)| !consuming)
            .map(|(name, _)| name)
            .collect()
    }
}

// === Backoff ===

/// Waits between sessions: doubling from `first` up to `cap`, and back to `first` after
/// a session that pulled for at least `cap` (it was healthy; this is a new fault).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, cap: Duration) -> Self {
        Backoff {
            first,
            cap,
            next: first,
        }
    }

    /// The wait after a session that pulled for `consumed` (`None`: it never got to).
    pub(crate) fn after(&mut self, consumed: Option<Duration>) -> Duration {
        if consumed.is_some_and(|d| d >= self.cap) {
            self.next = self.first;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.cap);
        delay
    }
}

// === Sessions ===

/// Runs `session` until `shutdown`, and again each time it ends or fails, after a
/// backoff; `consuming` is cleared whenever no session is pulling. Returns on shutdown,
/// once the last session has finished what it had in hand.
pub(crate) async fn keep_consuming<F, Fut>(
    name: &'static str,
    consuming: &Consuming,
    shutdown: &CancellationToken,
    mut session: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let mut backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
    while !shutdown.is_cancelled() {
        let result = session().await;
        let consumed = consuming.stop();
        if shutdown.is_cancelled() {
            break;
        }
        let delay = backoff.after(consumed);
        match result {
            Ok(()) => {
                tracing::warn!(consumer = name, retry_in = ?delay, "pull ended; consuming again");
            }
            Err(e) => {
                tracing::warn!(consumer = name, kind = e.metric_label(), error = %e, retry_in = ?delay, "consumer failed; consuming again");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(delay) => {}
        }
    }
    tracing::info!(consumer = name, "consumer stopped");
}

/// Opens a pull on `consumer` with heartbeats, `batch` messages per request.
pub(crate) async fn open(
    consumer: &PullConsumer,
    batch: usize,
    name: &'static str,
) -> Result<async_nats::jetstream::consumer::pull::Stream> {
    consumer
        .stream()
        .max_messages_per_batch(batch)
        .expires(PULL_EXPIRES)
        .heartbeat(HEARTBEAT)
        .messages()
        .await
        .map_err(|e| Error::nats(format!("pull from {name}"), e))
}

/// The messages of one pull until `shutdown`, or until the pull cannot deliver again:
/// its stream ended, or [`ends_pull`] says so of an error. Other errors are logged and
/// pulling goes on.
pub(crate) fn pulled<S>(
    messages: S,
    consumer: &'static str,
    shutdown: CancellationToken,
) -> impl Stream<Item = Message>
where
    S: Stream<Item = Result<Message, MessagesError>>,
{
    messages
        .take_until(shutdown.cancelled_owned())
        .take_while(move |m| {
            let go_on = match m {
                Err(e) if ends_pull(e.kind()) => {
                    tracing::warn!(consumer, error = %e, "pull cannot go on");
                    false
                }
                _ => true,
            };
            future::ready(go_on)
        })
        .filter_map(move |m| {
            future::ready(match m {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::warn!(consumer, error = %e, "pulling failed; going on");
                    None
                }
            })
        })
}

/// Whether a pull error means the pull will deliver nothing more: its consumer is gone
/// or no longer a pull consumer, nobody answers for it, the server stopped sending
/// heartbeats, or it asks more than the consumer allows. The session starts over.
pub(crate) fn ends_pull(kind: MessagesErrorKind) -> bool {
    match kind {
        MessagesErrorKind::MissingHeartbeat
        | MessagesErrorKind::ConsumerDeleted
        | MessagesErrorKind::PushBasedConsumer
        | MessagesErrorKind::NoResponders
        | MessagesErrorKind::RequestLimitExceeded => true,
        MessagesErrorKind::Pull | MessagesErrorKind::Other => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_healthy_session() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let waits: Vec<u128> = (0..6).map(|_| b.after(None).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1000, 1000]);
        // A short session is no sign of health: keep backing off.
        assert_eq!(b.after(Some(Duration::from_millis(10))).as_millis(), 1000);
        // One that pulled for the cap or longer was: the next fault starts over.
        assert_eq!(b.after(Some(Duration::from_secs(1))).as_millis(), 100);
        assert_eq!(b.after(None).as_millis(), 200);
    }

    #[test]
    fn only_errors_after_which_nothing_arrives_end_a_pull() {
        for kind in [
            MessagesErrorKind::MissingHeartbeat,
            MessagesErrorKind::ConsumerDeleted,
            MessagesErrorKind::PushBasedConsumer,
            MessagesErrorKind::NoResponders,
            MessagesErrorKind::RequestLimitExceeded,
        ] {
            assert!(ends_pull(kind), "{kind}");
        }
        for kind in [MessagesErrorKind::Pull, MessagesErrorKind::Other] {
            assert!(!ends_pull(kind), "{kind}");
        }
    }

    #[test]
    fn consumers_name_the_loops_that_stopped() {
        let consumers = Consumers::new(true);
        assert_eq!(
            consumers.stopped(),
            [
                "sluice-dispatcher",
                "sluice-dispatcher-groups",
                "sluice-dispatcher-children",
                "sluice-reporter"
            ]
        );
        consumers.events.start();
        consumers.statuses.start();
        consumers.children.start();
        assert_eq!(consumers.stopped(), ["sluice-reporter"]);
        consumers.reporter.as_ref().expect("reporting").start();
        assert!(consumers.stopped().is_empty());
        assert!(consumers.events.stop().is_some());
        assert_eq!(consumers.stopped(), ["sluice-dispatcher"]);
        assert_eq!(Consumers::new(false).states().len(), 3, "no reporter");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_that_ends_is_started_again_until_shutdown() {
        let consuming = Consuming::default();
        let shutdown = CancellationToken::new();
        let mut sessions = 0;
        keep_consuming("test", &consuming, &shutdown, || {
            sessions += 1;
            let n = sessions;
            let (consuming, shutdown) = (consuming.clone(), shutdown.clone());
            async move {
                match n {
                    // Could not open the consumer.
                    1 => Err(Error::nats("consumer", "no responders")),
                    // Pulled, then the pull ended.
                    2 => {
                        consuming.start();
                        assert!(consuming.is_consuming());
                        Ok(())
                    }
                    _ => {
                        consuming.start();
                        shutdown.cancel();
                        Ok(())
                    }
                }
            }
        })
        .await;
        assert_eq!(sessions, 3);
        assert!(!consuming.is_consuming(), "cleared once no session pulls");
    }
}
