//! `sluice install` and `uninstall` as users run them, against the Kubernetes API
//! double: the wizard driven through a pseudo-terminal, `--yes`, the dry run, a
//! second run, preflight failures and uninstall.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use sluice_tests::kubeapi::{JobScript, KubeApi};

const TIMEOUT_MS: u64 = 60_000;

/// The command with the double's kubeconfig and fixed webhook secrets (so runs can
/// be compared whole), in `dir`.
fn command(dir: &Path, api: &KubeApi, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
    c.args(args)
        .current_dir(dir)
        .env("KUBECONFIG", api.write_kubeconfig(dir))
        .env("NO_COLOR", "1")
        .env("SLUICE_INSTALL_GITHUB_WEBHOOK_SECRET", "gh-secret")
        .env("SLUICE_INSTALL_GITLAB_WEBHOOK_TOKEN", "gl-token")
        .env("SLUICE_INSTALL_WEBHOOK_SIGNING_SECRET", "whsec_c2x1aWNl")
        .env("SLUICE_INSTALL_TIMEOUT", "20s")
        .env_remove("SLUICE_INSTALL_VALUES");
    c
}

fn run(dir: &Path, api: &KubeApi, args: &[&str]) -> Output {
    command(dir, api, args).output().expect("run sluice")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Objects by `Kind/name`.
fn by_id(objects: Vec<Value>) -> BTreeMap<String, Value> {
    objects
        .into_iter()
        .map(|o| {
            let id = format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or_default(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            );
            (id, o)
        })
        .collect()
}

fn dry_run(dir: &Path, api: &KubeApi) -> BTreeMap<String, Value> {
    let out = run(
        dir,
        api,
        &[
            "install",
            "--yes",
            "--dry-run",
            "-o",
            "yaml",
            "--include-secrets",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&String::from_utf8_lossy(&out.stdout)).expect("YAML documents");
    by_id(docs)
}

fn sluice_objects(api: &KubeApi) -> Vec<String> {
    api.objects()
        .iter()
        .filter(|o| o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "sluice")
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or(""),
                o["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// The wizard's prompts for a cluster that hosts both, in order.
const PROMPTS: [&str; 14] = [
    "Namespace",
    "This cluster hosts",
    "Cluster name",
    "Existing NATS URL",
    "Credentials folder",
    "Webhook host",
    "Dashboard URL",
    "Allow cancel and rerun on the dashboard?",
    "GitHub webhook secret",
    "GitLab webhook token",
    "GitHub token",
    "GitLab token",
    "Run a smoke pipeline at the end?",
    "Check the cluster and install?",
];

/// Drives the wizard: at each prompt, in order, types its answer and Enter (`None`:
/// Enter alone), then
/// waits for it to finish and returns what it showed.
fn wizard(dir: &Path, api: &KubeApi, prompts: &[(&str, Option<&str>)]) -> String {
    let cmd = command(dir, api, &["install"]);
    let mut p = rexpect::session::spawn_command(cmd, Some(TIMEOUT_MS)).expect("spawn in a pty");
    let mut shown = String::new();
    for (prompt, key) in prompts {
        shown += &p
            .exp_string(prompt)
            .unwrap_or_else(|e| panic!("prompt {prompt:?}: {e}"));
        shown += prompt;
        match key {
            None => p.send_line("").map(|_| ()).expect("Enter"),
            Some(k) => p.send_line(k).map(|_| ()).expect("answer"),
        }
    }
    shown + &p.exp_eof().expect("the install ends")
}

/// Presses Enter at every prompt of the wizard, then waits for it to finish.
fn wizard_enter_everywhere(dir: &Path, api: &KubeApi) -> String {
    let prompts: Vec<_> = PROMPTS.iter().map(|p| (*p, None)).collect();
    wizard(dir, api, &prompts)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_wizard_on_enter_equals_yes_applies_the_dry_run_converges_and_uninstalls() {
    let tmp = tempfile::tempdir().expect("tmp");
    let api = KubeApi::start().await;
    let dir = tmp.path().to_owned();
    let api_ref = &api;

    let shown = tokio::task::block_in_place(|| wizard_enter_everywhere(&dir, api_ref));
    assert!(shown.contains("Sluice is installed"), "{shown}");
    // No KEDA in the cluster: not offered, not applied.
    assert!(!shown.contains("KEDA"), "{shown}");
    assert!(
        shown.contains("https://sluice.example.com/webhooks/github"),
        "{shown}"
    );
    assert!(
        dir.join("sluice-nats/admin.nk").exists(),
        "credentials made"
    );

    // What was applied is exactly what the dry run prints.
    let applied = by_id(api.applied());
    let printed = tokio::task::block_in_place(|| dry_run(&dir, api_ref));
    assert_eq!(
        applied.keys().collect::<Vec<_>>(),
        printed.keys().collect::<Vec<_>>()
    );
    for (id, object) in &printed {
        assert_eq!(&applied[id], object, "{id}");
    }
    assert!(api
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .all(|r| r.uri.contains("fieldManager=sluice")));

    // A second run changes nothing.
    let writes = api.writes().len();
    let again = tokio::task::block_in_place(|| run(&dir, api_ref, &["install", "--yes"]));
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("Nothing changed"), "{}", text(&again));
    assert_eq!(api.writes().len(), writes, "{:?}", &api.writes()[writes..]);

    // --yes alone gives what Enter everywhere gave.
    let other = KubeApi::start().await;
    let other_ref = &other;
    let yes = tokio::task::block_in_place(|| run(&dir, other_ref, &["install", "--yes"]));
    assert!(yes.status.success(), "{}", text(&yes));
    assert_eq!(by_id(other.applied()), applied);

    // Uninstall leaves only the volumes (and the namespace), and can run twice.
    let out = tokio::task::block_in_place(|| run(&dir, api_ref, &["uninstall"]));
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.find("Deployment/sluice-runner") < said.find("StatefulSet/sluice-nats"),
        "runners first: {said}"
    );
    assert!(said.contains("Kept 3 PersistentVolumeClaims"), "{said}");
    assert_eq!(sluice_objects(&api), ["Namespace/sluice"]);
    assert_eq!(api.claims().len(), 3);
    let twice = tokio::task::block_in_place(|| run(&dir, api_ref, &["uninstall"]));
    assert!(
        text(&twice).contains("Nothing to remove"),
        "{}",
        text(&twice)
    );
    let data = tokio::task::block_in_place(|| run(&dir, api_ref, &["uninstall", "--delete-data"]));
    assert!(data.status.success(), "{}", text(&data));
    assert!(api.claims().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn preflight_failures_stop_before_any_write_with_what_to_do() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_owned();
    let api = KubeApi::start().await;
    let api_ref = &api;
    api.deny("create", "roles");
    api.remove_storage_classes();
    let out = tokio::task::block_in_place(|| run(&dir, api_ref, &["install", "--yes"]));
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("cannot create roles.rbac.authorization.k8s.io in namespace sluice: ask a cluster admin"),
        "{said}"
    );
    assert!(
        said.contains("no default StorageClass, and NATS needs volumes"),
        "{said}"
    );
    assert!(said.contains("nothing was changed"), "{said}");
    assert!(api.writes().is_empty(), "{:?}", api.writes());
    assert!(api
        .requests()
        .iter()
        .all(|r| r.method != "PATCH" && r.method != "DELETE"));
    assert!(
        !dir.join("sluice-nats").exists(),
        "no local credentials either"
    );

    // A runner-only cluster must name its NATS and seed.
    let out = tokio::task::block_in_place(|| {
        run(&dir, api_ref, &["install", "--yes", "--hosts", "runner"])
    });
    let said = text(&out);
    assert!(!out.status.success());
    assert!(
        said.contains("nats_url: a runner-only cluster needs"),
        "{said}"
    );
    assert!(
        said.contains("runner-default.nk from `sluice cluster add default"),
        "{said}"
    );

    // An API server older than the manifests support.
    let old = KubeApi::start().await;
    old.set_version(1, 27);
    let old_ref = &old;
    let out = tokio::task::block_in_place(|| run(&dir, old_ref, &["install", "--yes"]));
    assert!(text(&out).contains("older than 1.29"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stuck_rollout_is_reported_with_its_reason() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_owned();
    let api = KubeApi::start().await;
    api.hold_rollouts(Some(
        "Back-off pulling image \"ghcr.io/sluice-ci/sluice:0.1.0\"",
    ));
    let api_ref = &api;
    let out = tokio::task::block_in_place(|| {
        command(&dir, api_ref, &["install", "--yes"])
            .env("SLUICE_INSTALL_TIMEOUT", "3s")
            .output()
            .expect("run")
    });
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("StatefulSet/sluice-nats is not ready after 3s: 0/3 ready"),
        "{said}"
    );
    assert!(said.contains("Back-off pulling image"), "{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keda_is_offered_when_its_crd_exists_and_refused_by_preflight_without_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_owned();
    let api = KubeApi::start().await;
    api.install_keda();
    let api_ref = &api;
    // KEDA is asked right before the smoke run.
    let at = PROMPTS
        .iter()
        .position(|p| p.starts_with("Run a smoke pipeline"))
        .expect("the smoke question");
    let mut prompts: Vec<(&str, Option<&str>)> = PROMPTS[..at].iter().map(|p| (*p, None)).collect();
    prompts.push(("Autoscale the runner with KEDA?", Some("y")));
    prompts.extend(PROMPTS[at..].iter().map(|p| (*p, None)));
    let shown = tokio::task::block_in_place(|| wizard(&dir, api_ref, &prompts));
    assert!(shown.contains("Sluice is installed"), "{shown}");
    assert!(
        shown.contains("runners:    KEDA, 1 to 10 replicas"),
        "{shown}"
    );
    assert!(
        shown.contains("created    ScaledObject/sluice-runner"),
        "{shown}"
    );
    let applied = by_id(api.applied());
    let so = &applied["ScaledObject/sluice-runner"];
    assert_eq!(so["apiVersion"], "keda.sh/v1alpha1");
    assert_eq!(so["spec"]["scaleTargetRef"]["name"], "sluice-runner");
    assert_eq!(so["spec"]["minReplicaCount"], 1);
    let trigger = &so["spec"]["triggers"][0];
    assert_eq!(trigger["type"], "nats-jetstream");
    assert_eq!(trigger["metadata"]["consumer"], "sluice-runner-default");
    assert_eq!(trigger["metadata"]["stream"], "SLUICE_RUNS");
    assert!(
        applied["Deployment/sluice-runner"]["spec"]["replicas"].is_null(),
        "KEDA owns the runner's replicas"
    );
    assert!(api.requests().iter().any(|r| r.method == "GET"
        && r.uri
            == "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/scaledobjects.keda.sh"));

    // The same answers from flags give the same objects.
    let flags = KubeApi::start().await;
    flags.install_keda();
    let flags_ref = &flags;
    let yes = tokio::task::block_in_place(|| run(&dir, flags_ref, &["install", "--yes", "--keda"]));
    assert!(yes.status.success(), "{}", text(&yes));
    assert_eq!(by_id(flags.applied()), applied);

    // Uninstall stops KEDA first, then drains the runners.
    let out = tokio::task::block_in_place(|| run(&dir, api_ref, &["uninstall"]));
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.find("ScaledObject/sluice-runner") < said.find("Deployment/sluice-runner"),
        "{said}"
    );
    assert_eq!(sluice_objects(&api), ["Namespace/sluice"]);

    // No KEDA: --keda stops in preflight, with what to do, before any write.
    let bare = KubeApi::start().await;
    let bare_ref = &bare;
    let out = tokio::task::block_in_place(|| run(&dir, bare_ref, &["install", "--yes", "--keda"]));
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    let line = said
        .lines()
        .find(|l| l.contains("KEDA is not installed"))
        .unwrap_or_else(|| panic!("{said}"));
    assert!(line.contains("install KEDA"), "{line}");
    assert!(bare.writes().is_empty(), "{:?}", bare.writes());
    // Uninstall in a cluster without KEDA still works (its kind is not served).
    let out = tokio::task::block_in_place(|| run(&dir, bare_ref, &["uninstall"]));
    assert!(text(&out).contains("Nothing to remove"), "{}", text(&out));
}

/// The smoke Job the install applied, and its containers' args by name.
fn smoke_job(api: &KubeApi) -> (Value, BTreeMap<String, Vec<String>>) {
    let job = api
        .applied()
        .into_iter()
        .find(|o| {
            o["kind"] == "Job"
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("sluice-smoke-"))
        })
        .expect("a smoke Job was applied");
    let spec = &job["spec"]["template"]["spec"];
    let args = spec["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["containers"].as_array().into_iter().flatten())
        .map(|c| {
            let args = c["args"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| a.as_str().unwrap_or_default().to_owned())
                .collect();
            (c["name"].as_str().unwrap_or_default().to_owned(), args)
        })
        .collect();
    (job, args)
}

fn script(steps: &[(&str, i32, &str)]) -> JobScript {
    JobScript {
        containers: steps
            .iter()
            .map(|(c, code, log)| ((*c).to_owned(), *code, (*log).to_owned()))
            .collect(),
        finish: true,
    }
}

fn applied_pipeline(api: &KubeApi) -> Value {
    let config = api
        .applied()
        .into_iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "sluice-smoke")
        .expect("the smoke ConfigMap");
    let text = config["data"]["pipeline.yaml"]
        .as_str()
        .expect("pipeline.yaml")
        .to_owned();
    sluice_core::pipeline::parse_documents("pipeline.yaml", &text).expect("a valid pipeline");
    serde_saphyr::from_str(&text).expect("YAML")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_smoke_run_is_a_job_in_the_cluster_whose_result_the_install_reports() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().to_owned();
    let api = KubeApi::start().await;
    api.script_jobs(
        "sluice-smoke-",
        script(&[
            ("apply", 0, "created    sluice-smoke"),
            ("start", 0, "manual:install-smoke-1"),
            ("logs", 0, "── hello ──\nSluice runs on cluster default"),
            ("result", 0, "run … succeeded"),
        ]),
    );
    let api_ref = &api;
    let out = tokio::task::block_in_place(|| run(&dir, api_ref, &["install", "--yes", "--smoke"]));
    let said = text(&out);
    assert!(out.status.success(), "{said}");

    // The Job: apply the pipeline, start it by a manual event, follow the run that
    // event starts, wait for its result; with the admin seed, over the in-cluster NATS.
    let (job, args) = smoke_job(&api);
    let delivery = args["start"]
        .iter()
        .skip_while(|a| *a != "--id")
        .nth(1)
        .expect("--id")
        .clone();
    let run_id = sluice_core::run::run_id(&format!("manual:{delivery}"), "sluice-smoke", 0);
    let strs = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        args["apply"],
        strs(&[
            "pipelines",
            "apply",
            "-f",
            "/etc/sluice-smoke/pipeline.yaml"
        ])
    );
    assert_eq!(
        args["start"],
        strs(&[
            "events",
            "publish",
            "--kind",
            "smoke",
            "--pipeline",
            "sluice-smoke",
            "--id",
            &delivery
        ])
    );
    assert_eq!(args["logs"], strs(&["runs", "logs", "--follow", &run_id]));
    assert_eq!(args["result"], strs(&["runs", "get", "--wait", &run_id]));
    let spec = &job["spec"]["template"]["spec"];
    let inits: Vec<&str> = spec["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(inits, ["apply", "start", "logs"], "in that order");
    assert_eq!(spec["containers"][0]["name"], "result");
    assert_eq!(
        spec["volumes"][0]["secret"]["secretName"],
        "sluice-nats-admin"
    );
    assert_eq!(job["spec"]["backoffLimit"], 0);
    let env = &spec["containers"][0]["env"];
    assert_eq!(env[0]["value"], "nats://sluice-nats.sluice.svc:4222");
    let pipeline = applied_pipeline(&api);
    assert_eq!(pipeline["name"], "sluice-smoke");
    assert_eq!(pipeline["runtime"]["cluster"], "default");
    assert_eq!(pipeline["steps"].as_array().map(Vec::len), Some(1));

    // The report: the run's log and its result, before the next steps.
    assert!(said.contains("│ Sluice runs on cluster default"), "{said}");
    assert!(
        said.contains(&format!("✓ the smoke run {run_id} succeeded")),
        "{said}"
    );
    assert!(said.find("smoke run") < said.rfind("Next:"), "{said}");

    // A run that fails: the install says so, with the result's last line, and fails.
    let failing = KubeApi::start().await;
    failing.script_jobs(
        "sluice-smoke-",
        script(&[
            ("apply", 0, "created    sluice-smoke"),
            ("start", 0, "manual:x"),
            ("logs", 0, "── hello ──\nsh: echo: not found"),
            ("result", 1, "run 0123 failed\n"),
        ]),
    );
    let failing_ref = &failing;
    let out =
        tokio::task::block_in_place(|| run(&dir, failing_ref, &["install", "--yes", "--smoke"]));
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    let line = said
        .lines()
        .find(|l| l.contains("the smoke run failed:"))
        .unwrap_or_else(|| panic!("{said}"));
    assert!(line.contains("did not succeed: run 0123 failed"), "{line}");
    assert!(
        line.contains("kubectl -n sluice logs job/sluice-smoke-"),
        "{line}"
    );
    assert!(said.contains("│ sh: echo: not found"), "{said}");
    assert!(
        said.contains("Sluice is installed, but the smoke run failed"),
        "{said}"
    );

    // A step before the run fails: its own reason.
    let unstarted = KubeApi::start().await;
    unstarted.script_jobs(
        "sluice-smoke-",
        script(&[
            ("apply", 0, "created    sluice-smoke"),
            ("start", 1, "Error: JetStream did not store the event"),
        ]),
    );
    let unstarted_ref = &unstarted;
    let out =
        tokio::task::block_in_place(|| run(&dir, unstarted_ref, &["install", "--yes", "--smoke"]));
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(
            "could not start it with a manual event: Error: JetStream did not store the event"
        ),
        "{said}"
    );

    // A run that never ends: bounded by --timeout, saying what it waited for.
    let stuck = KubeApi::start().await;
    stuck.script_jobs(
        "sluice-smoke-",
        JobScript {
            finish: false,
            ..script(&[("apply", 0, ""), ("start", 0, "")])
        },
    );
    let stuck_ref = &stuck;
    let out = tokio::task::block_in_place(|| {
        command(&dir, stuck_ref, &["install", "--yes", "--smoke"])
            .env("SLUICE_INSTALL_TIMEOUT", "2s")
            .output()
            .expect("run")
    });
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("did not finish: Job sluice-smoke-")
            && said.contains("not finished after 2s: step logs running"),
        "{said}"
    );
    assert!(
        said.contains("is the runner of cluster default ready"),
        "{said}"
    );

    // A runner-only cluster cannot: it has no credential that may start runs.
    let out = tokio::task::block_in_place(|| {
        run(
            &dir,
            api_ref,
            &[
                "install",
                "--yes",
                "--smoke",
                "--hosts",
                "runner",
                "--existing-nats-url",
                "nats://n:4222",
                "--nats-seed",
                "s.nk",
            ],
        )
    });
    assert!(
        text(&out).contains("smoke: a runner-only cluster holds no credential"),
        "{}",
        text(&out)
    );
}
