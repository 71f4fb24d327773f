//! How requests refused unsent are logged: counted, and reported once a second by
//! [`report_every_second`] with how many there were of each kind, not one warning each.
//! A request shed because JetStream is behind, or refused while NATS is disconnected,
//! is known not stored and counted in `sluice_ingest_requests_total`; in the spike
//! ingest sheds thousands a second, and a warning each buried the log (about 8,000
//! lines a spike) and cost the CPU the spike is short of. Each is still logged at debug
//! level with its event id.

use std::sync::Mutex;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::PublishError;

/// How often what was counted is reported.
const EVERY: Duration = Duration::from_secs(1);

/// Refusals not yet reported.
#[derive(Debug, Default)]
pub struct RefusalLog(Mutex<Refused>);

/// Refusals of each kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    /// JetStream too far behind (`outcome="shed"`).
    pub shed: u64,
    /// NATS disconnected (`outcome="unavailable"`).
    pub disconnected: u64,
}

impl Refused {
    fn is_empty(&self) -> bool {
        self.shed == 0 && self.disconnected == 0
    }
}

impl RefusalLog {
    /// Counts `e` if it refused an event unsent; says whether it did.
    pub fn count(&self, e: &PublishError) -> bool {
        let mut refused = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            PublishError::Behind { .. } => refused.shed += 1,
            PublishError::Disconnected => refused.disconnected += 1,
            _ => return false,
        }
        true
    }

    /// What was counted since the last call.
    pub fn take(&self) -> Refused {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Reports what `log` counted every second until `stop` trips, then once more, so the
/// last refusals before a shutdown are reported too.
pub async fn report_every_second(log: &RefusalLog, stop: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => report(log.take()),
        }
    }
    report(log.take());
}

fn report(refused: Refused) {
    if !refused.is_empty() {
        tracing::warn!(
            shed = refused.shed,
            disconnected = refused.disconnected,
            "webhooks refused without being sent, answered 503 (shed: JetStream behind; disconnected: NATS); each is counted in sluice_ingest_requests_total"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_unsent_are_counted_by_kind_until_taken() {
        let log = RefusalLog::default();
        let behind = PublishError::Behind {
            waiting: 9,
            wait: Duration::from_secs(2),
        };
        for _ in 0..3 {
            assert!(log.count(&behind));
        }
        assert!(log.count(&PublishError::Disconnected));
        // A publish that timed out may be stored: logged on its own, not counted here.
        assert!(!log.count(&PublishError::Timeout(Duration::from_secs(8))));
        assert_eq!(
            log.take(),
            Refused {
                shed: 3,
                disconnected: 1
            }
        );
        assert_eq!(log.take(), Refused::default());
    }
}
