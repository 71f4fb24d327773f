//! Reading a Pod's status: each container's state, why nothing runs, when it ended.

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

use super::watch::PodState;

/// A container as the runner sees it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum CState {
    NotStarted,
    Waiting {
        reason: Option<String>,
        message: Option<String>,
    },
    Running {
        started_at: Option<k8s_openapi::jiff::Timestamp>,
    },
    Terminated {
        code: i32,
        reason: Option<String>,
    },
}

pub(super) fn pod_phase(pod: &PodState) -> Option<&str> {
    pod.status.as_ref()?.phase.as_deref()
}

/// The Pod's own reason (`DeadlineExceeded`, `Evicted`), if it gives one.
pub(super) fn pod_reason(pod: &PodState) -> Option<&str> {
    pod.status.as_ref()?.reason.as_deref()
}

/// The Pod's reason and message, as one line.
pub(super) fn pod_message(pod: &PodState) -> Option<String> {
    let status = pod.status.as_ref()?;
    match (&status.reason, &status.message) {
        (Some(r), Some(m)) => Some(format!("{r}: {m}")),
        (Some(r), None) => Some(r.clone()),
        (None, Some(m)) => Some(m.clone()),
        (None, None) => None,
    }
}

/// The states of `names`, from the Pod's init and regular container statuses.
pub(super) fn container_states<'a>(
    pod: &PodState,
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<CState> {
    let status = pod.status.as_ref();
    let all: Vec<&ContainerStatus> = status
        .into_iter()
        .flat_map(|s| {
            s.init_container_statuses
                .iter()
                .flatten()
                .chain(s.container_statuses.iter().flatten())
        })
        .collect();
    names
        .into_iter()
        .map(|name| {
            let Some(state) = all
                .iter()
                .find(|c| c.name == name)
                .and_then(|c| c.state.as_ref())
            else {
                return CState::NotStarted;
            };
            if let Some(t) = &state.terminated {
                CState::Terminated {
                    code: t.exit_code,
                    reason: t.reason.clone(),
                }
            } else if let Some(r) = &state.running {
                CState::Running {
                    started_at: r.started_at.as_ref().map(|t| t.0),
                }
            } else if let Some(w) = &state.waiting {
                CState::Waiting {
                    reason: w.reason.clone(),
                    message: w.message.clone(),
                }
            } else {
                CState::NotStarted
            }
        })
        .collect()
}

/// When container `name` ended, as its status says (whole seconds).
pub(super) fn finished_at(pod: &PodState, name: &str) -> Option<time::OffsetDateTime> {
    let status = pod.status.as_ref()?;
    let c = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find(|c| c.name == name)?;
    let at = c
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .finished_at
        .as_ref()?
        .0;
    time::OffsetDateTime::from_unix_timestamp_nanos(at.as_nanosecond()).ok()
}

/// Whether a log stream that ended cleanly at `stream_end` ended before its container
/// did (`finished`): an API server or proxy dropping it, not the kubelet closing it at
/// the exit. `finished` has whole seconds; more than a second between the two cannot
/// be that rounding.
pub(super) fn ended_before_the_container(
    stream_end: time::OffsetDateTime,
    finished: Option<time::OffsetDateTime>,
) -> bool {
    finished.is_some_and(|f| f - stream_end > time::Duration::seconds(1))
}

/// Whether container `name` has ended.
pub(super) fn terminated(pod: &PodState, name: &str) -> bool {
    matches!(
        container_states(pod, [name]).first(),
        Some(CState::Terminated { .. })
    )
}

/// Why nothing runs: a container's waiting reason (image pull), else the scheduler's.
pub(super) fn waiting_reason(pod: &PodState, states: &[CState]) -> Option<String> {
    for s in states {
        if let CState::Waiting {
            reason: Some(r),
            message,
        } = s
        {
            if r != "PodInitializing" {
                return Some(match message {
                    Some(m) => format!("{r}: {m}"),
                    None => r.clone(),
                });
            }
        }
    }
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
        .map(|c| {
            format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or("Unschedulable"),
                c.message.as_deref().unwrap_or("not scheduled")
            )
        })
}

/// When the Pod's last container finished, in Unix seconds.
pub(super) fn last_finish(pod: &Pod) -> Option<i64> {
    let status = pod.status.as_ref()?;
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0.as_second())
        .max()
}
