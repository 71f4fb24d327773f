//! Every state of a segment's Pod, driven through [`PodRun::decide`] without any API.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use sluice_core::pipeline::Runtime;
use sluice_core::run::{RunRequest, RunState, RunStep};
use time::OffsetDateTime;
use tokio::time::Instant;

use super::{Decision, Effect, Next, Now, PodRun, Seen};
use crate::executor::Outcome;
use crate::kubernetes::watch::{PodState, PodView};

const PENDING: Duration = Duration::from_secs(600);
const POD: &str = "sluice-run-1";

// === fixtures ===

fn step(name: &str, timeout_secs: Option<u64>) -> RunStep {
    RunStep {
        name: name.into(),
        image: None,
        commands: vec!["true".into()],
        env: BTreeMap::new(),
        secrets: Vec::new(),
        resources: None,
        timeout_secs,
        pipeline: None,
        runtime: None,
    }
}

fn request(steps: Vec<RunStep>) -> RunRequest {
    RunRequest {
        run_id: "run-1".into(),
        pipeline: "app-ci".into(),
        cluster: "eu-1".into(),
        event_id: "manual:1".into(),
        repo: Some("acme/app".into()),
        clone_url: Some("https://example.com/acme/app.git".into()),
        git_ref: Some("refs/heads/main".into()),
        sha: None,
        pr: None,
        env: BTreeMap::new(),
        steps,
        skipped_steps: Vec::new(),
        runtime: Runtime::default(),
        timeout_secs: None,
        cache: None,
        concurrency_group: None,
        parent: None,
        attempt: 0,
        created_at: OffsetDateTime::UNIX_EPOCH,
    }
}

/// A clock the tests move by hand.
#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    wall: OffsetDateTime,
}

impl Clock {
    fn new() -> Self {
        Clock {
            start: Instant::now(),
            wall: OffsetDateTime::from_unix_timestamp(1_750_000_000).expect("time"),
        }
    }

    /// `secs` after the Pod was created.
    fn at(&self, secs: u64) -> Now {
        let d = Duration::from_secs(secs);
        Now {
            instant: self.start + d,
            wall: self.wall + d,
        }
    }

    fn instant(&self, secs: u64) -> Instant {
        self.start + Duration::from_secs(secs)
    }

    /// The kubelet's timestamp `secs` after the Pod was created.
    fn stamp(&self, secs: u64) -> Time {
        let t = self.wall + Duration::from_secs(secs);
        Time(k8s_openapi::jiff::Timestamp::from_second(t.unix_timestamp()).expect("timestamp"))
    }
}

/// The clone, then `build` (an init container), then `test` (the Pod's container);
/// `test` may run 60 s at most.
fn three_containers(clock: &Clock) -> PodRun {
    let req = request(vec![step("build", None), step("test", Some(60))]);
    PodRun::new(&req, 0, &req.steps, PENDING, clock.start)
}

/// A Pod status built container by container.
#[derive(Debug, Default)]
struct PodBuilder(PodStatus);

fn pod() -> PodBuilder {
    PodBuilder::default()
}

impl PodBuilder {
    fn init(mut self, name: &str, state: ContainerState) -> Self {
        self.0
            .init_container_statuses
            .get_or_insert_with(Vec::new)
            .push(status(name, state));
        self
    }

    fn main(mut self, name: &str, state: ContainerState) -> Self {
        self.0
            .container_statuses
            .get_or_insert_with(Vec::new)
            .push(status(name, state));
        self
    }

    fn phase(mut self, phase: &str) -> Self {
        self.0.phase = Some(phase.into());
        self
    }

    fn reason(mut self, reason: &str, message: Option<&str>) -> Self {
        self.0.reason = Some(reason.into());
        self.0.message = message.map(str::to_owned);
        self
    }

    fn unschedulable(mut self, message: &str) -> Self {
        self.0.conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some(message.into()),
            ..Default::default()
        }]);
        self
    }

    fn view(self) -> PodView {
        PodView::Present(Arc::new(PodState {
            created: Some(0),
            status: Some(self.0),
        }))
    }
}

fn status(name: &str, state: ContainerState) -> ContainerStatus {
    ContainerStatus {
        name: name.into(),
        state: Some(state),
        ..Default::default()
    }
}

fn waiting(reason: &str, message: Option<&str>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message: message.map(str::to_owned),
        }),
        ..Default::default()
    }
}

fn running(since: Option<Time>) -> ContainerState {
    ContainerState {
        running: Some(ContainerStateRunning { started_at: since }),
        ..Default::default()
    }
}

fn exited(code: i32) -> ContainerState {
    exited_because(code, None)
}

fn exited_because(code: i32, reason: Option<&str>) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: code,
            reason: reason.map(str::to_owned),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn look(run: &mut PodRun, view: &PodView, now: Now) -> Decision {
    run.decide(
        Seen {
            pod: view,
            cancelled: false,
            handed_off: false,
            watch_stopped: false,
        },
        now,
    )
}

fn publish(
    step: Option<&str>,
    state: RunState,
    code: Option<i32>,
    message: Option<&str>,
) -> Effect {
    Effect::Publish {
        step: step.map(str::to_owned),
        state,
        exit_code: code,
        message: message.map(str::to_owned),
    }
}

fn wait(wake_at: Option<Instant>) -> Next {
    Next::Wait { wake_at }
}

fn ends(state: RunState, message: &str) -> Next {
    Next::End(Some(Outcome {
        state,
        message: Some(message.into()),
    }))
}

// === what the run knows ===

#[test]
fn containers_are_the_clone_then_the_steps_with_their_timeouts() {
    let clock = Clock::new();
    let run = three_containers(&clock);
    let shape: Vec<_> = run
        .containers()
        .iter()
        .map(|c| (c.name.as_str(), c.step.as_str(), c.is_step, c.timeout))
        .collect();
    assert_eq!(
        shape,
        [
            ("sluice-clone", "clone", false, None),
            ("build", "build", true, None),
            ("test", "test", true, Some(Duration::from_secs(60))),
        ]
    );
    // A later segment clones again, under its own name; without a source, no clone.
    let req = request(vec![step("after", None)]);
    let later = PodRun::new(&req, 2, &req.steps, PENDING, clock.start);
    assert_eq!(later.containers()[0].step, "clone-2");
    let mut no_source = request(vec![step("only", None)]);
    no_source.clone_url = None;
    let run = PodRun::new(&no_source, 0, &no_source.steps, PENDING, clock.start);
    assert_eq!(run.containers().len(), 1);
    assert!(run.containers()[0].is_step);
}

// === pending, scheduled ===

#[test]
fn a_pod_not_seen_yet_is_waited_for_without_a_timer() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let d = look(&mut run, &PodView::Unknown, clock.at(0));
    assert_eq!(d.effects, []);
    assert_eq!(d.next, wait(None));
    // Even long after: the pending timer counts from what is seen of the Pod.
    let d = look(&mut run, &PodView::Unknown, clock.at(3600));
    assert_eq!(d.next, wait(None));
}

#[test]
fn a_pending_pod_waits_until_the_pending_timeout() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let pending = pod().phase("Pending").view();
    let d = look(&mut run, &pending, clock.at(5));
    assert_eq!(d.effects, []);
    assert_eq!(d.next, wait(Some(clock.instant(600))));
    // Scheduled, the clone's image being pulled: still waiting, same deadline.
    let pulling = pod()
        .phase("Pending")
        .init("sluice-clone", waiting("PodInitializing", None))
        .view();
    let d = look(&mut run, &pulling, clock.at(100));
    assert_eq!(d.effects, []);
    assert_eq!(d.next, wait(Some(clock.instant(600))));
}

#[test]
fn the_pending_timeout_deletes_the_pod_and_names_why_nothing_ran() {
    let clock = Clock::new();
    let cases = [
        (
            pod()
                .phase("Pending")
                .init(
                    "sluice-clone",
                    waiting(
                        "ImagePullBackOff",
                        Some("Back-off pulling image \"nope:1\""),
                    ),
                )
                .main("test", waiting("PodInitializing", None)),
            "ImagePullBackOff: Back-off pulling image \"nope:1\"",
        ),
        (
            pod()
                .phase("Pending")
                .unschedulable("0/3 nodes are available"),
            "Unschedulable: 0/3 nodes are available",
        ),
        (pod().phase("Pending"), "no reason given"),
    ];
    for (builder, why) in cases {
        let mut run = three_containers(&clock);
        let d = look(&mut run, &builder.view(), clock.at(600));
        assert_eq!(d.effects, [Effect::DeletePod, Effect::FinishLogs], "{why}");
        assert_eq!(
            d.next,
            ends(
                RunState::Error,
                &format!("no container started within 600s (pending timeout): {why}")
            )
        );
    }
}

// === the clone and the steps ===

#[test]
fn a_running_clone_is_followed_and_reports_no_state() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let cloning = pod()
        .phase("Pending")
        .init("sluice-clone", running(Some(clock.stamp(1))))
        .view();
    let d = look(&mut run, &cloning, clock.at(2));
    assert_eq!(d.effects, [Effect::FollowLog(0)]);
    // Something runs: no pending timer, and the clone has no timeout.
    assert_eq!(d.next, wait(None));
    // Looking again changes nothing.
    let d = look(&mut run, &cloning, clock.at(3));
    assert_eq!(d.effects, []);
}

#[test]
fn a_failed_clone_is_an_error_of_the_infrastructure_not_a_failed_step() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let failed = pod()
        .phase("Failed")
        .init("sluice-clone", exited(128))
        .view();
    let d = look(&mut run, &failed, clock.at(4));
    assert_eq!(
        d.effects,
        [
            Effect::FollowLog(0),
            Effect::AwaitLog(0),
            Effect::FinishLogs
        ]
    );
    assert_eq!(
        d.next,
        ends(
            RunState::Error,
            "cloning https://example.com/acme/app.git failed: exited with 128"
        )
    );
}

#[test]
fn steps_run_in_order_each_state_once_and_logs_before_final_states() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let cloning = pod()
        .phase("Pending")
        .init("sluice-clone", running(Some(clock.stamp(1))))
        .view();
    assert_eq!(
        look(&mut run, &cloning, clock.at(1)).effects,
        [Effect::FollowLog(0)]
    );

    let building = pod()
        .phase("Pending")
        .init("sluice-clone", exited(0))
        .init("build", running(Some(clock.stamp(5))))
        .main("test", waiting("PodInitializing", None))
        .view();
    let d = look(&mut run, &building, clock.at(5));
    assert_eq!(
        d.effects,
        [
            Effect::AwaitLog(0),
            Effect::FollowLog(1),
            publish(None, RunState::Running, None, None),
            publish(Some("build"), RunState::Running, None, None),
        ]
    );
    assert_eq!(d.next, wait(None));
    // The same Pod seen again (a watch resend, a timer): nothing to do.
    assert_eq!(look(&mut run, &building, clock.at(6)).effects, []);

    let testing = pod()
        .phase("Running")
        .init("sluice-clone", exited(0))
        .init("build", exited(0))
        .main("test", running(Some(clock.stamp(20))))
        .view();
    let d = look(&mut run, &testing, clock.at(30));
    assert_eq!(
        d.effects,
        [
            Effect::AwaitLog(1),
            publish(Some("build"), RunState::Succeeded, Some(0), None),
            Effect::FollowLog(2),
            publish(Some("test"), RunState::Running, None, None),
        ]
    );
    // test started at 20 s and may run 60 s.
    assert_eq!(d.next, wait(Some(clock.instant(80))));

    let done = pod()
        .phase("Succeeded")
        .init("sluice-clone", exited(0))
        .init("build", exited(0))
        .main("test", exited(0))
        .view();
    let d = look(&mut run, &done, clock.at(40));
    assert_eq!(
        d.effects,
        [
            Effect::AwaitLog(2),
            publish(Some("test"), RunState::Succeeded, Some(0), None),
            Effect::FinishLogs,
        ]
    );
    assert_eq!(d.next, Next::End(None));
}

#[test]
fn a_container_that_ran_and_ended_between_two_looks_still_ran() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let built = pod()
        .phase("Pending")
        .init("sluice-clone", exited(0))
        .init("build", exited(0))
        .main("test", waiting("PodInitializing", None))
        .view();
    let d = look(&mut run, &built, clock.at(10));
    assert_eq!(
        d.effects,
        [
            Effect::FollowLog(0),
            Effect::AwaitLog(0),
            Effect::FollowLog(1),
            Effect::AwaitLog(1),
            publish(None, RunState::Running, None, None),
            publish(Some("build"), RunState::Running, None, None),
            publish(Some("build"), RunState::Succeeded, Some(0), None),
        ]
    );
    // Waiting for the next container: the pending timer restarts from its end.
    assert_eq!(d.next, wait(Some(clock.instant(610))));
}

#[test]
fn a_failing_step_fails_the_run_with_its_exit_code() {
    let cases = [
        (exited(2), "exited with 2"),
        (
            exited_because(137, Some("OOMKilled")),
            "exited with 137 (out of memory)",
        ),
    ];
    for (state, message) in cases {
        let clock = Clock::new();
        let mut run = three_containers(&clock);
        let failed = pod()
            .phase("Failed")
            .init("sluice-clone", exited(0))
            .init("build", state)
            .main("test", waiting("PodInitializing", None))
            .view();
        let d = look(&mut run, &failed, clock.at(10));
        let code = if message.contains("137") { 137 } else { 2 };
        assert_eq!(
            d.effects[5..],
            [
                publish(Some("build"), RunState::Running, None, None),
                publish(Some("build"), RunState::Failed, Some(code), Some(message)),
                Effect::FinishLogs,
            ]
        );
        assert_eq!(
            d.next,
            ends(RunState::Failed, &format!("step build: {message}"))
        );
    }
}

#[test]
fn the_main_container_failing_ends_the_run_even_before_the_pod_phase_says_so() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let failed = pod()
        .phase("Running")
        .init("sluice-clone", exited(0))
        .init("build", exited(0))
        .main("test", exited(1))
        .view();
    let d = look(&mut run, &failed, clock.at(10));
    assert_eq!(
        d.effects.last(),
        Some(&Effect::FinishLogs),
        "{:?}",
        d.effects
    );
    assert!(d.effects.contains(&publish(
        Some("test"),
        RunState::Failed,
        Some(1),
        Some("exited with 1")
    )));
    assert_eq!(d.next, ends(RunState::Failed, "step test: exited with 1"));
}

#[test]
fn a_succeeded_pod_ends_only_once_every_container_is_reported() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    // The phase came before the last container's status.
    let early = pod()
        .phase("Succeeded")
        .init("sluice-clone", exited(0))
        .init("build", exited(0))
        .main("test", running(Some(clock.stamp(5))))
        .view();
    let d = look(&mut run, &early, clock.at(6));
    assert!(matches!(d.next, Next::Wait { .. }), "{d:?}");
}

// === timeouts ===

#[test]
fn a_step_over_its_timeout_is_stopped_and_failed() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let testing = pod()
        .phase("Running")
        .init("sluice-clone", exited(0))
        .init("build", exited(0))
        .main("test", running(Some(clock.stamp(10))))
        .view();
    let d = look(&mut run, &testing, clock.at(30));
    assert_eq!(d.next, wait(Some(clock.instant(70))));
    // The timer fires: 60 s after the step started.
    let d = look(&mut run, &testing, clock.at(70));
    assert_eq!(
        d.effects,
        [
            Effect::DeletePod,
            Effect::FinishLogs,
            publish(
                Some("test"),
                RunState::Failed,
                None,
                Some("timed out after 60s")
            ),
        ]
    );
    assert_eq!(
        d.next,
        ends(RunState::Failed, "step test: timed out after 60s")
    );
}

#[test]
fn a_step_adopted_past_its_timeout_is_stopped_at_the_first_look() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let testing = pod()
        .phase("Running")
        .init("sluice-clone", exited(0))
        .init("build", exited(0))
        .main("test", running(Some(clock.stamp(0))))
        .view();
    let d = look(&mut run, &testing, clock.at(61));
    assert_eq!(
        d.next,
        ends(RunState::Failed, "step test: timed out after 60s")
    );
    // Its log is followed and its running state said before it is failed.
    assert!(d.effects.contains(&Effect::FollowLog(2)));
    assert!(d
        .effects
        .contains(&publish(Some("test"), RunState::Running, None, None)));
}

#[test]
fn the_runs_deadline_fails_the_run_not_a_step() {
    let clock = Clock::new();
    // The kubelet killed the running container for activeDeadlineSeconds.
    let mut run = three_containers(&clock);
    let killed = pod()
        .phase("Failed")
        .reason(
            "DeadlineExceeded",
            Some("Pod was active on the node longer than the specified deadline"),
        )
        .init("sluice-clone", exited(0))
        .init("build", exited(137))
        .view();
    let d = look(&mut run, &killed, clock.at(10));
    assert!(d.effects.contains(&publish(
        Some("build"),
        RunState::Failed,
        Some(137),
        Some("the run's timeout was reached")
    )));
    assert_eq!(
        d.next,
        ends(RunState::Failed, "the run's timeout was reached")
    );

    // Or the Pod failed with no container left to report.
    let mut run = three_containers(&clock);
    let killed = pod()
        .phase("Failed")
        .reason("DeadlineExceeded", None)
        .view();
    let d = look(&mut run, &killed, clock.at(10));
    assert_eq!(d.effects, [Effect::FinishLogs]);
    assert_eq!(
        d.next,
        ends(RunState::Failed, "the run's timeout was reached")
    );
}

// === evicted, deleted ===

#[test]
fn an_evicted_pod_is_an_error_with_the_kubelets_reason() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let evicted = pod()
        .phase("Failed")
        .reason("Evicted", Some("The node was low on resource: memory."))
        .init("sluice-clone", exited(0))
        .init("build", running(Some(clock.stamp(1))))
        .view();
    let d = look(&mut run, &evicted, clock.at(5));
    assert_eq!(d.effects.last(), Some(&Effect::FinishLogs));
    assert_eq!(
        d.next,
        ends(
            RunState::Error,
            "Pod sluice-run-1 failed: Evicted: The node was low on resource: memory."
        )
    );
    let mut run = three_containers(&clock);
    let d = look(&mut run, &pod().phase("Failed").view(), clock.at(5));
    assert_eq!(
        d.next,
        ends(RunState::Error, "Pod sluice-run-1 failed: no reason given")
    );
}

#[test]
fn a_pod_deleted_by_someone_else_is_an_error() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let d = look(&mut run, &PodView::Gone, clock.at(5));
    assert_eq!(d.effects, [Effect::FinishLogs]);
    assert_eq!(
        d.next,
        ends(
            RunState::Error,
            &format!("Pod {POD} was deleted before the run finished")
        )
    );
}

// === cancel, hand-off, the watch ===

fn seen(pod: &PodView, cancelled: bool, handed_off: bool, watch_stopped: bool) -> Seen<'_> {
    Seen {
        pod,
        cancelled,
        handed_off,
        watch_stopped,
    }
}

#[test]
fn a_cancel_deletes_the_pod_unless_it_is_gone() {
    let clock = Clock::new();
    let testing = pod()
        .phase("Running")
        .init("sluice-clone", exited(0))
        .init("build", running(Some(clock.stamp(1))))
        .view();
    for view in [testing, PodView::Unknown] {
        let mut run = three_containers(&clock);
        let d = run.decide(seen(&view, true, false, false), clock.at(5));
        assert_eq!(d.effects, [Effect::DeletePod, Effect::FinishLogs]);
        assert_eq!(d.next, ends(RunState::Cancelled, "cancelled"));
    }
    // Deleted by the cancel itself: only the logs to finish.
    let mut run = three_containers(&clock);
    let d = run.decide(seen(&PodView::Gone, true, false, false), clock.at(5));
    assert_eq!(d.effects, [Effect::FinishLogs]);
    assert_eq!(d.next, ends(RunState::Cancelled, "cancelled"));
    // A cancel comes before a hand-off: the Pod must not outlive a cancelled run.
    let mut run = three_containers(&clock);
    let d = run.decide(seen(&PodView::Unknown, true, true, false), clock.at(5));
    assert_eq!(d.next, ends(RunState::Cancelled, "cancelled"));
}

#[test]
fn a_stopping_runner_hands_the_run_back_and_leaves_the_pod() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let building = pod()
        .init("sluice-clone", exited(0))
        .init("build", running(Some(clock.stamp(1))))
        .view();
    look(&mut run, &building, clock.at(2));
    let d = run.decide(seen(&building, false, true, false), clock.at(3));
    assert_eq!(d.effects, [Effect::FinishLogs]);
    assert_eq!(
        d.next,
        ends(RunState::Queued, "handed back: the runner is stopping")
    );
}

#[test]
fn a_stopped_watch_ends_the_run_as_an_error() {
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let d = run.decide(seen(&PodView::Unknown, false, false, true), clock.at(1));
    assert_eq!(d.effects, [Effect::FinishLogs]);
    assert_eq!(d.next, ends(RunState::Error, "the Pod watch stopped"));
}

// === adoption ===

#[test]
fn an_adopted_pod_catches_up_on_everything_it_missed_at_the_first_look() {
    // A restarted runner finds the Pod mid-way: each container's log is followed (the
    // followers resume after the stored lines) and the states already published are
    // published again, which their message ids make harmless.
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let midway = pod()
        .phase("Running")
        .init("sluice-clone", exited(0))
        .init("build", exited(0))
        .main("test", running(Some(clock.stamp(100))))
        .view();
    let d = look(&mut run, &midway, clock.at(120));
    assert_eq!(
        d.effects,
        [
            Effect::FollowLog(0),
            Effect::AwaitLog(0),
            Effect::FollowLog(1),
            Effect::AwaitLog(1),
            publish(None, RunState::Running, None, None),
            publish(Some("build"), RunState::Running, None, None),
            publish(Some("build"), RunState::Succeeded, Some(0), None),
            Effect::FollowLog(2),
            publish(Some("test"), RunState::Running, None, None),
        ]
    );
    assert_eq!(d.next, wait(Some(clock.instant(160))));
}

#[test]
fn a_later_segment_does_not_say_again_that_the_run_started() {
    let clock = Clock::new();
    let req = request(vec![step("after", None)]);
    let mut run = PodRun::new(&req, 1, &req.steps, PENDING, clock.start);
    let running_pod = pod()
        .init("sluice-clone", exited(0))
        .main("after", running(None))
        .view();
    let d = look(&mut run, &running_pod, clock.at(1));
    assert_eq!(
        d.effects,
        [
            Effect::FollowLog(0),
            Effect::AwaitLog(0),
            Effect::FollowLog(1),
            publish(Some("after"), RunState::Running, None, None),
        ]
    );
}

// === every combination ===

/// Every state each of the three containers can be in, under every phase, looked at
/// twice: the second look repeats nothing, a final state always follows its log, a
/// state is published at most once, and a log is followed at most once.
#[test]
fn every_combination_of_container_states_is_decided_consistently() {
    let clock = Clock::new();
    let states = |clock: &Clock| -> Vec<Option<ContainerState>> {
        vec![
            None,
            Some(waiting("ContainerCreating", None)),
            Some(running(Some(clock.stamp(0)))),
            Some(exited(0)),
            Some(exited(1)),
        ]
    };
    let phases = [
        None,
        Some("Pending"),
        Some("Running"),
        Some("Succeeded"),
        Some("Failed"),
    ];
    let names = ["sluice-clone", "build", "test"];
    let all = states(&clock);
    let mut looked = 0;
    for a in &all {
        for b in &all {
            for c in &all {
                for phase in phases {
                    let mut builder = pod();
                    if let Some(p) = phase {
                        builder = builder.phase(p);
                    }
                    for (name, state) in names.iter().zip([a, b, c]) {
                        if let Some(s) = state {
                            builder = if *name == "test" {
                                builder.main(name, s.clone())
                            } else {
                                builder.init(name, s.clone())
                            };
                        }
                    }
                    let view = builder.view();
                    let mut run = three_containers(&clock);
                    let first = look(&mut run, &view, clock.at(1));
                    check(&first.effects);
                    if let Next::Wait { wake_at } = first.next {
                        let again = look(&mut run, &view, clock.at(2));
                        let repeated: Vec<_> = again
                            .effects
                            .iter()
                            .filter(|e| matches!(e, Effect::Publish { .. } | Effect::FollowLog(_)))
                            .collect();
                        assert!(repeated.is_empty(), "{view:?}: {repeated:?}");
                        // A wake-up is in the future: the timers are not busy loops.
                        assert!(wake_at.is_none_or(|w| w > clock.instant(1)), "{view:?}");
                    }
                    looked += 1;
                }
            }
        }
    }
    assert_eq!(looked, 5 * 5 * 5 * 5);
}

fn check(effects: &[Effect]) {
    let mut followed = Vec::new();
    let mut awaited = Vec::new();
    let mut published = Vec::new();
    for e in effects {
        match e {
            Effect::FollowLog(i) => {
                assert!(!followed.contains(i), "{effects:?}");
                followed.push(*i);
            }
            Effect::AwaitLog(i) => {
                assert!(followed.contains(i), "awaited before followed: {effects:?}");
                awaited.push(*i);
            }
            Effect::Publish { step, state, .. } => {
                assert!(!published.contains(&(step, state)), "{effects:?}");
                if let Some(step) = step {
                    let i = ["clone", "build", "test"]
                        .iter()
                        .position(|s| s == step)
                        .expect("known step");
                    if state.is_final() && !effects.contains(&Effect::DeletePod) {
                        assert!(awaited.contains(&i), "final before its log: {effects:?}");
                    }
                }
                published.push((step, state));
            }
            Effect::FinishLogs | Effect::DeletePod => {}
        }
    }
}

#[test]
fn a_finished_containers_log_is_not_followed_again() {
    // Each look at a Pod whose container had ended used to start another follower of
    // that container's log, re-reading it from the start.
    let clock = Clock::new();
    let mut run = three_containers(&clock);
    let built = pod()
        .init("sluice-clone", exited(0))
        .init("build", exited(0))
        .main("test", waiting("PodInitializing", None))
        .view();
    let first = look(&mut run, &built, clock.at(1));
    assert!(first.effects.contains(&Effect::FollowLog(1)));
    for t in 2..5 {
        let again = look(&mut run, &built, clock.at(t));
        assert_eq!(again.effects, [], "look at {t}s");
    }
}
