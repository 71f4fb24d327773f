//! The test harness: real `nats-server` processes, an in-process ingest on a real
//! socket, webhook signing, and waiting on conditions with deadlines.
#![forbid(unsafe_code)]

pub mod auth;
pub mod deliveries;
pub mod dispatcher;
pub mod forge_files;
pub mod gitlab_hooks;
pub mod ingest;
pub mod kubeapi;
pub mod nats;
pub mod process;
pub mod recover;
pub mod runner;
pub mod sign;
pub mod streams;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Waits until `check` returns `Some`, polling every 20 ms, and panics with `what`
/// once `deadline` has passed. The only way tests wait for something to happen.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > until {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// `../shared/fixtures` beside the workspace, or `SLUICE_FIXTURES`.
pub fn fixtures_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("SLUICE_FIXTURES") {
        return PathBuf::from(dir);
    }
    let dir = workspace_root().join("../shared/fixtures");
    assert!(
        dir.is_dir(),
        "webhook fixtures not found at {}: set SLUICE_FIXTURES to the fixtures folder",
        dir.display()
    );
    dir
}

/// Reads one fixture file, e.g. `github/push.json`.
pub fn fixture(name: &str) -> Vec<u8> {
    let path = fixtures_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Installs a log subscriber for a test binary once; `RUST_LOG` picks the level.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
