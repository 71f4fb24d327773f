//! Command-line arguments. Every flag has an environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use secrecy::SecretString;
use sluice_core::nats::NatsOptions;
use sluice_core::pipeline::HumanDuration;
use sluice_core::streams::{ClusterConsumer, StreamSettings};
use sluice_core::telemetry::LogFormat;

#[derive(Debug, Parser)]
#[command(
    name = "sluice",
    version,
    about = "Event-driven CI/CD for Kubernetes: webhooks in, Pods out, NATS JetStream in between."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Receive GitHub, GitLab and Standard Webhooks deliveries, verify them and store
    /// each event in JetStream before answering.
    Ingest(IngestArgs),
    /// Match events against pipeline triggers and publish one run request per match.
    Dispatcher(DispatcherArgs),
    /// Run all of Sluice on this machine: NATS, ingest, dispatcher and a local runner,
    /// with pipelines from a folder.
    Dev(DevArgs),
    /// Pull the runs of one cluster and execute them.
    Runner(RunnerArgs),
    /// Serve the web dashboard: runs, live logs, decisions, pipelines, clusters (read-only).
    Dashboard(DashboardArgs),
    /// Manage pipelines: apply, list, get, delete, validate.
    #[command(subcommand)]
    Pipelines(PipelinesCommand),
    /// Runs: list, get (and wait), logs, cancel.
    #[command(subcommand)]
    Runs(RunsCommand),
    /// Streams, each consumer's backlog (per cluster for runners) and the runners alive.
    Status {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        /// Redraw every 2 seconds until Ctrl-C.
        #[arg(short, long)]
        watch: bool,
    },
    /// Inspect and publish events: why did (or didn't) a pipeline run?
    #[command(subcommand)]
    Events(EventsCommand),
    /// Create or change streams, buckets and each cluster's runner consumer (admin).
    #[command(subcommand)]
    Streams(StreamsCommand),
    /// Write NATS's configuration and one credential (NKey seed) per role (offline).
    #[command(subcommand)]
    Nats(NatsCommand),
    /// Add or remove one cluster's runner credential in a `nats init` folder (offline).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Install Sluice into a Kubernetes cluster: asks on a terminal (or takes flags,
    /// SLUICE_INSTALL_* variables and --values), checks, then applies (docs/install.md).
    Install(Box<crate::install::InstallArgs>),
    /// Remove what `sluice install` created (runners first); keeps volumes unless
    /// --delete-data.
    Uninstall(crate::install::UninstallArgs),
}

#[derive(Debug, Subcommand)]
pub enum StreamsCommand {
    /// Bring every stream, bucket and listed cluster consumer to these settings,
    /// creating what is missing. Services never change them; this command does.
    Apply(StreamsApplyArgs),
}

#[derive(Debug, Args)]
pub struct StreamsApplyArgs {
    /// Replicas of each stream and bucket: 1 for one NATS server, 3 for a cluster.
    #[arg(long, env = "SLUICE_STREAM_REPLICAS", default_value_t = StreamSettings::default().replicas, value_parser = replicas)]
    pub replicas: usize,
    /// How long a delivery id is recognised as a duplicate (GitHub redelivers for 3 days).
    #[arg(long, env = "SLUICE_DEDUP_WINDOW", default_value_t = HumanDuration(StreamSettings::default().dedup_window), value_parser = human_duration)]
    pub dedup_window: HumanDuration,
    /// How long events are kept (at least the dedup window).
    #[arg(long, env = "SLUICE_EVENTS_MAX_AGE", default_value_t = HumanDuration(StreamSettings::default().events_max_age), value_parser = human_duration)]
    pub events_max_age: HumanDuration,
    /// How long run states and logs are kept.
    #[arg(long, env = "SLUICE_LOGS_MAX_AGE", default_value_t = HumanDuration(StreamSettings::default().logs_max_age), value_parser = human_duration)]
    pub logs_max_age: HumanDuration,
    /// Bytes of logs kept at most; the oldest go first.
    #[arg(long, env = "SLUICE_LOGS_MAX_BYTES", default_value_t = StreamSettings::default().logs_max_bytes)]
    pub logs_max_bytes: i64,
    /// Clusters whose runner consumer to create or update, comma-separated, each
    /// `NAME[:ACK_WAIT[:MAX_IN_FLIGHT]]` (e.g. `eu-1,us-1:60s:500`; defaults 30s and no
    /// limit).
    #[arg(long, env = "SLUICE_CLUSTERS", value_delimiter = ',', value_parser = cluster_consumer)]
    pub clusters: Vec<ClusterConsumer>,
    /// Print what would change, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Delete run states and logs written by an older Sluice in the previous subject
    /// layout (without their cluster), which this version cannot read.
    #[arg(long, env = "SLUICE_PURGE_OLD_LAYOUT")]
    pub purge_old_layout: bool,
}

impl StreamsApplyArgs {
    pub fn settings(&self) -> StreamSettings {
        StreamSettings {
            replicas: self.replicas,
            dedup_window: self.dedup_window.0,
            events_max_age: self.events_max_age.0,
            logs_max_age: self.logs_max_age.0,
            logs_max_bytes: self.logs_max_bytes,
            clusters: self.clusters.clone(),
        }
    }
}

/// Stream replicas: JetStream allows 1 to 5.
fn replicas(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ 1..=5) => Ok(n),
        _ => Err(format!(
            "`{s}`: replicas must be 1 to 5 (1 for one server, 3 for a cluster)"
        )),
    }
}

fn cluster_consumer(s: &str) -> Result<ClusterConsumer, String> {
    ClusterConsumer::parse(s)
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Args)]
pub struct DispatcherArgs {
    /// Cluster for pipelines whose runtime names none.
    #[arg(long, env = "SLUICE_DEFAULT_CLUSTER", default_value = sluice_dispatcher::plan::DEFAULT_CLUSTER)]
    pub default_cluster: String,
    /// Events processed at once.
    #[arg(long, env = "SLUICE_DISPATCHER_CONCURRENCY", default_value_t = sluice_dispatcher::CONCURRENCY, value_parser = at_least_one)]
    pub concurrency: usize,
    /// Deliveries of an event before it is moved to the dead-letter subject.
    #[arg(long, env = "SLUICE_DISPATCHER_MAX_ATTEMPTS", default_value_t = sluice_dispatcher::MAX_ATTEMPTS, value_parser = at_least_one_of::<i64>)]
    pub max_attempts: i64,
    /// Replicas of each stream: 1 for one NATS server, 3 for a cluster.
    #[arg(long, env = "SLUICE_STREAM_REPLICAS", default_value_t = StreamSettings::default().replicas, value_parser = replicas)]
    pub stream_replicas: usize,
    /// GitHub token to read pull requests' changed files. Prefer the variable.
    #[arg(long, env = "SLUICE_GITHUB_TOKEN", hide_env_values = true, value_parser = secret)]
    pub github_token: Option<SecretString>,
    /// Authenticate to GitHub as this GitHub App (with --github-app-key-file) instead
    /// of with a token: installation tokens are minted and renewed per repository owner.
    #[arg(long, env = "SLUICE_GITHUB_APP_ID", requires = "github_app_key_file")]
    pub github_app_id: Option<u64>,
    /// The GitHub App's private key (PEM), as downloaded from its settings.
    #[arg(long, env = "SLUICE_GITHUB_APP_KEY_FILE", requires = "github_app_id")]
    pub github_app_key_file: Option<PathBuf>,
    /// GitHub API base URL (GitHub Enterprise: https://HOST/api/v3).
    #[arg(long, env = "SLUICE_GITHUB_API_URL", default_value = sluice_dispatcher::forge::GITHUB_API_URL)]
    pub github_api_url: String,
    /// GitLab token (read_api) to read merge requests' changed files. Prefer the variable.
    #[arg(long, env = "SLUICE_GITLAB_TOKEN", hide_env_values = true, value_parser = secret)]
    pub gitlab_token: Option<SecretString>,
    /// GitLab API base URL.
    #[arg(long, env = "SLUICE_GITLAB_API_URL", default_value = sluice_dispatcher::forge::GITLAB_API_URL)]
    pub gitlab_api_url: String,
    /// Send run states back to the forges as commit statuses (needs the tokens above).
    #[arg(long, env = "SLUICE_REPORT_STATUSES")]
    pub report_statuses: bool,
    /// Commit statuses link to `<URL>/runs/<run id>`.
    #[arg(long, env = "SLUICE_STATUS_LINK_BASE_URL", default_value = sluice_dispatcher::reporter::LINK_BASE_URL)]
    pub status_link_base_url: String,
    /// Commit status requests per hour and forge token (GitHub allows 5,000).
    #[arg(long, env = "SLUICE_FORGE_REQUESTS_PER_HOUR", default_value_t = sluice_dispatcher::reporter::REQUESTS_PER_HOUR, value_parser = at_least_one_of::<u32>)]
    pub forge_requests_per_hour: u32,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (the kubelet's probes and
    /// Prometheus).
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = sluice_core::admin::DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,
    /// Time the events in hand get to finish after SIGTERM; those still running then
    /// are handed back to NATS for another replica.
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE", default_value_t = HumanDuration(sluice_dispatcher::SHUTDOWN_GRACE), value_parser = human_duration)]
    pub shutdown_grace: HumanDuration,
    /// Redeliver the GitHub and GitLab webhook deliveries that failed and never became
    /// an event (an outage of NATS, ingest or the network in front of it). One replica
    /// at a time; needs the GitHub App (for its hook) or a token with hook access, and
    /// for GitLab hooks --gitlab-token with the project's Maintainer role and `api`.
    #[arg(long, env = "SLUICE_RECOVER_DELIVERIES")]
    pub recover_deliveries: bool,
    /// Hooks whose deliveries are reconciled, comma-separated: `app` (the GitHub App's
    /// hook), `repo:<owner>/<name>:<hook id>`, `org:<org>:<hook id>`, and GitLab (17.4+)
    /// project hooks `gitlab:<project id or path>:<hook id>` (`gitlab:42:7`,
    /// `gitlab:group/sub/project:7`).
    #[arg(long, env = "SLUICE_RECOVER_HOOKS", value_delimiter = ',', default_value = "app", value_parser = hook)]
    pub recover_hooks: Vec<sluice_dispatcher::recover::Hook>,
    /// How far back deliveries are reconciled (at most GitHub's 3 days; GitLab's 7 when
    /// only GitLab hooks are reconciled).
    #[arg(long, env = "SLUICE_RECOVER_HORIZON", default_value_t = HumanDuration(sluice_dispatcher::recover::HORIZON), value_parser = recover_horizon)]
    pub recover_horizon: HumanDuration,
    /// Time between reconcile passes, and between two redeliveries of one delivery.
    #[arg(long, env = "SLUICE_RECOVER_INTERVAL", default_value_t = HumanDuration(sluice_dispatcher::recover::INTERVAL), value_parser = positive_duration)]
    pub recover_interval: HumanDuration,
    /// Redeliveries of one delivery before it is reported lost (`sluice events lost`).
    #[arg(long, env = "SLUICE_RECOVER_MAX_ATTEMPTS", default_value_t = sluice_dispatcher::recover::MAX_ATTEMPTS, value_parser = at_least_one_of::<u32>)]
    pub recover_max_attempts: u32,
    /// Requests per hour to each forge for reconciling (listing and redeliveries) at
    /// most; with --report-statuses each is also taken from --forge-requests-per-hour.
    #[arg(long, env = "SLUICE_RECOVER_REQUESTS_PER_HOUR", default_value_t = sluice_dispatcher::recover::REQUESTS_PER_HOUR, value_parser = at_least_one_of::<u32>)]
    pub recover_requests_per_hour: u32,
    /// Repositories whose own pipelines (`.sluice/*.yaml` at each event's commit, read
    /// through the forge API with the tokens above) run beside the applied ones:
    /// comma-separated globs (`acme/*`, `!acme/secrets`). None by default: nothing is
    /// read from a repository nobody opted in.
    #[arg(long, env = "SLUICE_REPO_PIPELINES", value_delimiter = ',', value_parser = repo_glob)]
    pub repo_pipelines: Vec<sluice_core::pipeline::Glob>,
    /// Pipeline files read from one repository's `.sluice/`; later ones are refused.
    #[arg(long, env = "SLUICE_REPO_PIPELINES_MAX_FILES", default_value_t = sluice_core::repo_pipelines::MAX_FILES, value_parser = at_least_one)]
    pub repo_pipelines_max_files: usize,
    /// Bytes one `.sluice/` file may have.
    #[arg(long, env = "SLUICE_REPO_PIPELINES_MAX_FILE_BYTES", default_value_t = sluice_core::repo_pipelines::MAX_FILE_BYTES, value_parser = at_least_one)]
    pub repo_pipelines_max_file_bytes: usize,
    /// Deepest nesting of mappings and lists in a `.sluice/` file (at most 64).
    #[arg(long, env = "SLUICE_REPO_PIPELINES_MAX_DEPTH", default_value_t = sluice_core::repo_pipelines::MAX_DEPTH, value_parser = yaml_depth)]
    pub repo_pipelines_max_depth: usize,
    /// Pipelines one repository may define, all its files together.
    #[arg(long, env = "SLUICE_REPO_PIPELINES_MAX_PIPELINES", default_value_t = sluice_core::repo_pipelines::MAX_PIPELINES, value_parser = at_least_one)]
    pub repo_pipelines_max_pipelines: usize,
}

/// A repository glob, compared in lower case like triggers' `repos`.
fn repo_glob(s: &str) -> Result<sluice_core::pipeline::Glob, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("an empty repository glob".into());
    }
    sluice_core::pipeline::Glob::parse(&s.to_ascii_lowercase())
}

fn yaml_depth(s: &str) -> Result<usize, String> {
    let n = at_least_one(s)?;
    if n > sluice_core::yaml::MAX_DEPTH {
        return Err(format!(
            "{s}: at most {} (the limit of every YAML file Sluice reads)",
            sluice_core::yaml::MAX_DEPTH
        ));
    }
    Ok(n)
}

fn hook(s: &str) -> Result<sluice_dispatcher::recover::Hook, String> {
    sluice_dispatcher::recover::Hook::parse(s.trim()).map_err(|e| e.to_string())
}

fn recover_horizon(s: &str) -> Result<HumanDuration, String> {
    let d = human_duration(s)?;
    // GitHub's 3 days are held against the hooks when the reconciler starts.
    if d.0.is_zero() || d.0 > sluice_dispatcher::recover::GITLAB_MAX_HORIZON {
        return Err(format!(
            "{s:?}: must be more than 0 and at most 168h (GitLab lists 7 days, GitHub 3)"
        ));
    }
    Ok(d)
}

#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// Where to serve the pages, and `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "SLUICE_DASHBOARD_LISTEN", default_value = sluice_dashboard::DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Offer cancel and rerun on run pages, to holders of the actions token or users
    /// named by a trusted proxy (one of the two flags below is needed).
    #[arg(long, env = "SLUICE_DASHBOARD_ALLOW_ACTIONS")]
    pub allow_actions: bool,
    /// A file holding the token that allows actions (`Authorization: Bearer`, or typed
    /// into the page).
    #[arg(
        long,
        env = "SLUICE_DASHBOARD_ACTIONS_TOKEN_FILE",
        requires = "allow_actions"
    )]
    pub actions_token_file: Option<PathBuf>,
    /// A header naming the signed-in user, set by an authenticating proxy in front
    /// (e.g. oauth2-proxy's `X-Forwarded-User`); trusted as is, so only for a dashboard
    /// that nothing reaches but through that proxy.
    #[arg(
        long,
        env = "SLUICE_DASHBOARD_TRUSTED_USER_HEADER",
        requires = "allow_actions"
    )]
    pub trusted_user_header: Option<String>,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Folder of pipeline YAML files, reloaded when it changes.
    #[arg(long, env = "SLUICE_DEV_PIPELINES", default_value = ".sluice")]
    pub pipelines: PathBuf,
    /// Where webhooks are received.
    #[arg(long, env = "SLUICE_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the dashboard is served.
    #[arg(long, env = "SLUICE_DASHBOARD_LISTEN", default_value = sluice_dashboard::DEFAULT_LISTEN)]
    pub dashboard_listen: SocketAddr,
    /// Data folder: NATS store, workspaces, the generated webhook secret.
    #[arg(long, env = "SLUICE_DEV_DATA", default_value = ".sluice-data")]
    pub data: PathBuf,
    /// Port of the NATS server dev mode starts (unless --nats-url is given).
    #[arg(long, env = "SLUICE_NATS_PORT", default_value_t = 4222)]
    pub nats_port: u16,
    /// Where steps run.
    #[arg(long, env = "SLUICE_EXECUTOR", value_enum, default_value = "local")]
    pub executor: ExecutorKind,
    #[command(flatten)]
    pub kube: KubeArgs,
    #[command(flatten)]
    pub forge: DevForgeArgs,
}

/// Dev mode's forge settings: the dispatcher's flags and variables, except that commit
/// statuses link to dev mode's own dashboard unless `--status-link-base-url` is given.
#[derive(Debug, Args)]
pub struct DevForgeArgs {
    /// GitHub token for commit statuses and pull requests' changed files. Prefer the
    /// variable.
    #[arg(long, env = "SLUICE_GITHUB_TOKEN", hide_env_values = true, value_parser = secret)]
    pub github_token: Option<SecretString>,
    /// GitHub API base URL (GitHub Enterprise: https://HOST/api/v3).
    #[arg(long, env = "SLUICE_GITHUB_API_URL", default_value = sluice_dispatcher::forge::GITHUB_API_URL)]
    pub github_api_url: String,
    /// GitLab token (api) for commit statuses and merge requests' changed files. Prefer
    /// the variable.
    #[arg(long, env = "SLUICE_GITLAB_TOKEN", hide_env_values = true, value_parser = secret)]
    pub gitlab_token: Option<SecretString>,
    /// GitLab API base URL.
    #[arg(long, env = "SLUICE_GITLAB_API_URL", default_value = sluice_dispatcher::forge::GITLAB_API_URL)]
    pub gitlab_api_url: String,
    /// Send run states back to the forges as commit statuses (needs a token above).
    #[arg(long, env = "SLUICE_REPORT_STATUSES")]
    pub report_statuses: bool,
    /// Commit statuses link to `<URL>/runs/<run id>` (default: this dev mode's
    /// dashboard, `http://<--dashboard-listen>`).
    #[arg(long, env = "SLUICE_STATUS_LINK_BASE_URL")]
    pub status_link_base_url: Option<String>,
    /// Commit status requests per hour and forge token (GitHub allows 5,000).
    #[arg(long, env = "SLUICE_FORGE_REQUESTS_PER_HOUR", default_value_t = sluice_dispatcher::reporter::REQUESTS_PER_HOUR, value_parser = at_least_one_of::<u32>)]
    pub forge_requests_per_hour: u32,
}

/// Where steps run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorKind {
    /// Steps as processes on this host (images ignored, nothing isolated).
    Local,
    /// Steps as Pods through the Kubernetes API.
    Kubernetes,
}

#[derive(Debug, Args)]
pub struct RunnerArgs {
    /// The cluster whose runs to take (`sluice.runs.<cluster>`).
    #[arg(long, env = "SLUICE_CLUSTER")]
    pub cluster: String,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (the kubelet's probes and
    /// Prometheus).
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = sluice_core::admin::DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,
    /// Where steps run.
    #[arg(
        long,
        env = "SLUICE_EXECUTOR",
        value_enum,
        default_value = "kubernetes"
    )]
    pub executor: ExecutorKind,
    /// Runs executed at once; no more are pulled while this many run.
    #[arg(long, env = "SLUICE_MAX_RUNNING", default_value_t = sluice_runner::MAX_RUNNING, value_parser = at_least_one)]
    pub max_running: usize,
    /// Local executor: folder for per-run workspaces.
    #[arg(long, env = "SLUICE_WORKDIR", default_value = sluice_runner::WORKDIR)]
    pub workdir: PathBuf,
    /// Local executor: keep workspaces after runs, for debugging.
    #[arg(long, env = "SLUICE_KEEP_WORKSPACES")]
    pub keep_workspaces: bool,
    /// This replica's name in heartbeats and statuses (default: host name and pid).
    #[arg(long, env = "SLUICE_RUNNER_ID")]
    pub runner_id: Option<String>,
    /// How long a run may go without this runner's progress signal before NATS hands
    /// it to another replica (or to this one restarted), e.g. `30s`; at least `1s`.
    #[arg(long, env = "SLUICE_ACK_WAIT", default_value_t = HumanDuration(sluice_runner::ACK_WAIT), value_parser = ack_wait)]
    pub ack_wait: HumanDuration,
    #[command(flatten)]
    pub kube: KubeArgs,
}

/// The Kubernetes executor's settings.
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// Namespace of run Pods (default: the kubeconfig context's, or the runner's own
    /// in a cluster).
    #[arg(long, env = "SLUICE_NAMESPACE")]
    pub namespace: Option<String>,
    /// Image of steps that name none.
    #[arg(long, env = "SLUICE_DEFAULT_IMAGE", default_value = sluice_runner::kubernetes::DEFAULT_IMAGE)]
    pub default_image: String,
    /// Image of the built-in clone step (needs `sh` and `git`).
    #[arg(long, env = "SLUICE_CLONE_IMAGE", default_value = sluice_runner::kubernetes::CLONE_IMAGE)]
    pub clone_image: String,
    /// Secret with a `.git-credentials` file for private repositories; only the clone
    /// step mounts it.
    #[arg(long, env = "SLUICE_CLONE_SECRET")]
    pub clone_secret: Option<String>,
    /// Service account of run Pods whose pipeline names none (its token is not mounted).
    #[arg(long, env = "SLUICE_POD_SERVICE_ACCOUNT")]
    pub pod_service_account: Option<String>,
    /// User and group id steps run as; 0 lets them run as root.
    #[arg(long, env = "SLUICE_RUN_AS_USER", default_value_t = sluice_runner::kubernetes::RUN_AS_USER, value_parser = clap::value_parser!(i64).range(0..))]
    pub run_as_user: i64,
    /// Storage class of cache volumes (default: the cluster's default class).
    #[arg(long, env = "SLUICE_CACHE_STORAGE_CLASS")]
    pub cache_storage_class: Option<String>,
    /// Size of each cache volume.
    #[arg(long, env = "SLUICE_CACHE_SIZE", default_value = sluice_runner::kubernetes::CACHE_SIZE)]
    pub cache_size: String,
    /// Access mode of cache volumes: ReadWriteMany lets runs of one branch on
    /// different nodes share a cache at once.
    #[arg(long, env = "SLUICE_CACHE_ACCESS_MODE", default_value = sluice_runner::kubernetes::CACHE_ACCESS_MODE)]
    pub cache_access_mode: String,
    /// How long a run may wait for its next container to start (a node being added,
    /// an image being pulled) before it fails, e.g. `10m`.
    #[arg(long, env = "SLUICE_PENDING_TIMEOUT", default_value_t = HumanDuration(sluice_runner::kubernetes::PENDING_TIMEOUT), value_parser = positive_duration)]
    pub pending_timeout: HumanDuration,
    /// How long finished Pods are kept before they are deleted, e.g. `10m`, `0s`.
    #[arg(long, env = "SLUICE_DELETE_AFTER", default_value_t = HumanDuration(sluice_runner::kubernetes::DELETE_AFTER), value_parser = human_duration)]
    pub delete_after: HumanDuration,
    /// Kubernetes API requests per second.
    #[arg(long, env = "SLUICE_KUBE_QPS", default_value_t = sluice_runner::kubernetes::QPS, value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_qps: u32,
    /// Kubernetes API requests allowed at once above the rate.
    #[arg(long, env = "SLUICE_KUBE_BURST", default_value_t = sluice_runner::kubernetes::BURST, value_parser = clap::value_parser!(u32).range(1..))]
    pub kube_burst: u32,
    /// Container logs followed over one HTTP/2 connection at most; keep it under the
    /// API server's (or a proxy's) limit of concurrent streams per connection.
    #[arg(
        long,
        env = "SLUICE_KUBE_LOG_STREAMS_PER_CONNECTION",
        default_value_t = sluice_runner::kubernetes::STREAMS_PER_CONNECTION,
        value_parser = at_least_one
    )]
    pub kube_log_streams_per_connection: usize,
}

/// The runner's ack wait: progress is signalled every third of it, so at least
/// [`sluice_runner::MIN_ACK_WAIT`].
fn ack_wait(s: &str) -> Result<HumanDuration, String> {
    let min = HumanDuration(sluice_runner::MIN_ACK_WAIT);
    match sluice_core::duration::parse(s)? {
        d if d < min.0 => Err(format!(
            "{s:?}: must be at least {min}, or no progress signal fits in it"
        )),
        d => Ok(HumanDuration(d)),
    }
}

#[derive(Debug, Subcommand)]
pub enum PipelinesCommand {
    /// Validate and store pipelines from a YAML file or a folder of them. Nothing is
    /// stored unless every pipeline is valid.
    Apply {
        /// A .yaml/.yml file, or a folder searched for them.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List stored pipelines.
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Print one pipeline.
    Get {
        name: String,
        #[arg(short, long, value_enum, default_value = "yaml")]
        output: Output,
    },
    /// Delete a pipeline.
    Delete { name: String },
    /// Check pipelines offline, without NATS: `-f FILE` (a file or folder, as apply
    /// takes it), or a checkout `DIR` whose `.sluice/` is checked as the dispatcher
    /// reads a repository's pipelines (each file on its own, with the default limits).
    #[command(group = clap::ArgGroup::new("what").required(true).args(["file", "dir"]))]
    Validate {
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// A checkout (or its `.sluice/` folder).
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunsCommand {
    /// Recent runs, newest first.
    List {
        #[arg(long)]
        pipeline: Option<String>,
        #[arg(long)]
        repo: Option<String>,
        /// queued, scheduled, running, succeeded, failed, cancelled or error.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
        /// Redraw every 2 seconds until Ctrl-C.
        #[arg(short, long)]
        watch: bool,
    },
    /// One run and its steps.
    Get {
        run_id: String,
        /// Wait for the run to end; exit 0 if it succeeded, 3 if cancelled, 1 otherwise.
        #[arg(long)]
        wait: bool,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// A run's output.
    Logs {
        run_id: String,
        /// Keep printing until the run ends.
        #[arg(short, long)]
        follow: bool,
        /// Only this step.
        #[arg(long)]
        step: Option<String>,
    },
    /// Ask the run's cluster to cancel it.
    Cancel { run_id: String },
    /// Run the run's pipeline again (as it is now) for the same event: a new run with
    /// its own id, reported to the forge like the first.
    Rerun {
        run_id: String,
        /// Wait for the new run to end; exit codes as for `runs get --wait`.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Explain what the dispatcher decided for an event, pipeline by pipeline.
    Why {
        /// The event id, as ingest answered it (`github:<delivery id>`).
        event_id: String,
        /// Explain this pipeline even if it was not considered.
        #[arg(long)]
        pipeline: Option<String>,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Recent events and how many runs each started.
    List {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Forge deliveries the delivery reconciler could not recover, and why: they must
    /// be redelivered by hand (GitHub: the hook's Recent Deliveries, within 3 days;
    /// GitLab: the hook's Recent events, within 7).
    Lost {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Publish a manual event (provider `manual`).
    Publish {
        /// Event kind: push, tag, pull_request, comment, or any name.
        #[arg(long, default_value = "push")]
        kind: String,
        /// Start this pipeline directly, whatever its triggers say.
        #[arg(long)]
        pipeline: Option<String>,
        #[arg(long)]
        repo: Option<String>,
        #[arg(long)]
        clone_url: Option<String>,
        #[arg(long = "ref")]
        git_ref: Option<String>,
        #[arg(long)]
        sha: Option<String>,
        /// Event id (default: a new one).
        #[arg(long)]
        id: Option<String>,
    },
}

/// Flags every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// NATS server URL(s), comma-separated: nats://, tls://, ws:// or wss://.
    #[arg(
        long,
        global = true,
        env = "SLUICE_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,
    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, global = true, env = "SLUICE_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// File holding an NKey seed to authenticate to NATS.
    #[arg(long, global = true, env = "SLUICE_NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// Extra CA certificate (PEM) to trust for tls:// and wss:// NATS URLs.
    #[arg(long, global = true, env = "SLUICE_NATS_CA")]
    pub nats_ca: Option<PathBuf>,
    /// Log format: text or json. The level comes from RUST_LOG (default info).
    #[arg(long, global = true, env = "SLUICE_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
}

impl Global {
    pub fn nats(&self, name: &str) -> NatsOptions {
        NatsOptions {
            creds_file: self.nats_creds.clone(),
            nkey_file: self.nats_nkey.clone(),
            ca_file: self.nats_ca.clone(),
            ..NatsOptions::new(&self.nats_url, name)
        }
    }
}

fn secret(s: &str) -> Result<SecretString, String> {
    Ok(SecretString::from(s.to_owned()))
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// Address to listen on for webhooks.
    #[arg(long, env = "SLUICE_INGEST_LISTEN", default_value_t = sluice_ingest::LISTEN)]
    pub listen: SocketAddr,
    /// Where to serve `/healthz`, `/readyz` and `/metrics` (the kubelet's probes and
    /// Prometheus), outside the webhooks' connection cap.
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = sluice_core::admin::DEFAULT_ADMIN_LISTEN)]
    pub admin_listen: SocketAddr,
    /// GitHub webhook secret(s), comma-separated to rotate. Prefer the variable.
    #[arg(long, env = "SLUICE_GITHUB_WEBHOOK_SECRET", hide_env_values = true, value_parser = secret)]
    pub github_webhook_secret: Option<SecretString>,
    /// GitLab secret token(s), comma-separated; entries starting `whsec_` are GitLab
    /// signing tokens. Prefer the variable.
    #[arg(long, env = "SLUICE_GITLAB_WEBHOOK_TOKEN", hide_env_values = true, value_parser = secret)]
    pub gitlab_webhook_token: Option<SecretString>,
    /// Standard Webhooks signing secret(s) (`whsec_…`) for /webhooks/generic,
    /// comma-separated. Prefer the variable.
    #[arg(long, env = "SLUICE_WEBHOOK_SIGNING_SECRET", hide_env_values = true, value_parser = secret)]
    pub webhook_signing_secret: Option<SecretString>,
    /// YAML file of per-repository and per-organisation/group secrets (see docs/ingest.md).
    #[arg(long, env = "SLUICE_WEBHOOK_SECRETS_FILE")]
    pub secrets_file: Option<PathBuf>,
    /// Accept GitHub's legacy SHA-1 X-Hub-Signature when no SHA-256 signature is sent.
    #[arg(long, env = "SLUICE_ALLOW_SHA1_SIGNATURES")]
    pub allow_sha1: bool,
    /// Largest webhook body accepted, in bytes (the forges send at most 25 MiB).
    #[arg(long, env = "SLUICE_INGEST_MAX_BODY_BYTES", default_value_t = sluice_ingest::MAX_BODY_BYTES, value_parser = at_least_one)]
    pub max_body_bytes: usize,
    /// Time JetStream has to acknowledge an event before the forge is answered 503.
    #[arg(long, env = "SLUICE_INGEST_PUBLISH_TIMEOUT", default_value_t = HumanDuration(sluice_ingest::PUBLISH_TIMEOUT), value_parser = positive_duration)]
    pub publish_timeout: HumanDuration,
    /// Answer 503 at once, without sending, a request that would be answered later than
    /// this after its arrival because JetStream must first store the events ahead of it
    /// (JetStream is behind the offered rate); at most the publish timeout counts.
    #[arg(long, env = "SLUICE_INGEST_SHED_AFTER", default_value_t = HumanDuration(sluice_ingest::SHED_AFTER), value_parser = positive_duration)]
    pub shed_after: HumanDuration,
    /// Time a client has to send its body.
    #[arg(long, env = "SLUICE_INGEST_READ_TIMEOUT", default_value_t = HumanDuration(sluice_ingest::READ_TIMEOUT), value_parser = positive_duration)]
    pub read_timeout: HumanDuration,
    /// Accepted clock difference for Standard Webhooks timestamps, either way.
    #[arg(long, env = "SLUICE_SIGNATURE_TOLERANCE", default_value_t = HumanDuration(sluice_ingest::SIGNATURE_TOLERANCE), value_parser = positive_duration)]
    pub signature_tolerance: HumanDuration,
    /// How long a delivery id is recognised as a duplicate (GitHub redelivers for 3 days).
    #[arg(long, env = "SLUICE_DEDUP_WINDOW", default_value_t = HumanDuration(StreamSettings::default().dedup_window), value_parser = human_duration)]
    pub dedup_window: HumanDuration,
    /// How long events are kept in SLUICE_EVENTS (at least the dedup window).
    #[arg(long, env = "SLUICE_EVENTS_MAX_AGE", default_value_t = HumanDuration(StreamSettings::default().events_max_age), value_parser = human_duration)]
    pub events_max_age: HumanDuration,
    /// Replicas of each stream: 1 for one NATS server, 3 for a cluster.
    #[arg(long, env = "SLUICE_STREAM_REPLICAS", default_value_t = StreamSettings::default().replicas, value_parser = replicas)]
    pub stream_replicas: usize,
    /// Time in-flight requests get to finish after SIGTERM.
    #[arg(long, env = "SLUICE_SHUTDOWN_GRACE", default_value_t = HumanDuration(sluice_ingest::SHUTDOWN_GRACE), value_parser = human_duration)]
    pub shutdown_grace: HumanDuration,
    /// Time a client has to send a request's headers (from connecting, or from the
    /// first byte of a later request on a kept-alive connection).
    #[arg(long, env = "SLUICE_INGEST_HEADER_TIMEOUT", default_value_t = HumanDuration(sluice_ingest::HEADER_TIMEOUT), value_parser = positive_duration)]
    pub header_timeout: HumanDuration,
    /// Time a kept-alive connection may wait for its next request before it is closed.
    #[arg(long, env = "SLUICE_INGEST_IDLE_TIMEOUT", default_value_t = HumanDuration(sluice_ingest::IDLE_TIMEOUT), value_parser = positive_duration)]
    pub idle_timeout: HumanDuration,
    /// Connections served at once; a further one waits up to --queue-wait for a slot.
    #[arg(long, env = "SLUICE_INGEST_MAX_CONNECTIONS", default_value_t = sluice_ingest::MAX_CONNECTIONS, value_parser = at_least_one)]
    pub max_connections: usize,
    /// Time a connection over --max-connections waits for a slot before it is answered
    /// 503 with Retry-After (shorter than the 9 s ingest answers within).
    #[arg(long, env = "SLUICE_INGEST_QUEUE_WAIT", default_value_t = HumanDuration(sluice_ingest::QUEUE_WAIT), value_parser = queue_wait)]
    pub queue_wait: HumanDuration,
}

fn positive_duration(s: &str) -> Result<HumanDuration, String> {
    match sluice_core::duration::parse(s)? {
        d if d.is_zero() => Err(format!("{s:?}: must be longer than zero")),
        d => Ok(HumanDuration(d)),
    }
}

/// Shorter than the time ingest answers within, or the 503 would come too late.
fn queue_wait(s: &str) -> Result<HumanDuration, String> {
    let d = positive_duration(s)?;
    let within = sluice_ingest::publish::ANSWER_WITHIN;
    if d.0 >= within {
        return Err(format!(
            "{s:?}: must be shorter than the {} s ingest answers within",
            within.as_secs()
        ));
    }
    Ok(d)
}

pub(crate) fn human_duration(s: &str) -> Result<HumanDuration, String> {
    sluice_core::duration::parse(s).map(HumanDuration)
}

fn at_least_one(s: &str) -> Result<usize, String> {
    at_least_one_of(s)
}

/// A whole number of at least 1, refused with a message otherwise (never clamped).
fn at_least_one_of<T: std::str::FromStr + PartialOrd + From<u8>>(s: &str) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        _ => Err(format!("{s:?}: must be a whole number of at least 1")),
    }
}

#[derive(Debug, Subcommand)]
pub enum NatsCommand {
    /// Write DIR/nats.conf (one account with JetStream, one NKey user per role with its
    /// permissions) and one seed per role, mode 0600: admin.nk, ingest.nk,
    /// dispatcher.nk, dashboard.nk and runner-<cluster>.nk. Needs no server.
    Init(NatsInitArgs),
}

#[derive(Debug, Args)]
pub struct NatsInitArgs {
    /// Folder to write into (created with mode 0700).
    #[arg(long, env = "SLUICE_NATS_CONFIG_DIR")]
    pub out: PathBuf,
    /// The clusters that get a runner credential, comma-separated (e.g. `eu-1,us-1`).
    #[arg(long, env = "SLUICE_CLUSTERS", value_delimiter = ',', required = true, value_parser = cluster_name)]
    pub clusters: Vec<String>,
    /// Address NATS listens on for clients.
    #[arg(long, env = "SLUICE_NATS_LISTEN", default_value = sluice_core::roles::DEFAULT_LISTEN)]
    pub listen: String,
    /// JetStream's store folder on the NATS server.
    #[arg(long, env = "SLUICE_NATS_STORE_DIR", default_value = sluice_core::roles::DEFAULT_STORE_DIR)]
    pub store_dir: String,
    /// JetStream's file storage limit, e.g. `20G` (what the store's volume holds).
    /// Unset, NATS takes 75% of the disk free when it starts.
    #[arg(long, env = "SLUICE_NATS_MAX_FILE_STORE", value_parser = storage_size)]
    pub max_file_store: Option<String>,
    /// Replace existing seeds and nats.conf (every service then needs its new seed).
    #[arg(long, env = "SLUICE_NATS_FORCE")]
    pub force: bool,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Create the cluster's runner seed and re-render nats.conf from the folder's seeds;
    /// with --force, replace an existing seed (rotation).
    Add(ClusterAddArgs),
    /// Delete the cluster's runner seed and re-render nats.conf (revocation on reload).
    Remove(ClusterRemoveArgs),
}

#[derive(Debug, Args)]
pub struct ClusterAddArgs {
    /// The cluster (as runners name it with --cluster).
    #[arg(env = "SLUICE_CLUSTER", value_parser = cluster_name)]
    pub name: String,
    /// The folder `sluice nats init` wrote.
    #[arg(long, env = "SLUICE_NATS_CONFIG_DIR")]
    pub out: PathBuf,
    /// Replace the cluster's existing seed with a new one (rotation).
    #[arg(long, env = "SLUICE_NATS_FORCE")]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct ClusterRemoveArgs {
    /// The cluster whose runner credential to delete.
    #[arg(env = "SLUICE_CLUSTER", value_parser = cluster_name)]
    pub name: String,
    /// The folder `sluice nats init` wrote.
    #[arg(long, env = "SLUICE_NATS_CONFIG_DIR")]
    pub out: PathBuf,
}

/// A size in NATS's configuration syntax: digits and an optional unit.
fn storage_size(s: &str) -> Result<String, String> {
    let digits = s.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &s[digits.len()..];
    let units = ["", "K", "KB", "M", "MB", "G", "GB", "T", "TB"];
    if !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && units.contains(&unit.to_ascii_uppercase().as_str())
    {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{s}`: a size is digits and an optional unit K, M, G or T (e.g. 20G)"
        ))
    }
}

fn cluster_name(s: &str) -> Result<String, String> {
    sluice_core::pipeline::Name::parse(s).map(|n| n.as_str().to_owned())
}

impl NatsCommand {
    pub fn action(self) -> crate::nats_admin::Action {
        match self {
            NatsCommand::Init(a) => crate::nats_admin::Action::Init {
                dir: a.out,
                clusters: a.clusters,
                options: sluice_core::roles::ServerOptions {
                    listen: a.listen,
                    store_dir: a.store_dir,
                    max_file_store: a.max_file_store,
                },
                force: a.force,
            },
        }
    }
}

impl ClusterCommand {
    pub fn action(self) -> crate::nats_admin::Action {
        match self {
            ClusterCommand::Add(a) => crate::nats_admin::Action::AddCluster {
                dir: a.out,
                cluster: a.name,
                force: a.force,
            },
            ClusterCommand::Remove(a) => crate::nats_admin::Action::RemoveCluster {
                dir: a.out,
                cluster: a.name,
            },
        }
    }
}
