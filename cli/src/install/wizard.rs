//! The questions `sluice install` asks on a terminal. Each starts from the answer the
//! flags, variables and values file gave (or the default), explained in one line, so
//! pressing Enter at every prompt gives exactly what `--yes` gives.

use std::path::PathBuf;

use dialoguer::theme::SimpleTheme;
use dialoguer::{Confirm, Input, Password, Select};

use super::values::{Hosts, Secret, Values};

fn explain(line: &str) {
    eprintln!("  {line}");
}

fn text(prompt: &str, default: &str) -> anyhow::Result<String> {
    Ok(Input::<String>::with_theme(&SimpleTheme)
        .with_prompt(prompt)
        .default(default.to_owned())
        .interact_text()?)
}

fn optional_text(prompt: &str, default: Option<&str>) -> anyhow::Result<Option<String>> {
    let answer = Input::<String>::with_theme(&SimpleTheme)
        .with_prompt(prompt)
        .default(default.unwrap_or_default().to_owned())
        .allow_empty(true)
        .show_default(default.is_some())
        .interact_text()?;
    Ok(Some(answer.trim().to_owned()).filter(|a| !a.is_empty()))
}

/// A secret typed without echo; Enter keeps what was given (or generates one).
fn secret(
    prompt: &str,
    given: &Option<Secret>,
    empty_means: &str,
) -> anyhow::Result<Option<Secret>> {
    let hint = if given.is_some() {
        "Enter keeps the one given"
    } else {
        empty_means
    };
    let answer = Password::with_theme(&SimpleTheme)
        .with_prompt(format!("{prompt} ({hint})"))
        .allow_empty_password(true)
        .interact()?;
    Ok(if answer.is_empty() {
        given.clone()
    } else {
        Some(Secret::new(answer))
    })
}

/// A yes/no question; the answer is taken on Enter (`y`, `n`, or Enter alone for the
/// default), so a typed line is never left over for the next prompt.
fn yes_no(prompt: &str, default: bool) -> anyhow::Result<bool> {
    Ok(Confirm::with_theme(&SimpleTheme)
        .with_prompt(prompt)
        .default(default)
        .wait_for_newline(true)
        .interact()?)
}

/// Asks every question; returns the answers.
pub fn ask(mut v: Values, contexts: &[String], current: Option<&str>) -> anyhow::Result<Values> {
    eprintln!("Installing Sluice. Enter takes the answer in brackets.\n");
    if contexts.len() > 1 {
        explain("The kubeconfig context: the cluster to install into.");
        let chosen = v.context.as_deref().or(current);
        let default = contexts
            .iter()
            .position(|c| Some(c.as_str()) == chosen)
            .unwrap_or(0);
        let i = Select::with_theme(&SimpleTheme)
            .with_prompt("Context")
            .items(contexts)
            .default(default)
            .interact()?;
        if Some(contexts[i].as_str()) != current || v.context.is_some() {
            v.context = Some(contexts[i].clone());
        }
    }
    explain("The namespace for Sluice's services and the runs' Pods (created if missing).");
    v.namespace = text("Namespace", &v.namespace)?;
    explain(
        "What this cluster hosts: the control plane (NATS, ingest, dispatcher), a runner, or both.",
    );
    let all = [Hosts::Both, Hosts::ControlPlane, Hosts::Runner];
    let labels = [
        "both: the control plane and this cluster's runner",
        "control-plane: NATS, ingest and the dispatcher",
        "runner: runs this cluster's Pods, connecting out to NATS elsewhere",
    ];
    let i = Select::with_theme(&SimpleTheme)
        .with_prompt("This cluster hosts")
        .items(labels)
        .default(all.iter().position(|h| *h == v.hosts).unwrap_or(0))
        .interact()?;
    v.hosts = all[i];
    explain("This cluster's name, as pipelines' runtime.cluster names it.");
    v.cluster = text("Cluster name", &v.cluster)?;
    if v.hosts == Hosts::Runner {
        explain("The NATS URL this cluster's runners connect out to (tls:// or wss:// across networks).");
        loop {
            v.nats_url = optional_text("NATS URL", v.nats_url.as_deref())?;
            if v.nats_url.is_some() {
                break;
            }
            eprintln!("  A runner-only cluster needs it.");
        }
        explain(&format!("This cluster's credential: runner-{}.nk, from `sluice cluster add {}` on the control plane.", v.cluster, v.cluster));
        let default = v.nats_seed.as_ref().map(|p| p.display().to_string());
        loop {
            v.nats_seed = optional_text("Runner seed file", default.as_deref())?.map(PathBuf::from);
            if v.nats_seed.is_some() {
                break;
            }
            eprintln!("  A runner-only cluster needs it.");
        }
    } else {
        explain("An existing NATS to use; empty installs a 3-node NATS cluster here.");
        v.nats_url = optional_text("Existing NATS URL", v.nats_url.as_deref())?;
        explain("The folder of NATS credentials (`sluice nats init`); made here if missing. Keep it safe.");
        v.nats_dir = PathBuf::from(text(
            "Credentials folder",
            &v.nats_dir.display().to_string(),
        )?);
        explain("The host name webhooks reach ingest at (the example Ingress).");
        v.ingest_host = text("Webhook host", &v.ingest_host)?;
        explain("The dashboard's URL as users reach it (your Ingress or proxy); commit statuses link there. Empty: the in-cluster Service.");
        v.dashboard_url = optional_text("Dashboard URL", v.dashboard_url.as_deref())?;
        explain("The dashboard only reads; it can also offer cancel and rerun to holders of a token (generated, in a Secret).");
        v.dashboard_actions = yes_no(
            "Allow cancel and rerun on the dashboard?",
            v.dashboard_actions,
        )?;
        explain("Webhook secrets: paste the forge's, or press Enter to keep or generate one.");
        v.github_webhook_secret = secret(
            "GitHub webhook secret",
            &v.github_webhook_secret,
            "Enter generates one",
        )?;
        v.gitlab_webhook_token = secret(
            "GitLab webhook token",
            &v.gitlab_webhook_token,
            "Enter generates one",
        )?;
        explain("Forge tokens let the dispatcher post commit statuses and read changed files (optional).");
        v.github_token = secret("GitHub token", &v.github_token, "Enter for none")?;
        v.gitlab_token = secret("GitLab token", &v.gitlab_token, "Enter for none")?;
    }
    Ok(v)
}

/// The questions that depend on the cluster: KEDA's ScaledObject, offered only when
/// `keda_installed` (its CRD exists) and the cluster hosts a runner; the smoke run,
/// where the control plane (and so the admin seed) is installed.
pub fn ask_cluster_dependent(mut v: Values, keda_installed: bool) -> anyhow::Result<Values> {
    if v.hosts.runner() && keda_installed {
        explain(&format!(
            "KEDA is installed: it can scale the runner on this cluster's queue, 1 to {} replicas (it then owns the replica count).",
            v.keda_max_replicas
        ));
        v.keda = yes_no("Autoscale the runner with KEDA?", v.keda)?;
    }
    if v.hosts.control_plane() {
        explain(&format!(
            "A smoke run applies a one-step pipeline for cluster {}, starts it and shows its log (it needs a ready runner for the cluster).",
            v.cluster
        ));
        v.smoke = yes_no("Run a smoke pipeline at the end?", v.smoke)?;
    }
    Ok(v)
}

/// The summary lines of the answers (no secret).
pub fn summary(v: &Values) -> Vec<String> {
    let mut lines = vec![
        format!(
            "context:    {}",
            v.context.as_deref().unwrap_or("(current)")
        ),
        format!("namespace:  {}", v.namespace),
        format!("hosts:      {}", v.hosts),
        format!("cluster:    {}", v.cluster),
        format!("image:      {}", v.image),
    ];
    if v.hosts.control_plane() {
        lines.push(format!(
            "NATS:       {}",
            v.nats_url.clone().unwrap_or_else(|| format!(
                "3 nodes here ({} each), credentials in {}",
                v.nats_storage_size,
                v.nats_dir.display()
            ))
        ));
        lines.push(format!("webhooks:   https://{}/webhooks/…", v.ingest_host));
        lines.push(format!(
            "dashboard:  {} ({})",
            v.status_link_base_url(),
            if v.dashboard_actions {
                "cancel and rerun with a token"
            } else {
                "read-only"
            }
        ));
        lines.push(format!(
            "tokens:     {}",
            match (&v.github_token, &v.gitlab_token) {
                (None, None) => "none (no commit statuses)",
                (Some(_), None) => "GitHub",
                (None, Some(_)) => "GitLab",
                (Some(_), Some(_)) => "GitHub, GitLab",
            }
        ));
    } else {
        lines.push(format!(
            "NATS:       {}",
            v.nats_url.as_deref().unwrap_or("?")
        ));
        lines.push(format!(
            "seed:       {}",
            v.nats_seed
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ));
    }
    if v.smoke {
        lines.push(format!(
            "smoke:      a one-step pipeline on cluster {} at the end",
            v.cluster
        ));
    }
    if v.hosts.runner() {
        lines.push(if v.keda {
            format!(
                "runners:    KEDA, 1 to {} replicas on {}",
                v.keda_max_replicas,
                v.keda_monitoring_endpoint()
            )
        } else {
            format!("runners:    {} replicas", v.runner_replicas)
        });
    }
    lines
}

/// Shows the summary and asks to go on.
pub fn confirm(v: &Values) -> anyhow::Result<bool> {
    eprintln!("\nSummary:");
    for line in summary(v) {
        eprintln!("  {line}");
    }
    Ok(Confirm::with_theme(&SimpleTheme)
        .with_prompt("Check the cluster and install?")
        .default(true)
        .interact()?)
}
