//! The credentials and webhook secrets the Secrets are made of: NATS seeds from the
//! `sluice nats init` folder (made, or given this cluster's runner, when needed),
//! webhook secrets and tokens from the answers, else from the Secrets of an earlier
//! install (so a second run changes nothing), else generated.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use base64::Engine;

use super::render::{accounts_conf, names, Material};
use super::values::{Secret, Values};
use crate::nats_admin;

/// Values of Secrets already in the cluster, by Secret name and key.
pub type Existing = BTreeMap<String, BTreeMap<String, String>>;

/// Everything for the Secrets. `write` allows creating or extending the
/// `sluice nats init` folder; without it a missing folder is an error naming the
/// command. Returns the material and lines saying what was done to local files.
pub fn load(
    values: &Values,
    existing: &Existing,
    write: bool,
) -> anyhow::Result<(Material, Vec<String>)> {
    let mut lines = Vec::new();
    let mut seeds = BTreeMap::new();
    let mut accounts = None;
    if values.hosts.control_plane() {
        let dir = &values.nats_dir;
        let clusters = values.served_clusters();
        if !dir.join(nats_admin::CONFIG_FILE).exists() {
            if !write {
                anyhow::bail!(
                    "{} holds no credentials: run `sluice nats init --out {} --clusters {}` (or install without --dry-run, which does)",
                    dir.display(),
                    dir.display(),
                    clusters.join(",")
                );
            }
            lines.extend(nats_admin::init(
                dir,
                &clusters,
                &sluice_core::roles::ServerOptions::default(),
                false,
            )?);
        } else {
            for cluster in &clusters {
                let role = sluice_core::roles::Role::Runner(cluster.clone());
                if !dir.join(role.seed_file()).exists() {
                    if !write {
                        anyhow::bail!(
                            "{} has no credential for cluster {cluster}: run `sluice cluster add {cluster} --out {}`",
                            dir.display(),
                            dir.display()
                        );
                    }
                    lines.extend(nats_admin::add_cluster(dir, cluster, false)?);
                }
            }
        }
        // A folder made before the acting dashboard's role gets its seed when asked for.
        let acting = sluice_core::roles::Role::DashboardActions;
        if values.dashboard_actions && !dir.join(acting.seed_file()).exists() {
            if !write {
                anyhow::bail!(
                    "{} has no {}: install without --dry-run once, which adds it",
                    dir.display(),
                    acting.seed_file()
                );
            }
            lines.extend(nats_admin::add_role(dir, &acting)?);
        }
        let (users, warnings) = nats_admin::read_users(dir)?;
        lines.extend(warnings.0);
        accounts = Some(accounts_conf(&users));
        let mut roles = vec![
            "admin".to_owned(),
            "ingest".to_owned(),
            "dispatcher".to_owned(),
            dashboard_role(values).name(),
        ];
        if values.hosts.runner() {
            roles.push(format!("runner-{}", values.cluster));
        }
        for role in roles {
            seeds.insert(role.clone(), read_seed(&dir.join(format!("{role}.nk")))?);
        }
    } else if let Some(seed) = &values.nats_seed {
        seeds.insert(format!("runner-{}", values.cluster), read_seed(seed)?);
    }
    let keep = |given: &Option<Secret>, secret: &str, key: &str| -> Option<Secret> {
        given.clone().or_else(|| {
            existing
                .get(secret)
                .and_then(|d| d.get(key))
                .filter(|v| !v.is_empty())
                .map(|v| Secret::new(v.clone()))
        })
    };
    let material = Material {
        accounts_conf: accounts,
        seeds,
        github_webhook_secret: keep(&values.github_webhook_secret, names::WEBHOOKS, "github")
            .unwrap_or_else(|| Secret::new(random_hex(32))),
        gitlab_webhook_token: keep(&values.gitlab_webhook_token, names::WEBHOOKS, "gitlab")
            .unwrap_or_else(|| Secret::new(random_hex(32))),
        webhook_signing_secret: keep(&values.webhook_signing_secret, names::WEBHOOKS, "generic")
            .unwrap_or_else(|| {
                Secret::new(format!(
                    "whsec_{}",
                    base64::engine::general_purpose::STANDARD.encode(random_bytes(24))
                ))
            }),
        github_token: keep(&values.github_token, names::FORGE, "github-token"),
        gitlab_token: keep(&values.gitlab_token, names::FORGE, "gitlab-token"),
        // Made only when actions are on; a later install keeps the one in the cluster.
        dashboard_actions_token: values.dashboard_actions.then(|| {
            keep(
                &values.dashboard_actions_token,
                names::DASHBOARD_ACTIONS,
                "token",
            )
            .unwrap_or_else(|| Secret::new(random_hex(32)))
        }),
    };
    Ok((material, lines))
}

/// The dashboard's role: the acting one only when actions are on, so a read-only
/// dashboard holds a seed that cannot cancel or rerun.
pub fn dashboard_role(values: &Values) -> sluice_core::roles::Role {
    if values.dashboard_actions {
        sluice_core::roles::Role::DashboardActions
    } else {
        sluice_core::roles::Role::Dashboard
    }
}

fn read_seed(path: &Path) -> anyhow::Result<Secret> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the NATS seed {}", path.display()))?;
    let seed = text.trim();
    // The seed itself never goes into a message.
    nkeys::KeyPair::from_seed(seed)
        .map_err(|e| anyhow::anyhow!("{} does not hold an NKey seed ({e})", path.display()))?;
    Ok(Secret::new(seed))
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; n];
    getrandom::fill(&mut bytes).expect("the system's random source");
    bytes
}

fn random_hex(n: usize) -> String {
    random_bytes(n).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_made_once_and_secrets_kept_from_the_cluster() {
        let tmp = tempfile::tempdir().expect("tmp");
        let values = Values {
            nats_dir: tmp.path().join("nats"),
            ..Values::default()
        };
        let err = load(&values, &Existing::new(), false).expect_err("no folder");
        assert!(err.to_string().contains("sluice nats init --out"), "{err}");
        let (first, lines) = load(&values, &Existing::new(), true).expect("init");
        assert!(lines.join("\n").contains("Wrote nats.conf"), "{lines:?}");
        assert!(first.seeds.contains_key("runner-default"));
        assert!(first.webhook_signing_secret.expose().starts_with("whsec_"));
        let existing: Existing = [(
            names::WEBHOOKS.to_owned(),
            [("github".to_owned(), "kept".to_owned())].into(),
        )]
        .into();
        let (second, lines) = load(&values, &existing, true).expect("again");
        assert!(lines.is_empty(), "{lines:?}");
        assert_eq!(second.seeds, first.seeds);
        assert_eq!(second.accounts_conf, first.accounts_conf);
        assert_eq!(second.github_webhook_secret.expose(), "kept");
    }
}
