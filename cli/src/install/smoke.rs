//! The smoke run at the end of an install: a Job in the cluster applies a one-step
//! pipeline for the new cluster, starts it with a manual event, follows its log and
//! waits for its result (see `render::smoke`), so it works where the installer's
//! machine cannot reach NATS. The installer waits for the Job, bounded, and reports
//! the result with the Pod's logs, read from the API server.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::api::{Api, ListParams, LogParams};

use super::apply::apply_one;
use super::render::{self, SMOKE_PIPELINE, SMOKE_STEPS};
use super::values::Values;

/// How often the Job is looked at.
const POLL: Duration = Duration::from_secs(1);

/// A new manual event id for one smoke run (so each install's smoke is a new run).
pub fn new_delivery() -> String {
    let mut bytes = [0u8; 4];
    getrandom::fill(&mut bytes).expect("the system's random source");
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "install-smoke-{secs}-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

/// What one smoke run showed: the Job's end, and each step's log.
#[derive(Debug)]
pub struct Outcome {
    pub run_id: String,
    /// Ok when the run succeeded; otherwise why not, and what to do.
    pub result: Result<(), String>,
    /// The run's log as the `logs` step printed it.
    pub log: String,
}

/// Applies the smoke objects, waits for the Job (at most `timeout`) and reads its
/// Pod's logs. Errors are only for an API server that cannot be used; a run that
/// fails or does not finish is an [`Outcome`] with its reason.
pub async fn run(
    client: &kube::Client,
    values: &Values,
    timeout: Duration,
    out: &mut impl Write,
) -> anyhow::Result<Outcome> {
    let delivery = new_delivery();
    let run_id = render::smoke_run_id(&delivery);
    let job = render::smoke_job_name(&delivery);
    let ns = values.namespace.as_str();
    writeln!(
        out,
        "Smoke run: pipeline {SMOKE_PIPELINE} on cluster {} (run {run_id}, Job {job}) …",
        values.cluster
    )?;
    for object in render::smoke(values, &delivery, timeout.as_secs().max(1)) {
        apply_one(client, &object).await?;
        writeln!(out, "  applied    {}", object.id())?;
    }
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = format!("batch.kubernetes.io/job-name={job}");
    let deadline = Instant::now() + timeout;
    let mut shown = String::new();
    let finished = loop {
        let current = jobs
            .get(&job)
            .await
            .with_context(|| format!("cannot read Job {job}"))?;
        let json = serde_json::to_value(&current)?;
        match super::apply::readiness("Job", &json) {
            Ok(None) => break Ok(()),
            Err(why) => break Err(why),
            Ok(Some(_)) => {}
        }
        let pod = newest(&pods, &selector).await;
        let progress = pod
            .as_ref()
            .map_or_else(|| "waiting for its Pod".to_owned(), step_progress);
        if progress != shown {
            writeln!(out, "  waiting    {progress}")?;
            shown = progress;
        }
        if Instant::now() >= deadline {
            let why = pod.as_ref().map(stuck).unwrap_or_default();
            break Err(format!(
                "not finished after {}: {shown}{why}",
                sluice_core::pipeline::HumanDuration(timeout)
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    let pod = newest(&pods, &selector).await;
    let logs = match &pod {
        Some(p) => step_logs(&pods, p).await,
        None => Vec::new(),
    };
    let log_of = |step: &str| {
        logs.iter()
            .find(|(s, _)| s == step)
            .map(|(_, l)| l.clone())
            .unwrap_or_default()
    };
    let result = match finished {
        Ok(()) => Ok(()),
        Err(why) => {
            let failed = pod.as_ref().and_then(failed_step);
            Err(explain(values, &run_id, &job, &why, failed, &log_of))
        }
    };
    Ok(Outcome {
        run_id,
        result,
        log: log_of("logs"),
    })
}

/// The Job's newest Pod.
async fn newest(pods: &Api<Pod>, selector: &str) -> Option<Pod> {
    let list = pods
        .list(&ListParams::default().labels(selector))
        .await
        .ok()?;
    list.items
        .into_iter()
        .max_by_key(|p| p.metadata.creation_timestamp.clone())
}

/// Every step's container status, in the order they run.
fn statuses(pod: &Pod) -> Vec<ContainerStatus> {
    let status = pod.status.clone().unwrap_or_default();
    status
        .init_container_statuses
        .unwrap_or_default()
        .into_iter()
        .chain(status.container_statuses.unwrap_or_default())
        .collect()
}

/// Which step is running (or what the Pod waits for).
fn step_progress(pod: &Pod) -> String {
    for c in statuses(pod) {
        let Some(state) = &c.state else { continue };
        if state.running.is_some() {
            return format!("step {} running", c.name);
        }
        if let Some(w) = &state.waiting {
            return format!(
                "step {} waiting: {}",
                c.name,
                w.reason.as_deref().unwrap_or("")
            );
        }
    }
    format!(
        "Pod {}",
        pod.status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("Pending")
    )
}

/// Why a Pod is stuck: an unschedulable condition, an image that cannot be pulled.
fn stuck(pod: &Pod) -> String {
    let mut reasons = Vec::new();
    let status = pod.status.clone().unwrap_or_default();
    for c in status.conditions.unwrap_or_default() {
        if c.type_ == "PodScheduled" && c.status == "False" {
            reasons.push(format!(
                "{}: {}",
                c.reason.unwrap_or_default(),
                c.message.unwrap_or_default()
            ));
        }
    }
    for c in statuses(pod) {
        if let Some(w) = c.state.and_then(|s| s.waiting) {
            if w.reason.as_deref() != Some("PodInitializing") {
                reasons.push(format!(
                    "step {}: {}: {}",
                    c.name,
                    w.reason.unwrap_or_default(),
                    w.message.unwrap_or_default()
                ));
            }
        }
    }
    if reasons.is_empty() {
        String::new()
    } else {
        format!(" ({})", reasons.join("; "))
    }
}

/// The first step that exited non-zero, and its exit code.
fn failed_step(pod: &Pod) -> Option<(String, i32)> {
    statuses(pod).into_iter().find_map(|c| {
        let t = c.state?.terminated?;
        (t.exit_code != 0).then_some((c.name, t.exit_code))
    })
}

/// Each step's log that can be read (steps that never started have none).
async fn step_logs(pods: &Api<Pod>, pod: &Pod) -> Vec<(String, String)> {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let mut out = Vec::new();
    for step in SMOKE_STEPS {
        let params = LogParams {
            container: Some(step.to_owned()),
            ..LogParams::default()
        };
        if let Ok(text) = pods.logs(&name, &params).await {
            out.push((step.to_owned(), text));
        }
    }
    out
}

/// One line: what failed, its last log line, and what to do.
fn explain(
    values: &Values,
    run_id: &str,
    job: &str,
    why: &str,
    failed: Option<(String, i32)>,
    log_of: &dyn Fn(&str) -> String,
) -> String {
    let ns = &values.namespace;
    let last = |step: &str| {
        log_of(step)
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .map(|l| format!(": {}", l.trim()))
            .unwrap_or_default()
    };
    match failed {
        Some((step, code)) => {
            let what = match step.as_str() {
                "apply" => format!("could not apply the smoke pipeline{}", last("apply")),
                "start" => format!("could not start it with a manual event{}", last("start")),
                "logs" => format!("could not follow the run's log{}", last("logs")),
                _ if code == 3 => format!("run {run_id} was cancelled"),
                _ => format!("run {run_id} did not succeed{}", last("result")),
            };
            format!(
                "the smoke run failed: {what}; see `kubectl -n {ns} logs job/{job} --all-containers`{}",
                if step == "result" {
                    format!(" and, with NATS reachable, `sluice runs get {run_id}`")
                } else {
                    String::new()
                }
            )
        }
        None => format!(
            "the smoke run did not finish: Job {job} {why}; is the runner of cluster {} ready (`kubectl -n {ns} get pods -l sluice.dev/cluster={}`)? See `kubectl -n {ns} describe job/{job}`",
            values.cluster, values.cluster
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(statuses: serde_json::Value) -> Pod {
        serde_json::from_value(json!({ "metadata": { "name": "p" }, "status": statuses }))
            .expect("pod")
    }

    #[test]
    fn a_failed_step_is_named_with_its_last_line_and_a_stuck_pod_with_its_reason() {
        let v = Values::default();
        let failed = pod(json!({
            "phase": "Failed",
            "initContainerStatuses": [
                { "name": "apply", "image": "", "imageID": "", "ready": false, "restartCount": 0,
                  "state": { "terminated": { "exitCode": 0 } } },
                { "name": "start", "image": "", "imageID": "", "ready": false, "restartCount": 0,
                  "state": { "terminated": { "exitCode": 1 } } },
            ],
        }));
        let step = failed_step(&failed);
        assert_eq!(step, Some(("start".to_owned(), 1)));
        let line = explain(&v, "r1", "j", "failed", step, &|s: &str| {
            if s == "start" {
                "Error: JetStream did not store the event\n".to_owned()
            } else {
                String::new()
            }
        });
        assert!(
            line.contains(
                "could not start it with a manual event: Error: JetStream did not store the event"
            ),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
        let pulling = pod(json!({
            "phase": "Pending",
            "initContainerStatuses": [
                { "name": "apply", "image": "", "imageID": "", "ready": false, "restartCount": 0,
                  "state": { "waiting": { "reason": "ImagePullBackOff", "message": "Back-off pulling image" } } },
            ],
        }));
        assert_eq!(
            step_progress(&pulling),
            "step apply waiting: ImagePullBackOff"
        );
        assert!(stuck(&pulling).contains("ImagePullBackOff: Back-off pulling image"));
        let timed_out = explain(
            &v,
            "r1",
            "j",
            "not finished after 5m: step result running",
            None,
            &|_: &str| String::new(),
        );
        assert!(
            timed_out.contains("is the runner of cluster default ready"),
            "{timed_out}"
        );
    }
}
