//! `sluice install` and `sluice uninstall`: answers (a wizard on a terminal, or flags,
//! variables and a values file), rendered into typed objects by pure functions,
//! checked against the cluster before anything is written, then applied with
//! server-side apply so a second run converges and upgrades the same way.

pub mod apply;
pub mod args;
#[cfg(test)]
mod manifests;
pub mod material;
pub mod object;
pub mod preflight;
pub mod render;
pub mod smoke;
pub mod values;
pub mod wizard;

use std::io::IsTerminal;

use anyhow::{bail, Context};

pub use args::{InstallArgs, UninstallArgs};
use render::{names, Material};
use values::{Hosts, Values};

/// The answers from the defaults, the values file, then flags and variables.
pub fn answers(args: &InstallArgs) -> anyhow::Result<Values> {
    let base = match &args.values_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the values file {}", path.display()))?;
            Values::from_yaml(&path.display().to_string(), &text).map_err(anyhow::Error::msg)?
        }
        None => Values::default(),
    };
    Ok(args.set.apply(base))
}

/// Refuses invalid answers, one line per problem.
pub fn check(values: &Values) -> anyhow::Result<()> {
    if let Err(errors) = values.validate() {
        bail!("invalid answers:\n  {}", errors.join("\n  "));
    }
    Ok(())
}

/// A client for the kubeconfig context (the current one when none is named).
pub async fn client(context: Option<&str>) -> anyhow::Result<kube::Client> {
    let config = match context {
        Some(c) => kube::Config::from_kubeconfig(&kube::config::KubeConfigOptions {
            context: Some(c.to_owned()),
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot use kubeconfig context {c}"))?,
        None => kube::Config::infer().await.context(
            "no Kubernetes configuration: set KUBECONFIG or ~/.kube/config, or name --context",
        )?,
    };
    kube::Client::try_from(config).context("cannot make a Kubernetes client")
}

fn contexts() -> (Vec<String>, Option<String>) {
    match kube::config::Kubeconfig::read() {
        Ok(k) => (
            k.contexts.iter().map(|c| c.name.clone()).collect(),
            k.current_context.clone(),
        ),
        Err(_) => (Vec::new(), None),
    }
}

/// `sluice install`.
pub async fn run(args: InstallArgs) -> anyhow::Result<()> {
    let mut values = answers(&args)?;
    let interactive = !args.yes
        && !args.dry_run
        && std::io::stdin().is_terminal()
        && std::io::stderr().is_terminal();
    if interactive {
        let (contexts, current) = contexts();
        values = wizard::ask(values, &contexts, current.as_deref())?;
        // KEDA is offered only when the cluster has it; without an answer from the
        // API server it is not offered (preflight then says why the cluster is not
        // reachable).
        let keda_installed = if values.hosts.runner() {
            match client(values.context.as_deref()).await {
                Ok(c) => preflight::keda(&c).await == preflight::Keda::Served,
                Err(_) => false,
            }
        } else {
            false
        };
        values = wizard::ask_cluster_dependent(values, keda_installed)?;
    }
    check(&values)?;
    if args.dry_run {
        let material = if args.include_secrets {
            Some(material::load(&values, &Default::default(), false)?.0)
        } else {
            None
        };
        let objects = render::render(&values, material.as_ref());
        print!("{}", object::to_yaml_stream(&objects));
        return Ok(());
    }
    if interactive && !wizard::confirm(&values)? {
        println!("Nothing was changed.");
        return Ok(());
    }
    let client = client(values.context.as_deref()).await?;
    println!("Checking the cluster …");
    let mut planned = render::render(&values, None);
    if values.smoke {
        planned.extend(render::smoke(&values, "preflight", 1));
    }
    let report = preflight::run(&client, &values, &planned).await;
    for note in &report.notes {
        println!("  note: {note}");
    }
    if !report.failures.is_empty() {
        for failure in &report.failures {
            eprintln!("  ✗ {failure}");
        }
        bail!(
            "{} check(s) failed; nothing was changed",
            report.failures.len()
        );
    }
    println!(
        "  ✓ API server, permissions, namespace, storage{}",
        if values.hosts == Hosts::Runner {
            ", NATS"
        } else {
            ""
        }
    );
    let existing = if report.namespace_exists {
        apply::existing_secrets(
            &client,
            &values.namespace,
            &[names::WEBHOOKS, names::FORGE, names::DASHBOARD_ACTIONS],
        )
        .await?
    } else {
        Default::default()
    };
    let (material, lines) = material::load(&values, &existing, true)?;
    for line in lines {
        println!("  {line}");
    }
    let objects = render::render(&values, Some(&material));
    println!(
        "Applying {} objects to namespace {} …",
        objects.len(),
        values.namespace
    );
    let changed = apply::apply_all(&client, &objects, args.timeout, &mut std::io::stdout()).await?;
    if changed == 0 {
        println!("Nothing changed: everything already matched.");
    } else {
        println!("Sluice is installed: {changed} objects created or changed.");
    }
    let smoke = if values.smoke {
        let outcome = smoke::run(&client, &values, args.timeout, &mut std::io::stdout()).await?;
        for line in outcome.log.lines() {
            println!("  │ {line}");
        }
        match &outcome.result {
            Ok(()) => println!(
                "  ✓ the smoke run {} succeeded: cluster {} runs pipelines",
                outcome.run_id, values.cluster
            ),
            Err(why) => eprintln!("  ✗ {why}"),
        }
        outcome.result
    } else {
        Ok(())
    };
    for line in next_steps(&values, &material, std::io::stdout().is_terminal()) {
        println!("{line}");
    }
    smoke.map_err(|_| {
        anyhow::anyhow!(
            "Sluice is installed, but the smoke run failed (above); `sluice install` again, or with --smoke=false, changes nothing installed"
        )
    })
}

/// The webhook URLs and secrets to paste into the forges, and the next commands.
pub fn next_steps(v: &Values, m: &Material, show_secrets: bool) -> Vec<String> {
    let ns = &v.namespace;
    let mut out = vec![String::new()];
    if v.hosts.control_plane() {
        out.push(format!(
            "Webhooks (through the Ingress sluice-ingest for {}; without one: kubectl -n {ns} port-forward svc/sluice-ingest 8080):",
            v.ingest_host
        ));
        for (forge, path, key, secret) in [
            ("GitHub", "github", "github", &m.github_webhook_secret),
            ("GitLab", "gitlab", "gitlab", &m.gitlab_webhook_token),
            (
                "Standard Webhooks",
                "generic",
                "generic",
                &m.webhook_signing_secret,
            ),
        ] {
            let shown = if show_secrets {
                secret.expose().to_owned()
            } else {
                format!(
                    "kubectl -n {ns} get secret {} -o jsonpath='{{.data.{key}}}' | base64 -d",
                    names::WEBHOOKS
                )
            };
            out.push(format!(
                "  {forge:<18} https://{}/webhooks/{path}  secret: {shown}",
                v.ingest_host
            ));
        }
        out.push(String::new());
        out.push(format!(
            "Dashboard (commit statuses link to {}): kubectl -n {ns} port-forward svc/sluice-dashboard {port}, then http://127.0.0.1:{port}/runs",
            v.status_link_base_url(),
            port = values::dashboard_port(),
        ));
        if v.dashboard_url.is_none() {
            out.push("  Statuses link to the in-cluster Service: put your proxy or Ingress in front of svc/sluice-dashboard and set --dashboard-url to its URL.".into());
        }
        if let Some(token) = m
            .dashboard_actions_token
            .as_ref()
            .filter(|_| v.dashboard_actions)
        {
            let shown = if show_secrets {
                token.expose().to_owned()
            } else {
                format!(
                    "kubectl -n {ns} get secret {} -o jsonpath='{{.data.token}}' | base64 -d",
                    names::DASHBOARD_ACTIONS
                )
            };
            out.push(format!(
                "  Cancel and rerun take the actions token: {shown}"
            ));
        }
        out.push(String::new());
        out.push("Next:".into());
        out.push(format!(
            "  1. Reach NATS from here: kubectl -n {ns} port-forward svc/sluice-nats 4222"
        ));
        out.push(format!(
            "  2. Apply your pipelines: sluice --nats-nkey {}/admin.nk pipelines apply -f .sluice/",
            v.nats_dir.display()
        ));
        out.push(format!(
            "  3. Another cluster's runner: sluice cluster add NAME --out {dir}, re-run this install with --clusters {},NAME, then in that cluster: sluice install --hosts runner --cluster NAME --existing-nats-url URL --nats-seed {dir}/runner-NAME.nk",
            v.served_clusters().join(","),
            dir = v.nats_dir.display()
        ));
    } else {
        out.push("Next:".into());
        out.push(format!(
            "  Pipelines whose runtime.cluster is {} now run here: kubectl -n {ns} get pods -l sluice.dev/cluster={} -w",
            v.cluster, v.cluster
        ));
    }
    out.push(format!("  Remove it all: sluice uninstall --namespace {ns} (volumes are kept unless --delete-data)"));
    out
}

/// `sluice uninstall`.
pub async fn uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    let client = client(args.context.as_deref()).await?;
    println!("Removing Sluice from namespace {} …", args.namespace);
    apply::uninstall(
        &client,
        &args.namespace,
        args.delete_data,
        args.timeout,
        &mut std::io::stdout(),
    )
    .await
}
