//! The checked-in GitOps manifests, `deploy/install/<set>/`: what `sluice install
//! --dry-run -o yaml` prints for each answer set below, and a `kustomization.yaml`.
//! A test fails when they are stale; regenerate them with
//! `SLUICE_UPDATE_MANIFESTS=1 cargo test -p sluice manifests_are_current`.

use super::object::to_yaml_stream;
use super::render::render;
use super::values::{Hosts, Values};

/// The folder under `deploy/install/`, the answers, and the command that prints them.
pub fn answer_sets() -> Vec<(&'static str, Values, &'static str)> {
    vec![
        (
            "all",
            Values::default(),
            "sluice install --dry-run -o yaml",
        ),
        (
            "control-plane",
            Values {
                hosts: Hosts::ControlPlane,
                ..Values::default()
            },
            "sluice install --dry-run -o yaml --hosts control-plane",
        ),
        (
            "runner",
            Values {
                hosts: Hosts::Runner,
                nats_url: Some(RUNNER_NATS_URL.into()),
                nats_seed: Some("runner-default.nk".into()),
                ..Values::default()
            },
            "sluice install --dry-run -o yaml --hosts runner --existing-nats-url tls://nats.example.com:4222 --nats-seed runner-default.nk",
        ),
    ]
}

/// The example NATS URL of the runner-only manifests.
pub const RUNNER_NATS_URL: &str = "tls://nats.example.com:4222";

/// The files of one set: `sluice.yaml` and `kustomization.yaml`.
pub fn files(set: &str, values: &Values, command: &str) -> Vec<(String, String)> {
    let header = format!(
        "# Rendered by `{command}` (deploy/install/{set}); do not edit: change the answers and\n# regenerate with `SLUICE_UPDATE_MANIFESTS=1 cargo test -p sluice manifests_are_current`.\n# No Secrets here: create them first (docs/install.md, \"GitOps\").\n"
    );
    let manifests = format!("{header}{}", to_yaml_stream(&render(values, None)));
    let kustomization = format!(
        "{header}apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - sluice.yaml\n"
    );
    vec![
        ("sluice.yaml".into(), manifests),
        ("kustomization.yaml".into(), kustomization),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_current() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install");
        let update = std::env::var_os("SLUICE_UPDATE_MANIFESTS").is_some();
        let mut stale = Vec::new();
        for (set, values, command) in answer_sets() {
            values.validate().expect("valid answers");
            let dir = root.join(set);
            for (name, text) in files(set, &values, command) {
                let path = dir.join(&name);
                if update {
                    std::fs::create_dir_all(&dir).expect("mkdir");
                    std::fs::write(&path, &text).expect("write");
                } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                    stale.push(format!("deploy/install/{set}/{name}"));
                }
            }
        }
        assert!(
            stale.is_empty(),
            "stale: {}; regenerate with `SLUICE_UPDATE_MANIFESTS=1 cargo test -p sluice manifests_are_current`",
            stale.join(", ")
        );
    }
}
