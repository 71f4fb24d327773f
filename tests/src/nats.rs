//! Real `nats-server` processes: one per test, on a port of its own with its own store, that
//! can be stopped, killed with SIGKILL and restarted on the same port and store; and a
//! 3-node JetStream cluster on loopback.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::wait_for;

/// The `nats-server` binary: `SLUICE_NATS_SERVER`, else the project's `.tools/`, else
/// `PATH`.
pub fn server_binary() -> PathBuf {
    if let Ok(path) = std::env::var("SLUICE_NATS_SERVER") {
        return PathBuf::from(path);
    }
    let local = crate::workspace_root().join(".tools/nats/bin/nats-server");
    if local.exists() {
        return local;
    }
    PathBuf::from("nats-server")
}

/// JetStream's storage limit on every server the tests start. Unset, NATS takes 75% of
/// the disk free when it starts, and a stream's byte limit is reserved from that: on a
/// machine with 6 GB free, SLUICE_LOGS's 5 GiB could not be created, and the tests
/// would fail for the machine's disk rather than for the code.
pub const MAX_FILE_STORE: &str = "64G";

/// The `jetstream` block that sets [`MAX_FILE_STORE`], for a test's own `nats.conf`.
pub fn jetstream_limits() -> String {
    limits(MAX_FILE_STORE)
}

fn limits(max_file_store: &str) -> String {
    format!("jetstream {{ max_file_store: {max_file_store} }}\n")
}

/// A loopback port for a server of this test process, which it keeps across restarts.
///
/// Binding port 0 and handing the number on races: until the server binds it, the kernel
/// may give the same port to another test's outgoing connection or `bind(0)`, and a
/// server restarted on its port meets the same race while it is down. So ports come from
/// just below the kernel's ephemeral range (which it never hands out by itself), each at
/// most once per process (one counter for every test in the binary), starting at an
/// offset of the process id so that concurrent processes rarely meet; a port some other
/// process already holds is skipped.
pub fn reserve_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = reserved_range();
    let span = u32::from(high - low);
    let start = std::process::id().wrapping_mul(7919) % span;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < span, "all {span} test ports of this process are used");
        let port = low + u16::try_from((start + n) % span).expect("within span");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// `[low, high)`: the 10,000 ports below the ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 32768 by default).
fn reserved_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .filter(|low| *low > 11_024)
        .unwrap_or(32_768);
    (ephemeral_low - 10_000, ephemeral_low)
}

/// One `nats-server` with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    store: PathBuf,
    extra_args: Vec<String>,
    max_file_store: String,
    _dir: Option<TempDir>,
}

impl NatsServer {
    /// Starts a server on a reserved port with a fresh store, and waits until JetStream
    /// answers.
    pub async fn start() -> NatsServer {
        NatsServer::start_with_storage(MAX_FILE_STORE).await
    }

    /// [`NatsServer::start`] with JetStream's file storage limited to `max_file_store`
    /// (`1G`): a server on a small disk.
    pub async fn start_with_storage(max_file_store: &str) -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = NatsServer {
            child: None,
            port: reserve_port(),
            store: dir.path().to_owned(),
            extra_args: Vec::new(),
            max_file_store: max_file_store.to_owned(),
            _dir: Some(dir),
        };
        server.spawn();
        server.wait_ready().await;
        server
    }

    fn with_args(port: u16, store: &Path, extra_args: Vec<String>) -> NatsServer {
        NatsServer {
            child: None,
            port,
            store: store.to_owned(),
            extra_args,
            max_file_store: MAX_FILE_STORE.to_owned(),
            _dir: None,
        }
    }

    fn spawn(&mut self) {
        let bin = server_binary();
        let mut config = Vec::new();
        if !self.extra_args.iter().any(|a| a == "-c") {
            // The flags below name the store; the file only sets the limit.
            std::fs::create_dir_all(&self.store).expect("store dir");
            let file = self.store.join("limits.conf");
            std::fs::write(&file, limits(&self.max_file_store)).expect("write limits.conf");
            config = vec!["-c".to_owned(), file.display().to_string()];
        }
        let child = Command::new(&bin)
            .args(&config)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.store)
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits until a client can connect and JetStream answers.
    pub async fn wait_ready(&self) {
        let url = self.url();
        wait_for(
            "nats-server to serve JetStream",
            Duration::from_secs(20),
            || {
                let url = url.clone();
                async move {
                    let client = async_nats::ConnectOptions::new()
                        .connection_timeout(Duration::from_millis(500))
                        .connect(&url)
                        .await
                        .ok()?;
                    let js = async_nats::jetstream::new(client);
                    js.query_account().await.ok().map(|_| ())
                }
            },
        )
        .await;
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// SIGKILL and wait: a crash, nothing flushed beyond what the server already wrote.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: the server hangs with its connections open, answering nothing.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after [`NatsServer::pause`].
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, signal).expect("signal nats-server");
        }
    }

    /// Starts the server again on the same port and store.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready().await;
    }

    /// Starts the server again without waiting for JetStream (for cluster nodes, which
    /// need their peers first).
    pub fn respawn(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A server that only speaks TLS (`tls://`) and secure WebSocket (`wss://`, as
/// through a proxy that only allows 443), and only to a user with an NKey: the way a
/// runner in a locked-down cluster reaches NATS.
#[derive(Debug)]
pub struct SecureNats {
    pub server: NatsServer,
    pub tls_url: String,
    pub wss_url: String,
    /// The CA that signed the server's certificate (PEM).
    pub ca_file: PathBuf,
    /// The user's NKey seed.
    pub nkey_file: PathBuf,
    _dir: TempDir,
}

impl SecureNats {
    pub async fn start() -> SecureNats {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = |name: &str| dir.path().join(name);
        // A CA, and a certificate for 127.0.0.1 signed by it.
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "sluice test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("ca cert");
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().expect("server key");
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        let cert = params.signed_by(&key, &issuer).expect("server cert");
        std::fs::write(path("ca.pem"), ca_cert.pem()).expect("write");
        std::fs::write(path("server.pem"), cert.pem()).expect("write");
        std::fs::write(path("server-key.pem"), key.serialize_pem()).expect("write");

        let user = nkeys::KeyPair::new_user();
        std::fs::write(path("user.nk"), user.seed().expect("seed")).expect("write");
        let (port, ws_port) = (reserve_port(), reserve_port());
        let tls = format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\" }}",
            path("server.pem").display(),
            path("server-key.pem").display()
        );
        let config = format!(
            "{tls}\nwebsocket {{ host: 127.0.0.1, port: {ws_port}, {tls} }}\nauthorization {{ users: [ {{ nkey: {} }} ] }}\n{}",
            user.public_key(),
            jetstream_limits()
        );
        std::fs::write(path("server.conf"), config).expect("write");
        let store = path("store");
        let mut server = NatsServer::with_args(
            port,
            &store,
            vec!["-c".into(), path("server.conf").display().to_string()],
        );
        server.spawn();
        let secure = SecureNats {
            server,
            tls_url: format!("tls://127.0.0.1:{port}"),
            wss_url: format!("wss://127.0.0.1:{ws_port}"),
            ca_file: path("ca.pem"),
            nkey_file: path("user.nk"),
            _dir: dir,
        };
        let options = secure.options(&secure.tls_url);
        wait_jetstream("the TLS server", &options).await;
        secure
    }

    /// Client options for `url` with this server's CA and the user's NKey.
    pub fn options(&self, url: &str) -> sluice_core::nats::NatsOptions {
        sluice_core::nats::NatsOptions {
            ca_file: Some(self.ca_file.clone()),
            nkey_file: Some(self.nkey_file.clone()),
            ..sluice_core::nats::NatsOptions::new(url, "sluice-test")
        }
    }
}

/// A server in operator mode (decentralized JWT authentication): only users holding a
/// `.creds` file (a user JWT signed by an account the operator signed, and the user's
/// NKey seed) get in.
#[derive(Debug)]
pub struct OperatorNats {
    pub server: NatsServer,
    /// The user's credentials file.
    pub creds_file: PathBuf,
    _dir: TempDir,
}

impl OperatorNats {
    pub async fn start() -> OperatorNats {
        use serde_json::json;
        let dir = tempfile::tempdir().expect("tempdir");
        let operator = nkeys::KeyPair::new_operator();
        let account = nkeys::KeyPair::new_account();
        let system = nkeys::KeyPair::new_account();
        let user = nkeys::KeyPair::new_user();
        let unlimited = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
        });
        let operator_jwt = jwt(
            &operator,
            &operator.public_key(),
            "sluice-test-operator",
            json!({"type": "operator", "version": 2}),
        );
        let account_jwt = jwt(
            &operator,
            &account.public_key(),
            "SLUICE",
            json!({"limits": unlimited, "type": "account", "version": 2}),
        );
        let system_jwt = jwt(
            &operator,
            &system.public_key(),
            "SYS",
            json!({"type": "account", "version": 2}),
        );
        let user_jwt = jwt(
            &account,
            &user.public_key(),
            "runner",
            json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}),
        );
        let creds = format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             NKEY Seed printed below can be used to sign and prove identity.\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("seed")
        );
        let creds_file = dir.path().join("runner.creds");
        std::fs::write(&creds_file, creds).expect("write");
        let config = format!(
            "operator: {operator_jwt}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {account_jwt}\n  {}: {system_jwt}\n}}\n{}",
            system.public_key(),
            account.public_key(),
            system.public_key(),
            jetstream_limits()
        );
        let config_file = dir.path().join("server.conf");
        std::fs::write(&config_file, config).expect("write");
        let mut server = NatsServer::with_args(
            reserve_port(),
            &dir.path().join("store"),
            vec!["-c".into(), config_file.display().to_string()],
        );
        server.spawn();
        let options = sluice_core::nats::NatsOptions {
            creds_file: Some(creds_file.clone()),
            ..sluice_core::nats::NatsOptions::new(server.url(), "sluice-test")
        };
        wait_jetstream("the operator-mode server", &options).await;
        OperatorNats {
            server,
            creds_file,
            _dir: dir,
        }
    }

    pub fn options(&self) -> sluice_core::nats::NatsOptions {
        sluice_core::nats::NatsOptions {
            creds_file: Some(self.creds_file.clone()),
            ..sluice_core::nats::NatsOptions::new(self.server.url(), "sluice-test")
        }
    }
}

/// Waits until a client with `options` can connect and JetStream answers.
async fn wait_jetstream(what: &str, options: &sluice_core::nats::NatsOptions) {
    wait_for(
        &format!("{what} to serve JetStream"),
        Duration::from_secs(20),
        || async {
            let client = sluice_core::nats::connect_once(options, Duration::from_secs(2))
                .await
                .ok()?;
            let js = async_nats::jetstream::new(client);
            js.query_account().await.ok().map(|_| ())
        },
    )
    .await;
}

/// A NATS JWT: `issuer` signs claims about `subject`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::Engine;
    use sha2::Digest;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut claims = serde_json::json!({
        "iat": iat, "iss": issuer.public_key(), "name": name, "sub": subject, "nats": nats,
    });
    let digest = sha2::Sha256::digest(claims.to_string().as_bytes());
    claims["jti"] = serde_json::Value::String(hex::encode(&digest[..16]).to_uppercase());
    let body = b64(claims.to_string().as_bytes());
    let signature = issuer
        .sign(format!("{header}.{body}").as_bytes())
        .expect("sign");
    format!("{header}.{body}.{}", b64(&signature))
}

/// A JetStream cluster of three servers on loopback.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
    _dir: TempDir,
}

impl NatsCluster {
    /// Starts three routed nodes and waits until JetStream has a meta leader.
    pub async fn start() -> NatsCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster_ports: Vec<u16> = (0..3).map(|_| reserve_port()).collect();
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::new();
        for (i, cport) in cluster_ports.iter().enumerate() {
            let store = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&store).expect("store dir");
            let args = vec![
                "-n".into(),
                format!("n{i}"),
                "--cluster_name".into(),
                "sluice-test".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{cport}"),
                "--routes".into(),
                routes.clone(),
            ];
            let mut node = NatsServer::with_args(reserve_port(), &store, args);
            node.spawn();
            nodes.push(node);
        }
        let cluster = NatsCluster { nodes, _dir: dir };
        for node in &cluster.nodes {
            node.wait_ready().await;
        }
        cluster
    }

    /// All client URLs, comma-separated, as `SLUICE_NATS_URL` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }
}
