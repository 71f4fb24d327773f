//! One active reconciler across replicas: a lease in `SLUICE_DELIVERIES` under
//! [`LEASE_KEY`], taken and renewed by compare-and-set. Its expiry is a time in the
//! value rather than a per-key TTL, so it works on every bucket and server version;
//! replicas' clocks need only agree to well within the lease's length (three
//! intervals). Correctness does not rest on it: every redelivery is claimed by its own
//! compare-and-set, so two holders at once (a pause longer than the lease) still never
//! redeliver one delivery twice; the lease only keeps the others from spending budget.

use async_nats::jetstream::kv::{Operation, Store};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{Error, Result};

/// The lease's key.
pub const LEASE_KEY: &str = "lease";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub holder: String,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
}

/// Whether `holder` may take a lease found as `current` at `now`: nobody holds it, it
/// is its own, or it has expired.
pub fn may_take(current: Option<&Lease>, holder: &str, now: OffsetDateTime) -> bool {
    current.is_none_or(|l| l.holder == holder || l.until <= now)
}

/// Takes or renews the lease for `ttl` from `now`; `false` when another holds it (or
/// took it between the read and the write).
pub async fn acquire(
    kv: &Store,
    holder: &str,
    now: OffsetDateTime,
    ttl: std::time::Duration,
) -> Result<bool> {
    let entry = kv
        .entry(LEASE_KEY)
        .await
        .map_err(|e| Error::nats("read the reconciler lease", e))?;
    let live = entry
        .as_ref()
        .filter(|e| e.operation == Operation::Put)
        .and_then(|e| serde_json::from_slice::<Lease>(&e.value).ok());
    if !may_take(live.as_ref(), holder, now) {
        return Ok(false);
    }
    let lease = Lease {
        holder: holder.to_owned(),
        until: now + time::Duration::try_from(ttl).unwrap_or(time::Duration::MAX),
    };
    let value = serde_json::to_vec(&lease).map_err(|source| Error::Encode {
        what: "the reconciler lease",
        source,
    })?;
    let written = match entry {
        Some(e) => kv.update(LEASE_KEY, value.into(), e.revision).await.is_ok(),
        None => kv.create(LEASE_KEY, value.into()).await.is_ok(),
    };
    Ok(written)
}

/// Gives the lease up on shutdown, so another replica takes over at its next tick; a
/// failure only means it waits for the expiry.
pub async fn release(kv: &Store, holder: &str) {
    let Ok(Some(entry)) = kv.entry(LEASE_KEY).await else {
        return;
    };
    let ours = serde_json::from_slice::<Lease>(&entry.value).is_ok_and(|l| l.holder == holder);
    if ours {
        let _ = kv
            .delete_expect_revision(LEASE_KEY, Some(entry.revision))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn a_lease_is_taken_when_free_own_or_expired() {
        let now = datetime!(2026-12-02 12:00 UTC);
        let lease = |holder: &str, minutes: i64| Lease {
            holder: holder.into(),
            until: now + time::Duration::minutes(minutes),
        };
        assert!(may_take(None, "a", now));
        assert!(may_take(Some(&lease("a", 5)), "a", now), "renewal");
        assert!(!may_take(Some(&lease("b", 5)), "a", now), "held by another");
        assert!(may_take(Some(&lease("b", 0)), "a", now), "expired");
        assert!(may_take(Some(&lease("b", -1)), "a", now));
    }
}
