//! Turning a matched pipeline into a run request.

use sluice_core::pipeline::{render_template, Pipeline, Step};
use sluice_core::run::{run_id, RunCache, RunRequest, RunStep};
use sluice_core::Event;
use time::OffsetDateTime;

use crate::matcher::CelEvent;

/// Where runs go when a pipeline names no cluster.
pub const DEFAULT_CLUSTER: &str = "default";

/// Picks the cluster: the first of the list with a live runner; the first of the list
/// when none has one (the run waits there); the default when there is no list. The
/// list is the event's when it names one (a child step's `runtime.cluster`), else the
/// pipeline's.
pub fn cluster(
    pipeline: &Pipeline,
    event: &Event,
    default_cluster: &str,
    alive: impl Fn(&str) -> bool,
) -> String {
    fn pick<'a>(
        mut list: impl Iterator<Item = &'a str> + Clone,
        alive: impl Fn(&str) -> bool,
    ) -> Option<&'a str> {
        list.clone().find(|c| alive(c)).or_else(|| list.next())
    }
    let chosen = if event.clusters.is_empty() {
        pick(pipeline.runtime.cluster.0.iter().map(|c| c.as_str()), alive)
    } else {
        pick(event.clusters.iter().map(String::as_str), alive)
    };
    chosen.unwrap_or(default_cluster).to_owned()
}

/// The run request for `pipeline` started by `event`, on `cluster`.
pub fn plan(pipeline: &Pipeline, event: &Event, cel: &CelEvent<'_>, cluster: String) -> RunRequest {
    let vars = |name: &str| template_value(name, pipeline, event);
    let mut steps = Vec::with_capacity(pipeline.steps.len());
    let mut skipped = Vec::new();
    for step in &pipeline.steps {
        // A step's `when` that cannot be evaluated runs the step: skipping silently
        // is the worse failure, and the error is visible in the run.
        let run = step
            .when
            .as_ref()
            .is_none_or(|w| cel.eval(w).unwrap_or(true));
        if run {
            steps.push(run_step(step));
        } else {
            skipped.push(step.name.to_string());
        }
    }
    let cache = pipeline.cache.as_ref().map(|c| {
        let key_template = c.key.as_deref().unwrap_or("${repo}/${branch}");
        RunCache {
            key: sanitize_key(&render_template(key_template, vars)),
            fallback_key: event.default_branch.as_ref().map(|b| {
                sanitize_key(&render_template(key_template, |v| match v {
                    "branch" => b.clone(),
                    other => template_value(other, pipeline, event),
                }))
            }),
            paths: c.paths.clone(),
        }
    });
    RunRequest {
        run_id: run_id(&event.id, pipeline.name.as_str(), event.attempt),
        pipeline: pipeline.name.to_string(),
        cluster,
        event_id: event.id.clone(),
        repo: event.repo.clone(),
        clone_url: event.clone_url.clone(),
        git_ref: event.git_ref.clone(),
        sha: event.sha.clone(),
        pr: event.pr,
        env: pipeline.env.clone(),
        steps,
        skipped_steps: skipped,
        runtime: pipeline.runtime.clone(),
        timeout_secs: pipeline.timeout.map(|t| t.0.as_secs()),
        cache,
        concurrency_group: pipeline
            .concurrency
            .as_ref()
            .map(|c| render_template(&c.group, vars)),
        // Only the dispatcher starts child runs: a parent named by anyone else's event
        // would relay a child's result to a cluster that never asked.
        parent: (event.provider == sluice_core::Provider::Manual)
            .then(|| event.parent.clone())
            .flatten(),
        attempt: event.attempt,
        created_at: OffsetDateTime::now_utc(),
    }
}

fn run_step(step: &Step) -> RunStep {
    RunStep {
        name: step.name.to_string(),
        image: step.image.clone(),
        commands: step.commands.clone(),
        env: step.env.clone(),
        secrets: step.secrets.clone(),
        resources: step.resources.clone(),
        timeout_secs: step.timeout.map(|t| t.0.as_secs()),
        pipeline: step.pipeline.as_ref().map(ToString::to_string),
        runtime: step.runtime.clone(),
    }
}

/// The value of a `${…}` template variable for this event.
pub fn template_value(name: &str, pipeline: &Pipeline, event: &Event) -> String {
    match name {
        "repo" => event.repo.clone().unwrap_or_default(),
        "pr" => event.pr.map(|n| n.to_string()).unwrap_or_default(),
        "ref" => event.git_ref.clone().unwrap_or_default(),
        "branch" => branch(event).unwrap_or_default(),
        "sha" => event.sha.clone().unwrap_or_default(),
        "pipeline" => pipeline.name.to_string(),
        "kind" => event.kind.clone(),
        _ => String::new(),
    }
}

/// The branch an event is about: a push's branch, or a pull request's head branch when
/// known, else its target.
fn branch(event: &Event) -> Option<String> {
    let r = event.git_ref.as_deref()?;
    if let Some(b) = r.strip_prefix("refs/heads/") {
        return Some(b.to_owned());
    }
    if let Some(t) = r.strip_prefix("refs/tags/") {
        return Some(t.to_owned());
    }
    // refs/pull/7/head, refs/merge-requests/7/head: key the cache by the PR.
    event.pr.map(|n| format!("pr-{n}"))
}

/// Cache keys name volumes: keep them to a safe alphabet.
fn sanitize_key(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}
