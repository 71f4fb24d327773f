//! What the streams and the doubles hold, read incrementally, and the invariants.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use sluice_core::run::StatusUpdate;
use sluice_core::{subjects, Event};

use crate::env::{pipeline_for, Env};
use crate::load::Report;
use sluice_tests::streams::read_from;

/// Everything read so far from `SLUICE_EVENTS` and `SLUICE_STATUS`.
#[derive(Debug, Default)]
pub struct Seen {
    events_seq: u64,
    status_seq: u64,
    /// Event id → (times stored, kind).
    pub events: HashMap<String, (u32, String)>,
    /// Run id → final states stored for it.
    pub finals: HashMap<String, Vec<String>>,
    /// `SLUICE_RUNS`' last sequence when the current scenario began.
    pub runs_seq: u64,
}

impl Seen {
    /// Reads what is there before the first scenario.
    pub async fn start(&mut self, js: &jetstream::Context) -> anyhow::Result<()> {
        self.update(js).await?;
        self.runs_seq = runs_last_seq(js).await?;
        Ok(())
    }

    /// Reads what was stored since the last call.
    pub async fn update(&mut self, js: &jetstream::Context) -> anyhow::Result<()> {
        for stored in read_from(
            js,
            subjects::EVENTS_STREAM,
            "sluice.events.>",
            &mut self.events_seq,
        )
        .await?
        {
            let event: Event = serde_json::from_slice(&stored.payload).context("stored event")?;
            let entry = self.events.entry(event.id).or_insert((0, event.kind));
            entry.0 += 1;
        }
        for stored in read_from(
            js,
            subjects::STATUS_STREAM,
            "sluice.status.>",
            &mut self.status_seq,
        )
        .await?
        {
            let update: StatusUpdate =
                serde_json::from_slice(&stored.payload).context("stored state")?;
            if update.step.is_none() && update.state.is_final() {
                self.finals
                    .entry(update.run_id)
                    .or_default()
                    .push(update.state.as_str().to_owned());
            }
        }
        Ok(())
    }
}

pub async fn runs_last_seq(js: &jetstream::Context) -> anyhow::Result<u64> {
    let mut stream = js.get_stream(subjects::RUNS_STREAM).await?;
    Ok(stream.info().await?.state.last_sequence)
}

/// The runs the scenario's stored events must have led to: run id → (pipeline, cluster).
pub fn expected_runs(env: &Env, report: &Report) -> BTreeMap<String, (String, usize)> {
    let mut runs = BTreeMap::new();
    for id in report.delivered.keys() {
        if let Some((_, kind)) = env.seen.events.get(id) {
            if let Some((pipeline, cluster)) = pipeline_for(kind) {
                runs.insert(
                    sluice_core::run::run_id(id, pipeline, 0),
                    (pipeline.to_owned(), cluster),
                );
            }
        }
    }
    runs
}

/// Waits until every expected run has a final state; the ones still without one.
pub async fn wait_finals(
    env: &mut Env,
    runs: &BTreeMap<String, (String, usize)>,
    deadline: Duration,
) -> anyhow::Result<Vec<String>> {
    let until = Instant::now() + deadline;
    loop {
        // The suite's own connection may sit on a node that was just cut off: a
        // failed read is tried again until the deadline.
        if let Err(e) = env.seen.update(&env.js).await {
            if Instant::now() > until {
                return Err(e);
            }
        }
        let missing: Vec<String> = runs
            .keys()
            .filter(|r| !env.seen.finals.contains_key(*r))
            .cloned()
            .collect();
        if missing.is_empty() || Instant::now() > until {
            return Ok(missing);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The invariants over the streams and the doubles; one line per violation.
pub fn invariants(
    env: &Env,
    report: &Report,
    runs: &BTreeMap<String, (String, usize)>,
) -> Vec<String> {
    let mut failures = Vec::new();
    let mut push = |what: String, list: Vec<String>| {
        if !list.is_empty() {
            let n = list.len();
            let sample: Vec<String> = list.into_iter().take(5).collect();
            failures.push(format!("{what}: {n} (e.g. {})", sample.join(", ")));
        }
    };
    let never_ok: Vec<String> = report
        .delivered
        .iter()
        .filter(|(_, ok)| !**ok)
        .map(|(id, _)| id.clone())
        .collect();
    push(
        "deliveries never answered 2xx after the fault".into(),
        never_ok,
    );
    let not_once: Vec<String> = report
        .delivered
        .iter()
        .filter(|(_, ok)| **ok)
        .filter_map(|(id, _)| {
            let n = env.seen.events.get(id).map_or(0, |e| e.0);
            (n != 1).then(|| format!("{id} stored {n}×"))
        })
        .collect();
    push(
        "deliveries answered 2xx not stored exactly once".into(),
        not_once,
    );
    let dup_anywhere: Vec<String> = env
        .seen
        .events
        .iter()
        .filter(|(_, (n, _))| *n > 1)
        .map(|(id, (n, _))| format!("{id} {n}×"))
        .collect();
    push("events stored more than once".into(), dup_anywhere);
    let bad_answers: Vec<String> = report
        .answers
        .iter()
        .filter(|a| {
            !a.status
                .is_some_and(|s| (200..300).contains(&s) || s == 503)
        })
        .map(|a| match (&a.status, &a.error) {
            (Some(s), _) => format!("{} → {s}", a.event_id),
            (None, e) => format!("{} → no answer: {}", a.event_id, e.as_deref().unwrap_or("")),
        })
        .collect();
    push("answers other than 2xx/503".into(), bad_answers);
    let slow: Vec<String> = report
        .answers
        .iter()
        .filter(|a| a.took > Duration::from_secs(10))
        .map(|a| format!("{} in {:.1} s", a.event_id, a.took.as_secs_f64()))
        .collect();
    push("answers slower than 10 s".into(), slow);

    let created: Vec<HashMap<String, usize>> = env
        .apis
        .iter()
        .map(|api| {
            let mut counts = HashMap::new();
            for name in api.created() {
                *counts.entry(name).or_insert(0) += 1;
            }
            counts
        })
        .collect();
    let mut pods = Vec::new();
    let mut finals = Vec::new();
    for (run, (_, cluster)) in runs {
        let n = created[*cluster]
            .get(&format!("sluice-{run}"))
            .copied()
            .unwrap_or(0);
        if n != 1 {
            pods.push(format!("{run}: {n} Pods"));
        }
        let f = env.seen.finals.get(run).cloned().unwrap_or_default();
        if f.len() != 1 {
            finals.push(format!("{run}: final states {f:?}"));
        }
    }
    push("runs without exactly one Pod create".into(), pods);
    push("runs without exactly one final state".into(), finals);
    failures
}

/// The run requests `SLUICE_RUNS` stored in a scenario against the runs expected, and
/// the Pods the doubles were asked to create in it. One request per run is the rule.
/// More is a failure unless every one of them was taken as a redelivery: no Pod beyond
/// one per expected run. That happens when the stream's leader changes between storing
/// a run request and acknowledging it — the dispatcher publishes it again under the
/// same message id, and the new leader, which had not applied the first copy yet, does
/// not see a duplicate (NATS's deduplication, not Sluice's); the runner then finds
/// the run's Pod or its final state and does nothing twice. That is a note.
pub fn run_requests(
    stored: u64,
    expected: usize,
    new_pods: usize,
) -> Result<Option<String>, String> {
    let expected_u64 = expected as u64;
    if stored == expected_u64 {
        return Ok(None);
    }
    if stored > expected_u64 && new_pods == expected {
        return Ok(Some(format!(
            "{} run request(s) stored twice by NATS across a leader change (one per run expected: {expected}); the runners created no second Pod",
            stored - expected_u64
        )));
    }
    Err(format!(
        "run requests stored: {stored}, expected one per matching pipeline: {expected} ({new_pods} Pods created)"
    ))
}

/// Each stream's last sequence on each node, from its monitoring `/jsz`. `None` for a
/// node that does not answer.
async fn last_seqs(env: &Env) -> Vec<Option<BTreeMap<String, u64>>> {
    let mut out = Vec::new();
    for node in &env.nodes {
        let url = format!("{}/jsz?accounts=true&streams=true", node.monitor());
        let got = async {
            let v: serde_json::Value = env
                .http
                .get(&url)
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let mut seqs = BTreeMap::new();
            for account in v["account_details"].as_array()? {
                for s in account["stream_detail"].as_array().into_iter().flatten() {
                    seqs.insert(
                        s["name"].as_str()?.to_owned(),
                        s["state"]["last_seq"].as_u64()?,
                    );
                }
            }
            Some(seqs)
        }
        .await;
        out.push(got);
    }
    out
}

/// Waits until every node holds every stream with the same last sequence; how long it
/// took, or what still differs.
pub async fn replicas_agree(env: &Env, deadline: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let seqs = last_seqs(env).await;
        let differ = describe_difference(&seqs);
        match differ {
            None => return Ok(start.elapsed()),
            Some(d) if start.elapsed() > deadline => {
                return Err(format!("replicas differ after {deadline:?}: {d}"))
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn describe_difference(seqs: &[Option<BTreeMap<String, u64>>]) -> Option<String> {
    let mut all = Vec::new();
    for (i, s) in seqs.iter().enumerate() {
        match s {
            None => return Some(format!("n{} did not answer /jsz", i + 1)),
            Some(s) => all.push(s),
        }
    }
    let first = all[0];
    if first.len() < subjects::STREAMS.len() {
        return Some(format!("n1 holds only {} streams", first.len()));
    }
    for (i, s) in all.iter().enumerate().skip(1) {
        if *s != first {
            let diff: Vec<String> = first
                .iter()
                .filter(|(k, v)| s.get(*k) != Some(v))
                .map(|(k, v)| format!("{k} n1={v} n{}={:?}", i + 1, s.get(k)))
                .collect();
            return Some(if diff.is_empty() {
                format!("n{} holds other streams", i + 1)
            } else {
                diff.join("; ")
            });
        }
    }
    None
}

/// How long after an ingest stored again it may still refuse: the first request stored
/// on a new leader does not always show the ones stuck on the old leader stranded, and
/// then ingest sheds until its next request a second gets through (ingest's
/// `PROBE_AFTER`) and is acknowledged more than its one-second margin after them.
pub const RECOVERING: Duration = Duration::from_secs(2);

/// Once the fault has struck an ingest (a request sent during it failed) and the ingest
/// has then stored one sent after that (it has a working path to JetStream again),
/// every request sent to it from [`RECOVERING`] later in the fault must be stored too: the requests still
/// waiting on a leader or a connection that is gone say nothing of the new one. `Err`
/// lists, per ingest, the requests sent after that recovery that were not answered 2xx.
pub fn stored_after_recovery(
    answers: &[crate::load::Answer],
    from: Instant,
    to: Instant,
) -> std::result::Result<(), String> {
    let ok = |a: &crate::load::Answer| a.status.is_some_and(|s| (200..300).contains(&s));
    let mut failed: BTreeMap<usize, (usize, String)> = BTreeMap::new();
    let ingests: std::collections::BTreeSet<usize> = answers.iter().map(|a| a.ingest).collect();
    for ingest in ingests {
        let mut during: Vec<&crate::load::Answer> = answers
            .iter()
            .filter(|a| a.ingest == ingest && a.sent >= from && a.sent < to)
            .collect();
        during.sort_by_key(|a| a.sent);
        // Requests sent in the moments before the fault took hold may be stored.
        let Some(struck) = during.iter().find(|a| !ok(a)).map(|a| a.sent) else {
            continue;
        };
        let Some(recovered) = during
            .iter()
            .filter(|a| a.sent > struck && ok(a))
            .map(|a| a.sent + a.took)
            .min()
        else {
            continue;
        };
        for a in during
            .iter()
            .filter(|a| a.sent > recovered + RECOVERING && !ok(a))
        {
            let entry = failed.entry(ingest).or_insert_with(|| (0, String::new()));
            entry.0 += 1;
            if entry.1.is_empty() {
                entry.1 = format!(
                    "{} answered {} {:.1} s after its first 2xx",
                    a.event_id,
                    a.status
                        .map_or_else(|| "nothing".to_owned(), |s| s.to_string()),
                    (a.sent - recovered).as_secs_f64()
                );
            }
        }
    }
    if failed.is_empty() {
        return Ok(());
    }
    Err(failed
        .iter()
        .map(|(i, (n, first))| {
            format!(
                "ingest-{}: {n} request(s) not stored after it stored again (first: {first})",
                i + 1
            )
        })
        .collect::<Vec<_>>()
        .join("; "))
}

/// One `/readyz` poll of an ingest: when it was sent, which ingest, the status.
pub type Poll = (Instant, usize, u16);

/// What ingest's `/readyz` said during a fault against what the same ingest answered
/// webhooks sent within a second of each poll: a poll said ready falsely when none of
/// them was answered 2xx, not ready falsely when all were. Polls with no webhook near
/// them say nothing either way.
#[derive(Debug, Default, PartialEq)]
pub struct Readiness {
    pub polls: usize,
    pub ready: usize,
    pub false_ready: usize,
    pub false_unready: usize,
    /// The longest time one ingest's polls said ready falsely without a true one in
    /// between: from the first such poll to the last, plus the interval each stands for.
    pub longest_false_ready: Duration,
    pub longest_false_unready: Duration,
}

#[derive(Clone, Copy, PartialEq)]
enum Said {
    True,
    FalselyReady,
    FalselyUnready,
    Unknown,
}

/// [`Readiness`] of the polls sent in `[from, to)`, polled every `interval`.
pub fn readiness(
    polls: &[Poll],
    answers: &[crate::load::Answer],
    from: Instant,
    to: Instant,
    interval: Duration,
) -> Readiness {
    let mut r = Readiness::default();
    let mut in_fault: Vec<&Poll> = polls
        .iter()
        .filter(|(at, _, _)| *at >= from && *at < to)
        .collect();
    in_fault.sort_by_key(|(at, ingest, _)| (*ingest, *at));
    r.polls = in_fault.len();
    r.ready = in_fault.iter().filter(|p| p.2 == 200).count();
    // The open streak: its ingest, kind and first poll.
    let mut streak: Option<(usize, Said, Instant)> = None;
    for (at, ingest, status) in in_fault {
        let near: Vec<&crate::load::Answer> = answers
            .iter()
            .filter(|a| {
                a.ingest == *ingest
                    && a.sent + Duration::from_secs(1) >= *at
                    && a.sent <= *at + Duration::from_secs(1)
            })
            .collect();
        let any_ok = near
            .iter()
            .any(|a| a.status.is_some_and(|s| (200..300).contains(&s)));
        let all_ok = near
            .iter()
            .all(|a| a.status.is_some_and(|s| (200..300).contains(&s)));
        let said = match (near.is_empty(), *status == 200) {
            (true, _) => Said::Unknown,
            (false, true) if !any_ok => Said::FalselyReady,
            (false, false) if all_ok => Said::FalselyUnready,
            _ => Said::True,
        };
        match said {
            Said::FalselyReady => r.false_ready += 1,
            Said::FalselyUnready => r.false_unready += 1,
            _ => {}
        }
        if said == Said::Unknown {
            continue;
        }
        streak = match streak {
            Some((i, kind, first)) if i == *ingest && kind == said => Some((i, kind, first)),
            _ => (said != Said::True).then_some((*ingest, said, *at)),
        };
        if let Some((_, kind, first)) = streak {
            let long = *at - first + interval;
            let longest = match kind {
                Said::FalselyReady => &mut r.longest_false_ready,
                _ => &mut r.longest_false_unready,
            };
            *longest = (*longest).max(long);
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{readiness, run_requests, stored_after_recovery, Readiness};
    use crate::load::Answer;

    #[test]
    fn after_an_ingest_stores_again_every_later_request_must_be_stored() {
        let t0 = Instant::now();
        let answer = |ingest: usize, ms: u64, took_ms: u64, status: u16| Answer {
            event_id: format!("e{ingest}-{ms}"),
            ingest,
            sent: t0 + Duration::from_millis(ms),
            took: Duration::from_millis(took_ms),
            status: Some(status),
            error: None,
        };
        let end = t0 + Duration::from_secs(30);
        // Stored before the fault took hold; then stuck on the dead connection and
        // answered 503 at the timeout after the first 2xx on the new one: not
        // counted, they were sent before it.
        let mut answers = vec![
            answer(0, 200, 5, 202),
            answer(0, 1_000, 8_000, 503),
            answer(0, 5_000, 8_000, 503),
            answer(0, 6_500, 10, 202),
            answer(0, 7_000, 10, 202),
            answer(1, 7_000, 10, 202),
        ];
        assert_eq!(stored_after_recovery(&answers, t0, end), Ok(()));
        // Shed within RECOVERING of storing again: allowed.
        answers.push(answer(0, 8_000, 1, 503));
        assert_eq!(stored_after_recovery(&answers, t0, end), Ok(()));
        // Shed later: a failure naming the first one.
        answers.push(answer(0, 9_000, 1, 503));
        answers.push(answer(0, 10_000, 1, 503));
        let err = stored_after_recovery(&answers, t0, end).expect_err("shed after recovery");
        assert!(
            err.starts_with("ingest-1: 2 request(s) not stored after it stored again (first: e0-9000 answered 503 2.5 s after its first 2xx)"),
            "{err}"
        );
        // Never stored during the fault: nothing to say.
        let none = vec![answer(0, 1_000, 8_000, 503), answer(0, 2_000, 8_000, 503)];
        assert_eq!(stored_after_recovery(&none, t0, end), Ok(()));
    }

    #[test]
    fn readiness_counts_false_polls_and_their_longest_streak() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let answer = |ingest: usize, ms: u64, status: u16| Answer {
            event_id: format!("e{ms}"),
            ingest,
            sent: at(ms),
            took: Duration::from_millis(5),
            status: Some(status),
            error: None,
        };
        // Ingest 0 answers 503 from 3 s to 6 s and 2xx otherwise; ingest 1 2xx always.
        let mut answers = Vec::new();
        for ms in (0..10_000).step_by(250) {
            let failing = (3_000..6_000).contains(&ms);
            answers.push(answer(0, ms, if failing { 503 } else { 202 }));
            answers.push(answer(1, ms, 202));
        }
        // Ingest 0 says ready all along but for one poll at 5 s; ingest 1 is not ready
        // at 8 s and 8.5 s.
        let mut polls = Vec::new();
        for ms in (0..10_000).step_by(500) {
            polls.push((at(ms), 0, if ms == 5_000 { 503 } else { 200 }));
            polls.push((
                at(ms),
                1,
                if ms == 8_000 || ms == 8_500 { 503 } else { 200 },
            ));
        }
        let r = readiness(
            &polls,
            &answers,
            at(0),
            at(10_000),
            Duration::from_millis(500),
        );
        assert_eq!(
            r,
            Readiness {
                polls: 40,
                ready: 37,
                // The polls at 4 s and 4.5 s, whose every webhook within 1 s got 503
                // (3.5 s still sees the 2xx at 2.75 s, 5.5 s the one at 6 s).
                false_ready: 2,
                false_unready: 2,
                longest_false_ready: Duration::from_millis(1_000),
                longest_false_unready: Duration::from_millis(1_000),
            }
        );
        // No webhook near a poll: it says nothing.
        let quiet = readiness(&polls, &[], at(0), at(10_000), Duration::from_millis(500));
        assert_eq!((quiet.false_ready, quiet.false_unready), (0, 0));
        assert_eq!(quiet.longest_false_ready, Duration::ZERO);
    }

    #[test]
    fn a_run_request_stored_twice_is_a_note_only_when_no_pod_was_doubled() {
        assert_eq!(run_requests(10, 10, 10), Ok(None));
        let note = run_requests(11, 10, 10)
            .expect("a note")
            .expect("something to say");
        assert!(note.starts_with("1 run request(s) stored twice"), "{note}");
        // A second Pod, or a request missing, is a failure.
        assert!(run_requests(11, 10, 11).is_err());
        assert!(run_requests(9, 10, 9).is_err());
    }
}
