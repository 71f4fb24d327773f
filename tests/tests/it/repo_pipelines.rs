//! Repository pipelines through the whole dispatcher: `.sluice/` read from HTTP doubles
//! of the GitHub and GitLab APIs at each event's commit, the trust rule, refusals in
//! the decision and the `sluice/config` status, one read per commit, and a forge down
//! then back — against a real nats-server.

use std::time::Duration;

use secrecy::SecretString;
use sluice_core::pipeline::Glob;
use sluice_core::repo_pipelines::Side;
use sluice_core::run::RunRequest;
use sluice_core::{subjects, Event, Provider};
use sluice_dispatcher::forge::ForgeConfig;
use sluice_dispatcher::repo_pipelines::RepoPipelinesConfig;
use sluice_dispatcher::reporter::ReporterConfig;
use sluice_dispatcher::DispatcherConfig;
use sluice_tests::dispatcher::{
    all_messages, apply, decision, provision, publish_event, run_requests, Dispatcher,
};
use sluice_tests::forge_files::{ForgeFiles, GITHUB_TOKEN, GITLAB_TOKEN};
use sluice_tests::ingest::jetstream;
use sluice_tests::nats::NatsServer;
use sluice_tests::{init_logs, wait_for};

const C1: &str = "1111111111111111111111111111111111111111";
const C2: &str = "2222222222222222222222222222222222222222";
const BASE: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
const HEAD: &str = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";

fn build(command: &str) -> String {
    format!(
        "name: build\ntriggers:\n  - kinds: [push, pull_request]\nsteps:\n  - name: test\n    image: alpine\n    commands: [\"{command}\"]\n"
    )
}

fn config(nats: &NatsServer, forge: &ForgeFiles, repos: &[&str]) -> DispatcherConfig {
    DispatcherConfig {
        forge: ForgeConfig {
            github_token: Some(SecretString::from(GITHUB_TOKEN)),
            github_api_url: forge.github_url(),
            gitlab_token: Some(SecretString::from(GITLAB_TOKEN)),
            gitlab_api_url: forge.gitlab_url(),
            ..ForgeConfig::default()
        },
        repo_pipelines: RepoPipelinesConfig {
            repos: repos
                .iter()
                .map(|g| Glob::parse(g).expect("glob"))
                .collect(),
            ..RepoPipelinesConfig::default()
        },
        ..Dispatcher::config(&nats.url())
    }
}

fn push(id: &str, repo: &str, sha: &str) -> Event {
    let mut e = Event::new(Provider::Github, id, "push");
    e.repo = Some(repo.into());
    e.git_ref = Some("refs/heads/main".into());
    e.sha = Some(sha.into());
    e
}

fn pull_request(id: &str, association: &str, fork: bool) -> Event {
    let mut e = Event::new(Provider::Github, id, "pull_request");
    e.action = Some("opened".into());
    e.repo = Some("acme/app".into());
    e.pr = Some(7);
    e.git_ref = Some("refs/pull/7/head".into());
    e.sha = Some(HEAD.into());
    e.base_ref = Some("refs/heads/main".into());
    e.base_sha = Some(BASE.into());
    e.actor_association = Some(association.into());
    e.from_fork = Some(fork);
    e
}

/// The run requests of one event, waiting until there are `n`.
async fn runs_of(js: &async_nats::jetstream::Context, event_id: &str, n: usize) -> Vec<RunRequest> {
    wait_for(
        &format!("{n} run(s) of {event_id}"),
        Duration::from_secs(20),
        || async {
            let runs: Vec<RunRequest> = run_requests(js)
                .await
                .into_iter()
                .map(|(_, r)| r)
                .filter(|r| r.event_id == event_id)
                .collect();
            (runs.len() >= n).then_some(runs)
        },
    )
    .await
}

async fn decided(
    js: &async_nats::jetstream::Context,
    event_id: &str,
) -> sluice_core::run::Decision {
    wait_for(
        &format!("the decision on {event_id}"),
        Duration::from_secs(20),
        || async { decision(js, event_id).await },
    )
    .await
}

fn commands(r: &RunRequest) -> Vec<String> {
    r.steps.iter().flat_map(|s| s.commands.clone()).collect()
}

#[tokio::test]
async fn each_push_runs_the_definitions_at_its_commit_beside_the_applied_ones() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    // An applied pipeline that also watches the repository: both run.
    apply(
        &js,
        "name: build\ntriggers:\n  - repos: [acme/app]\n    kinds: [push]\nsteps:\n  - {name: s, image: alpine, commands: [applied]}\n",
    )
    .await;
    let forge = ForgeFiles::start().await;
    forge.set("acme/app", C1, &[("build.yaml", &build("echo one"))]);
    forge.set("acme/app", C2, &[("build.yaml", &build("echo two"))]);
    let _d = Dispatcher::start_with(config(&nats, &forge, &["acme/*"])).await;

    publish_event(&js, &push("p1", "acme/app", C1)).await;
    let runs = runs_of(&js, "github:p1", 2).await;
    let mut by_name: Vec<(String, Vec<String>)> = runs
        .iter()
        .map(|r| (r.pipeline.clone(), commands(r)))
        .collect();
    by_name.sort();
    assert_eq!(
        by_name,
        [
            ("acme/app:build".to_owned(), vec!["echo one".to_owned()]),
            ("build".to_owned(), vec!["applied".to_owned()]),
        ]
    );
    let d = decided(&js, "github:p1").await;
    let read = d.repo_pipelines.expect("repository pipelines recorded");
    assert_eq!(read.side, Some(Side::Head));
    assert_eq!(read.git_ref.as_deref(), Some(C1));
    assert_eq!(read.pipelines, ["acme/app:build"]);
    assert!(read.errors.is_empty(), "{:?}", read.errors);

    // The exact requests: the folder at the commit, then the file raw, with the token.
    let received = forge.received();
    let targets: Vec<&str> = received.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        [
            format!("/repos/acme/app/contents/.sluice?ref={C1}"),
            format!("/repos/acme/app/contents/.sluice/build.yaml?ref={C1}"),
        ]
    );
    assert!(received.iter().all(|r| r.authorized));
    assert_eq!(
        received[1].accept.as_deref(),
        Some("application/vnd.github.raw+json")
    );

    // What was read is noted for `sluice pipelines list`.
    let cache = sluice_core::streams::bucket(&js, subjects::REPO_FILES_BUCKET)
        .await
        .expect("bucket");
    let last: sluice_core::repo_pipelines::LastRead = serde_json::from_slice(
        &cache
            .get(subjects::repo_last_read_key("github", "acme/app"))
            .await
            .expect("get")
            .expect("recorded"),
    )
    .expect("json");
    assert_eq!(
        (
            last.repo.as_str(),
            last.git_ref.as_str(),
            last.side,
            &last.pipelines[..],
            last.errors
        ),
        (
            "acme/app",
            C1,
            Side::Head,
            &["acme/app:build".to_owned()][..],
            0
        )
    );

    // A push that changes the step runs the new step at once.
    publish_event(&js, &push("p2", "acme/app", C2)).await;
    let runs = runs_of(&js, "github:p2", 2).await;
    let repo_run = runs
        .iter()
        .find(|r| r.pipeline == "acme/app:build")
        .expect("the repository pipeline ran");
    assert_eq!(commands(repo_run), ["echo two"]);
}

#[tokio::test]
async fn a_repository_not_opted_in_is_never_read() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(
        &js,
        "name: any\ntriggers:\n  - kinds: [push]\nsteps:\n  - {name: s, image: alpine, commands: [x]}\n",
    )
    .await;
    let forge = ForgeFiles::start().await;
    forge.set("other/app", C1, &[("build.yaml", &build("echo one"))]);
    let _d = Dispatcher::start_with(config(&nats, &forge, &["acme/*", "!acme/secret"])).await;
    publish_event(&js, &push("n1", "other/app", C1)).await;
    publish_event(&js, &push("n2", "acme/secret", C1)).await;
    for id in ["github:n1", "github:n2"] {
        let d = decided(&js, id).await;
        assert!(d.repo_pipelines.is_none(), "{id}: {:?}", d.repo_pipelines);
        assert_eq!(
            runs_of(&js, id, 1).await.len(),
            1,
            "only the applied pipeline"
        );
    }
    assert!(forge.received().is_empty(), "{:?}", forge.targets());
}

#[tokio::test]
async fn a_malformed_file_fails_sluice_config_once_and_its_valid_sibling_runs() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let forge = ForgeFiles::start().await;
    let bad = "name: lint\nsteps:\n  - name: s\n    image: alpine\n    timeout: soon\n";
    forge.set(
        "acme/app",
        C1,
        &[("build.yaml", &build("echo one")), ("lint.yaml", bad)],
    );
    let config = DispatcherConfig {
        // Statuses stay queued in SLUICE_REPORTS (sent once an hour): the test reads
        // what the reporter would send.
        reporter: Some(ReporterConfig {
            interval: Duration::from_secs(3600),
            ..ReporterConfig::default()
        }),
        ..config(&nats, &forge, &["acme/app"])
    };
    let _d = Dispatcher::start_with(config).await;
    publish_event(&js, &push("m1", "acme/app", C1)).await;
    let runs = runs_of(&js, "github:m1", 1).await;
    assert_eq!(runs[0].pipeline, "acme/app:build");
    let d = decided(&js, "github:m1").await;
    let read = d.repo_pipelines.expect("recorded");
    assert_eq!(read.pipelines, ["acme/app:build"]);
    assert_eq!(read.errors.len(), 1, "{:?}", read.errors);
    assert!(
        read.errors[0].starts_with(".sluice/lint.yaml:5:") && read.errors[0].contains("soon"),
        "{:?}",
        read.errors
    );

    let reports = sluice_core::streams::bucket(&js, subjects::REPORTS_BUCKET)
        .await
        .expect("reports bucket");
    let statuses: Vec<serde_json::Value> = wait_for(
        "the sluice/config status queued",
        Duration::from_secs(10),
        || async {
            let mut out = Vec::new();
            for (subject, payload) in all_messages(&js, "KV_SLUICE_REPORTS").await {
                if subject.contains("config-") {
                    out.push(serde_json::from_slice(&payload).expect("json"));
                }
            }
            (!out.is_empty()).then_some(out)
        },
    )
    .await;
    drop(reports);
    assert_eq!(statuses.len(), 1, "exactly one: {statuses:?}");
    let s = &statuses[0];
    assert_eq!(s["pipeline"], "config");
    assert_eq!(s["state"], "failed");
    assert_eq!(s["sha"], C1);
    assert_eq!(s["repo"], "acme/app");
    assert_eq!(s["link_path"], "/events/github:m1");
    let description = s["description"].as_str().expect("description");
    assert!(
        description.starts_with(".sluice/lint.yaml:5:"),
        "{description}"
    );
}

#[tokio::test]
async fn a_fork_or_a_stranger_runs_the_base_definitions_and_a_member_its_proposal() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let forge = ForgeFiles::start().await;
    forge.set("acme/app", BASE, &[("build.yaml", &build("make test"))]);
    // The proposal rewrites the pipeline to print a Secret.
    let leak = "name: build\ntriggers:\n  - kinds: [pull_request]\nsteps:\n  - name: test\n    image: alpine\n    secrets: [deploy-token]\n    commands: [\"cat /var/run/secrets/deploy-token/*\"]\n";
    forge.set("acme/app", HEAD, &[("build.yaml", leak)]);
    let _d = Dispatcher::start_with(config(&nats, &forge, &["acme/app"])).await;

    for (id, association, fork) in [
        ("f1", "MEMBER", true),
        ("f2", "CONTRIBUTOR", false),
        ("f3", "NONE", false),
    ] {
        publish_event(&js, &pull_request(id, association, fork)).await;
        let event_id = format!("github:{id}");
        let runs = runs_of(&js, &event_id, 1).await;
        assert_eq!(commands(&runs[0]), ["make test"], "{id}");
        assert!(runs[0].steps[0].secrets.is_empty(), "{id}");
        // The head is still what is built.
        assert_eq!(runs[0].sha.as_deref(), Some(HEAD), "{id}");
        let read = decided(&js, &event_id)
            .await
            .repo_pipelines
            .expect("recorded");
        assert_eq!(read.side, Some(Side::Base), "{id}");
        assert_eq!(read.git_ref.as_deref(), Some(BASE), "{id}");
    }
    let targets = forge.targets();
    assert!(
        targets.iter().all(|t| !t.contains(HEAD)),
        "the proposal is never even read: {targets:?}"
    );

    publish_event(&js, &pull_request("f4", "MEMBER", false)).await;
    let runs = runs_of(&js, "github:f4", 1).await;
    assert_eq!(runs[0].steps[0].secrets, ["deploy-token"]);
    let read = decided(&js, "github:f4")
        .await
        .repo_pipelines
        .expect("recorded");
    assert_eq!(
        (read.side, read.git_ref.as_deref()),
        (Some(Side::Head), Some(HEAD))
    );
}

#[tokio::test]
async fn a_burst_of_events_for_one_commit_reads_the_forge_once() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let forge = ForgeFiles::start().await;
    forge.set(
        "group/app",
        C1,
        &[
            ("build.yaml", &build("echo one")),
            ("lint.yml", &build("x").replace("name: build", "name: lint")),
        ],
    );
    let _d = Dispatcher::start_with(config(&nats, &forge, &["group/**"])).await;
    for i in 0..50 {
        let mut e = Event::new(Provider::Gitlab, &format!("b{i}"), "push");
        e.repo = Some("group/app".into());
        e.sha = Some(C1.into());
        e.git_ref = Some("refs/heads/main".into());
        publish_event(&js, &e).await;
    }
    wait_for("100 runs", Duration::from_secs(30), || async {
        (run_requests(&js).await.len() >= 100).then_some(())
    })
    .await;
    let received = forge.received();
    let targets: Vec<&str> = received.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        [
            format!(
                "/api/v4/projects/group%2Fapp/repository/tree?path=.sluice&ref={C1}&per_page=100"
            ),
            format!(
                "/api/v4/projects/group%2Fapp/repository/files/.sluice%2Fbuild.yaml/raw?ref={C1}"
            ),
            format!(
                "/api/v4/projects/group%2Fapp/repository/files/.sluice%2Flint.yml/raw?ref={C1}"
            ),
        ],
        "one set of reads for 50 events"
    );
    assert!(received.iter().all(|r| r.authorized));
}

#[tokio::test]
async fn a_forge_down_then_back_loses_nothing_and_one_that_stays_down_dead_letters() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let forge = ForgeFiles::start().await;
    forge.set("acme/app", C1, &[("build.yaml", &build("echo one"))]);
    forge.set_down(true);
    let config = DispatcherConfig {
        max_attempts: 3,
        ..config(&nats, &forge, &["acme/app"])
    };
    let _d = Dispatcher::start_with(config).await;
    publish_event(&js, &push("down1", "acme/app", C1)).await;
    wait_for(
        "a read tried while down",
        Duration::from_secs(20),
        || async { (!forge.received().is_empty()).then_some(()) },
    )
    .await;
    forge.set_down(false);
    let runs = runs_of(&js, "github:down1", 1).await;
    assert_eq!(runs[0].pipeline, "acme/app:build");

    // Down for good: after its attempts the event is dead-lettered with the reason.
    forge.set_down(true);
    publish_event(&js, &push("down2", "acme/app", C2)).await;
    let dead = wait_for(
        "the event dead-lettered",
        Duration::from_secs(40),
        || async {
            all_messages(&js, subjects::DEADLETTER_STREAM)
                .await
                .into_iter()
                .map(|(_, p)| String::from_utf8_lossy(&p).into_owned())
                .find(|p| p.contains("down2"))
        },
    )
    .await;
    assert!(dead.contains("acme/app"), "{dead}");
    assert!(
        dead.contains("503"),
        "the reason names what the forge said: {dead}"
    );
    assert!(!dead.contains(GITHUB_TOKEN), "no token in the reason");
    assert!(
        run_requests(&js)
            .await
            .iter()
            .all(|(_, r)| r.event_id != "github:down2"),
        "nothing planned for it"
    );
}

#[tokio::test]
async fn ok_to_test_from_a_member_runs_the_proposal_once_per_commit_and_from_a_stranger_nothing() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let forge = ForgeFiles::start().await;
    forge.set("acme/app", BASE, &[("build.yaml", &build("make test"))]);
    forge.set("acme/app", HEAD, &[("build.yaml", &build("make proposed"))]);
    forge.set_pull("acme/app", 7, HEAD, "stranger/app", BASE);
    let _d = Dispatcher::start_with(config(&nats, &forge, &["acme/app"])).await;
    let comment = |id: &str, association: &str| {
        let mut e = Event::new(Provider::Github, id, "comment");
        e.action = Some("created".into());
        e.repo = Some("acme/app".into());
        e.pr = Some(7);
        e.actor = Some("reviewer".into());
        e.actor_association = Some(association.into());
        e.comment = Some("/ok-to-test".into());
        e
    };

    // A stranger's approval: nothing read, nothing run, the decision says why.
    publish_event(&js, &comment("k1", "NONE")).await;
    let read = decided(&js, "github:k1")
        .await
        .repo_pipelines
        .expect("recorded");
    assert_eq!(read.side, None);
    assert!(read.reason.contains("reviewer is none"), "{}", read.reason);
    assert!(forge.received().is_empty(), "{:?}", forge.targets());

    // A member's: the head is looked up and its proposal runs, as a synchronize of it.
    publish_event(&js, &comment("k2", "MEMBER")).await;
    let runs = runs_of(&js, "github:k2", 1).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].pipeline, "acme/app:build");
    assert_eq!(commands(&runs[0]), ["make proposed"]);
    assert_eq!(runs[0].sha.as_deref(), Some(HEAD));
    assert_eq!(runs[0].git_ref.as_deref(), Some("refs/pull/7/head"));
    let read = decided(&js, "github:k2")
        .await
        .repo_pipelines
        .expect("recorded");
    assert_eq!(
        (read.side, read.git_ref.as_deref()),
        (Some(Side::Head), Some(HEAD))
    );
    assert!(
        read.reason.contains("/ok-to-test approved pull request #7"),
        "{}",
        read.reason
    );
    assert_eq!(forge.targets()[0], "/repos/acme/app/pulls/7");

    // A second approval of the same commit stores no second run.
    publish_event(&js, &comment("k3", "OWNER")).await;
    let d = decided(&js, "github:k3").await;
    assert_eq!(d.runs.len(), 1);
    assert_eq!(d.runs[0].outcome, "duplicate");
    assert_eq!(d.runs[0].run_id, runs[0].run_id);
    let stored = run_requests(&js)
        .await
        .into_iter()
        .filter(|(_, r)| r.pipeline == "acme/app:build")
        .count();
    assert_eq!(stored, 1);

    // A rerun of the approved run is refused before anything is stored: approving
    // again is what runs a head again.
    let refused = sluice_core::bus::rerun(
        &js,
        "github:k2",
        "acme/app:build",
        time::OffsetDateTime::now_utc(),
    )
    .await
    .expect("answered");
    let sluice_core::run::RerunAnswer::Refused { reason } = refused else {
        panic!("a rerun of an approval started");
    };
    assert!(
        reason.contains("comment /ok-to-test on the pull request again"),
        "{reason}"
    );

    // The same comment naming the pipeline without the pin a rerun carries (stored by
    // hand, or by a CLI from before reruns of repository pipelines): nothing runs — the
    // pull request's head may have moved past what was approved.
    forge.set_pull("acme/app", 7, C2, "stranger/app", BASE);
    forge.set("acme/app", C2, &[("build.yaml", &build("make unapproved"))]);
    let mut named = comment("k4", "MEMBER");
    named.pipeline = Some("acme/app:build".into());
    publish_event(&js, &named).await;
    let d = decided(&js, "github:k4").await;
    assert!(d.runs.is_empty(), "{:?}", d.runs);
    let read = d.repo_pipelines.expect("recorded");
    assert_eq!(read.side, None);
    assert!(read.reason.contains("only by a rerun"), "{}", read.reason);
    assert!(
        run_requests(&js)
            .await
            .iter()
            .all(|(_, r)| !commands(r).contains(&"make unapproved".to_owned())),
        "the unapproved head never ran"
    );
}

/// A GitLab merge request of `group/app` from the project itself, opened by user
/// `user_id`: GitLab's hook carries no association, and names no target commit.
fn merge_request(id: &str, user_id: u64) -> Event {
    let mut e = Event::new(Provider::Gitlab, id, "pull_request");
    e.action = Some("opened".into());
    e.repo = Some("group/app".into());
    e.pr = Some(3);
    e.git_ref = Some("refs/merge-requests/3/head".into());
    e.sha = Some(HEAD.into());
    e.base_ref = Some("refs/heads/main".into());
    e.actor = Some(format!("user{user_id}"));
    e.actor_id = Some(user_id);
    e.from_fork = Some(false);
    e
}

const DEVELOPER: u64 = 11;
const STRANGER: u64 = 12;

fn gitlab_files(git_ref: &str) -> [String; 2] {
    let r = git_ref.replace('/', "%2F");
    [
        format!("/api/v4/projects/group%2Fapp/repository/tree?path=.sluice&ref={r}&per_page=100"),
        format!("/api/v4/projects/group%2Fapp/repository/files/.sluice%2Fbuild.yaml/raw?ref={r}"),
    ]
}

fn member_of_group_app(user_id: u64) -> String {
    format!("/api/v4/projects/group%2Fapp/members/all/{user_id}")
}

#[tokio::test]
async fn a_gitlab_developer_runs_the_proposal_and_a_non_member_the_target_branchs() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let forge = ForgeFiles::start().await;
    forge.set(
        "group/app",
        "refs/heads/main",
        &[("build.yaml", &build("make test"))],
    );
    forge.set(
        "group/app",
        HEAD,
        &[("build.yaml", &build("make proposed"))],
    );
    forge.set_member("group/app", DEVELOPER, 30);
    let _d = Dispatcher::start_with(config(&nats, &forge, &["group/app"])).await;

    // A Developer's merge request: the members API says so, and the proposal runs.
    publish_event(&js, &merge_request("g1", DEVELOPER)).await;
    let runs = runs_of(&js, "gitlab:g1", 1).await;
    assert_eq!(commands(&runs[0]), ["make proposed"]);
    let read = decided(&js, "gitlab:g1")
        .await
        .repo_pipelines
        .expect("recorded");
    assert_eq!(
        (read.side, read.git_ref.as_deref()),
        (Some(Side::Head), Some(HEAD))
    );
    assert!(
        read.reason.contains("the author is member"),
        "{}",
        read.reason
    );
    let received = forge.received();
    let targets: Vec<&str> = received.iter().map(|r| r.target.as_str()).collect();
    let mut want = vec![member_of_group_app(DEVELOPER)];
    want.extend(gitlab_files(HEAD));
    assert_eq!(targets, want);
    assert!(received.iter().all(|r| r.authorized));

    // A non-member (a 404): the target branch's definitions, the proposal unread.
    forge.clear();
    publish_event(&js, &merge_request("g2", STRANGER)).await;
    let runs = runs_of(&js, "gitlab:g2", 1).await;
    assert_eq!(commands(&runs[0]), ["make test"]);
    assert_eq!(
        runs[0].sha.as_deref(),
        Some(HEAD),
        "the head is still built"
    );
    let read = decided(&js, "gitlab:g2")
        .await
        .repo_pipelines
        .expect("recorded");
    assert_eq!(
        (read.side, read.git_ref.as_deref()),
        (Some(Side::Base), Some("refs/heads/main"))
    );
    assert!(
        read.reason.contains("the author is none"),
        "{}",
        read.reason
    );
    let mut want = vec![member_of_group_app(STRANGER)];
    want.extend(gitlab_files("refs/heads/main"));
    assert_eq!(forge.targets(), want);

    // The Developer again within five minutes: the membership is remembered and the
    // commit's files are cached, so the forge is not asked at all.
    forge.clear();
    let mut again = merge_request("g3", DEVELOPER);
    again.action = Some("synchronize".into());
    publish_event(&js, &again).await;
    let runs = runs_of(&js, "gitlab:g3", 1).await;
    assert_eq!(commands(&runs[0]), ["make proposed"]);
    assert!(forge.targets().is_empty(), "{:?}", forge.targets());
}

#[tokio::test]
async fn a_gitlab_comment_command_runs_for_a_member_and_not_for_a_stranger() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(
        &js,
        "name: retest\ntriggers:\n  - kinds: [comment]\n    command: /retest\nsteps:\n  - {name: s, image: alpine, commands: [make test]}\n",
    )
    .await;
    let forge = ForgeFiles::start().await;
    forge.set_member("group/app", DEVELOPER, 40);
    // No repository opts in: the look-up is for the applied pipeline's command.
    let _d = Dispatcher::start_with(config(&nats, &forge, &[])).await;
    let comment = |id: &str, user_id: u64| {
        let mut e = Event::new(Provider::Gitlab, id, "comment");
        e.action = Some("created".into());
        e.repo = Some("group/app".into());
        e.pr = Some(3);
        e.sha = Some(HEAD.into());
        e.git_ref = Some("refs/merge-requests/3/head".into());
        e.actor = Some(format!("user{user_id}"));
        e.actor_id = Some(user_id);
        e.comment = Some("/retest".into());
        e
    };

    publish_event(&js, &comment("r1", DEVELOPER)).await;
    let runs = runs_of(&js, "gitlab:r1", 1).await;
    assert_eq!(runs[0].pipeline, "retest");
    assert_eq!(forge.targets(), [member_of_group_app(DEVELOPER)]);

    forge.clear();
    publish_event(&js, &comment("r2", STRANGER)).await;
    let d = decided(&js, "gitlab:r2").await;
    assert!(d.runs.is_empty(), "{:?}", d.runs);
    let verdict = &d.pipelines[0].triggers[0];
    assert_eq!(verdict.failed.as_deref(), Some("command_authors"));
    assert!(verdict.detail.contains("NONE"), "{}", verdict.detail);
    assert_eq!(forge.targets(), [member_of_group_app(STRANGER)]);

    // The member's second command within five minutes asks nothing.
    forge.clear();
    publish_event(&js, &comment("r3", DEVELOPER)).await;
    runs_of(&js, "gitlab:r3", 1).await;
    assert!(forge.targets().is_empty(), "{:?}", forge.targets());
}

#[tokio::test]
async fn a_gitlab_members_ok_to_test_runs_the_proposal_at_the_notes_head_without_a_look_up() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let forge = ForgeFiles::start().await;
    forge.set(
        "group/app",
        HEAD,
        &[("build.yaml", &build("make proposed"))],
    );
    forge.set_member("group/app", DEVELOPER, 50);
    let _d = Dispatcher::start_with(config(&nats, &forge, &["group/app"])).await;
    // A note on a merge request from a fork: it names the head (`last_commit`).
    let comment = |id: &str, user_id: u64| {
        let mut e = Event::new(Provider::Gitlab, id, "comment");
        e.action = Some("created".into());
        e.repo = Some("group/app".into());
        e.pr = Some(3);
        e.sha = Some(HEAD.into());
        e.git_ref = Some("refs/merge-requests/3/head".into());
        e.base_ref = Some("refs/heads/main".into());
        e.from_fork = Some(true);
        e.actor = Some(format!("user{user_id}"));
        e.actor_id = Some(user_id);
        e.comment = Some("/ok-to-test".into());
        e
    };

    publish_event(&js, &comment("k1", STRANGER)).await;
    let read = decided(&js, "gitlab:k1")
        .await
        .repo_pipelines
        .expect("recorded");
    assert_eq!(read.side, None);
    assert!(read.reason.contains("user12 is none"), "{}", read.reason);
    assert_eq!(forge.targets(), [member_of_group_app(STRANGER)]);

    forge.clear();
    publish_event(&js, &comment("k2", DEVELOPER)).await;
    let runs = runs_of(&js, "gitlab:k2", 1).await;
    assert_eq!(commands(&runs[0]), ["make proposed"]);
    assert_eq!(runs[0].sha.as_deref(), Some(HEAD));
    assert_eq!(
        runs[0].git_ref.as_deref(),
        Some("refs/merge-requests/3/head")
    );
    // The membership and the files at the note's head; no merge request look-up.
    let mut want = vec![member_of_group_app(DEVELOPER)];
    want.extend(gitlab_files(HEAD));
    assert_eq!(forge.targets(), want);
}

#[tokio::test]
async fn a_forge_that_refuses_for_good_reads_nothing_and_the_applied_pipelines_still_run() {
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    apply(
        &js,
        "name: applied\ntriggers:\n  - repos: [acme/app]\n    kinds: [push]\nsteps:\n  - {name: s, image: alpine, commands: [x]}\n",
    )
    .await;
    let forge = ForgeFiles::start().await;
    forge.set("acme/app", C1, &[("build.yaml", &build("echo one"))]);
    // No GitHub credentials at all: asking again cannot help.
    let mut config = config(&nats, &forge, &["acme/app"]);
    config.forge.github_token = None;
    let _d = Dispatcher::start_with(config).await;
    publish_event(&js, &push("nc1", "acme/app", C1)).await;
    let runs = runs_of(&js, "github:nc1", 1).await;
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].pipeline, "applied");
    let read = decided(&js, "github:nc1")
        .await
        .repo_pipelines
        .expect("recorded");
    assert_eq!(read.side, None);
    assert!(
        read.reason.starts_with("not read: ") && read.reason.contains("SLUICE_GITHUB_TOKEN"),
        "says which setting to fix: {}",
        read.reason
    );
    assert!(
        all_messages(&js, subjects::DEADLETTER_STREAM)
            .await
            .is_empty(),
        "not dead-lettered"
    );
    assert!(forge.received().is_empty(), "{:?}", forge.targets());
}

/// The state a runner would store for a run of `pipeline`, so it can be rerun.
fn ran(run: &RunRequest) -> sluice_core::run::StatusUpdate {
    sluice_core::run::StatusUpdate {
        run_id: run.run_id.clone(),
        pipeline: run.pipeline.clone(),
        state: sluice_core::run::RunState::Succeeded,
        step: None,
        at: time::OffsetDateTime::now_utc(),
        cluster: Some(run.cluster.clone()),
        event_id: Some(run.event_id.clone()),
        concurrency_group: None,
        exit_code: Some(0),
        message: None,
        runner: Some("runner-1".into()),
        repo: run.repo.clone(),
        sha: run.sha.clone(),
        parent: None,
    }
}

#[tokio::test]
async fn a_rerun_of_a_repository_pipeline_runs_what_its_run_read_and_refuses_clearly_otherwise() {
    use sluice_core::bus;
    use sluice_core::run::{RerunAnswer, RerunRequest};
    init_logs();
    let nats = NatsServer::start().await;
    let js = jetstream(&nats.url()).await;
    provision(&js).await;
    let forge = ForgeFiles::start().await;
    forge.set("acme/app", C1, &[("build.yaml", &build("echo one"))]);
    let _d = Dispatcher::start_with(config(&nats, &forge, &["acme/*"])).await;

    publish_event(&js, &push("r1", "acme/app", C1)).await;
    let first = runs_of(&js, "github:r1", 1).await.remove(0);
    assert_eq!(first.pipeline, "acme/app:build");
    decided(&js, "github:r1").await;
    let status = ran(&first);
    bus::publish_json(&js, status.subject(), &status.message_id(), &status)
        .await
        .expect("state");
    let reads = forge.received().len();

    // Asked of the dispatcher, as the dashboard does.
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let ask = |run_id: String| {
        let client = client.clone();
        async move {
            let request = RerunRequest {
                run_id,
                by: "token".into(),
            };
            bus::request_rerun(&client, &request, Duration::from_secs(10))
                .await
                .expect("an answer")
        }
    };
    let RerunAnswer::Started { run_id: second } = ask(first.run_id.clone()).await else {
        panic!("the rerun was refused");
    };
    let rerun = wait_for("the rerun's request", Duration::from_secs(20), || async {
        run_requests(&js)
            .await
            .into_iter()
            .map(|(_, r)| r)
            .find(|r| r.run_id == second)
    })
    .await;
    assert_eq!(
        (
            rerun.pipeline.as_str(),
            commands(&rerun),
            rerun.sha.as_deref()
        ),
        ("acme/app:build", vec!["echo one".to_owned()], Some(C1))
    );
    let read = decided(&js, &rerun.event_id)
        .await
        .repo_pipelines
        .expect("recorded");
    assert_eq!(
        (read.side, read.git_ref.as_deref()),
        (Some(Side::Head), Some(C1))
    );
    assert!(read.reason.contains("a rerun reads"), "{}", read.reason);
    assert_eq!(
        forge.received().len(),
        reads,
        "the commit's files were read once, for the first run"
    );

    // A rerun of the rerun, stored directly as `sluice runs rerun` does.
    let status = ran(&rerun);
    bus::publish_json(&js, status.subject(), &status.message_id(), &status)
        .await
        .expect("state");
    let RerunAnswer::Started { run_id: third } =
        bus::rerun(&js, &rerun.event_id, &rerun.pipeline, status.at)
            .await
            .expect("stored")
    else {
        panic!("the rerun of a rerun was refused");
    };
    let third = wait_for(
        "the third run's request",
        Duration::from_secs(20),
        || async {
            run_requests(&js)
                .await
                .into_iter()
                .map(|(_, r)| r)
                .find(|r| r.run_id == third)
        },
    )
    .await;
    assert_eq!(commands(&third), ["echo one"]);
    let read = decided(&js, &third.event_id)
        .await
        .repo_pipelines
        .expect("recorded");
    assert_eq!(
        (read.side, read.git_ref.as_deref()),
        (Some(Side::Head), Some(C1))
    );
    assert!(read.reason.contains("a rerun reads"), "{}", read.reason);

    // Without the first run's decision, where its definitions came from is unknown:
    // refused before anything is stored.
    let decisions = js
        .get_stream(subjects::DECISIONS_STREAM)
        .await
        .expect("stream");
    decisions
        .purge()
        .filter(subjects::decision("github:r1"))
        .await
        .expect("purge");
    let events = sluice_tests::dispatcher::count(&js, subjects::EVENTS_STREAM).await;
    let RerunAnswer::Refused { reason } = ask(first.run_id.clone()).await else {
        panic!("a rerun without its decision started");
    };
    assert!(
        reason.contains("decision on event github:r1 is no longer stored"),
        "{reason}"
    );
    assert_eq!(
        sluice_tests::dispatcher::count(&js, subjects::EVENTS_STREAM).await,
        events,
        "nothing stored"
    );
}
