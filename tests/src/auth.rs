//! A `nats-server` started from exactly what `sluice nats init` writes (its `nats.conf`
//! and one NKey seed per role), and clients that report every permission violation the
//! server sends them, so a test can tell "refused by the permissions" from "failed".

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_core::nats::NatsOptions;
use sluice_core::roles::{self, Role, ServerOptions};
use tempfile::TempDir;

use crate::nats::{reserve_port, server_binary};
use crate::wait_for;

/// The CLI's `nats init` / `cluster add` / `cluster remove`, compiled into the harness:
/// the module uses nothing else of the binary, so the tests run the very code operators
/// run, without spawning the binary.
#[path = "../../cli/src/nats_admin.rs"]
pub mod nats_admin;

/// One server configured by `nats init`.
#[derive(Debug)]
pub struct AuthNats {
    child: Option<Child>,
    port: u16,
    /// The folder `nats init` wrote: `nats.conf` and the seeds.
    pub dir: PathBuf,
    log: PathBuf,
    _tmp: TempDir,
}

impl AuthNats {
    /// Runs `nats init` for `clusters` on a free loopback port, starts the server from
    /// the written `nats.conf`, and waits until the admin seed gets JetStream answers.
    pub async fn start(clusters: &[&str]) -> AuthNats {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("nats");
        let port = reserve_port();
        let options = ServerOptions {
            listen: format!("127.0.0.1:{port}"),
            store_dir: tmp.path().join("store").display().to_string(),
            max_file_store: Some(crate::nats::MAX_FILE_STORE.into()),
        };
        let clusters: Vec<String> = clusters.iter().map(|c| (*c).to_owned()).collect();
        nats_admin::init(&dir, &clusters, &options, false).expect("sluice nats init");
        let log = tmp.path().join("server.log");
        let mut server = AuthNats {
            child: None,
            port,
            dir,
            log,
            _tmp: tmp,
        };
        server.spawn();
        let admin = server.options(&Role::Admin);
        wait_for(
            "nats-server started from nats.conf",
            Duration::from_secs(20),
            || {
                let admin = admin.clone();
                async move {
                    let client = sluice_core::nats::connect_once(&admin, Duration::from_secs(2))
                        .await
                        .ok()?;
                    async_nats::jetstream::new(client)
                        .query_account()
                        .await
                        .ok()
                        .map(|_| ())
                }
            },
        )
        .await;
        server
    }

    /// [`AuthNats::start`], then every stream, bucket and each cluster's consumer
    /// provisioned with the admin seed, as `sluice streams apply` does; with the admin's
    /// JetStream context.
    pub async fn provisioned(clusters: &[&str]) -> (AuthNats, async_nats::jetstream::Context) {
        let server = AuthNats::start(clusters).await;
        let admin = sluice_core::nats::connect(&server.options(&Role::Admin))
            .await
            .expect("the admin seed connects");
        let js = async_nats::jetstream::new(admin);
        let settings = sluice_core::streams::StreamSettings {
            clusters: clusters
                .iter()
                .map(|c| sluice_core::streams::ClusterConsumer::new(*c))
                .collect(),
            ..Default::default()
        };
        sluice_core::streams::apply(&js, &settings, false)
            .await
            .expect("streams apply with the admin seed");
        (server, js)
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("server log");
        let bin = server_binary();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(self.dir.join(nats_admin::CONFIG_FILE))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; run ./scripts/install-nats or set SLUICE_NATS_SERVER",
                    bin.display()
                )
            });
        self.child = Some(child);
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The role's seed file.
    pub fn seed(&self, role: &Role) -> PathBuf {
        self.dir.join(role.seed_file())
    }

    /// Options as the role's service connects: its seed and its inbox prefix.
    pub fn options(&self, role: &Role) -> NatsOptions {
        NatsOptions {
            nkey_file: Some(self.seed(role)),
            inbox_prefix: Some(roles::inbox_prefix(role)),
            ..NatsOptions::new(self.url(), format!("sluice-test-{}", role.name()))
        }
    }

    /// SIGHUP: the server reads `nats.conf` again, as `nats-server --signal reload` does.
    pub fn reload(&self) {
        let pid = self.child.as_ref().expect("running").id();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP nats-server");
    }

    /// What the server logged so far (its errors name refused operations).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for AuthNats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A plain client with one role's seed that keeps every error the server sent it.
#[derive(Debug, Clone)]
pub struct Probe {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    errors: Arc<Mutex<Vec<String>>>,
}

/// How long a request that the server drops (a publish it refuses gets no reply) may
/// take before it counts as refused.
pub const REFUSED_WITHIN: Duration = Duration::from_secs(2);

impl Probe {
    /// Connects as `role` to `server`.
    pub async fn connect(server: &AuthNats, role: &Role) -> Probe {
        Probe::connect_with(&server.url(), &server.seed(role), role).await
    }

    /// Connects with a seed file and `role`'s inbox prefix.
    pub async fn connect_with(url: &str, seed: &Path, role: &Role) -> Probe {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let seen = errors.clone();
        let seed = std::fs::read_to_string(seed).expect("seed");
        let client = async_nats::ConnectOptions::new()
            .nkey(seed.trim().to_owned())
            .custom_inbox_prefix(roles::inbox_prefix(role))
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        seen.lock().expect("errors").push(e.to_string());
                    }
                }
            })
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("connect as {}: {e}", role.name()));
        let js = async_nats::jetstream::context::ContextBuilder::new()
            .timeout(REFUSED_WITHIN)
            .build(client.clone());
        Probe { client, js, errors }
    }

    /// Waits until the server has reported a publish to `subject` as a permission
    /// violation.
    pub async fn publish_refused(&self, subject: &str) {
        self.violation("Publish", subject).await;
    }

    /// Waits until the server has reported a subscription to `subject` as a permission
    /// violation.
    pub async fn subscribe_refused(&self, subject: &str) {
        self.violation("Subscription", subject).await;
    }

    async fn violation(&self, what: &str, subject: &str) {
        let want = format!("Permissions Violation for {what} to \"{subject}\"");
        let errors = self.errors.clone();
        wait_for(&want, Duration::from_secs(5), || {
            let found = errors
                .lock()
                .expect("errors")
                .iter()
                .any(|e| e.contains(&want));
            async move { found.then_some(()) }
        })
        .await;
    }

    /// Every error the server has sent so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().expect("errors").clone()
    }
}
