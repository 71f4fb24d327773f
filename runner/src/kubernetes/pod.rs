//! The Pod of a run: the clone and every step but the last as init containers, which
//! Kubernetes runs one after another and stops at the first failure; the last step as
//! the Pod's one container. All share an `emptyDir` at `/workspace`.
//!
//! Init containers give ordering, stop-on-failure, per-container logs and exit codes
//! from the kubelet itself, with one Pod (one scheduling decision, one image-pull
//! node) per run and no agent inside the Pod that would need NATS credentials.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EnvFromSource, EnvVar, LocalObjectReference,
    PersistentVolumeClaimVolumeSource, Pod, PodSecurityContext, PodSpec, ResourceRequirements,
    SeccompProfile, SecretEnvSource, SecretVolumeSource, SecurityContext, Toleration, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sluice_core::pipeline::Resources;
use sluice_core::run::{RunRequest, RunStep};

use super::KubeSettings;

/// Where the workspace volume is mounted in every container.
pub const WORKSPACE: &str = "/workspace";
/// The built-in first container that clones the source.
pub const CLONE_CONTAINER: &str = "sluice-clone";
/// Where a step's Secret `name` appears as files: `<SECRETS_DIR>/<name>/<key>`.
pub const SECRETS_DIR: &str = "/var/run/secrets/sluice";
const GIT_CREDENTIALS_DIR: &str = "/var/run/secrets/sluice-git";

pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_CLUSTER: &str = "sluice.dev/cluster";
pub const LABEL_RUN: &str = "sluice.dev/run";
pub const LABEL_PIPELINE: &str = "sluice.dev/pipeline";
pub const LABEL_REPO: &str = "sluice.dev/repo";
pub const LABEL_SEGMENT: &str = "sluice.dev/segment";
pub const ANNOTATION_REPO: &str = "sluice.dev/repo";
/// The full pipeline name, which [`LABEL_PIPELINE`] holds only when it is a label value.
pub const ANNOTATION_PIPELINE: &str = "sluice.dev/pipeline";
pub const ANNOTATION_EVENT: &str = "sluice.dev/event";
pub const ANNOTATION_SHA: &str = "sluice.dev/sha";

/// The Pod name of a run's `segment` (steps between child-pipeline steps): derived
/// from the run id alone, so a redelivered request finds the Pod it already made.
pub fn pod_name(run_id: &str, segment: usize) -> String {
    match segment {
        0 => format!("sluice-{run_id}"),
        n => format!("sluice-{run_id}-{n}"),
    }
}

/// The PersistentVolumeClaim holding the cache of `key` (repository and branch).
pub fn cache_claim_name(key: &str) -> String {
    format!("sluice-cache-{}", &sluice_core::run::id_digest(key)[..16])
}

/// The containers of a segment, in the order they run: the clone first (when the run
/// has a source), then its steps.
pub fn container_names(req: &RunRequest, steps: &[RunStep]) -> Vec<String> {
    let mut names = Vec::with_capacity(steps.len() + 1);
    if req.clone_url.is_some() {
        names.push(CLONE_CONTAINER.to_owned());
    }
    names.extend(steps.iter().map(|s| s.name.clone()));
    names
}

/// The longest Kubernetes label value.
const LABEL_VALUE_MAX: usize = 63;
/// Hex digits of the name's SHA-256 that [`label_value`] appends to a changed name.
const LABEL_DIGEST_LEN: usize = 10;

fn label_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Whether `s` is a Kubernetes label value: empty, or at most 63 of `[A-Za-z0-9._-]`
/// starting and ending alphanumeric.
fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= LABEL_VALUE_MAX
            && s.chars().all(label_char)
            && s.starts_with(|c: char| c.is_ascii_alphanumeric())
            && s.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

/// `s` as a label value: itself when it is one; otherwise its other characters as `_`,
/// cut to leave room for `-` and the first 10 hex digits of the SHA-256 of `s`, so two
/// names that differ only in a replaced character or past the cut still differ
/// (`acme/app:build` → `acme_app_build-<digest>`). The same name always gives the
/// same value, so the label can be selected on.
fn label_value(s: &str) -> String {
    if is_label_value(s) {
        return s.to_owned();
    }
    let digest = &sluice_core::run::id_digest(s)[..LABEL_DIGEST_LEN];
    // Every character is ASCII after this, so byte lengths are character counts.
    let sanitized: String = s
        .chars()
        .map(|c| if label_char(c) { c } else { '_' })
        .collect();
    let stem = sanitized.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let stem = &stem[..stem.len().min(LABEL_VALUE_MAX - 1 - LABEL_DIGEST_LEN)];
    let stem = stem.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if stem.is_empty() {
        digest.to_owned()
    } else {
        format!("{stem}-{digest}")
    }
}

/// The repository label: the path with `/` as `.` (`acme/app` → `acme.app`), cut at 63.
/// Kept readable for selectors; distinct paths may share it, and the full path is in
/// [`ANNOTATION_REPO`].
fn repo_label_value(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| if label_char(c) { c } else { '.' })
        .take(LABEL_VALUE_MAX)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_owned()
}

/// The Pod for `steps` (one segment of `req`; `steps` is never empty).
pub fn build(
    req: &RunRequest,
    segment: usize,
    steps: &[RunStep],
    settings: &KubeSettings,
    cache_claim: Option<&str>,
) -> Pod {
    let mut labels = BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), "sluice".to_owned()),
        (LABEL_CLUSTER.to_owned(), req.cluster.clone()),
        (LABEL_RUN.to_owned(), req.run_id.clone()),
        (LABEL_PIPELINE.to_owned(), label_value(&req.pipeline)),
        (LABEL_SEGMENT.to_owned(), segment.to_string()),
    ]);
    let mut annotations = BTreeMap::from([
        (ANNOTATION_EVENT.to_owned(), req.event_id.clone()),
        (ANNOTATION_PIPELINE.to_owned(), req.pipeline.clone()),
    ]);
    if let Some(repo) = &req.repo {
        labels.insert(LABEL_REPO.to_owned(), repo_label_value(repo));
        annotations.insert(ANNOTATION_REPO.to_owned(), repo.clone());
    }
    if let Some(sha) = &req.sha {
        annotations.insert(ANNOTATION_SHA.to_owned(), sha.clone());
    }

    let mut volumes = vec![Volume {
        name: "workspace".into(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    }];
    let mut shared_mounts = vec![VolumeMount {
        name: "workspace".into(),
        mount_path: WORKSPACE.into(),
        ..Default::default()
    }];
    if let (Some(claim), Some(cache)) = (cache_claim, &req.cache) {
        volumes.push(Volume {
            name: "cache".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.to_owned(),
                read_only: None,
            }),
            ..Default::default()
        });
        // One claim, one sub-directory per cached path.
        for path in &cache.paths {
            shared_mounts.push(VolumeMount {
                name: "cache".into(),
                mount_path: absolute(path),
                sub_path: Some(sub_path(path)),
                ..Default::default()
            });
        }
    }

    // Secrets of every step of the segment, as volumes (mounted only where used).
    let mut secret_names: Vec<&String> = steps.iter().flat_map(|s| &s.secrets).collect();
    secret_names.sort();
    secret_names.dedup();
    for name in &secret_names {
        volumes.push(Volume {
            name: secret_volume(name),
            secret: Some(SecretVolumeSource {
                secret_name: Some((*name).clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    let mut containers: Vec<Container> = Vec::with_capacity(steps.len() + 1);
    if let Some(url) = &req.clone_url {
        containers.push(clone_container(req, url, settings, &shared_mounts));
        if let Some(secret) = &settings.clone_secret {
            volumes.push(Volume {
                name: "git-credentials".into(),
                secret: Some(SecretVolumeSource {
                    secret_name: Some(secret.clone()),
                    default_mode: Some(0o440),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    for step in steps {
        containers.push(step_container(req, step, settings, &shared_mounts));
    }
    // The last step is the Pod's container; everything before it runs in order first.
    let main = containers.pop().into_iter().collect();

    let runtime = &req.runtime;
    let service_account = runtime
        .service_account
        .clone()
        .or_else(|| settings.service_account.clone());
    let tolerations: Vec<Toleration> = runtime
        .tolerations
        .iter()
        .filter_map(|t| serde_json::from_value(t.clone()).ok())
        .collect();
    let pull_secrets: Vec<LocalObjectReference> = runtime
        .image_pull_secrets
        .iter()
        .map(|name| LocalObjectReference { name: name.clone() })
        .collect();

    Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&req.run_id, segment)),
            namespace: Some(settings.namespace.clone()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(PodSpec {
            restart_policy: Some("Never".into()),
            active_deadline_seconds: req.timeout_secs.and_then(|s| i64::try_from(s).ok()),
            // The Pod's identity in the cluster's API: none unless the pipeline names
            // a service account, which is asking for it.
            automount_service_account_token: Some(runtime.service_account.is_some()),
            service_account_name: service_account,
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(settings.run_as_user != 0),
                run_as_user: Some(settings.run_as_user),
                run_as_group: Some(settings.run_as_user),
                fs_group: Some(settings.run_as_user),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            node_selector: (!runtime.node_selector.is_empty())
                .then(|| runtime.node_selector.clone()),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            image_pull_secrets: (!pull_secrets.is_empty()).then_some(pull_secrets),
            init_containers: (!containers.is_empty()).then_some(containers),
            containers: main,
            volumes: Some(volumes),
            enable_service_links: Some(false),
            ..Default::default()
        }),
        status: None,
    }
}

fn secret_volume(name: &str) -> String {
    // Volume names are DNS labels; Secret names may be longer DNS subdomains.
    let digest = sluice_core::run::id_digest(name);
    format!("secret-{}", &digest[..16])
}

fn absolute(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{WORKSPACE}/{}", path.trim_start_matches("./"))
    }
}

fn sub_path(path: &str) -> String {
    let clean: String = path
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "root".into()
    } else {
        clean
    }
}

fn restricted() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn run_env(req: &RunRequest) -> Vec<EnvVar> {
    vec![
        env("CI", "true"),
        env("SLUICE", "true"),
        env("SLUICE_RUN_ID", &req.run_id),
        env("SLUICE_PIPELINE", &req.pipeline),
        env("SLUICE_EVENT_ID", &req.event_id),
        env("SLUICE_REPO", req.repo.as_deref().unwrap_or("")),
        env("SLUICE_REF", req.git_ref.as_deref().unwrap_or("")),
        env("SLUICE_SHA", req.sha.as_deref().unwrap_or("")),
        env("SLUICE_WORKSPACE", WORKSPACE),
        // Images run as an arbitrary non-root user whose home may not exist.
        env("HOME", format!("{WORKSPACE}/.home")),
    ]
}

/// The script of the clone container. `git init` + `fetch` rather than `clone`: cache
/// volumes mounted inside the workspace make it non-empty. The ref is fetched first
/// (it works on every forge, pull request refs included); the commit alone only if
/// the ref has moved past it.
pub const CLONE_SCRIPT: &str = r#"set -e
git init -q .
echo .home >> .git/info/exclude
mkdir -p "$HOME"
git remote add origin "$SLUICE_CLONE_URL"
if [ -n "$SLUICE_REF" ]; then git fetch -q origin "$SLUICE_REF"; else git fetch -q origin; fi
if [ -n "$SLUICE_SHA" ]; then
  git cat-file -e "$SLUICE_SHA^{commit}" 2>/dev/null || git fetch -q origin "$SLUICE_SHA"
  git checkout -q --detach "$SLUICE_SHA"
else
  git checkout -q --detach FETCH_HEAD
fi
echo "checked out $(git rev-parse HEAD)"
"#;

fn clone_container(
    req: &RunRequest,
    url: &str,
    settings: &KubeSettings,
    mounts: &[VolumeMount],
) -> Container {
    let mut env = run_env(req);
    env.push(self::env("SLUICE_CLONE_URL", url));
    env.push(self::env("GIT_TERMINAL_PROMPT", "0"));
    let mut mounts = mounts.to_vec();
    if settings.clone_secret.is_some() {
        // Only the clone sees the credentials; steps (the code under test) never do.
        env.push(self::env("GIT_CONFIG_COUNT", "1"));
        env.push(self::env("GIT_CONFIG_KEY_0", "credential.helper"));
        env.push(self::env(
            "GIT_CONFIG_VALUE_0",
            format!("store --file={GIT_CREDENTIALS_DIR}/.git-credentials"),
        ));
        mounts.push(VolumeMount {
            name: "git-credentials".into(),
            mount_path: GIT_CREDENTIALS_DIR.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    Container {
        name: CLONE_CONTAINER.into(),
        image: Some(settings.clone_image.clone()),
        command: Some(vec!["sh".into(), "-c".into(), CLONE_SCRIPT.into()]),
        working_dir: Some(WORKSPACE.into()),
        env: Some(env),
        volume_mounts: Some(mounts),
        security_context: Some(restricted()),
        ..Default::default()
    }
}

fn step_container(
    req: &RunRequest,
    step: &RunStep,
    settings: &KubeSettings,
    mounts: &[VolumeMount],
) -> Container {
    let mut env = run_env(req);
    env.push(self::env("SLUICE_STEP", &step.name));
    // Step env over pipeline env, as in the pipeline file.
    let mut vars = req.env.clone();
    vars.extend(step.env.clone());
    env.extend(vars.iter().map(|(k, v)| self::env(k, v)));
    let mut mounts = mounts.to_vec();
    let mut env_from = Vec::new();
    for name in &step.secrets {
        env_from.push(EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: name.clone(),
                optional: None,
            }),
            ..Default::default()
        });
        mounts.push(VolumeMount {
            name: secret_volume(name),
            mount_path: format!("{SECRETS_DIR}/{name}"),
            read_only: Some(true),
            ..Default::default()
        });
    }
    Container {
        name: step.name.clone(),
        image: Some(
            step.image
                .clone()
                .unwrap_or_else(|| settings.default_image.clone()),
        ),
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            format!("set -e\n{}\n", step.commands.join("\n")),
        ]),
        working_dir: Some(WORKSPACE.into()),
        env: Some(env),
        env_from: (!env_from.is_empty()).then_some(env_from),
        volume_mounts: Some(mounts),
        resources: step.resources.as_ref().map(resources),
        security_context: Some(restricted()),
        ..Default::default()
    }
}

/// Requests and limits as given; what a step leaves out comes from the namespace's
/// LimitRange, so cluster admins set defaults where they belong.
fn resources(r: &Resources) -> ResourceRequirements {
    let pick = |pairs: [(&str, &Option<String>); 2]| {
        let map: BTreeMap<String, Quantity> = pairs
            .into_iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_owned(), Quantity(v.clone()))))
            .collect();
        (!map.is_empty()).then_some(map)
    };
    ResourceRequirements {
        requests: pick([("cpu", &r.cpu), ("memory", &r.memory)]),
        limits: pick([("cpu", &r.cpu_limit), ("memory", &r.memory_limit)]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_label_values_are_kept() {
        for name in ["app-ci", "build", "a", "A.b_c-9", "x".repeat(63).as_str()] {
            assert_eq!(label_value(name), name);
        }
        assert_eq!(label_value(""), "", "an empty label value is valid");
    }

    #[test]
    fn repository_pipeline_names_become_stable_label_values() {
        let v = label_value("acme/app:build");
        assert!(is_label_value(&v), "{v}");
        let (stem, digest) = v.rsplit_once('-').expect("a digest");
        assert_eq!(stem, "acme_app_build");
        assert_eq!(digest, &sluice_core::run::id_digest("acme/app:build")[..10]);
        assert_eq!(
            label_value("acme/app:build"),
            v,
            "the same name, the same value"
        );
        // Names that differ only in a replaced character do not share the label.
        assert_ne!(label_value("acme/app:build"), label_value("acme/app/build"));
        // GitLab groups: upper case, dots and underscores are kept.
        let v = label_value("Group.One/sub_group/App:test");
        assert!(v.starts_with("Group.One_sub_group_App_test-"), "{v}");
        assert!(is_label_value(&v), "{v}");
    }

    #[test]
    fn long_names_are_cut_and_stay_distinct() {
        let long = format!("acme/{}:build", "a".repeat(200));
        let v = label_value(&long);
        assert!(is_label_value(&v), "{v}");
        assert_eq!(v.len(), 63);
        let other = format!("acme/{}:test", "a".repeat(200));
        assert_ne!(label_value(&other), v, "names differing past the cut");
        // Valid characters but too long: cut as well.
        let v = label_value(&"b".repeat(64));
        assert!(is_label_value(&v) && v.len() <= 63, "{v}");
    }

    #[test]
    fn label_values_start_and_end_alphanumeric() {
        for name in [
            "-app",
            "app-",
            "/acme/app:",
            ":::",
            "é",
            "_",
            // Cut right after `acme_` and 46 `a`: on the `_`.
            format!("acme/{}_:x{}", "a".repeat(46), "y".repeat(20)).as_str(),
        ] {
            let v = label_value(name);
            assert!(is_label_value(&v), "{name:?} gave {v:?}");
            assert!(!v.is_empty() && !v.contains("_-"), "{name:?} gave {v:?}");
        }
        assert_eq!(label_value(":::").len(), 10, "nothing left but the digest");
    }

    #[test]
    fn the_pod_keeps_the_full_pipeline_name() {
        let req: RunRequest = serde_json::from_value(serde_json::json!({
            "run_id": "r1",
            "pipeline": "acme/app:build",
            "cluster": "eu-1",
            "event_id": "github:1",
            "repo": "acme/app",
            "steps": [{"name": "test", "commands": ["true"]}],
            "created_at": "2026-01-01T00:00:00Z",
        }))
        .expect("run request");
        let pod = build(&req, 0, &req.steps, &KubeSettings::default(), None);
        let labels = pod.metadata.labels.expect("labels");
        let annotations = pod.metadata.annotations.expect("annotations");
        assert_eq!(labels[LABEL_PIPELINE], label_value("acme/app:build"));
        assert_eq!(annotations[ANNOTATION_PIPELINE], "acme/app:build");
        assert_eq!(labels[LABEL_REPO], "acme.app");
        assert!(labels.values().all(|v| is_label_value(v)), "{labels:?}");
    }
}
