//! How requests refused unsent are logged: a line a second at most, with how many
//! there were. A request shed because JetStream is behind, or refused while NATS is
//! disconnected, is known not stored and counted in `sluice_ingest_requests_total`; in
//! the spike ingest sheds thousands a second, and a warning each buried the log (about
//! 8,000 lines a spike) and cost the CPU the spike is short of. Each is still logged at
//! debug level with its event id.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most one summary line in this time.
const EVERY: Duration = Duration::from_secs(1);

/// Counts refusals between the lines that report them.
#[derive(Debug, Default)]
pub struct RefusalLog(Mutex<Since>);

#[derive(Debug, Default)]
struct Since {
    /// When the last line was written.
    logged: Option<Instant>,
    /// Refusals since, not yet in a line.
    unlogged: u64,
}

impl RefusalLog {
    /// Counts a refusal at `now`; returns how many a line written now reports (this one
    /// and those since the last line), or `None` while a line was written less than
    /// [`EVERY`] ago. The first refusal after a quiet second is reported at once; the
    /// last ones of a stretch are reported by the next line, or only by the metric.
    pub fn count(&self, now: Instant) -> Option<u64> {
        let mut since = self.0.lock().unwrap_or_else(|p| p.into_inner());
        since.unlogged += 1;
        let due = since
            .logged
            .is_none_or(|at| now.saturating_duration_since(at) >= EVERY);
        if !due {
            return None;
        }
        since.logged = Some(now);
        Some(std::mem::take(&mut since.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_a_second_reports_every_refusal_since_the_last() {
        let log = RefusalLog::default();
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // The first is reported at once.
        assert_eq!(log.count(at(0)), Some(1));
        // 999 more within the second: no line.
        for i in 1..1_000 {
            assert_eq!(log.count(at(i)), None, "a line at {i} ms");
        }
        // The first after the second reports them with itself.
        assert_eq!(log.count(at(1_000)), Some(1_000));
        assert_eq!(log.count(at(1_500)), None);
        // After a quiet minute, at once again.
        assert_eq!(log.count(at(61_500)), Some(2));
        assert_eq!(log.count(at(61_501)), None);
    }
}
