//! The `sluice` binary as users run it: pipelines and events commands against a real
//! nats-server, with the messages, positions and exit codes they rely on.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use sluice_core::{Event, Provider};
use sluice_tests::dispatcher::{decision, pipeline_names, provision, publish_event, Dispatcher};
use sluice_tests::ingest::jetstream;
use sluice_tests::nats::NatsServer;
use sluice_tests::{init_logs, wait_for};

fn sluice(nats_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env("SLUICE_NATS_URL", nats_url)
        .env("NO_COLOR", "1")
        .output()
        .expect("run sluice")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write");
    path.display().to_string()
}

const GOOD: &str = "name: app-ci\ntriggers:\n  - repos: [acme/app]\n    kinds: [push]\nsteps:\n  - name: test\n    image: alpine\n    commands: [make test]\n";

#[test]
fn validate_reports_file_line_column_and_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tmp");
    let cases = [
        (
            "unknown.yaml",
            "name: a\nsteps:\n  - name: s\n    image: alpine\n    comands: [x]\n",
            ":5:5: ",
            "unknown field `comands`",
        ),
        (
            "glob.yaml",
            "name: a\ntriggers:\n  - branches: [\"rel[ease\"]\nsteps:\n  - {name: s, image: i}\n",
            ":3:17: ",
            "bad glob `rel[ease`",
        ),
        (
            "cel.yaml",
            "name: a\ntriggers:\n  - when: \"event.kind ==\"\nsteps:\n  - {name: s, image: i}\n",
            ":3:12: ",
            "bad CEL",
        ),
        (
            "image.yaml",
            "name: a\nsteps:\n  - name: s\n    commands: [make]\n",
            ":3:3: ",
            "step `s` has no image",
        ),
    ];
    for (file, body, position, message) in cases {
        let path = write(dir.path(), file, body);
        let out = sluice(
            "nats://127.0.0.1:1",
            &["pipelines", "validate", "-f", &path],
        );
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(
            stderr.contains(&format!("{path}{position}")),
            "{file}: {stderr}"
        );
        assert!(stderr.contains(message), "{file}: {stderr}");
        // Validate applies nothing, so it does not say it applied nothing.
        assert!(
            stderr.contains("Error: 1 problem found\n"),
            "{file}: {stderr}"
        );
        assert!(!stderr.contains("applied"), "{file}: {stderr}");
        // Apply refuses the whole file, before it connects.
        let out = sluice("nats://127.0.0.1:1", &["pipelines", "apply", "-f", &path]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{file}: {stderr}");
        assert!(
            stderr.contains("Error: 1 problem found: nothing was applied"),
            "{file}: {stderr}"
        );
        assert!(!stderr.contains("cannot reach NATS"), "{file}: {stderr}");
    }
    let good = write(dir.path(), "good.yaml", GOOD);
    let out = sluice(
        "nats://127.0.0.1:1",
        &["pipelines", "validate", "-f", &good],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "pipeline/app-ci is valid\n");

    // A document that is a list of pipelines: each one is valid on its own line.
    let items: String = GOOD
        .replace("app-ci", "lint")
        .lines()
        .chain(GOOD.lines())
        .map(|l| match l.starts_with("name:") {
            true => format!("- {l}\n"),
            false => format!("  {l}\n"),
        })
        .collect();
    let list = write(dir.path(), "list.yaml", &items);
    let out = sluice(
        "nats://127.0.0.1:1",
        &["pipelines", "validate", "-f", &list],
    );
    assert!(out.status.success(), "{items}{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "pipeline/lint is valid\npipeline/app-ci is valid\n"
    );
}

#[test]
fn validate_checks_a_checkouts_sluice_folder_file_by_file() {
    let checkout = tempfile::tempdir().expect("tmp");
    let folder = checkout.path().join(".sluice");
    std::fs::create_dir(&folder).expect("mkdir");
    write(&folder, "app.yaml", GOOD);
    write(
        &folder,
        "lint.yml",
        "name: lint\nsteps:\n  - name: s\n    image: alpine\n    timeout: soon\n",
    );
    write(
        &folder,
        "big.yaml",
        &format!("{GOOD}# {}\n", "x".repeat(40_000)),
    );
    // Not pipeline files: ignored.
    write(&folder, "README.md", "# pipelines");
    std::fs::create_dir(folder.join("nested")).expect("mkdir");
    write(&folder.join("nested"), "x.yaml", "not: [valid");

    for dir in [checkout.path().to_owned(), folder.clone()] {
        let out = sluice(
            "nats://127.0.0.1:1",
            &["pipelines", "validate", &dir.display().to_string()],
        );
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        // The valid file still counts, as the dispatcher would run it.
        assert_eq!(stdout, "pipeline/app-ci is valid\n");
        assert!(stderr.contains("error: .sluice/lint.yml:5:"), "{stderr}");
        assert!(stderr.contains("bad duration `soon`"), "{stderr}");
        assert!(
            stderr.contains("error: .sluice/big.yaml: the file is")
                && stderr.contains("--repo-pipelines-max-file-bytes"),
            "{stderr}"
        );
        assert!(!stderr.contains("nested"), "{stderr}");
        assert!(stderr.contains("2 problems found"), "{stderr}");
    }
    std::fs::remove_file(folder.join("lint.yml")).expect("rm");
    std::fs::remove_file(folder.join("big.yaml")).expect("rm");
    let out = sluice(
        "nats://127.0.0.1:1",
        &[
            "pipelines",
            "validate",
            &checkout.path().display().to_string(),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    let empty = tempfile::tempdir().expect("tmp");
    let out = sluice(
        "nats://127.0.0.1:1",
        &["pipelines", "validate", &empty.path().display().to_string()],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no .sluice/ folder in"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test]
async fn streams_apply_on_a_small_server_says_how_to_fit() {
    init_logs();
    // 1 GiB of JetStream storage: the 5 GiB the logs stream reserves by default does
    // not fit, as on a machine with little disk free.
    let nats = NatsServer::start_with_storage("1G").await;
    let out = sluice(&nats.url(), &["streams", "apply"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("stream SLUICE_LOGS"), "{err}");
    assert!(
        err.contains("cannot reserve its limit of 5120 MiB"),
        "{err}"
    );
    assert!(err.contains("max_file_store"), "{err}");
    assert!(
        err.contains("run `sluice streams apply --logs-max-bytes 1073741824`"),
        "{err}"
    );
    // What it suggests is enough.
    let out = sluice(
        &nats.url(),
        &["streams", "apply", "--logs-max-bytes", "268435456"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[tokio::test]
async fn apply_is_all_or_nothing_and_the_registry_round_trips() {
    init_logs();
    let nats = NatsServer::start().await;
    let url = nats.url();
    let js = jetstream(&url).await;
    let dir = tempfile::tempdir().expect("tmp");
    let folder = dir.path().display().to_string();

    // Before the operator has provisioned anything, the error says what to run.
    write(dir.path(), "a-good.yaml", GOOD);
    let out = sluice(&url, &["pipelines", "apply", "-f", &folder]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("run `sluice streams apply`"),
        "{}",
        text(&out.stderr)
    );
    // The dry run shows what would be created and creates nothing.
    let out = sluice(
        &url,
        &["streams", "apply", "--dry-run", "--clusters", "eu-1:60s"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let plan = text(&out.stdout);
    assert!(plan.contains("+ create stream SLUICE_EVENTS"), "{plan}");
    assert!(plan.contains("+ create bucket SLUICE_PIPELINES"), "{plan}");
    assert!(
        plan.contains("+ create consumer sluice-runner-eu-1"),
        "{plan}"
    );
    assert!(
        js.get_stream("SLUICE_EVENTS").await.is_err(),
        "a dry run creates nothing"
    );
    let out = sluice(&url, &["streams", "apply", "--clusters", "eu-1:60s"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Applied."),
        "{}",
        text(&out.stdout)
    );
    let out = sluice(
        &url,
        &["streams", "apply", "--clusters", "eu-1:60s", "--dry-run"],
    );
    assert!(
        text(&out.stdout).contains("Nothing to change."),
        "a second apply converges: {}",
        text(&out.stdout)
    );
    let out = sluice(
        &url,
        &[
            "streams",
            "apply",
            "--dry-run",
            "--replicas",
            "1",
            "--dedup-window",
            "96h",
        ],
    );
    assert!(
        text(&out.stdout).contains("duplicate_window: 259200s -> 345600s"),
        "the difference, field by field: {}",
        text(&out.stdout)
    );

    write(dir.path(), "b-bad.yaml", "name: broken\nsteps: []\n");
    let out = sluice(&url, &["pipelines", "apply", "-f", &folder]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("b-bad.yaml"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        pipeline_names(&js).await.is_empty(),
        "the good file was not stored either"
    );

    std::fs::remove_file(dir.path().join("b-bad.yaml")).expect("rm");
    let out = sluice(&url, &["pipelines", "apply", "-f", &folder]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "pipeline/app-ci created\n");
    let out = sluice(&url, &["pipelines", "apply", "-f", &folder]);
    assert_eq!(text(&out.stdout), "pipeline/app-ci unchanged\n");
    assert_eq!(pipeline_names(&js).await, ["app-ci"]);

    let out = sluice(&url, &["pipelines", "list"]);
    let listing = text(&out.stdout);
    assert!(listing.starts_with("NAME"), "{listing}");
    assert!(
        listing.lines().nth(1).unwrap_or("").starts_with("app-ci"),
        "{listing}"
    );

    let out = sluice(&url, &["pipelines", "get", "app-ci", "-o", "json"]);
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(got["steps"][0]["commands"][0], "make test");
    let out = sluice(&url, &["pipelines", "get", "app-ci"]);
    let yaml = text(&out.stdout);
    assert!(yaml.contains("name: app-ci"), "{yaml}");

    let out = sluice(&url, &["pipelines", "delete", "app-ci"]);
    assert!(out.status.success());
    let out = sluice(&url, &["pipelines", "get", "app-ci"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no pipeline named \"app-ci\""),
        "{}",
        text(&out.stderr)
    );
}

/// `sluice pipelines list` adds what the dispatchers last read from repositories'
/// `.sluice/` (the `last.` records of SLUICE_REPO_FILES, never its cached listings), and
/// on an install from before repository pipelines (no bucket) shows the applied ones alone.
#[tokio::test]
async fn pipelines_list_shows_the_repository_pipelines_read_in_the_last_hour() {
    use sluice_core::repo_pipelines::{LastRead, Side};
    use sluice_core::subjects::{repo_files_key, repo_last_read_key, REPO_FILES_BUCKET};
    init_logs();
    let nats = NatsServer::start().await;
    let url = nats.url();
    let js = jetstream(&url).await;
    let bucket_config = |name: &str| {
        sluice_core::streams::StreamSettings::default()
            .buckets()
            .into_iter()
            .find(|b| b.bucket == name)
            .expect("a bucket of the install")
    };
    // An older install: the pipelines bucket and no SLUICE_REPO_FILES.
    js.create_key_value(bucket_config(sluice_core::subjects::PIPELINES_BUCKET))
        .await
        .expect("pipelines bucket");
    let dir = tempfile::tempdir().expect("tmp");
    let file = write(dir.path(), "app.yaml", GOOD);
    let out = sluice(&url, &["pipelines", "apply", "-f", &file]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let applied = "NAME    TRIGGERS  STEPS  CLUSTER    REVISION\n\
                   app-ci  1         1      (default)  1\n";
    let out = sluice(&url, &["pipelines", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), applied);
    assert_eq!(text(&out.stderr), "");

    js.create_key_value(bucket_config(REPO_FILES_BUCKET))
        .await
        .expect("repository files bucket");
    let kv = sluice_core::streams::bucket(&js, REPO_FILES_BUCKET)
        .await
        .expect("bucket");
    let sha = "9f1c2b3a4d5e6f708192a3b4c5d6e7f809112233";
    let put = |key: String, record: LastRead| {
        let kv = kv.clone();
        async move {
            kv.put(key, serde_json::to_vec(&record).expect("json").into())
                .await
                .expect("put");
        }
    };
    let pushed = LastRead {
        provider: Provider::Github,
        repo: "acme/app".into(),
        side: Side::Head,
        git_ref: sha.into(),
        event_id: "github:d-7".into(),
        pipelines: vec!["acme/app:build".into(), "acme/app:lint".into()],
        errors: 0,
        read_at: time::macros::datetime!(2026-12-03 11:40:00 UTC),
    };
    put(repo_last_read_key("github", "acme/app"), pushed.clone()).await;
    put(
        repo_last_read_key("gitlab", "group/svc"),
        LastRead {
            provider: Provider::Gitlab,
            repo: "group/svc".into(),
            side: Side::Base,
            git_ref: "refs/heads/main".into(),
            event_id: "gitlab:e-2".into(),
            pipelines: Vec::new(),
            errors: 2,
            read_at: time::macros::datetime!(2026-12-03 11:55:30 UTC),
        },
    )
    .await;
    // A commit's cached listing shares the bucket: even a value that would parse is not
    // a read record.
    put(
        repo_files_key("github", "acme/ghost", sha),
        LastRead {
            repo: "acme/ghost".into(),
            ..pushed
        },
    )
    .await;

    let out = sluice(&url, &["pipelines", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "{applied}\n\
             Repository pipelines (read in the last hour):\n\
             REPOSITORY PIPELINE  REPOSITORY  DEFINITIONS  COMMIT           READ\n\
             acme/app:build       acme/app    head         9f1c2b3a4d5e     2026-12-03T11:40:00Z\n\
             acme/app:lint        acme/app    head         9f1c2b3a4d5e     2026-12-03T11:40:00Z\n\
             (none)               group/svc   base         refs/heads/main  2026-12-03T11:55:30Z\n\
             group/svc: 2 file(s) or pipeline(s) refused; `sluice events why gitlab:e-2` lists them\n"
        )
    );
    assert_eq!(text(&out.stderr), "");
    // Scripts keep their shape: a bare list of the applied pipelines.
    let out = sluice(&url, &["pipelines", "list", "-o", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    assert_eq!(list[0]["name"], "app-ci");
}

#[tokio::test]
async fn events_why_shows_which_repository_definitions_ran_and_what_was_refused() {
    init_logs();
    let nats = NatsServer::start().await;
    let url = nats.url();
    let js = jetstream(&url).await;
    provision(&js).await;
    let decision = |id: &str, repo_pipelines: serde_json::Value| {
        serde_json::json!({
            "event_id": id, "provider": "github", "kind": "pull_request", "action": "opened",
            "repo": "acme/app", "ref": "refs/pull/7/head", "sha": "e".repeat(40), "pr": 7,
            "decided_at": "2026-12-03T12:00:00Z", "pipelines": [], "not_considered": 0,
            "runs": [], "repo_pipelines": repo_pipelines
        })
    };
    let base = decision(
        "github:rp-1",
        serde_json::json!({
            "side": "base", "git_ref": "b".repeat(40),
            "reason": "the pull request comes from a fork: its target branch's definitions run",
            "pipelines": ["acme/app:build"],
            "errors": [".sluice/lint.yaml:5:14: bad duration `soon`"]
        }),
    );
    let unread = decision(
        "github:rp-2",
        serde_json::json!({"reason": "reviewer is none: only an owner, member or collaborator's /ok-to-test runs a pull request's proposed definitions"}),
    );
    for d in [&base, &unread] {
        let subject = sluice_core::subjects::decision(d["event_id"].as_str().expect("id"));
        js.publish(subject, serde_json::to_vec(d).expect("json").into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }
    let out = sluice(&url, &["events", "why", "github:rp-1"]);
    let why = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let b = "b".repeat(40);
    assert!(
        why.contains(&format!(
            "repository pipelines: the target branch's .sluice/ at {b}\n  why: the pull request comes from a fork: its target branch's definitions run\n  read: acme/app:build\n  refused: .sluice/lint.yaml:5:14: bad duration `soon`\n"
        )),
        "{why}"
    );
    let out = sluice(&url, &["events", "why", "github:rp-2"]);
    let why = text(&out.stdout);
    assert!(
        why.contains("repository pipelines: not read: reviewer is none: only an owner"),
        "{why}"
    );
}

#[tokio::test]
async fn events_why_explains_each_pipeline() {
    init_logs();
    let nats = NatsServer::start().await;
    let url = nats.url();
    let js = jetstream(&url).await;
    provision(&js).await;
    let dir = tempfile::tempdir().expect("tmp");
    let file = write(
        dir.path(),
        "p.yaml",
        "name: on-main\ntriggers:\n  - repos: [acme/app]\n    branches: [main]\nsteps:\n  - {name: s, image: i}\n---\nname: on-tags\ntriggers:\n  - repos: [acme/app]\n    tags: [\"v*\"]\nsteps:\n  - {name: s, image: i}\n---\nname: elsewhere\ntriggers:\n  - repos: [acme/other]\nsteps:\n  - {name: s, image: i}\n",
    );
    assert!(sluice(&url, &["pipelines", "apply", "-f", &file])
        .status
        .success());
    let _dispatcher = Dispatcher::start(&url).await;

    let mut e = Event::new(Provider::Github, "why-1", "push");
    e.repo = Some("acme/app".into());
    e.git_ref = Some("refs/heads/main".into());
    publish_event(&js, &e).await;
    wait_for("the decision", Duration::from_secs(20), || {
        decision(&js, "github:why-1")
    })
    .await;

    let out = sluice(&url, &["events", "why", "github:why-1"]);
    let why = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(why.contains("on-main  run "), "{why}");
    assert!(why.contains("✓ on-main"), "{why}");
    assert!(why.contains("✗ on-tags"), "{why}");
    assert!(
        why.contains("trigger 1: tags: event is on branch main, trigger wants tags"),
        "{why}"
    );
    assert!(
        why.contains("(1 others do not watch this repository)"),
        "{why}"
    );

    let out = sluice(
        &url,
        &["events", "why", "github:why-1", "--pipeline", "elsewhere"],
    );
    assert!(
        text(&out.stdout).contains("pipeline elsewhere was not considered"),
        "{}",
        text(&out.stdout)
    );

    let out = sluice(&url, &["events", "why", "github:nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no decision recorded for github:nope"));

    let out = sluice(&url, &["events", "list"]);
    let list = text(&out.stdout);
    assert!(
        list.contains("github:why-1") && list.contains("acme/app"),
        "{list}"
    );

    // A manual event naming a pipeline starts it, whatever its triggers.
    let out = sluice(
        &url,
        &[
            "events",
            "publish",
            "--pipeline",
            "elsewhere",
            "--id",
            "m-1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "manual:m-1\n");
    let d = wait_for("the manual decision", Duration::from_secs(20), || {
        decision(&js, "manual:m-1")
    })
    .await;
    assert_eq!(d.runs.len(), 1);
    assert_eq!(d.runs[0].pipeline, "elsewhere");
}

#[test]
fn unreachable_nats_is_named_in_the_error() {
    let out = sluice("nats://127.0.0.1:1", &["pipelines", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("cannot reach NATS at nats://127.0.0.1:1"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn an_error_is_told_with_its_causes_and_no_backtrace_even_under_rust_backtrace() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["pipelines", "list"])
        .env("SLUICE_NATS_URL", "nats://127.0.0.1:1")
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run sluice");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("Error: cannot reach NATS at nats://127.0.0.1:1"),
        "{stderr}"
    );
    assert!(stderr.contains("Caused by:\n    0: "), "{stderr}");
    assert!(!stderr.contains("backtrace"), "{stderr}");
    assert!(!stderr.contains("main.rs"), "{stderr}");
}

#[tokio::test]
async fn runs_commands_show_states_logs_and_exit_codes() {
    use sluice_tests::runner::{git_repo, publish_run, run_request, step, Runner};
    init_logs();
    let nats = NatsServer::start().await;
    let url = nats.url();
    let js = jetstream(&url).await;
    provision(&js).await;
    let (repo, sha) = git_repo();
    let _runner = Runner::start(&url, "eu-1", "cli-runner").await;
    publish_run(
        &js,
        &run_request(
            "cli-ok",
            "eu-1",
            repo.path(),
            &sha,
            vec![step("hello", &["echo hi there"])],
        ),
    )
    .await;
    publish_run(
        &js,
        &run_request(
            "cli-bad",
            "eu-1",
            repo.path(),
            &sha,
            vec![step("boom", &["exit 7"])],
        ),
    )
    .await;

    // `get --wait` blocks until the end and says how it went in its exit code.
    let url2 = url.clone();
    let ok =
        tokio::task::spawn_blocking(move || sluice(&url2, &["runs", "get", "cli-ok", "--wait"]))
            .await
            .expect("join");
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok.stderr));
    let shown = text(&ok.stdout);
    assert!(
        shown.contains("state     succeeded")
            && shown.contains("hello")
            && shown.contains("runner cli-runner"),
        "{shown}"
    );
    let url3 = url.clone();
    let bad = tokio::task::spawn_blocking(move || {
        sluice(&url3, &["runs", "get", "cli-bad", "--wait", "-o", "json"])
    })
    .await
    .expect("join");
    assert_eq!(bad.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&bad.stdout).expect("json");
    assert_eq!(json["state"], "failed");
    assert_eq!(json["steps"][0]["exit_code"], 7);

    let logs = sluice(&url, &["runs", "logs", "cli-ok", "--step", "hello"]);
    assert_eq!(text(&logs.stdout), "hi there\n");
    let list = text(&sluice(&url, &["runs", "list", "--state", "failed"]).stdout);
    assert!(
        list.contains("cli-bad") && !list.contains("cli-ok"),
        "{list}"
    );
    let missing = sluice(&url, &["runs", "get", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("no run nope"));
}

// Multi-threaded: the `sluice` processes are waited for with blocking calls while the
// in-process runner must keep running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_backlog_per_cluster_and_live_runners() {
    use sluice_tests::runner::{git_repo, publish_run, run_request, step};
    init_logs();
    let nats = NatsServer::start().await;
    let url = nats.url();
    let js = jetstream(&url).await;
    provision(&js).await;
    let (repo, sha) = git_repo();
    // A cluster with a backlog and no runner yet: the consumer exists once a runner
    // has joined, so start one, stop it, then queue work.
    let runner = sluice_tests::runner::Runner::start(&url, "eu-9", "status-runner").await;
    wait_for(
        "the runner's heartbeat",
        Duration::from_secs(20),
        || async {
            let out = sluice(&url, &["status", "-o", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["runners"]
                .as_array()?
                .iter()
                .any(|r| r["runner"] == "status-runner"))
            .then_some(())
        },
    )
    .await;
    runner.stop().await;
    for i in 0..3 {
        publish_run(
            &js,
            &run_request(
                &format!("q-{i}"),
                "eu-9",
                repo.path(),
                &sha,
                vec![step("s", &["true"])],
            ),
        )
        .await;
    }
    let out = sluice(&url, &["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let consumer = v["consumers"]
        .as_array()
        .expect("consumers")
        .iter()
        .find(|c| c["name"] == "sluice-runner-eu-9")
        .expect("the cluster's consumer group");
    // A pull the stopped runner left open on the server may still take one: it is then
    // in progress (waiting out its ack wait), not pending. Either way, the backlog.
    let backlog = consumer["pending"].as_u64().expect("pending")
        + consumer["in_progress"].as_u64().expect("in progress");
    assert_eq!(backlog, 3, "{consumer}");
    let table = text(&sluice(&url, &["status"]).stdout);
    assert!(
        table.contains("SLUICE_EVENTS") && table.contains("BACKLOG"),
        "{table}"
    );
}

const AGAIN: &str = "name: again\ntriggers:\n  - repos: [acme/app]\n    kinds: [push]\nruntime: { cluster: eu-1 }\nsteps:\n  - name: hello\n    image: alpine\n    commands: [\"echo run $SLUICE_RUN_ID\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_rerun_starts_the_pipeline_again_for_the_same_event() {
    use sluice_core::run::{run_id, RunState};
    use sluice_tests::dispatcher::apply;
    use sluice_tests::runner::{final_state, git_repo, log_lines};

    init_logs();
    let nats = NatsServer::start().await;
    let url = nats.url();
    let js = jetstream(&url).await;
    provision(&js).await;
    apply(&js, AGAIN).await;
    let (repo, sha) = git_repo();
    let _dispatcher = Dispatcher::start(&url).await;
    let _runner = sluice_tests::runner::Runner::start(&url, "eu-1", "rerun-runner").await;
    let mut event = Event::new(Provider::Manual, "first-push", "push");
    event.repo = Some("acme/app".into());
    event.clone_url = Some(repo.path().display().to_string());
    event.git_ref = Some("refs/heads/main".into());
    event.sha = Some(sha);
    publish_event(&js, &event).await;
    let first = run_id("manual:first-push", "again", 0);
    let done = wait_for("the first run", Duration::from_secs(30), || {
        final_state(&js, &first)
    })
    .await;
    assert_eq!(done.state, RunState::Succeeded);

    let url2 = url.clone();
    let first2 = first.clone();
    let out =
        tokio::task::spawn_blocking(move || sluice(&url2, &["runs", "rerun", &first2, "--wait"]))
            .await
            .expect("join");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let second = stdout.lines().next().unwrap_or_default().trim().to_owned();
    assert_eq!(second.len(), 20, "the new run id comes first: {stdout}");
    assert_ne!(second, first);
    let rerun = final_state(&js, &second).await.expect("the rerun finished");
    assert_eq!(rerun.state, RunState::Succeeded);
    let event_id = rerun.event_id.unwrap_or_default();
    assert!(
        event_id.starts_with("manual:first-push~rerun"),
        "the rerun is of the same event: {event_id}"
    );
    assert_eq!(
        log_lines(&js, &second, "hello").await,
        [format!("run {second}")]
    );
    let missing = sluice(&url, &["runs", "rerun", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(text(&missing.stderr).contains("no run nope"));
}

#[test]
fn watch_redraws_until_interrupted() {
    use std::io::{BufRead, BufReader};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let nats = rt.block_on(NatsServer::start());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["status", "--watch"])
        .env("SLUICE_NATS_URL", nats.url())
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("STREAM") && tx.send(()).is_err() {
                return;
            }
        }
    });
    for frame in 1..=2 {
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("frame {frame} of `status --watch`"));
    }
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let status = child.wait().expect("exit");
    assert!(status.success(), "Ctrl-C ends --watch cleanly: {status:?}");
}

/// `runs logs --follow` prints lines as they are stored and stops at the run's final
/// state, reading each stream through one consumer however many chunks arrive (it once
/// created a consumer per chunk to look at the run's state).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_reads_each_stream_with_one_consumer() {
    use futures::StreamExt;
    use sluice_core::run::{LogChunk, LogLine, RunState, StatusUpdate};
    use sluice_core::{bus, subjects};
    use std::io::{BufRead, BufReader};

    init_logs();
    let nats = NatsServer::start().await;
    let url = nats.url();
    let js = jetstream(&url).await;
    provision(&js).await;
    let chunk = |seq: u64| LogChunk {
        run_id: "fol-1".into(),
        step: "build".into(),
        seq,
        lines: vec![LogLine {
            stream: "stdout".into(),
            text: format!("line {seq}"),
        }],
    };
    let logs_subject = subjects::logs("eu-1", "fol-1");
    let store = |seq: u64| {
        let js = js.clone();
        let subject = logs_subject.clone();
        async move {
            bus::publish_json(&js, subject, &format!("fol-1.build.{seq}"), &chunk(seq))
                .await
                .expect("store a chunk");
        }
    };
    let state = |state: RunState| StatusUpdate {
        run_id: "fol-1".into(),
        pipeline: "p".into(),
        state,
        step: None,
        at: time::OffsetDateTime::now_utc(),
        cluster: Some("eu-1".into()),
        event_id: None,
        concurrency_group: None,
        exit_code: None,
        message: None,
        runner: None,
        repo: None,
        sha: None,
        parent: None,
    };
    let running = state(RunState::Running);
    bus::publish_json(&js, running.subject(), &running.message_id(), &running)
        .await
        .expect("store running");
    store(0).await;

    // Every consumer create request, as the server receives it.
    let client = async_nats::connect(&url).await.expect("connect");
    let mut creates = client
        .subscribe("$JS.API.CONSUMER.CREATE.>")
        .await
        .expect("subscribe");
    client.flush().await.expect("flush");

    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["runs", "logs", "fol-1", "--follow"])
        .env("SLUICE_NATS_URL", &url)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next_line = |what: &str| {
        rx.recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{what} within 20 s"))
    };
    assert_eq!(next_line("the step header"), "── build ──");
    assert_eq!(next_line("the first stored line"), "line 0");
    // Followed live now: forty more chunks, each printed before the next is stored.
    for seq in 1..=40 {
        store(seq).await;
        assert_eq!(next_line("a followed line"), format!("line {seq}"));
    }
    let done = state(RunState::Succeeded);
    bus::publish_json(&js, done.subject(), &done.message_id(), &done)
        .await
        .expect("store the final state");
    let status = tokio::task::spawn_blocking(move || child.wait().expect("exit"))
        .await
        .expect("join");
    assert!(status.success(), "{status:?}");

    client.flush().await.expect("flush");
    let mut created = 0;
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(1), creates.next()).await {
        created += 1;
    }
    // Logs, states, and the final count of the run's logs.
    assert!(
        (1..=3).contains(&created),
        "{created} consumers for 41 chunks"
    );
}

#[test]
fn service_flags_out_of_range_are_refused_with_a_message() {
    for (args, says) in [
        (&["dispatcher", "--concurrency", "0"][..], "at least 1"),
        (&["dispatcher", "--max-attempts", "0"], "at least 1"),
        (&["dispatcher", "--max-attempts=-3"], "at least 1"),
        (
            &["dispatcher", "--forge-requests-per-hour", "0"],
            "at least 1",
        ),
        (
            &["dispatcher", "--stream-replicas", "0"],
            "replicas must be 1 to 5",
        ),
        (&["ingest", "--max-body-bytes", "0"], "at least 1"),
        (&["ingest", "--publish-timeout", "0s"], "longer than zero"),
        (&["ingest", "--read-timeout", "0s"], "longer than zero"),
        (&["ingest", "--queue-wait", "0s"], "longer than zero"),
        (&["ingest", "--queue-wait", "9s"], "shorter than the 9 s"),
        (
            &["ingest", "--stream-replicas", "7"],
            "replicas must be 1 to 5",
        ),
    ] {
        let out = sluice("nats://127.0.0.1:1", args);
        let err = text(&out.stderr);
        // A usage error before anything starts, naming the flag and what it takes.
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let flag = args[1].split('=').next().unwrap_or_default();
        assert!(err.contains(flag) && err.contains(says), "{args:?}: {err}");
    }
    let out = sluice(
        "nats://127.0.0.1:1",
        &[
            "nats",
            "init",
            "--out",
            "unused",
            "--clusters",
            "a",
            "--max-file-store",
            "lots",
        ],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--max-file-store") && err.contains("e.g. 20G"),
        "{err}"
    );
    // The defaults shown are the libraries' own.
    let help = text(&sluice("nats://127.0.0.1:1", &["dispatcher", "--help"]).stdout);
    assert!(
        help.contains(&format!("[default: {}]", sluice_dispatcher::CONCURRENCY)),
        "{help}"
    );
    let help = text(&sluice("nats://127.0.0.1:1", &["ingest", "--help"]).stdout);
    assert!(
        help.contains(&format!("[default: {}]", sluice_ingest::MAX_BODY_BYTES))
            && help.contains("--queue-wait <QUEUE_WAIT>"),
        "{help}"
    );
}

#[test]
fn runner_flags_out_of_range_are_refused_with_a_message() {
    for (flag, value, says) in [
        ("--max-running", "0", "at least 1"),
        ("--ack-wait", "500ms", "must be at least 1s"),
        ("--kube-qps", "0", "0 is not in 1.."),
        ("--kube-burst", "0", "0 is not in 1.."),
        ("--kube-log-streams-per-connection", "0", "at least 1"),
        ("--pending-timeout", "0s", "longer than zero"),
        ("--run-as-user", "-1", "-1 is not in 0.."),
    ] {
        let arg = format!("{flag}={value}");
        let out = sluice("nats://127.0.0.1:1", &["runner", "--cluster", "eu-1", &arg]);
        let err = text(&out.stderr);
        // A usage error before anything starts, naming the flag and what it takes.
        assert_eq!(out.status.code(), Some(2), "{arg}: {err}");
        assert!(err.contains(flag) && err.contains(says), "{arg}: {err}");
    }
    // The defaults shown are the runner library's own.
    let help = text(&sluice("nats://127.0.0.1:1", &["runner", "--help"]).stdout);
    for default in [
        sluice_runner::MAX_RUNNING.to_string(),
        sluice_core::pipeline::HumanDuration(sluice_runner::ACK_WAIT).to_string(),
        sluice_runner::kubernetes::QPS.to_string(),
        sluice_runner::kubernetes::DEFAULT_IMAGE.to_owned(),
        sluice_core::pipeline::HumanDuration(sluice_runner::kubernetes::PENDING_TIMEOUT)
            .to_string(),
    ] {
        assert!(
            help.contains(&format!("[default: {default}]")),
            "{default}: {help}"
        );
    }
}

/// `GET path` on `addr` over a plain socket: the status code and body, or `None` while
/// nothing answers.
fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let code = answer.split(' ').nth(1)?.parse().ok()?;
    let body = answer.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

/// `sluice dispatcher` serves its admin endpoints: ready once its consumers pull, 503
/// naming NATS while NATS is down, ready again after NATS restarts, metrics with the
/// build; SIGTERM ends it cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatcher_admin_endpoints_tell_the_truth_through_a_nats_restart() {
    init_logs();
    let mut nats = NatsServer::start().await;
    let url = nats.url();
    let js = jetstream(&url).await;
    provision(&js).await;
    let admin = format!("127.0.0.1:{}", sluice_tests::nats::reserve_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("dispatcher")
        .env("SLUICE_NATS_URL", &url)
        .env("SLUICE_ADMIN_LISTEN", &admin)
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the dispatcher");
    let status = |want: u16| {
        let admin = admin.clone();
        move || {
            let admin = admin.clone();
            async move {
                tokio::task::spawn_blocking(move || http_get(&admin, "/readyz"))
                    .await
                    .ok()
                    .flatten()
                    .filter(|(code, _)| *code == want)
                    .map(|(_, body)| body)
            }
        }
    };
    wait_for(
        "the dispatcher to be ready",
        Duration::from_secs(30),
        status(200),
    )
    .await;
    let admin2 = admin.clone();
    let (code, metrics) = tokio::task::spawn_blocking(move || http_get(&admin2, "/metrics"))
        .await
        .expect("join")
        .expect("metrics");
    assert_eq!(code, 200);
    assert!(metrics.contains("sluice_build_info{version="), "{metrics}");
    assert!(metrics.contains("sluice_nats_connected 1"), "{metrics}");

    nats.kill();
    // The first 503 may come from a probe that timed out before the client noticed the
    // lost connection; within the ping interval it names NATS.
    let admin3 = admin.clone();
    wait_for(
        "a 503 naming NATS while NATS is down",
        Duration::from_secs(30),
        move || {
            let admin = admin3.clone();
            async move {
                let (code, body) = tokio::task::spawn_blocking(move || http_get(&admin, "/readyz"))
                    .await
                    .ok()??;
                let verdict: serde_json::Value = serde_json::from_str(&body).ok()?;
                let names_nats = verdict["failed"]
                    .as_array()?
                    .iter()
                    .any(|f| f["check"] == "nats");
                (code == 503 && verdict["ready"] == false && names_nats).then_some(())
            }
        },
    )
    .await;
    nats.restart().await;
    wait_for(
        "ready again after NATS is back",
        Duration::from_secs(60),
        status(200),
    )
    .await;

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exited = tokio::task::spawn_blocking(move || child.wait().expect("exit"))
        .await
        .expect("join");
    assert!(exited.success(), "{exited:?}");
}
