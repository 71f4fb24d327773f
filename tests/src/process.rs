//! Sluice's services as processes of the `sluice` binary (the fault suite, the spike
//! benchmark), each with its own NKey seed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// One service process, restartable with the same arguments.
#[derive(Debug)]
pub struct Service {
    pub name: String,
    /// `http://127.0.0.1:<port>`: health, readiness and metrics.
    pub admin: String,
    /// `http://127.0.0.1:<port>` of ingest's webhooks ([`Service::with_webhooks`]).
    webhooks: Option<String>,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// Times the suite started it (1 = never restarted).
    pub starts: u32,
}

impl Service {
    pub fn new(
        name: &str,
        bin: &Path,
        port: u16,
        args: Vec<String>,
        env: Vec<(String, String)>,
        logs: &Path,
    ) -> Service {
        Service {
            name: name.to_owned(),
            admin: format!("http://127.0.0.1:{port}"),
            webhooks: None,
            bin: bin.to_owned(),
            args,
            env,
            log: logs.join(format!("{name}.log")),
            child: None,
            starts: 0,
        }
    }

    /// An ingest's: its webhooks on `port` (its admin endpoints on the one given to
    /// [`Service::new`]).
    pub fn with_webhooks(mut self, port: u16) -> Service {
        self.webhooks = Some(format!("http://127.0.0.1:{port}"));
        self
    }

    /// The webhooks' base URL of an ingest.
    pub fn webhooks(&self) -> &str {
        self.webhooks
            .as_deref()
            .unwrap_or_else(|| panic!("{} serves no webhooks", self.name))
    }

    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.bin)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", self.name))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// `None` while running; the exit status once it has ended by itself.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(Child::try_wait) {
            None => Some("not started".into()),
            Some(Ok(None)) => None,
            Some(Ok(Some(status))) => Some(status.to_string()),
            Some(Err(e)) => Some(e.to_string()),
        }
    }

    /// SIGKILL and reap: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The process's peak resident set (`VmHWM`) in bytes, while it runs.
    pub fn peak_rss(&self) -> Option<u64> {
        peak_rss(self.child.as_ref()?.id())
    }
}

/// A process's peak resident set (`VmHWM`) in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:").map(|kib| kib * 1024)
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// CPU time `pid` has used so far, user and system, from `/proc/<pid>/stat` (in
/// USER_HZ ticks, which the kernel ABI fixes at 100 a second).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its ')'.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// GET `url`, the status (0 when there was no answer within `timeout`).
pub async fn status_of(http: &reqwest::Client, url: &str, timeout: Duration) -> u16 {
    match http.get(url).timeout(timeout).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Waits until `/readyz` of every service answers 200; how long that took.
pub async fn wait_ready(
    http: &reqwest::Client,
    services: &[&Service],
    deadline: Duration,
) -> Result<Duration, String> {
    let start = Instant::now();
    loop {
        let mut waiting = Vec::new();
        for s in services {
            let status =
                status_of(http, &format!("{}/readyz", s.admin), Duration::from_secs(3)).await;
            if status != 200 {
                waiting.push(format!("{} ({status})", s.name));
            }
        }
        if waiting.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > deadline {
            return Err(format!(
                "not ready after {deadline:?}: {}",
                waiting.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `SLUICE_BIN`, else the `sluice` binary next to the running one (the harness
/// binaries are built beside it).
pub fn sluice_bin() -> anyhow::Result<PathBuf> {
    if let Some(bin) = std::env::var_os("SLUICE_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let me = std::env::current_exe()?;
    let bin = me.parent().unwrap_or(Path::new(".")).join("sluice");
    anyhow::ensure!(
        bin.exists(),
        "no sluice binary at {}: set SLUICE_BIN",
        bin.display()
    );
    Ok(bin)
}

/// Owned command-line arguments.
pub fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// Waits until a NATS node's `/healthz` (at its monitoring base URL) answers 200: its
/// JetStream is up and current. How long that took.
pub async fn nats_healthy(
    http: &reqwest::Client,
    monitor: &str,
    deadline: Duration,
) -> anyhow::Result<Duration> {
    match nats_healthy_unless(http, monitor, deadline, |_| false).await? {
        Health::Healthy(took) => Ok(took),
        Health::Tolerated(said) => bail!("{monitor}/healthz: {said}"),
    }
}

/// How a NATS node's `/healthz` stood when [`nats_healthy_unless`] stopped waiting.
#[derive(Debug)]
pub enum Health {
    /// It answered 200 this long after the wait began.
    Healthy(Duration),
    /// It kept saying this, a complaint the caller tolerates, for [`TOLERATED_FOR`].
    Tolerated(String),
}

/// How long a tolerated complaint must hold before the wait gives up on a 200: NATS
/// keeps one about a consumer it lost for good, and waiting out the whole deadline for
/// it cost the fault suite a minute each time.
pub const TOLERATED_FOR: Duration = Duration::from_secs(5);

/// [`nats_healthy`], but stops early once `/healthz` has said only what `tolerated`
/// accepts for [`TOLERATED_FOR`]; fails after `deadline` with what it said last.
pub async fn nats_healthy_unless(
    http: &reqwest::Client,
    monitor: &str,
    deadline: Duration,
    tolerated: fn(&str) -> bool,
) -> anyhow::Result<Health> {
    let start = Instant::now();
    let url = format!("{monitor}/healthz");
    let mut tolerated_since: Option<Instant> = None;
    loop {
        let answer = http.get(&url).timeout(Duration::from_secs(2)).send().await;
        let said = match answer {
            Ok(r) if r.status() == 200 => return Ok(Health::Healthy(start.elapsed())),
            Ok(r) => format!("{}: {}", r.status(), r.text().await.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        let said = said.trim();
        if tolerated(said) {
            let since = *tolerated_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= TOLERATED_FOR {
                return Ok(Health::Tolerated(format!(
                    "/healthz said for {:.0} s: {said}",
                    TOLERATED_FOR.as_secs_f64()
                )));
            }
        } else {
            tolerated_since = None;
        }
        if start.elapsed() > deadline {
            bail!("{url} not healthy after {deadline:?}: {said}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_reads_this_process_and_grows_with_work() {
        let pid = std::process::id();
        let before = cpu_time(pid).expect("own /proc/<pid>/stat parses");
        // Spin until the kernel has charged at least one more tick (10 ms) to us.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut x = 0u64;
        while cpu_time(pid).expect("stat") <= before {
            assert!(Instant::now() < deadline, "CPU time never advanced");
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
        assert_eq!(cpu_time(u32::MAX), None, "no such process");
    }

    /// A `/healthz` on a real socket that answers 503 with `body` for its first
    /// `unhealthy` requests, then 200.
    async fn healthz(body: &'static str, unhealthy: usize) -> String {
        let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let app = axum::Router::new().route(
            "/healthz",
            axum::routing::get(move || {
                let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async move {
                    if n < unhealthy {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, body)
                    } else {
                        (axum::http::StatusCode::OK, "{}")
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bound");
        let addr = listener.local_addr().expect("address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_tolerated_complaint_ends_the_wait_and_others_do_not() {
        let http = reqwest::Client::new();
        let tolerated = |said: &str| said.contains("orphan");
        // Always the tolerated complaint: given up on after TOLERATED_FOR, well
        // before the deadline, with what it said.
        let url = healthz("orphan consumer", usize::MAX).await;
        let started = Instant::now();
        let healed = nats_healthy_unless(&http, &url, Duration::from_secs(60), tolerated)
            .await
            .expect("no failure");
        assert!(
            matches!(&healed, Health::Tolerated(said) if said.contains("503") && said.contains("orphan consumer")),
            "not tolerated"
        );
        assert!(started.elapsed() < Duration::from_secs(30));
        // Any other complaint is waited on to the deadline, and fails.
        let url = healthz("stream not current", usize::MAX).await;
        let err = nats_healthy_unless(&http, &url, Duration::from_secs(1), tolerated)
            .await
            .expect_err("not healthy");
        assert!(format!("{err:#}").contains("stream not current"), "{err:#}");
        // Healthy after a few complaints: healthy.
        let url = healthz("orphan consumer", 3).await;
        let healed = nats_healthy_unless(&http, &url, Duration::from_secs(60), tolerated)
            .await
            .expect("healthy");
        assert!(matches!(healed, Health::Healthy(_)));
    }
}
