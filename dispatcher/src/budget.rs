//! A forge request budget: a token bucket per forge sized from requests per hour, and
//! a pause per forge when the forge said to wait (`Retry-After`, a spent rate limit).
//! Cheap to clone; clones share the buckets, so the commit status reporter and the
//! delivery reconciler spend from one budget and one forge's pause holds back both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_core::Provider;

#[derive(Debug, Clone)]
pub struct ForgeBudget {
    per_hour: u32,
    buckets: Arc<Mutex<HashMap<Provider, Bucket>>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    paused_until: Option<Instant>,
}

impl ForgeBudget {
    /// A budget of `per_hour` requests per forge (at least 1), a fiftieth of it at once.
    pub fn new(per_hour: u32) -> Self {
        ForgeBudget {
            per_hour: per_hour.max(1),
            buckets: Arc::default(),
        }
    }

    fn burst(&self) -> f64 {
        (f64::from(self.per_hour) / 50.0).max(1.0)
    }

    fn with<T>(&self, forge: Provider, now: Instant, f: impl FnOnce(&mut Bucket) -> T) -> T {
        let burst = self.burst();
        // A poisoned lock only means a panic elsewhere mid-update: the numbers are
        // still usable.
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.entry(forge).or_insert(Bucket {
            tokens: burst,
            refilled: now,
            paused_until: None,
        });
        f(bucket)
    }

    /// Takes one request for `forge`; when there is none, how long until the next
    /// (`None` while the forge said to wait).
    pub fn take(&self, forge: Provider, now: Instant) -> Result<(), Option<Duration>> {
        let (per_sec, burst) = (f64::from(self.per_hour) / 3600.0, self.burst());
        self.with(forge, now, |b| {
            if b.paused_until.is_some_and(|t| now < t) {
                return Err(None);
            }
            let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
            b.tokens = (b.tokens + elapsed * per_sec).min(burst);
            b.refilled = now;
            if b.tokens >= 1.0 {
                b.tokens -= 1.0;
                Ok(())
            } else {
                Err(Some(Duration::from_secs_f64((1.0 - b.tokens) / per_sec)))
            }
        })
    }

    /// Gives back a request taken but not made.
    pub fn refund(&self, forge: Provider, now: Instant) {
        let burst = self.burst();
        self.with(forge, now, |b| b.tokens = (b.tokens + 1.0).min(burst));
    }

    /// Holds every request to `forge` back until `until`.
    pub fn pause(&self, forge: Provider, now: Instant, until: Instant) {
        self.with(forge, now, |b| {
            b.paused_until = Some(b.paused_until.map_or(until, |t| t.max(until)));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_request_per_share_of_the_hour_and_pauses_shared_by_clones() {
        let start = Instant::now();
        let budget = ForgeBudget::new(100);
        let other = budget.clone();
        assert_eq!(budget.take(Provider::Github, start), Ok(()), "a burst of 2");
        assert_eq!(other.take(Provider::Github, start), Ok(()), "shared");
        let Err(Some(wait)) = budget.take(Provider::Github, start) else {
            panic!("spent")
        };
        assert!(
            wait.abs_diff(Duration::from_secs(36)) < Duration::from_millis(1),
            "{wait:?}"
        );
        assert_eq!(budget.take(Provider::Gitlab, start), Ok(()), "per forge");
        budget.refund(Provider::Github, start);
        assert_eq!(other.take(Provider::Github, start), Ok(()), "refunded");
        let later = start + Duration::from_secs(36);
        assert_eq!(budget.take(Provider::Github, later), Ok(()), "one per 36 s");
        other.pause(Provider::Github, later, later + Duration::from_secs(3600));
        let much_later = later + Duration::from_secs(1800);
        assert_eq!(
            budget.take(Provider::Github, much_later),
            Err(None),
            "paused"
        );
        assert_eq!(budget.take(Provider::Gitlab, much_later), Ok(()));
    }
}
