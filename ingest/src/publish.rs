//! Stores events in JetStream and waits for the acknowledgement.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::{self, message::PublishMessage, object_store::ObjectStore};
use sha2::{Digest, Sha256};
use sluice_core::streams;
use sluice_core::{subjects, Event, PayloadRef};
use tokio::sync::OnceCell;

pub use crate::error::PublishError;

/// Room left for the message's headers and protocol line inside NATS's payload limit.
const HEADER_ROOM: usize = 4 * 1024;
/// NATS's default `max_payload`, used while the server's own is not yet known.
const DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

/// What JetStream said about a stored event.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    /// The delivery id was already in the stream's duplicate window.
    pub duplicate: bool,
    /// The body went to the object store and the event carries a reference.
    pub by_reference: bool,
}

/// Every forge gives up on a delivery after 10 s (GitHub, GitLab): an answer decided
/// later reaches no one. Ingest answers within this of the request's arrival.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(9);

/// Publishes envelopes to `SLUICE_EVENTS` with `Nats-Msg-Id` = event id.
pub struct Publisher {
    client: async_nats::Client,
    js: jetstream::Context,
    payloads: OnceCell<ObjectStore>,
    timeout: Duration,
    /// The longest predicted wait a request is admitted to (`--shed-after`).
    shed_after: Duration,
    backlog: Arc<Backlog>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    pub fn new(client: async_nats::Client, timeout: Duration, shed_after: Duration) -> Self {
        // Waiting for an in-flight slot (rather than failing) is bounded by `timeout`.
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .backpressure_on_inflight(true)
            .build(client.clone());
        Publisher {
            client,
            js,
            payloads: OnceCell::new(),
            timeout,
            shed_after,
            backlog: Arc::default(),
        }
    }

    /// The JetStream context, for provisioning and readiness checks.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Publishes waiting for JetStream's acknowledgement now.
    pub fn in_flight(&self) -> usize {
        let s = self.backlog.0.lock().unwrap_or_else(|p| p.into_inner());
        s.pending.len() + s.stale
    }

    /// A handle that reads what the backlog knows of JetStream, for the metrics.
    pub fn backlog_view(&self) -> BacklogView {
        BacklogView(self.backlog.clone())
    }

    /// Connections made so far: publishes are judged by the connection they went out on.
    fn connection(&self) -> u64 {
        self.client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stores `event` with `raw` (the validated original payload) and returns once
    /// JetStream has acknowledged it, or fails by the earlier of the publish timeout
    /// and [`ANSWER_WITHIN`] from `received` (when the request arrived). Refuses at
    /// once, without publishing, when the events ahead of it would not be stored in
    /// that time (see [`behind`]): then the 503 is the truth, the event is not stored.
    pub async fn publish(
        &self,
        mut event: Event,
        raw: &[u8],
        received: Instant,
    ) -> Result<(Stored, Duration), PublishError> {
        // Fail fast while disconnected: the client would otherwise buffer the message
        // and make the forge wait the whole timeout for a 503.
        if self.client.connection_state() != State::Connected {
            return Err(PublishError::Disconnected);
        }
        let spent = received.elapsed();
        let budget = self.timeout.min(ANSWER_WITHIN.saturating_sub(spent));
        if budget.is_zero() {
            // Sent now it would time out at once, perhaps stored: refuse it unsent.
            return Err(PublishError::Late(spent));
        }
        let waiting = self.backlog.admit(
            shed_by(self.shed_after, spent, budget),
            spent,
            self.connection(),
        )?;
        let started = Instant::now();
        let deadline = tokio::time::timeout(budget, self.store(&mut event, raw)).await;
        let stored = deadline.map_err(|_| {
            waiting.timed_out(budget);
            PublishError::Timeout(budget)
        })??;
        let took = started.elapsed();
        waiting.acknowledged(took);
        Ok((stored, took))
    }

    async fn store(&self, event: &mut Event, raw: &[u8]) -> Result<Stored, PublishError> {
        let mut body = event
            .to_json_with_payload(raw)
            .map_err(PublishError::Encode)?;
        let by_reference = body.len() + HEADER_ROOM > self.max_payload();
        if by_reference {
            event.payload_ref = Some(self.put_payload(&event.id, raw).await?);
            body = serde_json::to_vec(&event).map_err(PublishError::Encode)?;
        }
        let ack = self
            .js
            .send_publish(
                event.subject(),
                PublishMessage::build()
                    .payload(body.into())
                    .message_id(&event.id),
            )
            .await
            .map_err(PublishError::from_publish)?
            .await
            .map_err(PublishError::from_publish)?;
        Ok(Stored {
            duplicate: ack.duplicate,
            by_reference,
        })
    }

    fn max_payload(&self) -> usize {
        match self.client.server_info().max_payload {
            0 => DEFAULT_MAX_PAYLOAD,
            n => n,
        }
    }

    /// Stores an oversized body under the event id. A redelivery overwrites it with
    /// the same bytes, so the reference stays valid either way.
    async fn put_payload(&self, event_id: &str, raw: &[u8]) -> Result<PayloadRef, PublishError> {
        let store = self
            .payloads
            .get_or_try_init(|| streams::payloads(&self.js))
            .await
            .map_err(PublishError::PayloadStore)?;
        let mut reader = raw;
        store
            .put(event_id, &mut reader)
            .await
            .map_err(PublishError::Payload)?;
        Ok(PayloadRef {
            bucket: subjects::PAYLOADS_BUCKET.into(),
            key: event_id.to_owned(),
            size: raw.len() as u64,
            sha256: hex::encode(Sha256::digest(raw)),
        })
    }
}

/// What ingest knows of how far behind JetStream is: the publishes waiting for their
/// acknowledgement, and how fast and how late acknowledgements come back.
#[derive(Debug, Default)]
struct Backlog(Mutex<BacklogState>);

#[derive(Debug)]
struct BacklogState {
    /// The connection (the client's count of connections made) the figures below are
    /// of.
    connection: u64,
    /// The publishes the figures count, by admission number, with when each was
    /// admitted.
    pending: BTreeMap<u64, Instant>,
    next: u64,
    /// Publishes still waiting that say nothing of JetStream now (see [`STRANDED`]).
    stale: usize,
    /// When the queue last went from empty to busy: the rate counts busy time only.
    busy_since: Instant,
    /// When each acknowledgement of the last [`RATE_WINDOW`] came, oldest first.
    acks: VecDeque<Instant>,
    /// The last rate read over enough busy time, for a new burst's first moments.
    rate: f64,
    /// How long recent acknowledgements took (exponentially weighted).
    latency: Duration,
    /// When a request was last admitted as a probe while shedding (see [`probe_due`]).
    last_probe: Option<Instant>,
}

impl Default for BacklogState {
    fn default() -> Self {
        BacklogState {
            connection: 0,
            pending: BTreeMap::new(),
            next: 0,
            stale: 0,
            busy_since: Instant::now(),
            acks: VecDeque::new(),
            rate: 0.0,
            latency: Duration::ZERO,
            last_probe: None,
        }
    }
}

/// The rate is read over the acknowledgements of this last stretch of busy time. A
/// sliding window: JetStream acknowledges in bursts (one per batch it syncs), and a
/// window that restarts each second read them as 12 a second one moment and 250 the
/// next in the spike, admitting a queue twice the size the rate could drain in time.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// How much busy time is enough to read a rate from.
const RATE_AFTER: Duration = Duration::from_millis(250);

/// A publish still waiting when one admitted this much later is acknowledged was
/// stranded: the stream's leader that had it went away (JetStream answers one
/// connection's publishes to a stream in order), or, after a reconnect, the connection
/// did. Its acknowledgement will mostly never come, so neither it nor its timeout says
/// how far behind JetStream is now — judged by them, ingest shed every request for
/// seconds after a leader change or a reconnect ("1 events waiting, about 1.2 s"),
/// until they timed out. Such publishes are counted apart and the estimate starts
/// afresh. The margin leaves room for requests admitted together but sent in another
/// order, and for a body put in the object store before its event.
const STRANDED: Duration = Duration::from_secs(1);

impl BacklogState {
    /// Acknowledgements per second over the last [`RATE_WINDOW`] of busy time, once
    /// there is [`RATE_AFTER`] of it (a spike into an idle ingest is otherwise
    /// predicted from no rate for its whole first second, admitting everything sent in
    /// it); else the last rate so read.
    fn rate_now(&self) -> f64 {
        let now = Instant::now();
        let from = now
            .checked_sub(RATE_WINDOW)
            .map_or(self.busy_since, |w| w.max(self.busy_since));
        let span = now.saturating_duration_since(from);
        let counted = self.acks.len() - self.acks.partition_point(|at| *at <= from);
        if span >= RATE_AFTER && counted > 0 {
            counted as f64 / span.as_secs_f64()
        } else {
            self.rate
        }
    }

    /// Counts an acknowledgement that came now, and forgets those out of the window.
    fn count_ack(&mut self) {
        let now = Instant::now();
        self.acks.push_back(now);
        if let Some(from) = now.checked_sub(RATE_WINDOW) {
            while self.acks.front().is_some_and(|at| *at <= from) {
                self.acks.pop_front();
            }
        }
        if now.saturating_duration_since(self.busy_since) >= RATE_AFTER {
            self.rate = self.rate_now();
        }
    }

    /// How late acknowledgements are now: the recent ones' weighted latency, or the
    /// wait of the oldest publish still waiting when that is longer. Completed
    /// acknowledgements alone lag: in the spike the first ones of a burst came back in
    /// 170 ms while 470 more queued behind them, so the queue read as fast and was
    /// admitted whole, to be answered 3 s later.
    fn latency_now(&self) -> Duration {
        let oldest = self
            .pending
            .first_key_value()
            .map_or(Duration::ZERO, |(_, at)| at.elapsed());
        self.latency.max(oldest)
    }

    /// How long since the last acknowledgement, or since this stretch of busy time
    /// began when none has come in it (the window keeps the last one until the next).
    fn quiet(&self, now: Instant) -> Duration {
        let last = self
            .acks
            .back()
            .map_or(self.busy_since, |at| (*at).max(self.busy_since));
        now.saturating_duration_since(last)
    }

    fn observe(&mut self, took: Duration) {
        self.latency = if self.latency.is_zero() {
            took
        } else {
            self.latency.mul_f64(0.9) + took.mul_f64(0.1)
        };
    }

    /// Sets the publishes admitted before `before` apart, and forgets what was
    /// measured: JetStream now is not what they waited on. Returns how many.
    fn start_afresh(&mut self, before: u64) -> usize {
        let kept = self.pending.split_off(&before);
        let stranded = std::mem::replace(&mut self.pending, kept).len();
        self.stale += stranded;
        self.busy_since = Instant::now();
        self.acks.clear();
        self.rate = 0.0;
        self.latency = Duration::ZERO;
        stranded
    }
}

/// One publish counted in flight until it is dropped.
struct Waiting<'a> {
    backlog: &'a Backlog,
    number: u64,
}

impl Waiting<'_> {
    /// Not acknowledged within `waited`: its latency is at least that, so a JetStream
    /// whose every acknowledgement is late still reads as behind. A stranded publish
    /// says nothing of JetStream now.
    fn timed_out(&self, waited: Duration) {
        let mut s = self.backlog.0.lock().unwrap_or_else(|p| p.into_inner());
        if s.pending.contains_key(&self.number) {
            s.observe(waited);
        }
    }

    fn acknowledged(&self, took: Duration) {
        let mut s = self.backlog.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&admitted) = s.pending.get(&self.number) else {
            return;
        };
        let oldest = s.pending.first_key_value().map(|(_, at)| *at);
        let stranded = if oldest.is_some_and(|oldest| oldest + STRANDED < admitted) {
            s.start_afresh(self.number)
        } else {
            0
        };
        s.observe(took);
        s.count_ack();
        drop(s);
        // Logged outside the lock every request takes.
        if stranded > 0 {
            tracing::warn!(
                stranded,
                "publishes acknowledged out of order by more than a second are set apart as stranded (a stream leader went away)"
            );
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut s = self.backlog.0.lock().unwrap_or_else(|p| p.into_inner());
        if s.pending.remove(&self.number).is_none() {
            s.stale = s.stale.saturating_sub(1);
        }
    }
}

impl Backlog {
    /// Counts a publish in flight on `connection`, or refuses it when JetStream is too
    /// far behind to store it within `budget` of its arrival, `spent` ago (see
    /// [`shed_by`]). A new connection starts afresh: what waits on the old one is
    /// stranded.
    fn admit(
        &self,
        budget: Duration,
        spent: Duration,
        connection: u64,
    ) -> Result<Waiting<'_>, PublishError> {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if connection > s.connection {
            s.connection = connection;
            let next = s.next;
            s.start_afresh(next);
        }
        let in_flight = s.pending.len();
        if let Some(wait) = behind(in_flight, s.rate_now(), s.latency_now(), budget, spent) {
            let now = Instant::now();
            let since_probe = s.last_probe.map(|at| now.saturating_duration_since(at));
            if !probe_due(s.quiet(now), since_probe) {
                return Err(PublishError::Behind {
                    waiting: in_flight,
                    wait,
                });
            }
            s.last_probe = Some(now);
        }
        if in_flight == 0 {
            // The rate is measured over busy time only: an idle hour is not a slow
            // hour. The last rate read stands until this stretch has enough.
            s.busy_since = Instant::now();
        }
        let number = s.next;
        s.next += 1;
        s.pending.insert(number, Instant::now());
        Ok(Waiting {
            backlog: self,
            number,
        })
    }
}

/// While shedding, one request is admitted once no acknowledgement has come for this
/// long, and once a second after that. Shedding counts what waits; when what waits was
/// stranded on a stream leader that stopped, its acknowledgements never come, and only
/// an acknowledgement of a later publish shows it stranded (see [`STRANDED`]). Shedding
/// everything, ingest admitted no later publish: after a leader paused in the fault
/// suite, it refused every request for the 8 s until the stranded ones timed out,
/// while the new leader could store them. A request admitted into a real stall waits
/// out its budget like those ahead of it: one a second, not the flood shedding spares.
const PROBE_AFTER: Duration = STRANDED;

/// Whether a request that would be shed is admitted as a probe instead: no
/// acknowledgement for `quiet` (JetStream is stalled or what waits is stranded, not
/// merely slow: a slow JetStream still acknowledges) and no probe for `since_probe`.
fn probe_due(quiet: Duration, since_probe: Option<Duration>) -> bool {
    quiet >= PROBE_AFTER && since_probe.is_none_or(|d| d >= PROBE_AFTER)
}

/// How long after its arrival a request may be answered before it is shed rather than
/// published: `--shed-after`, or the publish budget (`budget`, left after `spent`) when
/// that ends sooner. Measured from the arrival, not from here: a request that waited
/// for a connection slot or was read slowly has spent part of the forge's wait already,
/// and in the spike those answered past 1 s although their queue was predicted at 0.8.
fn shed_by(shed_after: Duration, spent: Duration, budget: Duration) -> Duration {
    shed_after.min(spent + budget)
}

/// What the backlog reads of JetStream at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BacklogReading {
    /// Publishes waiting for their acknowledgement that the estimate counts.
    pub waiting: usize,
    /// Publishes still waiting that were set apart as stranded.
    pub stranded: usize,
    /// Acknowledgements per second.
    pub ack_rate: f64,
    /// How late acknowledgements are (see `BacklogState::latency_now`).
    pub ack_latency: Duration,
}

/// Reads the publisher's backlog (for the metrics) without holding the publisher. The
/// default views a backlog with nothing in it, for exporting the metrics without one.
#[derive(Debug, Clone, Default)]
pub struct BacklogView(Arc<Backlog>);

impl BacklogView {
    pub fn read(&self) -> BacklogReading {
        let s = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        BacklogReading {
            waiting: s.pending.len(),
            stranded: s.stale,
            ack_rate: s.rate_now(),
            ack_latency: s.latency_now(),
        }
    }
}

/// Whether JetStream is too far behind to store one more event within `budget` of the
/// request's arrival, `spent` ago, and if so how long after its arrival it would be
/// answered: only when recent
/// acknowledgements already take a quarter of the budget (JetStream is queueing, not
/// just busy) and the time spent plus what the `in_flight` events ahead need, at the
/// rate acknowledgements come back, is more than 80 % of it. A burst into an idle
/// server is always admitted, however late its requests arrive: its acknowledgements
/// are fast, and the time left (not a guess) decides for the ones that are not.
pub fn behind(
    in_flight: usize,
    acks_per_second: f64,
    recent_latency: Duration,
    budget: Duration,
    spent: Duration,
) -> Option<Duration> {
    if recent_latency < budget / 4 || acks_per_second <= 0.0 {
        return None;
    }
    let answered = spent + Duration::from_secs_f64(in_flight as f64 / acks_per_second);
    (answered > budget.mul_f64(0.8)).then_some(answered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SHED_AFTER;

    const BUDGET: Duration = Duration::from_secs(8);

    /// `n` publishes admitted on connection 1 just after their requests arrived.
    fn admitted(backlog: &Backlog, budget: Duration, n: usize) -> Vec<Waiting<'_>> {
        (0..n)
            .map(|i| {
                backlog
                    .admit(budget, Duration::ZERO, 1)
                    .unwrap_or_else(|e| panic!("publish {i} refused: {e}"))
            })
            .collect()
    }

    /// Busy for `over`, with `n` acknowledgements spread evenly over it.
    fn acknowledged_over(s: &mut BacklogState, n: u32, over: Duration) {
        let now = Instant::now();
        s.busy_since = now - over;
        s.acks = (1..=n).map(|i| now - over + over * i / n).collect();
    }

    #[test]
    fn a_shedding_ingest_admits_one_request_a_second_to_find_a_new_leader() {
        // As in the fault suite's leader pause: 22 publishes went to the leader before
        // it stopped and wait 5 s later; the one acknowledgement since (a publish the
        // leader had replicated) came 1.2 s ago, having taken 4.5 s. At the last rate
        // read, 25/s, 22 ahead is 0.88 s: every request is shed, and without a later
        // publish acknowledged nothing shows the 22 stranded.
        let backlog = Backlog::default();
        let stranded: Vec<_> = admitted(&backlog, SHED_AFTER, 22);
        {
            let mut s = backlog.0.lock().unwrap();
            let now = Instant::now();
            s.pending
                .values_mut()
                .for_each(|at| *at = now - Duration::from_secs(5));
            s.busy_since = now - Duration::from_secs(5);
            s.rate = 25.0;
            s.latency = Duration::from_millis(4_500);
            s.acks = VecDeque::from([now - Duration::from_millis(1_200)]);
            assert!(behind(
                22,
                s.rate_now(),
                s.latency_now(),
                SHED_AFTER,
                Duration::ZERO
            )
            .is_some());
        }
        let probe = backlog
            .admit(SHED_AFTER, Duration::ZERO, 1)
            .expect("a probe after a second without an acknowledgement");
        // One a second: the next is shed.
        assert!(matches!(
            backlog.admit(SHED_AFTER, Duration::ZERO, 1),
            Err(PublishError::Behind { waiting: 23, .. })
        ));
        // The new leader stores it at once: the 22 are set apart, requests admitted.
        probe.acknowledged(Duration::from_millis(4));
        drop(probe);
        {
            let s = backlog.0.lock().unwrap();
            assert_eq!((s.pending.len(), s.stale), (0, 22));
            assert!(s.quiet(Instant::now()) < PROBE_AFTER);
        }
        assert!(backlog.admit(SHED_AFTER, Duration::ZERO, 1).is_ok());
        drop(stranded);
    }

    #[test]
    fn a_probe_only_when_acknowledgements_have_stopped() {
        // A slow JetStream still acknowledging is shed, not probed.
        assert!(!probe_due(Duration::from_millis(300), None));
        assert!(probe_due(Duration::from_secs(1), None));
        // Once a second.
        assert!(!probe_due(
            Duration::from_secs(3),
            Some(Duration::from_millis(400))
        ));
        assert!(probe_due(
            Duration::from_secs(3),
            Some(Duration::from_secs(1))
        ));
    }

    #[test]
    fn the_backlog_gauges_are_read_when_scraped_not_when_a_request_comes() {
        let backlog = Arc::new(Backlog::default());
        let mut registry = prometheus_client::registry::Registry::default();
        crate::metrics::Metrics::default().register(&mut registry, &BacklogView(backlog.clone()));
        let scrape = || {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoded");
            text
        };
        let waiting = backlog.admit(BUDGET, Duration::ZERO, 1).expect("admitted");
        // Nothing happens for 2 s (a stalled JetStream): the oldest wait still shows.
        backlog
            .0
            .lock()
            .unwrap()
            .pending
            .values_mut()
            .for_each(|at| *at -= Duration::from_secs(2));
        let text = scrape();
        assert!(text.contains("backlog_waiting 1.0\n"), "{text}");
        let latency: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("backlog_ack_latency_seconds "))
            .expect("the latency gauge")
            .parse()
            .expect("a number");
        assert!(latency >= 2.0, "{text}");
        drop(waiting);
        assert!(scrape().contains("backlog_waiting 0.0\n"));
    }

    #[test]
    fn a_queue_behind_fast_first_acknowledgements_is_judged_by_its_oldest() {
        let backlog = Backlog::default();
        let waiting: Vec<_> = admitted(&backlog, SHED_AFTER, 469);
        {
            // A second into a spike: the first 31 acknowledgements took 171 ms, and
            // what is still waiting was admitted over the last 800 ms.
            let mut s = backlog.0.lock().unwrap();
            acknowledged_over(&mut s, 31, Duration::from_secs(1));
            s.latency = Duration::from_millis(171);
            let now = Instant::now();
            for (i, at) in s.pending.values_mut().enumerate() {
                *at = now - Duration::from_millis(800) + Duration::from_millis(1) * i as u32;
            }
            assert!(s.latency_now() >= Duration::from_millis(800));
        }
        // 469 ahead at 31/s: refused, although completed acknowledgements were quick.
        let Err(PublishError::Behind { waiting: 469, wait }) =
            backlog.admit(SHED_AFTER, Duration::ZERO, 1)
        else {
            panic!("admitted behind a 15 s queue");
        };
        assert!(wait > Duration::from_secs(10), "{wait:?}");
        drop(waiting);
    }

    #[test]
    fn bursts_of_acknowledgements_are_read_over_the_last_second() {
        let backlog = Backlog::default();
        let waiting: Vec<_> = admitted(&backlog, SHED_AFTER, 90);
        {
            // Busy for 5 s; 25 acknowledged every 250 ms (100/s), the last burst just
            // now, and an older burst outside the window.
            let mut s = backlog.0.lock().unwrap();
            let now = Instant::now();
            s.busy_since = now - Duration::from_secs(5);
            s.acks = [1_500, 800, 550, 300, 50]
                .iter()
                .flat_map(|ms| std::iter::repeat_n(now - Duration::from_millis(*ms), 25))
                .collect();
            s.latency = Duration::from_millis(400);
            let rate = s.rate_now();
            assert!((99.0..=101.0).contains(&rate), "{rate}/s");
        }
        // 90 ahead at 100/s is 0.9 s, over 80 % of the 1 s wait: shed. Read from the
        // last 300 ms alone (two bursts, "167/s"), it would have been admitted.
        assert!(matches!(
            backlog.admit(SHED_AFTER, Duration::ZERO, 1),
            Err(PublishError::Behind { waiting: 90, .. })
        ));
        drop(waiting);
    }

    #[test]
    fn a_rate_is_read_only_from_busy_time() {
        let backlog = Backlog::default();
        {
            let mut s = backlog.0.lock().unwrap();
            // Connected before: a first publish on a new connection starts afresh.
            s.connection = 1;
            // Busy for 100 ms only, with 10 acknowledgements: too little to read.
            acknowledged_over(&mut s, 10, Duration::from_millis(100));
            s.rate = 42.0;
            assert_eq!(s.rate_now(), 42.0);
            // Busy for 500 ms with 100: 200/s.
            acknowledged_over(&mut s, 100, Duration::from_millis(500));
            let rate = s.rate_now();
            assert!((190.0..=201.0).contains(&rate), "{rate}/s");
        }
        // An acknowledgement keeps the reading for the next burst's first moments.
        let w = backlog.admit(BUDGET, Duration::ZERO, 1).expect("admitted");
        backlog.0.lock().unwrap().busy_since = Instant::now() - Duration::from_millis(500);
        w.acknowledged(Duration::from_millis(2));
        drop(w);
        let s = backlog.0.lock().unwrap();
        assert!(
            s.rate > 0.0 && s.acks.len() == 101,
            "{} {}",
            s.rate,
            s.acks.len()
        );
    }

    #[test]
    fn a_slow_queue_acknowledged_slightly_out_of_order_strands_nothing() {
        let backlog = Backlog::default();
        // 300 admitted over the last 3 s, each waiting since.
        let mut waiting: Vec<_> = (0..300)
            .map(|_| Some(backlog.admit(BUDGET, Duration::ZERO, 1).expect("admitted")))
            .collect();
        {
            let mut s = backlog.0.lock().unwrap();
            let now = Instant::now();
            for (i, at) in s.pending.values_mut().enumerate() {
                *at = now - Duration::from_secs(3) + Duration::from_millis(10) * i as u32;
            }
        }
        // Acknowledged in order but for pairs swapped, and one 900 ms early.
        let mut order: Vec<usize> = (0..300).collect();
        for pair in order.chunks_mut(2) {
            pair.swap(0, 1);
        }
        order.retain(|i| *i != 190);
        order.insert(100, 190);
        for i in order {
            // Acknowledged, then answered (dropped), as `publish` does.
            let w = waiting[i].take().expect("once");
            w.acknowledged(Duration::from_millis(1_500));
            drop(w);
            // Set apart, they would leave the queue as stranded.
            assert_eq!(backlog.0.lock().unwrap().stale, 0, "after {i}");
        }
        let s = backlog.0.lock().unwrap();
        assert_eq!(s.pending.len(), 0);
        // Nothing started afresh: every acknowledgement still counts towards the rate.
        assert_eq!(s.acks.len(), 300);
    }

    #[test]
    fn a_burst_into_a_fast_server_is_admitted() {
        // 5,000 in flight at an unknown rate with fast acknowledgements.
        assert_eq!(
            behind(5_000, 0.0, Duration::ZERO, BUDGET, Duration::ZERO),
            None
        );
        assert_eq!(
            behind(
                5_000,
                500.0,
                Duration::from_millis(50),
                BUDGET,
                Duration::ZERO
            ),
            None
        );
    }

    #[test]
    fn a_queue_that_cannot_drain_in_time_is_refused() {
        // Acknowledgements take 3 s and come back at 500/s: 4,000 ahead need 8 s.
        let wait = behind(4_000, 500.0, Duration::from_secs(3), BUDGET, Duration::ZERO);
        assert_eq!(wait, Some(Duration::from_secs(8)));
        // 3,000 ahead need 6 s, inside 80 % of the budget.
        assert_eq!(
            behind(3_000, 500.0, Duration::from_secs(3), BUDGET, Duration::ZERO),
            None
        );
    }

    #[test]
    fn a_stalled_server_is_left_to_the_timeout() {
        // No acknowledgement in the last window: no rate to predict from.
        assert_eq!(
            behind(10, 0.0, Duration::from_secs(5), BUDGET, Duration::ZERO),
            None
        );
    }

    #[test]
    fn a_slow_acknowledgement_after_an_idle_hour_does_not_shed() {
        let backlog = Backlog::default();
        // Connected an hour ago, one publish, then nothing.
        drop(backlog.admit(BUDGET, Duration::ZERO, 1).expect("admitted"));
        backlog.0.lock().unwrap().busy_since = Instant::now() - Duration::from_secs(3600);
        let first = backlog.admit(BUDGET, Duration::ZERO, 1).expect("admitted");
        let second = backlog.admit(BUDGET, Duration::ZERO, 1).expect("admitted");
        // One slow acknowledgement: over the idle hour it would read as 1/3600 a second.
        first.acknowledged(Duration::from_secs(3));
        drop(first);
        assert!(
            backlog.admit(BUDGET, Duration::ZERO, 1).is_ok(),
            "shed after an idle hour"
        );
        drop(second);
    }

    #[test]
    fn late_acknowledgements_count_as_slow() {
        let backlog = Backlog::default();
        backlog
            .admit(BUDGET, Duration::ZERO, 1)
            .expect("admitted")
            .timed_out(BUDGET);
        assert_eq!(backlog.0.lock().unwrap().latency, BUDGET);
    }

    #[test]
    fn a_new_connection_is_not_judged_by_what_waits_on_the_old_one() {
        let backlog = Backlog::default();
        // The old connection's link died: 600 publishes wait, acknowledgements came
        // back at 300/s and took 400 ms before it did.
        let stuck: Vec<_> = admitted(&backlog, SHED_AFTER, 600);
        {
            let mut s = backlog.0.lock().unwrap();
            acknowledged_over(&mut s, 90, Duration::from_millis(300));
            s.latency = Duration::from_millis(400);
        }
        assert!(
            backlog.admit(SHED_AFTER, Duration::ZERO, 1).is_err(),
            "behind on connection 1"
        );
        // Reconnected: admitted, and the old publishes' timeouts change nothing.
        let fresh = backlog
            .admit(SHED_AFTER, Duration::ZERO, 2)
            .expect("a new connection starts afresh");
        stuck[0].timed_out(BUDGET);
        assert_eq!(backlog.0.lock().unwrap().latency, Duration::ZERO);
        fresh.acknowledged(Duration::from_millis(5));
        assert_eq!(backlog.0.lock().unwrap().latency, Duration::from_millis(5));
        // Still counted as waiting until they end, but apart from the new connection's.
        {
            let s = backlog.0.lock().unwrap();
            assert_eq!((s.pending.len(), s.stale), (1, 600));
        }
        drop(stuck);
        drop(fresh);
        let s = backlog.0.lock().unwrap();
        assert_eq!((s.pending.len(), s.stale), (0, 0));
    }

    #[test]
    fn publishes_stranded_by_a_leader_change_do_not_shed_the_new_leaders_requests() {
        let backlog = Backlog::default();
        // Sent to a leader that then stopped: 2 s later still waiting, and one timed
        // out, so acknowledgements read as slow and rare.
        let stranded = backlog
            .admit(SHED_AFTER, Duration::ZERO, 1)
            .expect("admitted");
        let timed_out = backlog
            .admit(SHED_AFTER, Duration::ZERO, 1)
            .expect("admitted");
        {
            let mut s = backlog.0.lock().unwrap();
            for at in s.pending.values_mut() {
                *at -= Duration::from_secs(2);
            }
            s.busy_since = Instant::now() - Duration::from_secs(2);
        }
        timed_out.timed_out(BUDGET);
        drop(timed_out);
        // The new leader acknowledges a request admitted now, at once.
        let fresh = backlog
            .admit(SHED_AFTER, Duration::ZERO, 1)
            .expect("admitted");
        fresh.acknowledged(Duration::from_millis(3));
        drop(fresh);
        {
            let s = backlog.0.lock().unwrap();
            assert_eq!(
                (s.pending.len(), s.stale),
                (0, 1),
                "the stranded one set apart"
            );
            assert_eq!(s.latency, Duration::from_millis(3));
        }
        // Its late timeout changes nothing, and the next request is admitted.
        stranded.timed_out(BUDGET);
        assert_eq!(backlog.0.lock().unwrap().latency, Duration::from_millis(3));
        assert!(backlog.admit(SHED_AFTER, Duration::ZERO, 1).is_ok());
        drop(stranded);
        assert_eq!(backlog.0.lock().unwrap().stale, 0);
    }

    #[test]
    fn acknowledgements_in_order_or_close_together_strand_nothing() {
        let backlog = Backlog::default();
        let waiting: Vec<_> = admitted(&backlog, BUDGET, 100);
        // The last admitted answered first (sent in another order, within the margin).
        waiting[99].acknowledged(Duration::from_millis(400));
        for w in &waiting[..99] {
            w.acknowledged(Duration::from_millis(400));
        }
        let s = backlog.0.lock().unwrap();
        assert_eq!((s.pending.len(), s.stale), (100, 0));
        assert_eq!(s.acks.len(), 100);
    }

    #[test]
    fn in_flight_counts_what_is_waiting() {
        let backlog = Backlog::default();
        let a = backlog.admit(BUDGET, Duration::ZERO, 1).expect("admitted");
        let b = backlog.admit(BUDGET, Duration::ZERO, 1).expect("admitted");
        assert_eq!(backlog.0.lock().unwrap().pending.len(), 2);
        drop(a);
        drop(b);
        assert_eq!(backlog.0.lock().unwrap().pending.len(), 0);
    }

    #[test]
    fn a_spike_is_read_from_its_first_quarter_second() {
        let backlog = Backlog::default();
        let admitted: Vec<_> = admitted(&backlog, SHED_AFTER, 600);
        {
            // 300 ms into the spike: 90 acknowledged (300/s), each taking 400 ms.
            let mut s = backlog.0.lock().unwrap();
            acknowledged_over(&mut s, 90, Duration::from_millis(300));
            s.latency = Duration::from_millis(400);
        }
        // 600 ahead at 300/s is 2 s, more than the 1 s a request may wait.
        let Err(PublishError::Behind { waiting, wait }) =
            backlog.admit(SHED_AFTER, Duration::ZERO, 1)
        else {
            panic!("admitted into a 2 s queue");
        };
        assert_eq!(waiting, 600);
        assert!(wait > Duration::from_millis(1_900), "{wait:?}");
        // The full publish budget would still have admitted it.
        assert!(backlog.admit(BUDGET, Duration::ZERO, 1).is_ok());
        drop(admitted);
    }

    #[test]
    fn the_time_a_request_spent_before_publishing_counts_towards_its_wait() {
        // At 300 acknowledgements a second 200 ahead is 0.67 s: admitted when the
        // request has just arrived, refused when it waited 300 ms for a connection slot
        // (it would be answered after about 1 s).
        let slow = Duration::from_millis(300);
        assert_eq!(behind(200, 300.0, slow, SHED_AFTER, Duration::ZERO), None);
        let late = behind(200, 300.0, slow, SHED_AFTER, Duration::from_millis(300));
        // Answered about 0.97 s after arriving: over the 80 % mark.
        assert!(
            late.is_some_and(|at| at > Duration::from_millis(950) && at < SHED_AFTER),
            "{late:?}"
        );
        // A fast JetStream admits it however late it arrived.
        let fast = Duration::from_millis(20);
        assert_eq!(
            behind(200, 3_000.0, fast, SHED_AFTER, Duration::from_secs(3)),
            None
        );
        // Through the backlog, as publishing asks it.
        let backlog = Backlog::default();
        let ahead: Vec<_> = admitted(&backlog, SHED_AFTER, 200);
        {
            let mut s = backlog.0.lock().unwrap();
            acknowledged_over(&mut s, 300, Duration::from_secs(1));
            s.latency = slow;
        }
        let spent = Duration::from_millis(300);
        let budget = shed_by(SHED_AFTER, spent, crate::PUBLISH_TIMEOUT);
        assert!(backlog.admit(budget, spent, 1).is_err(), "admitted late");
        assert!(backlog.admit(budget, Duration::ZERO, 1).is_ok());
        drop(ahead);
    }

    #[test]
    fn a_request_is_shed_by_the_earlier_of_shed_after_and_its_publish_budget() {
        let (shed_after, timeout) = (SHED_AFTER, crate::PUBLISH_TIMEOUT);
        // Just arrived: the shed-after wait.
        assert_eq!(shed_by(shed_after, Duration::ZERO, timeout), shed_after);
        // A shed-after wait longer than a publish may take is cut to the publish's.
        let long = Duration::from_secs(30);
        assert_eq!(shed_by(long, Duration::ZERO, timeout), timeout);
        // 8.5 s after arriving, 0.5 s is left of the 9 s the answer is due in.
        let spent = Duration::from_millis(8_500);
        let budget = timeout.min(ANSWER_WITHIN - spent);
        assert_eq!(shed_by(long, spent, budget), ANSWER_WITHIN);
        assert_eq!(shed_by(shed_after, spent, budget), shed_after);
    }

    #[test]
    fn the_shed_after_wait_bounds_the_queue() {
        // At 300 acknowledgements a second, 300 ahead is 1 s: refused; 200 is not.
        let slow = Duration::from_millis(300);
        assert_eq!(
            behind(300, 300.0, slow, SHED_AFTER, Duration::ZERO),
            Some(Duration::from_secs(1))
        );
        assert_eq!(behind(200, 300.0, slow, SHED_AFTER, Duration::ZERO), None);
        // Acknowledgements quicker than a quarter of it: not queueing, never shed.
        assert_eq!(
            behind(
                3_000,
                300.0,
                Duration::from_millis(200),
                SHED_AFTER,
                Duration::ZERO
            ),
            None
        );
    }
}
