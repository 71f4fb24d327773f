//! `sluice install` and `sluice uninstall` flags. Each value flag has a
//! `SLUICE_INSTALL_*` variable and overrides the `--values` file, which overrides the
//! defaults in `values.rs`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use sluice_core::pipeline::HumanDuration;

use super::values::{Hosts, Secret, Values};
use crate::args::human_duration;

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// A YAML file of answers (keys as in docs/install.md); flags and variables win.
    #[arg(long = "values", short = 'f', env = "SLUICE_INSTALL_VALUES")]
    pub values_file: Option<PathBuf>,
    /// Never prompt: take every answer from flags, variables, --values or the defaults.
    #[arg(long, short = 'y', env = "SLUICE_INSTALL_YES")]
    pub yes: bool,
    /// Print every object in apply order and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: the format (YAML documents).
    #[arg(short, long, value_enum, default_value = "yaml")]
    pub output: DryRunOutput,
    /// With --dry-run: also print the Secrets (credentials from --nats-dir or
    /// --nats-seed, webhook secrets given or generated). Without it none are printed.
    #[arg(long)]
    pub include_secrets: bool,
    /// How long to wait for NATS, the streams Job and each Deployment to be ready.
    #[arg(long, env = "SLUICE_INSTALL_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub set: ValueFlags,
}

/// The format of `--dry-run`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DryRunOutput {
    Yaml,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// The kubeconfig context (default: the current one).
    #[arg(long, env = "SLUICE_INSTALL_CONTEXT")]
    pub context: Option<String>,
    /// The namespace Sluice was installed in.
    #[arg(long, env = "SLUICE_INSTALL_NAMESPACE", default_value = super::values::DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Also delete the PersistentVolumeClaims: NATS's streams and the runners' caches.
    #[arg(long)]
    pub delete_data: bool,
    /// How long to wait for the runners to stop before the rest is removed.
    #[arg(long, env = "SLUICE_INSTALL_TIMEOUT", default_value = "2m", value_parser = duration)]
    pub timeout: Duration,
}

fn duration(s: &str) -> Result<Duration, String> {
    sluice_core::duration::parse(s)
}

fn secret(s: &str) -> Result<Secret, String> {
    Ok(Secret::new(s))
}

/// One flag per answer; `None` when neither the flag nor its variable is set.
#[derive(Debug, Args)]
pub struct ValueFlags {
    /// The kubeconfig context to install into (default: the current one).
    #[arg(long, env = "SLUICE_INSTALL_CONTEXT")]
    pub context: Option<String>,
    /// Namespace for Sluice (default `sluice`).
    #[arg(long, env = "SLUICE_INSTALL_NAMESPACE")]
    pub namespace: Option<String>,
    /// What this cluster hosts.
    #[arg(long, env = "SLUICE_INSTALL_HOSTS", value_enum)]
    pub hosts: Option<Hosts>,
    /// This cluster's name, as pipelines' `runtime.cluster` names it (default `default`).
    #[arg(long, env = "SLUICE_INSTALL_CLUSTER")]
    pub cluster: Option<String>,
    /// Control plane: every cluster whose runners it serves, comma-separated.
    #[arg(long, env = "SLUICE_INSTALL_CLUSTERS", value_delimiter = ',')]
    pub clusters: Option<Vec<String>>,
    /// The Sluice image (from scripts/build-image).
    #[arg(long, env = "SLUICE_INSTALL_IMAGE")]
    pub image: Option<String>,
    /// The NATS server image.
    #[arg(long, env = "SLUICE_INSTALL_NATS_IMAGE")]
    pub nats_image: Option<String>,
    /// Use this NATS instead of installing one; a runner-only cluster's NATS.
    #[arg(long, env = "SLUICE_INSTALL_NATS_URL")]
    pub existing_nats_url: Option<String>,
    /// Control plane: the `sluice nats init` folder (created when missing).
    #[arg(long, env = "SLUICE_INSTALL_NATS_DIR")]
    pub nats_dir: Option<PathBuf>,
    /// Runner-only: this cluster's seed from `sluice cluster add` (runner-<cluster>.nk).
    #[arg(long, env = "SLUICE_INSTALL_NATS_SEED")]
    pub nats_seed: Option<PathBuf>,
    /// Size of each NATS node's JetStream volume.
    #[arg(long, env = "SLUICE_INSTALL_NATS_STORAGE_SIZE")]
    pub nats_storage_size: Option<String>,
    /// Storage class of NATS's volumes (default: the cluster's default class).
    #[arg(long, env = "SLUICE_INSTALL_STORAGE_CLASS")]
    pub storage_class: Option<String>,
    #[arg(long, env = "SLUICE_INSTALL_INGEST_REPLICAS")]
    pub ingest_replicas: Option<i32>,
    #[arg(long, env = "SLUICE_INSTALL_DISPATCHER_REPLICAS")]
    pub dispatcher_replicas: Option<i32>,
    #[arg(long, env = "SLUICE_INSTALL_DASHBOARD_REPLICAS")]
    pub dashboard_replicas: Option<i32>,
    #[arg(long, env = "SLUICE_INSTALL_RUNNER_REPLICAS")]
    pub runner_replicas: Option<i32>,
    /// Runs each runner replica executes at once.
    #[arg(long, env = "SLUICE_INSTALL_MAX_RUNNING")]
    pub max_running: Option<u32>,
    /// Replicas of each stream: 3 for the installed NATS, 1 for one existing server.
    #[arg(long, env = "SLUICE_INSTALL_STREAM_REPLICAS")]
    pub stream_replicas: Option<u32>,
    /// Host name of the example Ingress for webhooks.
    #[arg(long, env = "SLUICE_INSTALL_INGEST_HOST")]
    pub ingest_host: Option<String>,
    /// Ingest's --shed-after: answer 503 at once a webhook that JetStream's backlog would
    /// leave unanswered longer than this after its arrival (default: ingest's, 1s; at
    /// most its publish timeout, 8s).
    #[arg(long, env = "SLUICE_INSTALL_INGEST_SHED_AFTER", value_parser = human_duration)]
    pub ingest_shed_after: Option<HumanDuration>,
    #[arg(long, env = "SLUICE_INSTALL_INGRESS_CLASS")]
    pub ingress_class: Option<String>,
    /// The dashboard's URL as users reach it (your Ingress or proxy); commit statuses
    /// link there (default: the in-cluster Service URL).
    #[arg(long, env = "SLUICE_INSTALL_DASHBOARD_URL")]
    pub dashboard_url: Option<String>,
    /// Offer cancel and rerun on the dashboard to holders of the token in the Secret
    /// sluice-dashboard-actions; `--dashboard-actions=false` turns it off.
    #[arg(long, env = "SLUICE_INSTALL_DASHBOARD_ACTIONS", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub dashboard_actions: Option<bool>,
    /// With --dashboard-actions: the header in which your authenticating proxy names
    /// the signed-in user, e.g. X-Forwarded-User (trusted as is: only for a dashboard
    /// nothing reaches but through that proxy).
    #[arg(long, env = "SLUICE_INSTALL_DASHBOARD_TRUSTED_USER_HEADER")]
    pub dashboard_trusted_user_header: Option<String>,
    /// Where runners may reach the API server (ports 443 and 6443).
    #[arg(long, env = "SLUICE_INSTALL_API_SERVER_CIDR")]
    pub api_server_cidr: Option<String>,
    /// Runner-only: where runners may reach NATS (its port only).
    #[arg(long, env = "SLUICE_INSTALL_NATS_CIDR")]
    pub nats_cidr: Option<String>,
    /// Scale the runner with a KEDA ScaledObject on the cluster's queue (KEDA must be
    /// installed); `--keda=false` turns it off.
    #[arg(long, env = "SLUICE_INSTALL_KEDA", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub keda: Option<bool>,
    /// With --keda: the most runner replicas KEDA scales to.
    #[arg(long, env = "SLUICE_INSTALL_KEDA_MAX_REPLICAS")]
    pub keda_max_replicas: Option<i32>,
    /// With --keda: NATS's monitoring listener (host:port) that KEDA reads.
    #[arg(long, env = "SLUICE_INSTALL_KEDA_MONITORING_ENDPOINT")]
    pub keda_monitoring_endpoint: Option<String>,
    /// After installing, run a one-step pipeline on this cluster and report its result
    /// (needs the control plane here); `--smoke=false` turns it off.
    #[arg(long, env = "SLUICE_INSTALL_SMOKE", num_args = 0..=1, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub smoke: Option<bool>,
    /// The image of the smoke pipeline's step (needs sh).
    #[arg(long, env = "SLUICE_INSTALL_SMOKE_IMAGE")]
    pub smoke_image: Option<String>,
    /// GitHub webhook secret (generated when not given). Prefer the variable.
    #[arg(long, env = "SLUICE_INSTALL_GITHUB_WEBHOOK_SECRET", hide_env_values = true, value_parser = secret)]
    pub github_webhook_secret: Option<Secret>,
    /// GitLab webhook token (generated when not given). Prefer the variable.
    #[arg(long, env = "SLUICE_INSTALL_GITLAB_WEBHOOK_TOKEN", hide_env_values = true, value_parser = secret)]
    pub gitlab_webhook_token: Option<Secret>,
    /// Standard Webhooks secret, `whsec_…` (generated when not given).
    #[arg(long, env = "SLUICE_INSTALL_WEBHOOK_SIGNING_SECRET", hide_env_values = true, value_parser = secret)]
    pub webhook_signing_secret: Option<Secret>,
    /// GitHub token for commit statuses and changed files (optional).
    #[arg(long, env = "SLUICE_INSTALL_GITHUB_TOKEN", hide_env_values = true, value_parser = secret)]
    pub github_token: Option<Secret>,
    /// GitLab token for commit statuses and changed files (optional).
    #[arg(long, env = "SLUICE_INSTALL_GITLAB_TOKEN", hide_env_values = true, value_parser = secret)]
    pub gitlab_token: Option<Secret>,
    /// With --dashboard-actions: the token that allows actions (generated when not
    /// given). Prefer the variable.
    #[arg(long, env = "SLUICE_INSTALL_DASHBOARD_ACTIONS_TOKEN", hide_env_values = true, value_parser = secret)]
    pub dashboard_actions_token: Option<Secret>,
}

impl ValueFlags {
    /// `base` with every given flag written over it.
    pub fn apply(&self, mut v: Values) -> Values {
        macro_rules! set {
            ($($field:ident => $target:ident),* $(,)?) => {
                $(if let Some(x) = &self.$field { v.$target = x.clone(); })*
            };
        }
        set!(
            namespace => namespace, hosts => hosts, cluster => cluster, clusters => clusters,
            image => image, nats_image => nats_image, nats_dir => nats_dir,
            nats_storage_size => nats_storage_size, ingest_replicas => ingest_replicas,
            dispatcher_replicas => dispatcher_replicas, runner_replicas => runner_replicas,
            dashboard_replicas => dashboard_replicas, dashboard_actions => dashboard_actions,
            max_running => max_running, stream_replicas => stream_replicas,
            ingest_host => ingest_host, api_server_cidr => api_server_cidr,
            nats_cidr => nats_cidr, keda => keda, keda_max_replicas => keda_max_replicas,
            smoke => smoke, smoke_image => smoke_image,
        );
        macro_rules! set_some {
            ($($field:ident => $target:ident),* $(,)?) => {
                $(if let Some(x) = &self.$field { v.$target = Some(x.clone()); })*
            };
        }
        set_some!(
            context => context, existing_nats_url => nats_url, nats_seed => nats_seed,
            storage_class => storage_class, ingress_class => ingress_class,
            keda_monitoring_endpoint => keda_monitoring_endpoint,
            ingest_shed_after => ingest_shed_after,
            dashboard_trusted_user_header => dashboard_trusted_user_header,
            github_webhook_secret => github_webhook_secret,
            gitlab_webhook_token => gitlab_webhook_token,
            webhook_signing_secret => webhook_signing_secret,
            github_token => github_token, gitlab_token => gitlab_token,
            dashboard_url => dashboard_url, dashboard_actions_token => dashboard_actions_token,
        );
        v
    }
}
