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

/// A label value: at most 63 of `[A-Za-z0-9._-]`, starting and ending alphanumeric.
fn label_value(s: &str) -> String {
    let mapped: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '.'
            }
        })
        .take(63)
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
        (LABEL_PIPELINE.to_owned(), req.pipeline.clone()),
        (LABEL_SEGMENT.to_owned(), segment.to_string()),
    ]);
    let mut annotations = BTreeMap::from([(ANNOTATION_EVENT.to_owned(), req.event_id.clone())]);
    if let Some(repo) = &req.repo {
        labels.insert(LABEL_REPO.to_owned(), label_value(repo));
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
