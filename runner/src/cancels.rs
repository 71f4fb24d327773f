//! The runs cancelled on this cluster that this runner could still be handed.
//!
//! A cancel matters while the run's request can still be delivered: a request stays in
//! `SLUICE_RUNS` at most the stream's max age from when it was stored, and it was stored
//! before it could be cancelled. So a cancel older than that max age can refuse nothing
//! any more, and is forgotten; the set holds at most one max age of cancels, however
//! long the runner runs and however long the control stream's history.

use std::collections::HashMap;
use std::time::Duration;

use time::OffsetDateTime;

/// How often the set is swept for cancels that can refuse nothing any more.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Cancelled run ids, each with when its cancel was stored.
#[derive(Debug)]
pub(crate) struct Cancelled {
    /// How long a run request can wait to be delivered: the runs stream's max age.
    keep: Duration,
    ids: HashMap<String, OffsetDateTime>,
    next_sweep: Option<OffsetDateTime>,
}

impl Cancelled {
    pub fn new(keep: Duration) -> Self {
        Cancelled {
            keep,
            ids: HashMap::new(),
            next_sweep: None,
        }
    }

    /// `run_id` was cancelled by a request stored at `at`.
    pub fn insert(&mut self, run_id: &str, at: OffsetDateTime, now: OffsetDateTime) {
        if self.next_sweep.is_none_or(|due| now >= due) {
            self.sweep(now);
            self.next_sweep = Some(now + SWEEP_EVERY);
        }
        if self.expired(at, now) {
            return;
        }
        let kept = self.ids.entry(run_id.to_owned()).or_insert(at);
        *kept = (*kept).max(at);
    }

    /// Whether a run handed over now must not start.
    pub fn contains(&self, run_id: &str, now: OffsetDateTime) -> bool {
        self.ids
            .get(run_id)
            .is_some_and(|at| !self.expired(*at, now))
    }

    /// The run's final state is stored, which any later delivery finds first.
    pub fn forget(&mut self, run_id: &str) {
        self.ids.remove(run_id);
    }

    /// Forgets the cancels that can refuse nothing any more.
    pub fn sweep(&mut self, now: OffsetDateTime) {
        let keep = self.keep;
        self.ids.retain(|_, at| now - *at < keep);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    fn expired(&self, at: OffsetDateTime, now: OffsetDateTime) -> bool {
        now - at >= self.keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn t(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_750_000_000 + secs).expect("time")
    }

    #[test]
    fn a_cancel_is_kept_while_its_run_can_still_be_delivered() {
        let mut c = Cancelled::new(7 * DAY);
        c.insert("run-1", t(0), t(0));
        assert!(c.contains("run-1", t(0)));
        assert!(c.contains("run-1", t(7 * 86_400 - 1)));
        // Its request has left the runs stream by now: nothing left to refuse.
        assert!(!c.contains("run-1", t(7 * 86_400)));
        assert!(!c.contains("run-2", t(0)));
    }

    #[test]
    fn old_cancels_are_swept_so_the_set_holds_one_max_age_of_them() {
        let mut c = Cancelled::new(DAY);
        // A runner up for ten days, 100 cancels an hour.
        for hour in 0..240 {
            for i in 0..100 {
                let at = t(hour * 3600 + i);
                c.insert(&format!("run-{hour}-{i}"), at, at);
            }
        }
        let now = t(240 * 3600 - 1);
        c.sweep(now);
        assert_eq!(c.len(), 24 * 100, "the last day's");
        assert!(c.contains("run-239-0", now));
        assert!(!c.contains("run-200-0", now));
    }

    #[test]
    fn the_control_streams_history_adds_only_what_can_still_refuse_a_run() {
        // At start-up the whole control stream is read: cancels older than the runs
        // stream's max age are not kept at all.
        let mut c = Cancelled::new(DAY);
        let now = t(30 * 86_400);
        c.insert("long-gone", t(0), now);
        c.insert("yesterday", now - Duration::from_secs(3600), now);
        assert_eq!(c.len(), 1);
        assert!(c.contains("yesterday", now));
    }

    #[test]
    fn a_cancel_read_twice_keeps_its_latest_time_and_a_finished_run_is_forgotten() {
        let mut c = Cancelled::new(DAY);
        c.insert("run-1", t(0), t(0));
        c.insert("run-1", t(3600), t(3600));
        assert!(c.contains("run-1", t(86_400 + 1)));
        c.insert("run-1", t(0), t(3600));
        assert!(
            c.contains("run-1", t(86_400 + 1)),
            "an older copy changes nothing"
        );
        c.forget("run-1");
        assert!(!c.contains("run-1", t(3600)));
        assert_eq!(c.len(), 0);
    }
}
