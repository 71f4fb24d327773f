//! `sluice dev`: the whole system on one machine, in one process: a NATS server (the
//! provisioned one, unless a URL is given), ingest, the dispatcher and a local runner,
//! with pipelines loaded from a folder and reloaded when it changes.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use secrecy::SecretString;
use sluice_core::nats::NatsOptions;
use sluice_core::streams::{self, StreamSettings};
use sluice_dispatcher::forge::ForgeConfig;
use sluice_dispatcher::reporter::ReporterConfig;
use sluice_dispatcher::DispatcherConfig;
use sluice_ingest::{IngestConfig, SecretSources, Secrets};
use sluice_runner::RunnerConfig;
use tokio_util::sync::CancellationToken;

use crate::args::{DevArgs, DevForgeArgs, ExecutorKind, Global};

/// The cluster of the local runner, and of pipelines that name none.
const LOCAL_CLUSTER: &str = "local";
/// The logs dev mode keeps: a laptop's disk, not a cluster's volume. NATS reserves a
/// stream's byte limit from its storage (75% of the disk free when it starts), so the
/// production default of 5 GiB would refuse to start on a machine with 6 GB free.
const DEV_LOGS_MAX_BYTES: i64 = 256 * 1024 * 1024;

pub async fn run(global: &Global, a: DevArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    // Refused before anything starts.
    let reporting = reporter(&a.forge)?;
    // The current kubeconfig context's cluster, checked before anything starts.
    let kube = match a.executor {
        ExecutorKind::Kubernetes => Some(crate::runner::kube_executor(&a.kube).await?),
        ExecutorKind::Local => None,
    };
    std::fs::create_dir_all(&a.data)
        .with_context(|| format!("cannot create {}", a.data.display()))?;
    let (nats_url, server) = if nats_url_given() {
        (global.nats_url.clone(), None)
    } else {
        let (url, child) = start_nats(&a.data, a.nats_port).await?;
        (url, Some(child))
    };
    let nats = |name: &str| NatsOptions {
        url: nats_url.clone(),
        ..global.nats(name)
    };

    let secret = match std::env::var("SLUICE_GITHUB_WEBHOOK_SECRET") {
        Ok(s) if !s.is_empty() => s,
        _ => dev_secret(&a.data)?,
    };
    let github = SecretString::from(secret.clone());
    let gitlab = std::env::var("SLUICE_GITLAB_WEBHOOK_TOKEN")
        .ok()
        .map(SecretString::from);
    let signing = std::env::var("SLUICE_WEBHOOK_SIGNING_SECRET")
        .ok()
        .map(SecretString::from);
    let secrets = Secrets::load(SecretSources {
        github: Some(&github),
        gitlab: gitlab.as_ref(),
        generic: signing.as_ref(),
        file: None,
    })?;

    // Pipelines first, so the dispatcher starts with them.
    let client =
        sluice_core::nats::connect_once(&nats("sluice-dev"), Duration::from_secs(10)).await?;
    let js = async_nats::jetstream::new(client);
    // The same code path as `sluice streams apply`: dev mode is its own operator.
    let settings = StreamSettings {
        clusters: vec![streams::ClusterConsumer::new(LOCAL_CLUSTER)],
        logs_max_bytes: DEV_LOGS_MAX_BYTES,
        ..StreamSettings::default()
    };
    streams::apply(&js, &settings, false).await?;
    let kv = streams::bucket(&js, sluice_core::subjects::PIPELINES_BUCKET).await?;
    let mut applied = BTreeSet::new();
    let clusters = reload(&kv, &a.pipelines, &mut applied).await;

    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("cannot listen on {} (set --listen)", a.listen))?;
    // One port for everything in dev mode: the webhooks and ingest's admin endpoints.
    let ingest = tokio::spawn(sluice_ingest::serve(
        listener,
        None,
        IngestConfig {
            admin_listen: None,
            ..IngestConfig::new(a.listen, nats("sluice-ingest"), secrets)
        },
        shutdown.clone(),
    ));
    // The dashboard before the dispatcher: commit statuses link to where it listens.
    let dashboard = sluice_dashboard::start(
        sluice_core::nats::connect(&nats("sluice-dashboard")).await?,
        a.dashboard_listen,
        None,
        shutdown.clone(),
    )
    .await
    .with_context(|| "cannot serve the dashboard (set --dashboard-listen)")?;
    let reporter = reporting.map(|r| ReporterConfig {
        link_base_url: link_base_url(r.link_base_url.as_deref(), dashboard.addr),
        ..r.config
    });
    let statuses = statuses_line(reporter.as_ref());
    let dispatcher = tokio::spawn(sluice_dispatcher::run(
        DispatcherConfig {
            default_cluster: LOCAL_CLUSTER.into(),
            forge: ForgeConfig {
                github_token: a.forge.github_token.clone(),
                github_api_url: a.forge.github_api_url.clone(),
                gitlab_token: a.forge.gitlab_token.clone(),
                gitlab_api_url: a.forge.gitlab_api_url.clone(),
                ..ForgeConfig::default()
            },
            reporter,
            ..DispatcherConfig::new(nats("sluice-dispatcher"))
        },
        shutdown.clone(),
    ));
    let workdir = a.data.join("workspaces");
    let mut runners = Vec::new();
    for cluster in &clusters {
        let mut config = RunnerConfig::new(nats("sluice-runner"), cluster.clone(), workdir.clone());
        config.runner_id = format!("dev-{cluster}");
        if let Some(kube) = &kube {
            config.executor = sluice_runner::Executor::Kubernetes(kube.clone());
        }
        runners.push(tokio::spawn(sluice_runner::run(config, shutdown.clone())));
    }

    let base = format!("http://{}", a.listen);
    println!();
    println!("Sluice is running (dev mode).");
    println!("  webhooks   {base}/webhooks/github   secret: {secret}");
    println!("             {base}/webhooks/gitlab   (set SLUICE_GITLAB_WEBHOOK_TOKEN)");
    println!("             {base}/webhooks/generic  (set SLUICE_WEBHOOK_SIGNING_SECRET)");
    println!("  dashboard  http://{}/runs", dashboard.addr);
    println!("  statuses   {statuses}");
    println!("  NATS       {nats_url}");
    println!(
        "  pipelines  {} ({} loaded; changes are picked up)",
        a.pipelines.display(),
        applied.len()
    );
    let names = clusters.iter().cloned().collect::<Vec<_>>().join(", ");
    match &kube {
        Some(_) => println!(
            "  runner     Kubernetes executor (current kubeconfig context) for cluster(s) {names}"
        ),
        None => println!(
            "  runner     local executor for cluster(s) {names}: step images are ignored and nothing is isolated"
        ),
    }
    println!();
    println!("Next, in another terminal:");
    println!("  export SLUICE_NATS_URL={nats_url} SLUICE_GITHUB_WEBHOOK_SECRET={secret}");
    println!("  ./scripts/send-webhook --url {base}/webhooks/github PAYLOAD.json");
    println!("  sluice runs list");
    println!("  sluice events list");
    println!();

    // Reload pipelines when the folder changes, until shutdown.
    let mut seen = fingerprint(&a.pipelines);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = fingerprint(&a.pipelines);
        if now != seen {
            seen = now;
            let clusters_now = reload(&kv, &a.pipelines, &mut applied).await;
            let new: Vec<&String> = clusters_now.difference(&clusters).collect();
            if !new.is_empty() {
                eprintln!("note: pipelines now name cluster(s) {new:?}; restart `sluice dev` to run them locally");
            }
        }
    }
    for task in runners {
        let _ = task.await;
    }
    let _ = dispatcher.await;
    let _ = ingest.await;
    dashboard.wait().await;
    if let Some(mut server) = server {
        // SIGTERM: the server flushes its store and exits.
        if let Some(pid) = server.id() {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), server.wait()).await;
    }
    Ok(())
}

/// What `--report-statuses` asks for, before the dashboard's address is known: the
/// reporter's settings, and the link base if one was given. None: no statuses.
#[derive(Debug)]
struct Reporting {
    config: ReporterConfig,
    link_base_url: Option<String>,
}

/// Commit statuses are sent only with `--report-statuses` and a forge token to send
/// them with; the one without the other is refused rather than silently ignored.
fn reporter(f: &DevForgeArgs) -> anyhow::Result<Option<Reporting>> {
    if !f.report_statuses {
        return Ok(None);
    }
    if f.github_token.is_none() && f.gitlab_token.is_none() {
        bail!("--report-statuses needs a forge token to send them with: --github-token or --gitlab-token (SLUICE_GITHUB_TOKEN, SLUICE_GITLAB_TOKEN)");
    }
    Ok(Some(Reporting {
        config: ReporterConfig {
            requests_per_hour: f.forge_requests_per_hour,
            ..ReporterConfig::default()
        },
        link_base_url: f.status_link_base_url.clone(),
    }))
}

/// Where commit statuses link: `--status-link-base-url` when given (without a trailing
/// `/`), else this dev mode's dashboard at the address it is bound to; an unspecified
/// address (`0.0.0.0`) is opened as the loopback one.
fn link_base_url(given: Option<&str>, dashboard: SocketAddr) -> String {
    if let Some(url) = given {
        return url.trim_end_matches('/').to_owned();
    }
    let ip = match dashboard.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, dashboard.port()))
}

/// The banner's line about commit statuses.
fn statuses_line(reporter: Option<&ReporterConfig>) -> String {
    match reporter {
        Some(r) => format!("commit statuses link to {}/runs/<run id>", r.link_base_url),
        None => "not reported (--report-statuses with --github-token or --gitlab-token)".into(),
    }
}

/// Validates and applies every pipeline of `dir`; removes the ones that left it.
/// Returns the clusters to run locally. Errors are printed and the previous pipelines
/// stay in place.
async fn reload(
    kv: &async_nats::jetstream::kv::Store,
    dir: &Path,
    applied: &mut BTreeSet<String>,
) -> BTreeSet<String> {
    let mut clusters = BTreeSet::from([LOCAL_CLUSTER.to_owned()]);
    if !dir.exists() {
        eprintln!(
            "note: no pipeline folder at {} (set --pipelines)",
            dir.display()
        );
        return clusters;
    }
    let pipelines = match crate::pipelines::load(dir) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pipelines not reloaded: {e}");
            return clusters;
        }
    };
    let mut now = BTreeSet::new();
    for p in &pipelines {
        for c in &p.runtime.cluster.0 {
            clusters.insert(c.to_string());
        }
        let name = p.name.to_string();
        match serde_json::to_vec(p) {
            Ok(value) => {
                if let Err(e) = kv.put(&name, value.into()).await {
                    eprintln!("cannot store pipeline {name}: {e}");
                }
            }
            Err(e) => eprintln!("cannot encode pipeline {name}: {e}"),
        }
        now.insert(name);
    }
    for gone in applied.difference(&now) {
        let _ = kv.delete(gone).await;
        eprintln!("pipeline/{gone} removed");
    }
    eprintln!(
        "pipelines loaded from {}: {}",
        dir.display(),
        now.iter().cloned().collect::<Vec<_>>().join(", ")
    );
    *applied = now;
    clusters
}

/// Names, sizes and modification times of the folder's YAML files.
fn fingerprint(dir: &Path) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.insert(path, (meta.len(), meta.modified().ok()));
            }
        }
    }
    out
}

fn nats_url_given() -> bool {
    std::env::var_os("SLUICE_NATS_URL").is_some()
        || std::env::args().any(|a| a == "--nats-url" || a.starts_with("--nats-url="))
}

/// Starts the provisioned `nats-server` with JetStream and its data under `data/`.
async fn start_nats(data: &Path, port: u16) -> anyhow::Result<(String, tokio::process::Child)> {
    let bin = nats_binary()
        .context("no nats-server found: run ./scripts/install-nats, or pass --nats-url")?;
    if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        bail!("port {port} is taken: pass --nats-port, or --nats-url to use the NATS server already there");
    }
    let store = data.join("nats");
    std::fs::create_dir_all(&store)?;
    let log = std::fs::File::create(data.join("nats.log"))?;
    let child = tokio::process::Command::new(&bin)
        .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
        .arg(&store)
        .stdout(Stdio::null())
        .stderr(log)
        // Its own process group: a Ctrl-C in the terminal reaches `sluice dev`, which
        // stops the services first and this server last, so runs can report.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let url = format!("nats://127.0.0.1:{port}");
    let opts = NatsOptions::new(&url, "sluice-dev");
    let until = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(client) = sluice_core::nats::connect_once(&opts, Duration::from_secs(2)).await {
            if async_nats::jetstream::new(client)
                .query_account()
                .await
                .is_ok()
            {
                break;
            }
        }
        if std::time::Instant::now() > until {
            bail!(
                "nats-server did not start; see {}",
                data.join("nats.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "started {} on {url} (data in {})",
        bin.display(),
        store.display()
    );
    Ok((url, child))
}

fn nats_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_NATS_SERVER") {
        return Some(PathBuf::from(p));
    }
    let local = PathBuf::from(".tools/nats/bin/nats-server");
    if local.exists() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("nats-server"))
            .find(|p| p.exists())
    })
}

/// A webhook secret for dev mode, made once and kept in the data folder.
fn dev_secret(data: &Path) -> anyhow::Result<String> {
    let path = data.join("github-webhook-secret");
    if let Ok(s) = std::fs::read_to_string(&path) {
        if !s.trim().is_empty() {
            return Ok(s.trim().to_owned());
        }
    }
    let mut bytes = [0u8; 20];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("cannot read /dev/urandom for a secret")?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, &secret)?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn statuses_link_to_the_dev_dashboard_unless_a_base_is_given() {
        let at = |s: &str| s.parse::<SocketAddr>().expect("addr");
        assert_eq!(
            link_base_url(None, at("127.0.0.1:8090")),
            "http://127.0.0.1:8090"
        );
        assert_eq!(
            link_base_url(None, at("0.0.0.0:9000")),
            "http://127.0.0.1:9000"
        );
        assert_eq!(link_base_url(None, at("[::]:8090")), "http://[::1]:8090");
        assert_eq!(
            link_base_url(Some("https://ci.example.com/"), at("127.0.0.1:8090")),
            "https://ci.example.com"
        );
        // The dispatcher's own default is the dashboard's default address too.
        assert_eq!(
            sluice_dispatcher::reporter::LINK_BASE_URL,
            link_base_url(None, at(sluice_dashboard::DEFAULT_LISTEN))
        );
    }

    fn dev_args(args: &[&str]) -> DevArgs {
        #[derive(Parser)]
        struct Dev {
            #[command(flatten)]
            dev: DevArgs,
        }
        Dev::try_parse_from(std::iter::once("dev").chain(args.iter().copied()))
            .expect("args")
            .dev
    }

    #[test]
    fn reporting_needs_the_flag_and_a_token_and_the_banner_names_the_link() {
        assert!(reporter(&dev_args(&[]).forge).expect("off").is_none());
        let err = reporter(&dev_args(&["--report-statuses"]).forge).expect_err("no token");
        assert!(err.to_string().contains("--github-token"), "{err}");
        let a = dev_args(&[
            "--report-statuses",
            "--github-token",
            "ghp_x",
            "--dashboard-listen",
            "127.0.0.1:8091",
        ]);
        let r = reporter(&a.forge).expect("on").expect("reporting");
        assert_eq!(r.link_base_url, None);
        let config = ReporterConfig {
            link_base_url: link_base_url(r.link_base_url.as_deref(), a.dashboard_listen),
            ..r.config
        };
        assert_eq!(
            statuses_line(Some(&config)),
            "commit statuses link to http://127.0.0.1:8091/runs/<run id>"
        );
        assert!(statuses_line(None).starts_with("not reported"));
        let given = dev_args(&[
            "--report-statuses",
            "--gitlab-token",
            "glpat",
            "--status-link-base-url",
            "https://ci.example.com",
        ]);
        let r = reporter(&given.forge).expect("on").expect("reporting");
        assert_eq!(r.link_base_url.as_deref(), Some("https://ci.example.com"));
    }
}
