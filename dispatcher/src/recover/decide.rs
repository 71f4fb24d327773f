//! What one reconcile pass does, decided from what it read and nothing else: the
//! forge's listing of recent deliveries, the event ids `SLUICE_EVENTS` holds and the
//! attempt records in `SLUICE_DELIVERIES`. No I/O here, so every rule has a unit test.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One delivery as GitHub lists it (`GET …/hooks/…/deliveries`); GitLab's hook events
/// are turned into one ([`super::gitlab::HookEvent::delivery`]). A redelivery is a
/// delivery of its own, with a new `id` and the same `guid`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Delivery {
    pub id: u64,
    /// The `X-GitHub-Delivery` header (GitLab: `Idempotency-Key`): ingest's event id
    /// is `<forge>:<guid>`.
    pub guid: String,
    #[serde(with = "time::serde::rfc3339")]
    pub delivered_at: OffsetDateTime,
    #[serde(default)]
    pub redelivery: bool,
    /// What Sluice answered; 0 when GitHub could not connect at all.
    #[serde(default)]
    pub status_code: u16,
    #[serde(default)]
    pub event: String,
    #[serde(default)]
    pub action: Option<String>,
}

impl Delivery {
    fn succeeded(&self) -> bool {
        (200..300).contains(&self.status_code)
    }
}

/// What became of a delivery the reconciler acted on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Redelivery asked for; not stored yet.
    Pending,
    /// Stored after a redelivery.
    Recovered,
    /// Given up on; see the reason.
    Lost,
}

/// Why a delivery could not be recovered (the `reason` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Redelivered `--recover-max-attempts` times and still not stored.
    AttemptsExhausted,
    /// The forge refused to redeliver it (older than GitHub's 3 days or GitLab's 7,
    /// hook gone, no permission).
    Refused,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::AttemptsExhausted => "attempts_exhausted",
            Reason::Refused => "refused",
        }
    }
}

/// The reconciler's record of one delivery, kept in `SLUICE_DELIVERIES` under
/// [`record_key`]. Only deliveries that failed and were not stored get one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub forge: String,
    /// The hook it was listed under: `app`, `repo:<owner>/<name>:<id>`, `org:<org>:<id>`,
    /// `gitlab:<project>:<id>`.
    pub hook: String,
    pub guid: String,
    pub event: String,
    #[serde(default)]
    pub action: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub first_delivered_at: OffsetDateTime,
    /// Redeliveries this reconciler asked for.
    pub attempts: u32,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_attempt_at: Option<OffsetDateTime>,
    pub state: State,
    #[serde(default)]
    pub reason: Option<Reason>,
    /// A human-readable cause for a lost delivery (the forge's answer); never a secret.
    #[serde(default)]
    pub detail: Option<String>,
}

/// The key of a delivery's record: `<forge>.<guid>` (GitHub's guids and GitLab's
/// idempotency keys are UUIDs, valid key tokens).
pub fn record_key(forge: &str, guid: &str) -> String {
    format!("{forge}.{guid}")
}

/// The limits a pass decides within.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Deliveries before this are left alone.
    pub horizon_start: OffsetDateTime,
    /// Redeliveries of one delivery before it is reported lost.
    pub max_attempts: u32,
    /// Time a redelivery gets to arrive before the next is asked for.
    pub spacing: Duration,
    pub now: OffsetDateTime,
}

/// One thing a pass does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Ask the forge to redeliver `delivery_id`; `record` is what to store first (the
    /// claim: stored only if the record is still at the revision read).
    Redeliver { delivery_id: u64, record: Record },
    /// A redelivered delivery is now stored: count it once.
    Recovered { record: Record },
    /// Report it and stop trying.
    Lost { record: Record },
}

/// A stored record and the revision it was read at.
pub type Records = HashMap<String, (Record, u64)>;

/// What to do about the deliveries of one hook: for each guid seen within the horizon
/// that has no event in `stored` (event ids, `github:<guid>`) and no 2xx answer, a
/// redelivery of its latest delivery — unless one was asked for less than `spacing`
/// ago, or `max_attempts` were spent (then it is reported lost, once). A guid with a
/// pending record that is now stored is counted recovered, once.
pub fn plan(
    forge: &str,
    hook: &str,
    listing: &[Delivery],
    stored: &HashSet<String>,
    records: &Records,
    limits: &Limits,
) -> Vec<Action> {
    let mut by_guid: BTreeMap<&str, Vec<&Delivery>> = BTreeMap::new();
    for d in listing
        .iter()
        .filter(|d| d.delivered_at >= limits.horizon_start)
    {
        by_guid.entry(d.guid.as_str()).or_default().push(d);
    }
    by_guid
        .into_iter()
        .filter_map(|(guid, deliveries)| {
            let key = record_key(forge, guid);
            let record = records.get(&key).map(|(r, _)| r);
            decide(forge, hook, guid, &deliveries, stored, record, limits)
        })
        .collect()
}

fn decide(
    forge: &str,
    hook: &str,
    guid: &str,
    deliveries: &[&Delivery],
    stored: &HashSet<String>,
    record: Option<&Record>,
    limits: &Limits,
) -> Option<Action> {
    let is_stored = stored.contains(&format!("{forge}:{guid}"));
    if is_stored {
        // Counted once: only a pending record turns into a recovery.
        return record
            .filter(|r| r.state == State::Pending)
            .map(|r| Action::Recovered {
                record: Record {
                    state: State::Recovered,
                    ..r.clone()
                },
            });
    }
    // A 2xx means ingest stored it (it answers 2xx only after JetStream acknowledged);
    // not in the set means it was stored before the set's start or has expired since:
    // redelivering cannot bring it back any more than it is.
    if deliveries.iter().any(|d| d.succeeded()) {
        return None;
    }
    let latest = deliveries.iter().max_by_key(|d| (d.delivered_at, d.id))?;
    let first = deliveries.iter().map(|d| d.delivered_at).min()?;
    let record = match record {
        Some(r) if r.state != State::Pending => return None,
        Some(r) => r.clone(),
        None => Record {
            forge: forge.to_owned(),
            hook: hook.to_owned(),
            guid: guid.to_owned(),
            event: latest.event.clone(),
            action: latest.action.clone(),
            first_delivered_at: first,
            attempts: 0,
            last_attempt_at: None,
            state: State::Pending,
            reason: None,
            detail: None,
        },
    };
    if record.attempts >= limits.max_attempts {
        return Some(Action::Lost {
            record: Record {
                state: State::Lost,
                reason: Some(Reason::AttemptsExhausted),
                detail: Some(format!(
                    "redelivered {} times; last answer {}",
                    record.attempts, latest.status_code
                )),
                ..record
            },
        });
    }
    let spacing = time::Duration::try_from(limits.spacing).unwrap_or(time::Duration::MAX);
    if record
        .last_attempt_at
        .is_some_and(|at| limits.now - at < spacing)
    {
        return None;
    }
    Some(Action::Redeliver {
        delivery_id: latest.id,
        record: Record {
            attempts: record.attempts + 1,
            last_attempt_at: Some(limits.now),
            ..record
        },
    })
}

/// The next page's cursor from a `Link` header (`<…?per_page=100&cursor=X>; rel="next"`).
/// Only the cursor is taken: the next request is built against the configured API URL,
/// so a header can never send the App's JWT to another host.
pub fn next_cursor(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (url, params) = part.split_once(';')?;
        if !params.split(';').any(|p| p.trim() == "rel=\"next\"") {
            return None;
        }
        let url = url.trim().trim_start_matches('<').trim_end_matches('>');
        let (_, query) = url.split_once('?')?;
        form_pairs(query).find_map(|(k, v)| (k == "cursor" && !v.is_empty()).then_some(v))
    })
}

fn form_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        Some((k.to_owned(), percent_decode(v)))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a page reaches back past the horizon, so no older page is needed (GitHub
/// lists the newest first).
pub fn reaches_horizon(page: &[Delivery], horizon_start: OffsetDateTime) -> bool {
    page.iter().any(|d| d.delivered_at < horizon_start)
}

/// How long the forge asked to wait: `Retry-After` seconds (secondary limits), else the
/// primary limit's reset time when none are left, else `None` (not a rate limit).
pub fn rate_limit_wait(
    status: u16,
    retry_after: Option<&str>,
    remaining: Option<&str>,
    reset: Option<&str>,
    now: OffsetDateTime,
) -> Option<Duration> {
    if let Some(secs) = retry_after.and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(Duration::from_secs(secs));
    }
    if remaining.map(str::trim) == Some("0") {
        let reset: i64 = reset?.trim().parse().ok()?;
        let secs = (reset - now.unix_timestamp()).max(1);
        return Some(Duration::from_secs(u64::try_from(secs).unwrap_or(1)));
    }
    // A 429 without either header is still a rate limit: GitHub says to wait a minute.
    (status == 429).then_some(Duration::from_secs(60))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-12-02 12:00 UTC);

    fn limits() -> Limits {
        Limits {
            horizon_start: NOW - time::Duration::hours(6),
            max_attempts: 3,
            spacing: Duration::from_secs(300),
            now: NOW,
        }
    }

    fn delivery(id: u64, guid: &str, minutes_ago: i64, status: u16) -> Delivery {
        Delivery {
            id,
            guid: guid.into(),
            delivered_at: NOW - time::Duration::minutes(minutes_ago),
            redelivery: false,
            status_code: status,
            event: "push".into(),
            action: None,
        }
    }

    fn stored(guids: &[&str]) -> HashSet<String> {
        guids.iter().map(|g| format!("github:{g}")).collect()
    }

    fn run(listing: &[Delivery], stored: &HashSet<String>, records: &Records) -> Vec<Action> {
        plan("github", "app", listing, stored, records, &limits())
    }

    fn redelivered(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Redeliver { delivery_id, .. } => Some(*delivery_id),
                _ => None,
            })
            .collect()
    }

    fn pending(guid: &str, attempts: u32, minutes_ago: i64) -> (String, (Record, u64)) {
        let record = Record {
            forge: "github".into(),
            hook: "app".into(),
            guid: guid.into(),
            event: "push".into(),
            action: None,
            first_delivered_at: NOW - time::Duration::hours(1),
            attempts,
            last_attempt_at: Some(NOW - time::Duration::minutes(minutes_ago)),
            state: State::Pending,
            reason: None,
            detail: None,
        };
        (record_key("github", guid), (record, 7))
    }

    #[test]
    fn only_failed_deliveries_without_an_event_are_redelivered() {
        let listing = [
            delivery(1, "a", 10, 503),
            delivery(2, "b", 10, 202),
            // Failed as GitHub saw it, but stored: the 2xx was lost on the way back.
            delivery(3, "c", 10, 0),
            delivery(4, "d", 10, 0),
        ];
        let actions = run(&listing, &stored(&["b", "c"]), &Records::new());
        assert_eq!(redelivered(&actions), [1, 4]);
        let Action::Redeliver { record, .. } = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!((record.attempts, record.state), (1, State::Pending));
        assert_eq!(record.last_attempt_at, Some(NOW));
    }

    #[test]
    fn a_guid_answered_2xx_once_is_left_alone_and_the_latest_failure_is_redelivered() {
        let listing = [
            delivery(1, "a", 30, 503),
            delivery(2, "a", 20, 202),
            delivery(3, "b", 30, 503),
            delivery(4, "b", 20, 502),
        ];
        assert_eq!(
            redelivered(&run(&listing, &stored(&[]), &Records::new())),
            [4]
        );
    }

    #[test]
    fn deliveries_older_than_the_horizon_are_left_alone() {
        let listing = [
            delivery(1, "a", 6 * 60 + 1, 503),
            delivery(2, "b", 359, 503),
        ];
        assert_eq!(
            redelivered(&run(&listing, &stored(&[]), &Records::new())),
            [2]
        );
    }

    #[test]
    fn a_recent_redelivery_is_given_time_to_arrive() {
        let listing = [delivery(1, "a", 30, 503), delivery(2, "b", 30, 503)];
        let records: Records = [pending("a", 1, 1), pending("b", 1, 6)].into();
        let actions = run(&listing, &stored(&[]), &records);
        assert_eq!(redelivered(&actions), [2]);
        let Action::Redeliver { record, .. } = &actions[0] else {
            panic!("{actions:?}")
        };
        assert_eq!(record.attempts, 2, "counts on from the stored record");
    }

    #[test]
    fn after_max_attempts_it_is_reported_lost_once() {
        let listing = [delivery(1, "a", 30, 503)];
        let records: Records = [pending("a", 3, 10)].into();
        let actions = run(&listing, &stored(&[]), &records);
        let [Action::Lost { record }] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(record.state, State::Lost);
        assert_eq!(record.reason, Some(Reason::AttemptsExhausted));
        let (key, (_, rev)) = pending("a", 3, 10);
        let records: Records = [(key, (record.clone(), rev))].into();
        assert!(
            run(&listing, &stored(&[]), &records).is_empty(),
            "reported once"
        );
    }

    #[test]
    fn a_pending_delivery_now_stored_is_recovered_once() {
        let listing = [delivery(1, "a", 30, 503), delivery(2, "a", 1, 503)];
        let records: Records = [pending("a", 1, 1)].into();
        let actions = run(&listing, &stored(&["a"]), &records);
        let [Action::Recovered { record }] = actions.as_slice() else {
            panic!("{actions:?}")
        };
        assert_eq!(record.state, State::Recovered);
        let (key, (_, rev)) = pending("a", 1, 1);
        let records: Records = [(key, (record.clone(), rev))].into();
        assert!(run(&listing, &stored(&["a"]), &records).is_empty());
        // A delivery stored without the reconciler's help is no recovery.
        assert!(run(&listing, &stored(&["a"]), &Records::new()).is_empty());
    }

    #[test]
    fn the_cursor_comes_from_the_next_link_only() {
        let link = "<https://api.github.com/app/hook/deliveries?per_page=2&cursor=v1_11%3D>; rel=\"next\", \
                    <https://api.github.com/app/hook/deliveries?per_page=2>; rel=\"first\"";
        assert_eq!(next_cursor(link).as_deref(), Some("v1_11="));
        assert_eq!(
            next_cursor("<https://x/?cursor=abc>; rel=\"prev\""),
            None,
            "only rel=next"
        );
        assert_eq!(next_cursor(""), None);
    }

    #[test]
    fn rate_limits_are_read_from_the_headers() {
        assert_eq!(
            rate_limit_wait(403, Some("7"), None, None, NOW),
            Some(Duration::from_secs(7))
        );
        let reset = (NOW.unix_timestamp() + 30).to_string();
        assert_eq!(
            rate_limit_wait(403, None, Some("0"), Some(&reset), NOW),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            rate_limit_wait(403, None, Some("12"), Some(&reset), NOW),
            None
        );
        assert_eq!(
            rate_limit_wait(429, None, None, None, NOW),
            Some(Duration::from_secs(60))
        );
    }

    #[test]
    fn a_page_reaching_past_the_horizon_ends_the_listing() {
        let h = limits().horizon_start;
        assert!(!reaches_horizon(&[delivery(1, "a", 10, 202)], h));
        assert!(reaches_horizon(&[delivery(1, "a", 7 * 60, 202)], h));
    }
}
