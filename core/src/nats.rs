//! Connecting to NATS the same way from every service.

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectOptions};

use crate::{Error, Result};

/// How to reach and authenticate to NATS. Filled from `SLUICE_NATS_*` flags.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://`, `tls://`, `ws://` or `wss://` URL; several may be comma-separated.
    pub url: String,
    /// A `.creds` file (JWT + NKey seed).
    pub creds_file: Option<PathBuf>,
    /// A file holding an NKey seed.
    pub nkey_file: Option<PathBuf>,
    /// Extra CA certificate (PEM) for `tls://` / `wss://`.
    pub ca_file: Option<PathBuf>,
    /// Client name shown in the server's connection list.
    pub name: String,
    /// Prefix of this client's reply subjects (default `_INBOX`). A runner uses its
    /// cluster's own ([`crate::roles::inbox_prefix`]), so its credential can be allowed
    /// to receive replies there and nowhere else.
    pub inbox_prefix: Option<String>,
}

impl NatsOptions {
    /// Options for a plain URL and no credentials.
    pub fn new(url: impl Into<String>, name: impl Into<String>) -> Self {
        NatsOptions {
            url: url.into(),
            creds_file: None,
            nkey_file: None,
            ca_file: None,
            name: name.into(),
            inbox_prefix: None,
        }
    }
}

/// How often a client pings a server that has sent it nothing. async-nats gives up on
/// a connection after three intervals without a word from the server and moves to
/// another URL, so this bounds how long a server that vanished without a TCP reset (a
/// cut link, a paused or frozen node) can hold a service's connection: 6 s. At the
/// former 10 s, ingest answered every webhook 503 for the 30 s a node was cut off while
/// the two others could store them (the fault suite's `ingest-node-cut`).
pub const PING_INTERVAL: Duration = Duration::from_secs(2);

/// How long a service's connection attempt to one server may take, handshake
/// included, before the next URL is tried.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects, retrying forever with backoff: a service that starts before NATS, or
/// outlives a NATS restart, keeps running and reconnects on its own.
///
/// Returns once the client exists; the first connection may still be pending, in which
/// case requests fail or wait until it is up.
pub async fn connect(opts: &NatsOptions) -> Result<Client> {
    let connect = ConnectOptions::new()
        .connection_timeout(CONNECTION_TIMEOUT)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(backoff);
    connect_with(opts, connect).await
}

/// Connects once, for command-line tools: fails within `timeout` with an error that
/// names the URL when NATS cannot be reached.
pub async fn connect_once(opts: &NatsOptions, timeout: Duration) -> Result<Client> {
    let connect = ConnectOptions::new().connection_timeout(timeout);
    match tokio::time::timeout(
        timeout + Duration::from_secs(1),
        connect_with(opts, connect),
    )
    .await
    {
        Ok(client) => client,
        Err(_) => Err(Error::Timeout(timeout)),
    }
}

async fn connect_with(opts: &NatsOptions, connect: ConnectOptions) -> Result<Client> {
    // The connection timeout is the caller's: set here, it overrode `connect_once`'s,
    // whose shorter timeout then ended as "JetStream did not answer" instead of naming
    // the server that did not.
    let mut connect = connect.name(&opts.name).ping_interval(PING_INTERVAL);
    if let Some(path) = &opts.creds_file {
        connect = connect
            .credentials_file(path)
            .await
            .map_err(|source| Error::ReadFile {
                what: "NATS credentials",
                path: path.clone(),
                source,
            })?;
    }
    if let Some(path) = &opts.nkey_file {
        let seed = std::fs::read_to_string(path).map_err(|source| Error::ReadFile {
            what: "NATS NKey seed",
            path: path.clone(),
            source,
        })?;
        connect = connect.nkey(seed.trim().to_owned());
    }
    if let Some(prefix) = &opts.inbox_prefix {
        connect = connect.custom_inbox_prefix(prefix);
    }
    if let Some(path) = &opts.ca_file {
        connect = connect.add_root_certificates(path.clone());
    }
    let urls: Vec<async_nats::ServerAddr> = opts
        .url
        .split(',')
        .map(|u| {
            u.trim()
                .parse()
                .map_err(|e: std::io::Error| Error::NatsUrl {
                    url: u.trim().to_owned(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<_>>()?;
    connect
        .connect(urls)
        .await
        .map_err(|source| Error::Connect {
            url: opts.url.clone(),
            source,
        })
}

/// Reconnect delay: quick first retries, then capped at 5 s so a restarted server is
/// found again within seconds.
fn backoff(attempt: usize) -> Duration {
    let millis = 50u64.saturating_mul(1 << attempt.min(7));
    Duration::from_millis(millis.min(5_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connecting_once_fails_within_its_own_timeout_naming_the_server() {
        // Accepts the TCP connection and never sends NATS's INFO, like a paused server.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("nats://{}", listener.local_addr().unwrap());
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                open.push(stream);
            }
        });
        let opts = NatsOptions::new(url.clone(), "test");
        let err = connect_once(&opts, Duration::from_millis(300))
            .await
            .expect_err("nothing answers");
        assert!(
            matches!(&err, Error::Connect { url: u, .. } if *u == url),
            "{err}"
        );
        held.abort();
    }

    #[test]
    fn backoff_grows_then_caps() {
        assert_eq!(backoff(0), Duration::from_millis(50));
        assert!(backoff(3) > backoff(2));
        assert_eq!(backoff(50), Duration::from_millis(5_000));
    }
}
