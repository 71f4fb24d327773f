//! A segment's Pod as a state machine. [`PodRun::decide`] turns what the run knows,
//! what it sees of its Pod and the time into the effects to perform — publish a state,
//! follow a container's log, delete the Pod — and whether the segment is over; the
//! loop in `mod.rs` only performs them. Nothing here calls an API or reads a clock, so
//! every state is tested without a server (`decide/tests.rs`).

use std::time::Duration;

use sluice_core::run::{RunRequest, RunState, RunStep};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::pod;
use super::status::{self, CState};
use super::watch::{PodState, PodView};
use crate::executor::Outcome;

/// One container of the segment, in the order they run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Container {
    pub name: String,
    /// The step its states and log are reported under.
    pub step: String,
    /// The built-in clone is not a step: it reports no state of its own.
    pub is_step: bool,
    pub timeout: Option<Duration>,
}

/// The moment of a look: the runner's own clock for its timers, the wall clock for
/// the start times the kubelet reports.
#[derive(Debug, Clone, Copy)]
pub(super) struct Now {
    pub instant: Instant,
    pub wall: OffsetDateTime,
}

impl Now {
    pub fn current() -> Self {
        Now {
            instant: Instant::now(),
            wall: OffsetDateTime::now_utc(),
        }
    }
}

/// What the run sees at a look.
#[derive(Debug, Clone, Copy)]
pub(super) struct Seen<'a> {
    pub pod: &'a PodView,
    /// The run was cancelled.
    pub cancelled: bool,
    /// The runner is stopping: the run goes back to the queue, its Pod untouched.
    pub handed_off: bool,
    /// The shared Pod watch is gone: nothing more will be seen.
    pub watch_stopped: bool,
}

/// Something to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Effect {
    /// A state of the run (`step: None`) or of a step.
    Publish {
        step: Option<String>,
        state: RunState,
        exit_code: Option<i32>,
        message: Option<String>,
    },
    /// Start shipping container `i`'s log.
    FollowLog(usize),
    /// Wait until container `i`'s log is shipped: a step's output comes before its
    /// final state.
    AwaitLog(usize),
    /// Let every log follower ship what it has read (a bounded wait).
    FinishLogs,
    DeletePod,
}

/// What to do after the effects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Next {
    /// Look again when the Pod, the cancel or the hand-off changes, or at `wake_at`.
    Wait { wake_at: Option<Instant> },
    /// The segment is over: `None` when its Pod succeeded, else how the run ends.
    End(Option<Outcome>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Decision {
    pub effects: Vec<Effect>,
    pub next: Next,
}

/// What the run has done about one container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    following: bool,
    running_reported: bool,
    final_reported: bool,
}

/// What the run knows of its segment's Pod between looks.
#[derive(Debug)]
pub(super) struct PodRun {
    pod: String,
    source: Option<String>,
    containers: Vec<Container>,
    pending_timeout: Duration,
    /// The run's own `running` is published (by this segment or an earlier one).
    started: bool,
    /// Since when no container has run: the pending timeout counts from here.
    waiting_since: Instant,
    progress: Vec<Progress>,
}

impl PodRun {
    /// Segment `segment` of `req`, whose Pod was created (or found) at `now`.
    pub fn new(
        req: &RunRequest,
        segment: usize,
        steps: &[RunStep],
        pending_timeout: Duration,
        now: Instant,
    ) -> Self {
        let containers: Vec<Container> = pod::container_names(req, steps)
            .into_iter()
            .map(|name| {
                let step = steps.iter().find(|s| s.name == name);
                Container {
                    step: match (name.as_str(), segment) {
                        (pod::CLONE_CONTAINER, 0) => "clone".to_owned(),
                        (pod::CLONE_CONTAINER, n) => format!("clone-{n}"),
                        (step, _) => step.to_owned(),
                    },
                    is_step: name != pod::CLONE_CONTAINER,
                    timeout: step.and_then(|s| s.timeout_secs.map(Duration::from_secs)),
                    name,
                }
            })
            .collect();
        PodRun {
            pod: pod::pod_name(&req.run_id, segment),
            source: req.clone_url.clone(),
            progress: vec![Progress::default(); containers.len()],
            containers,
            pending_timeout,
            // Segments run in order and only after the previous one succeeded, which
            // took a step that ran (and so published the run's `running`).
            started: segment > 0,
            waiting_since: now,
        }
    }

    pub fn containers(&self) -> &[Container] {
        &self.containers
    }

    /// The effects of one look, and when to look again.
    pub fn decide(&mut self, seen: Seen<'_>, now: Now) -> Decision {
        let gone = matches!(seen.pod, PodView::Gone);
        if seen.watch_stopped {
            return end(
                vec![Effect::FinishLogs],
                error("the Pod watch stopped".into()),
            );
        }
        if seen.cancelled {
            let mut effects = vec![Effect::FinishLogs];
            if !gone {
                effects.insert(0, Effect::DeletePod);
            }
            return end(effects, cancelled());
        }
        if seen.handed_off {
            // The followers stop too, after shipping what they read: the adopter
            // resumes after the last stored line.
            return end(vec![Effect::FinishLogs], handed_back());
        }
        match seen.pod {
            PodView::Unknown => Decision {
                effects: Vec::new(),
                next: Next::Wait { wake_at: None },
            },
            PodView::Gone => end(
                vec![Effect::FinishLogs],
                error(format!(
                    "Pod {} was deleted before the run finished",
                    self.pod
                )),
            ),
            PodView::Present(pod) => self.look(pod, now),
        }
    }

    fn look(&mut self, pod: &PodState, now: Now) -> Decision {
        let states = status::container_states(pod, self.containers.iter().map(|c| &*c.name));
        let mut effects = Vec::new();
        let mut wake_at = None;
        let mut any_running = false;
        for (i, state) in states.iter().enumerate() {
            if matches!(state, CState::Running { .. } | CState::Terminated { .. })
                && !self.progress[i].following
            {
                self.progress[i].following = true;
                effects.push(Effect::FollowLog(i));
            }
            match state {
                CState::Running { started_at } => {
                    any_running = true;
                    if !self.progress[i].running_reported {
                        self.waiting_since = now.instant;
                        self.report_running(i, &mut effects);
                    }
                    if let Some(limit) = self.containers[i].timeout {
                        let ran = started_at.map(|t| ran(t, now.wall)).unwrap_or_default();
                        if ran >= limit {
                            return self.timed_out(i, limit, effects);
                        }
                        earliest(&mut wake_at, now.instant + (limit - ran));
                    }
                }
                CState::Terminated { code, reason } if !self.progress[i].final_reported => {
                    self.progress[i].final_reported = true;
                    self.waiting_since = now.instant;
                    if let Some(outcome) =
                        self.ended(i, pod, *code, reason.as_deref(), &mut effects)
                    {
                        effects.push(Effect::FinishLogs);
                        return end(effects, outcome);
                    }
                }
                _ => {}
            }
        }
        match status::pod_phase(pod) {
            Some("Succeeded") if self.progress.iter().all(|p| p.final_reported) => {
                effects.push(Effect::FinishLogs);
                return Decision {
                    effects,
                    next: Next::End(None),
                };
            }
            Some("Failed") => {
                effects.push(Effect::FinishLogs);
                let outcome = match status::pod_reason(pod) {
                    Some("DeadlineExceeded") => run_timeout(),
                    _ => error(format!(
                        "Pod {} failed: {}",
                        self.pod,
                        status::pod_message(pod).unwrap_or_else(|| "no reason given".into())
                    )),
                };
                return end(effects, outcome);
            }
            _ => {}
        }
        if !any_running {
            // Waiting for a node, an image, or the next container.
            let limit = self.pending_timeout;
            if now.instant.saturating_duration_since(self.waiting_since) >= limit {
                let why = status::waiting_reason(pod, &states)
                    .unwrap_or_else(|| "no reason given".into());
                effects.extend([Effect::DeletePod, Effect::FinishLogs]);
                return end(
                    effects,
                    error(format!(
                        "no container started within {limit:?} (pending timeout): {why}"
                    )),
                );
            }
            earliest(&mut wake_at, self.waiting_since + limit);
        }
        Decision {
            effects,
            next: Next::Wait { wake_at },
        }
    }

    /// Container `i` is seen running (or ended) for the first time.
    fn report_running(&mut self, i: usize, effects: &mut Vec<Effect>) {
        self.progress[i].running_reported = true;
        if !self.containers[i].is_step {
            return;
        }
        if !self.started {
            self.started = true;
            effects.push(publish(None, RunState::Running, None, None));
        }
        let step = self.containers[i].step.clone();
        effects.push(publish(Some(step), RunState::Running, None, None));
    }

    /// Container `i` ended with `code`: its state, and how the run ends if it failed.
    fn ended(
        &mut self,
        i: usize,
        pod: &PodState,
        code: i32,
        reason: Option<&str>,
        effects: &mut Vec<Effect>,
    ) -> Option<Outcome> {
        effects.push(Effect::AwaitLog(i));
        let ok = code == 0;
        // Killed for the run's activeDeadlineSeconds: the Pod says so.
        let deadline = status::pod_reason(pod) == Some("DeadlineExceeded");
        let message = (!ok).then(|| match reason {
            _ if deadline => "the run's timeout was reached".to_owned(),
            Some("OOMKilled") => format!("exited with {code} (out of memory)"),
            _ => format!("exited with {code}"),
        });
        let container = &self.containers[i];
        let (is_step, step) = (container.is_step, container.step.clone());
        if is_step {
            // Ran and ended between two looks: it still ran.
            if !self.progress[i].running_reported {
                self.report_running(i, effects);
            }
            let state = if ok {
                RunState::Succeeded
            } else {
                RunState::Failed
            };
            effects.push(publish(
                Some(step.clone()),
                state,
                Some(code),
                message.clone(),
            ));
        }
        if ok {
            return None;
        }
        Some(if deadline {
            Outcome {
                state: RunState::Failed,
                message,
            }
        } else if is_step {
            Outcome {
                state: RunState::Failed,
                message: message.map(|m| format!("step {step}: {m}")),
            }
        } else {
            error(format!(
                "cloning {} failed: {}",
                self.source.as_deref().unwrap_or("the source"),
                message.unwrap_or_default()
            ))
        })
    }

    /// Container `i` ran out of time: the Pod goes, the step fails.
    fn timed_out(&self, i: usize, limit: Duration, mut effects: Vec<Effect>) -> Decision {
        let step = self.containers[i].step.clone();
        let message = format!("timed out after {limit:?}");
        effects.extend([
            Effect::DeletePod,
            Effect::FinishLogs,
            publish(
                Some(step.clone()),
                RunState::Failed,
                None,
                Some(message.clone()),
            ),
        ]);
        end(
            effects,
            Outcome {
                state: RunState::Failed,
                message: Some(format!("step {step}: {message}")),
            },
        )
    }
}

fn end(effects: Vec<Effect>, outcome: Outcome) -> Decision {
    Decision {
        effects,
        next: Next::End(Some(outcome)),
    }
}

fn publish(
    step: Option<String>,
    state: RunState,
    exit_code: Option<i32>,
    message: Option<String>,
) -> Effect {
    Effect::Publish {
        step,
        state,
        exit_code,
        message,
    }
}

fn earliest(wake_at: &mut Option<Instant>, at: Instant) {
    *wake_at = Some(wake_at.map_or(at, |w| w.min(at)));
}

/// How long a container that started at `started` has run at `now`.
fn ran(started: k8s_openapi::jiff::Timestamp, now: OffsetDateTime) -> Duration {
    let then = OffsetDateTime::from_unix_timestamp_nanos(started.as_nanosecond()).unwrap_or(now);
    (now - then).try_into().unwrap_or_default()
}

pub(super) fn error(message: String) -> Outcome {
    Outcome {
        state: RunState::Error,
        message: Some(message),
    }
}

pub(super) fn handed_back() -> Outcome {
    Outcome {
        state: RunState::Queued,
        message: Some("handed back: the runner is stopping".into()),
    }
}

fn cancelled() -> Outcome {
    Outcome {
        state: RunState::Cancelled,
        message: Some("cancelled".into()),
    }
}

fn run_timeout() -> Outcome {
    Outcome {
        state: RunState::Failed,
        message: Some("the run's timeout was reached".into()),
    }
}

#[cfg(test)]
mod tests;
