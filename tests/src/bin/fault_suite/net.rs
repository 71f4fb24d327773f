//! The network: one namespace per NATS node, each joined to a bridge in the root
//! namespace by a veth pair, and the 3-node JetStream cluster running in them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

pub const BRIDGE: &str = "slfbr0";
const NS_PREFIX: &str = "slf-n";
const SUBNET: &str = "10.231.0";
pub const NODES: usize = 3;

/// `ip …`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip`")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub fn ns(i: usize) -> String {
    format!("{NS_PREFIX}{i}")
}

/// The veth end in the root namespace, on the bridge: taking it down cuts node `i` off.
pub fn host_link(i: usize) -> String {
    format!("{NS_PREFIX}{i}h")
}

pub fn node_ip(i: usize) -> String {
    format!("{SUBNET}.{}", 10 + i)
}

/// Whether the suite can run here: root, and `ip netns` works. The reason when not.
pub fn available() -> Result<(), String> {
    let probe = format!("{NS_PREFIX}probe");
    let _ = ip(&["netns", "del", &probe]);
    match ip(&["netns", "add", &probe]) {
        Ok(()) => {
            let _ = ip(&["netns", "del", &probe]);
            Ok(())
        }
        Err(e) => Err(format!("{e:#}")),
    }
}

/// Removes whatever a previous run left: the namespaces (their veth ends go with them),
/// host links and the bridge. Errors are ignored: most of it is usually not there.
pub fn cleanup() {
    for i in 1..=NODES {
        let _ = ip(&["link", "del", &host_link(i)]);
        let _ = ip(&["netns", "del", &ns(i)]);
    }
    let _ = ip(&["link", "del", BRIDGE]);
}

/// The bridge (10.231.0.1/24) and a namespace per node (10.231.0.1<i>).
pub fn setup() -> anyhow::Result<()> {
    cleanup();
    ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    ip(&["addr", "add", &format!("{SUBNET}.1/24"), "dev", BRIDGE])?;
    ip(&["link", "set", BRIDGE, "up"])?;
    for i in 1..=NODES {
        let (ns, host) = (ns(i), host_link(i));
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&[
            "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node_ip(i)),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["link", "set", &host, "master", BRIDGE])?;
        ip(&["link", "set", &host, "up"])?;
    }
    Ok(())
}

pub fn link_down(i: usize) -> anyhow::Result<()> {
    ip(&["link", "set", &host_link(i), "down"])
}

pub fn link_up(i: usize) -> anyhow::Result<()> {
    ip(&["link", "set", &host_link(i), "up"])
}

/// One NATS node in its namespace.
#[derive(Debug)]
pub struct Node {
    pub index: usize,
    pub name: String,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    pub fn url(&self) -> String {
        format!("nats://{}:4222", node_ip(self.index))
    }

    pub fn monitor(&self) -> String {
        format!("http://{}:8222", node_ip(self.index))
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// `ip netns exec` replaces itself with the server (no fork), so the child's pid is
    /// the server's.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", &ns(self.index)])
            .arg(sluice_tests::nats::server_binary())
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start nats-server")?;
        self.child = Some(child);
        Ok(())
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `deadline` for the process to exit by itself (after lame duck mode).
    pub async fn wait_exit(&mut self, deadline: Duration) -> bool {
        let until = std::time::Instant::now() + deadline;
        while std::time::Instant::now() < until {
            if !self.is_running() {
                self.child = None;
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes each node's configuration from the `nats init` file (`base`: its users,
/// `sync_interval: always`), with the node's own listen address, store, name, routes
/// and monitoring port.
pub fn nodes(base: &Path, dir: &Path) -> anyhow::Result<Vec<Node>> {
    let text = std::fs::read_to_string(base)?;
    let routes: Vec<String> = (1..=NODES)
        .map(|i| format!("    nats://{}:6222", node_ip(i)))
        .collect();
    let mut nodes = Vec::new();
    for i in 1..=NODES {
        let ip = node_ip(i);
        let store = dir.join(format!("n{i}-store"));
        let mut conf = String::new();
        for line in text.lines() {
            let trimmed = line.trim_start();
            if trimmed.starts_with("listen:") {
                conf.push_str(&format!("listen: \"{ip}:4222\"\n"));
            } else if trimmed.starts_with("store_dir:") {
                conf.push_str(&format!("  store_dir: \"{}\"\n", store.display()));
            } else {
                conf.push_str(line);
                conf.push('\n');
            }
        }
        anyhow::ensure!(
            conf.contains("sync_interval: always"),
            "nats init no longer writes sync_interval: always"
        );
        conf.push_str(&format!(
            "\nserver_name: n{i}\nhttp: \"{ip}:8222\"\nlame_duck_duration: \"30s\"\nlame_duck_grace_period: \"2s\"\ncluster {{\n  name: sluice-fault\n  listen: \"{ip}:6222\"\n  routes: [\n{}\n  ]\n}}\n",
            routes.join("\n")
        ));
        let config = dir.join(format!("n{i}.conf"));
        std::fs::write(&config, conf)?;
        nodes.push(Node {
            index: i,
            name: format!("n{i}"),
            config,
            log: dir.join(format!("n{i}.log")),
            child: None,
        });
    }
    Ok(nodes)
}
