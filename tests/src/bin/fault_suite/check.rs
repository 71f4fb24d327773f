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

#[cfg(test)]
mod tests {
    use super::run_requests;

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
