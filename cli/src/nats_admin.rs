//! `sluice nats init` and `sluice cluster add/remove`: one NKey seed per role in a folder,
//! and the `nats.conf` whose users are always rendered from the seeds in that folder,
//! so running a command twice, or after a failure, converges on the same file.
//!
//! No server is needed. Seeds are created with mode 0600 from the first byte (a new
//! file opened with that mode, or a new one renamed over the old), and never printed
//! or logged: messages name files, not their content.
//!
//! This module uses nothing else of the binary, so the integration tests build it too
//! (`tests/src/auth.rs`) and start a real server from exactly what it writes.

use std::collections::BTreeSet;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use sluice_core::roles::{self, Role, ServerOptions, User};

/// The configuration file in the folder.
pub const CONFIG_FILE: &str = "nats.conf";

/// What to do; built from the command line in `args.rs`.
#[derive(Debug, Clone)]
pub enum Action {
    /// Write a new folder: every role's seed and `nats.conf`.
    Init {
        dir: PathBuf,
        clusters: Vec<String>,
        options: ServerOptions,
        force: bool,
    },
    /// Add one cluster's runner (or, with `force`, replace its seed: rotation).
    AddCluster {
        dir: PathBuf,
        cluster: String,
        force: bool,
    },
    /// Take one cluster's runner out.
    RemoveCluster { dir: PathBuf, cluster: String },
}

/// Runs `action` and prints what it did and what to do next.
pub fn run(action: Action) -> anyhow::Result<()> {
    for line in apply(action)? {
        println!("{line}");
    }
    Ok(())
}

/// Runs `action`; returns the lines to show the operator.
pub fn apply(action: Action) -> anyhow::Result<Vec<String>> {
    match action {
        Action::Init {
            dir,
            clusters,
            options,
            force,
        } => init(&dir, &clusters, &options, force),
        Action::AddCluster {
            dir,
            cluster,
            force,
        } => add_cluster(&dir, &cluster, force),
        Action::RemoveCluster { dir, cluster } => remove_cluster(&dir, &cluster),
    }
}

/// `sluice nats init`.
pub fn init(
    dir: &Path,
    clusters: &[String],
    options: &ServerOptions,
    force: bool,
) -> anyhow::Result<Vec<String>> {
    for cluster in clusters {
        sluice_core::pipeline::Name::parse(cluster).map_err(anyhow::Error::msg)?;
    }
    let roles = Role::all_for(clusters);
    let config = dir.join(CONFIG_FILE);
    let existing: Vec<String> = roles
        .iter()
        .map(Role::seed_file)
        .chain([CONFIG_FILE.to_owned()])
        .filter(|f| dir.join(f).exists())
        .collect();
    if !existing.is_empty() && !force {
        bail!(
            "{} already holds {}: refusing to replace credentials that may be in use; pass --force to replace them (every service then needs its new seed)",
            dir.display(),
            existing.join(", ")
        );
    }
    make_dir(dir)?;
    for role in &roles {
        write_seed(&dir.join(role.seed_file()), &new_seed()?, force)?;
    }
    let (users, mut out) = read_users(dir)?;
    write_config(&config, &roles::render_config(&users, options))?;
    let clusters_in_dir = runner_clusters(&users);
    // The summary goes before any warnings about the folder's files.
    out.0.insert(
        0,
        format!(
            "Wrote {} and {} seeds (mode 0600) in {}: {}.",
            CONFIG_FILE,
            roles.len(),
            dir.display(),
            roles
                .iter()
                .map(Role::seed_file)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let extra: Vec<&str> = clusters_in_dir
        .iter()
        .map(String::as_str)
        .filter(|c| !clusters.iter().any(|l| l == c))
        .collect();
    if !extra.is_empty() {
        out.push(format!(
            "Also kept as users, since their seeds are in {}: {} (`sluice cluster remove NAME --out {}` takes one out).",
            dir.display(),
            extra
                .iter()
                .map(|c| format!("runner-{c}"))
                .collect::<Vec<_>>()
                .join(", "),
            dir.display()
        ));
    }
    out.push(String::new());
    out.push("Next:".into());
    out.push(format!(
        "  1. Start NATS with it: nats-server -c {}",
        config.display()
    ));
    out.push(format!(
        "  2. Create the streams and each cluster's consumer: sluice --nats-nkey {} streams apply --clusters {}",
        dir.join(Role::Admin.seed_file()).display(),
        clusters_in_dir.join(",")
    ));
    out.push(
        "  3. Give each service its own seed with --nats-nkey (SLUICE_NATS_NKEY): ingest.nk, dispatcher.nk, dashboard.nk (dashboard-actions.nk for a dashboard with --allow-actions); runner-<cluster>.nk only into that cluster (see docs/security.md). Keep admin.nk with the operators."
            .into(),
    );
    Ok(out.0)
}

/// `sluice cluster add`.
pub fn add_cluster(dir: &Path, cluster: &str, force: bool) -> anyhow::Result<Vec<String>> {
    sluice_core::pipeline::Name::parse(cluster).map_err(anyhow::Error::msg)?;
    let config = existing_config(dir)?;
    let role = Role::Runner(cluster.to_owned());
    let seed = dir.join(role.seed_file());
    let mut out = Lines::default();
    if !seed.exists() {
        write_seed(&seed, &new_seed()?, false)?;
        out.push(format!(
            "Created {} (mode 0600) for cluster {cluster}.",
            seed.display()
        ));
    } else if force {
        write_seed(&seed, &new_seed()?, true)?;
        out.push(format!(
            "Replaced {} with a new seed (rotation): the old one stops working when NATS reloads.",
            seed.display()
        ));
    } else {
        out.push(format!(
            "Cluster {cluster} already has a credential ({}); kept it (--force replaces it with a new one: rotation).",
            seed.display()
        ));
    }
    let users = rerender(dir, &config, &mut out)?;
    out.push(String::new());
    out.push("Next:".into());
    out.push(reload_hint(&config));
    out.push(format!(
        "  2. Create its consumer: sluice --nats-nkey {} streams apply --clusters {}",
        dir.join(Role::Admin.seed_file()).display(),
        runner_clusters(&users).join(",")
    ));
    out.push(format!(
        "  3. Install the seed in cluster {cluster} only, e.g. kubectl create secret generic sluice-nats-nkey --from-file=nkey={}, and run the runner with --cluster {cluster} --nats-nkey <mounted file>.",
        seed.display()
    ));
    Ok(out.0)
}

/// Gives a folder made before `role` existed its seed, and renders `nats.conf`'s users
/// again; a seed already there is kept. For roles not every folder must hold
/// ([`Role::required`]), such as `dashboard-actions`.
pub fn add_role(dir: &Path, role: &Role) -> anyhow::Result<Vec<String>> {
    let config = existing_config(dir)?;
    let seed = dir.join(role.seed_file());
    let mut out = Lines::default();
    if seed.exists() {
        return Ok(out.0);
    }
    write_seed(&seed, &new_seed()?, false)?;
    out.push(format!(
        "Created {} (mode 0600) for the {} role.",
        seed.display(),
        role.name()
    ));
    rerender(dir, &config, &mut out)?;
    Ok(out.0)
}

/// `sluice cluster remove`.
pub fn remove_cluster(dir: &Path, cluster: &str) -> anyhow::Result<Vec<String>> {
    sluice_core::pipeline::Name::parse(cluster).map_err(anyhow::Error::msg)?;
    let config = existing_config(dir)?;
    let seed = dir.join(Role::Runner(cluster.to_owned()).seed_file());
    let mut out = Lines::default();
    match std::fs::remove_file(&seed) {
        Ok(()) => out.push(format!("Deleted {}.", seed.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => out.push(format!(
            "Cluster {cluster} has no credential in {}; nothing to delete.",
            dir.display()
        )),
        Err(e) => return Err(e).with_context(|| format!("cannot delete {}", seed.display())),
    }
    rerender(dir, &config, &mut out)?;
    out.push(String::new());
    out.push("Next:".into());
    out.push(reload_hint(&config));
    out.push(format!(
        "  2. Its runners are disconnected by the reload. Its consumer sluice-runner-{cluster} and any runs still queued for it stay in SLUICE_RUNS until an operator deletes them."
    ));
    Ok(out.0)
}

/// The users the seeds in `dir` stand for, and a line for each file that was skipped
/// or is readable by others. Every fixed role must have its seed: the configuration is
/// rendered from the folder, and a missing admin or ingest seed would otherwise drop
/// that user.
pub fn read_users(dir: &Path) -> anyhow::Result<(Vec<User>, Lines)> {
    let mut out = Lines::default();
    let mut users = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".nk"))
        else {
            continue;
        };
        let role = match Role::parse(stem) {
            Ok(role) => role,
            Err(_) => {
                out.push(format!(
                    "Skipped {}: not a role's seed (admin, ingest, dispatcher, dashboard, dashboard-actions, runner-<cluster>).",
                    path.display()
                ));
                continue;
            }
        };
        let meta = std::fs::metadata(&path)?;
        if meta.permissions().mode() & 0o077 != 0 {
            out.push(format!(
                "Warning: {} can be read by other users (mode {:o}); run chmod 600 on it.",
                path.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        users.push(User {
            public_key: public_key(&path)?,
            role,
        });
    }
    let missing: Vec<String> = Role::FIXED
        .iter()
        .filter(|r| r.required() && !users.iter().any(|u| &u.role == *r))
        .map(Role::seed_file)
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} lacks {}: nats.conf is rendered from the seeds in this folder, so put them back (or run `sluice nats init --force` to start over)",
            dir.display(),
            missing.join(", ")
        );
    }
    users.sort_by(|a, b| a.role.cmp(&b.role));
    Ok((users, out))
}

/// Lines for the operator.
#[derive(Debug, Default)]
pub struct Lines(pub Vec<String>);

impl Lines {
    fn push(&mut self, line: String) {
        self.0.push(line);
    }
}

fn runner_clusters(users: &[User]) -> Vec<String> {
    let clusters: BTreeSet<String> = users
        .iter()
        .filter_map(|u| match &u.role {
            Role::Runner(c) => Some(c.clone()),
            _ => None,
        })
        .collect();
    clusters.into_iter().collect()
}

fn reload_hint(config: &Path) -> String {
    format!(
        "  1. Reload NATS so it takes the new users ({}): nats-server --signal reload (or kill -HUP <pid>); for the installed StatefulSet, update its config Secret and run kubectl rollout restart statefulset/sluice-nats.",
        config.display()
    )
}

fn existing_config(dir: &Path) -> anyhow::Result<PathBuf> {
    let config = dir.join(CONFIG_FILE);
    if !config.exists() {
        bail!(
            "{} not found: run `sluice nats init --out {} --clusters …` first",
            config.display(),
            dir.display()
        );
    }
    Ok(config)
}

/// Renders the users block of `config` from the seeds in `dir`.
fn rerender(dir: &Path, config: &Path, out: &mut Lines) -> anyhow::Result<Vec<User>> {
    let (users, warnings) = read_users(dir)?;
    out.0.extend(warnings.0);
    let old = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let new = roles::replace_users(&old, &users)
        .with_context(|| format!("cannot rewrite the users of {}", config.display()))?;
    if new == old {
        out.push(format!(
            "{} already lists exactly the users whose seeds are in {}; unchanged.",
            config.display(),
            dir.display()
        ));
    } else {
        write_config(config, &new)?;
        out.push(format!(
            "Rewrote the users of {} from the seeds in {}.",
            config.display(),
            dir.display()
        ));
    }
    Ok(users)
}

fn new_seed() -> anyhow::Result<String> {
    nkeys::KeyPair::new_user()
        .seed()
        .map_err(|e| anyhow::anyhow!("cannot make an NKey seed: {e}"))
}

fn public_key(path: &Path) -> anyhow::Result<String> {
    let seed =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    // The seed itself never goes into an error message.
    let pair = nkeys::KeyPair::from_seed(seed.trim())
        .map_err(|e| anyhow::anyhow!("{} does not hold an NKey seed ({e})", path.display()))?;
    if pair.key_pair_type() != nkeys::KeyPairType::User {
        bail!(
            "{} holds an NKey seed of another kind; a user seed starts with SU",
            path.display()
        );
    }
    Ok(pair.public_key())
}

fn make_dir(dir: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes a seed so that no other user can read it at any moment: a new file opened
/// with mode 0600, renamed over the old seed when replacing one (a reader sees the old
/// seed or the new, never a partial one).
fn write_seed(path: &Path, seed: &str, replace: bool) -> anyhow::Result<()> {
    let write = |target: &Path| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(target)?;
        file.write_all(seed.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()
    };
    if !replace {
        return write(path).with_context(|| format!("cannot create {}", path.display()));
    }
    let tmp = path.with_extension("nk.new");
    remove_if_present(&tmp)?;
    write(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// Writes the configuration through a new file renamed over the old, so a server
/// reloading meanwhile reads the old file or the new one, never half of one. It holds
/// public keys only.
fn write_config(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("conf.new");
    remove_if_present(&tmp)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    fn init_ab(dir: &Path) -> Vec<String> {
        init(
            dir,
            &["a".into(), "b".into()],
            &ServerOptions::default(),
            false,
        )
        .expect("init")
    }

    #[test]
    fn init_writes_private_seeds_and_a_config_of_their_public_keys() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("nats");
        let out = init_ab(&dir).join("\n");
        assert_eq!(mode(&dir), 0o700);
        let config = std::fs::read_to_string(dir.join(CONFIG_FILE)).expect("config");
        for role in Role::all_for(&["a", "b"]) {
            let seed_path = dir.join(role.seed_file());
            assert_eq!(mode(&seed_path), 0o600, "{}", role.name());
            let seed = std::fs::read_to_string(&seed_path).expect("seed");
            assert!(seed.starts_with("SU"));
            assert!(!config.contains(seed.trim()), "a seed in nats.conf");
            assert!(!out.contains(seed.trim()), "a seed printed");
            assert!(config.contains(&public_key(&seed_path).expect("key")));
        }
        assert!(out.contains("streams apply --clusters a,b"), "{out}");

        let again =
            init(&dir, &["a".into()], &ServerOptions::default(), false).expect_err("seeds exist");
        assert!(again.to_string().contains("--force"), "{again}");
        let before = std::fs::read_to_string(dir.join("admin.nk")).expect("seed");
        init(&dir, &["a".into()], &ServerOptions::default(), true).expect("forced");
        assert_ne!(
            std::fs::read_to_string(dir.join("admin.nk")).expect("seed"),
            before
        );
        assert_eq!(mode(&dir.join("admin.nk")), 0o600);
        // runner-b's seed is still in the folder, so it is still a user.
        let config = std::fs::read_to_string(dir.join(CONFIG_FILE)).expect("config");
        assert!(config.contains("# runner-b\n"));

        let bad = init(
            &tmp.path().join("x"),
            &["EU".into()],
            &ServerOptions::default(),
            false,
        );
        assert!(bad.is_err());
        assert!(
            !tmp.path().join("x").exists(),
            "nothing written for a bad name"
        );
    }

    #[test]
    fn a_folder_from_before_the_acting_dashboard_is_read_and_given_its_seed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("nats");
        init_ab(&dir);
        let acting = Role::DashboardActions;
        std::fs::remove_file(dir.join(acting.seed_file())).expect("as before the role");
        let (users, _) = read_users(&dir).expect("an older folder is still read");
        assert!(!users.iter().any(|u| u.role == acting));
        let out = add_role(&dir, &acting).expect("add").join("\n");
        assert!(out.contains("dashboard-actions.nk"), "{out}");
        assert_eq!(mode(&dir.join(acting.seed_file())), 0o600);
        let config = std::fs::read_to_string(dir.join(CONFIG_FILE)).expect("config");
        let key = public_key(&dir.join(acting.seed_file())).expect("key");
        assert!(config.contains(&key), "the new user is rendered");
        assert!(add_role(&dir, &acting).expect("again").is_empty(), "kept");
        // A required role's seed missing is still refused.
        std::fs::remove_file(dir.join(Role::Dashboard.seed_file())).expect("rm");
        let err = read_users(&dir).expect_err("dashboard.nk is required");
        assert!(err.to_string().contains("dashboard.nk"), "{err}");
    }

    #[test]
    fn cluster_add_and_remove_converge_and_say_so() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        let missing = add_cluster(dir, "c", false).expect_err("no config");
        assert!(missing.to_string().contains("nats init"), "{missing}");
        init_ab(dir);
        let conf = dir.join(CONFIG_FILE);
        // An operator's edit outside the users survives.
        let edited = std::fs::read_to_string(&conf).expect("config").replace(
            "sync_interval: always",
            "sync_interval: always\n  max_file_store: 10G",
        );
        std::fs::write(&conf, &edited).expect("edit");

        let out = add_cluster(dir, "c", false).expect("add").join("\n");
        assert!(out.contains("Created"), "{out}");
        assert!(out.contains("streams apply --clusters a,b,c"), "{out}");
        assert_eq!(mode(&dir.join("runner-c.nk")), 0o600);
        let with_c = std::fs::read_to_string(&conf).expect("config");
        assert!(with_c.contains("# runner-c\n") && with_c.contains("max_file_store: 10G"));

        let out = add_cluster(dir, "c", false).expect("add twice").join("\n");
        assert!(
            out.contains("already has a credential") && out.contains("unchanged"),
            "{out}"
        );
        assert_eq!(std::fs::read_to_string(&conf).expect("config"), with_c);

        let old_key = public_key(&dir.join("runner-c.nk")).expect("key");
        add_cluster(dir, "c", true).expect("rotate");
        let rotated = std::fs::read_to_string(&conf).expect("config");
        assert!(!rotated.contains(&old_key));
        assert!(rotated.contains(&public_key(&dir.join("runner-c.nk")).expect("key")));

        let out = remove_cluster(dir, "c").expect("remove").join("\n");
        assert!(out.contains("Deleted") && out.contains("Rewrote"), "{out}");
        assert!(!dir.join("runner-c.nk").exists());
        assert_eq!(std::fs::read_to_string(&conf).expect("config"), edited);
        let out = remove_cluster(dir, "c").expect("remove twice").join("\n");
        assert!(
            out.contains("nothing to delete") && out.contains("unchanged"),
            "{out}"
        );

        std::fs::remove_file(dir.join("ingest.nk")).expect("rm");
        let err = add_cluster(dir, "d", false).expect_err("ingest seed missing");
        assert!(err.to_string().contains("ingest.nk"), "{err}");
        assert_eq!(std::fs::read_to_string(&conf).expect("config"), edited);
        assert!(add_cluster(dir, "D", false).is_err());
    }
}
