//! An in-process ingest on a real loopback socket, and helpers to post to it and read
//! what it stored.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream;
use secrecy::SecretString;
use sluice_core::nats::NatsOptions;
use sluice_core::{subjects, Event};
use sluice_ingest::{IngestConfig, SecretSources, Secrets};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::wait_for;

pub const GITHUB_SECRET: &str = "gh-test-secret-7f3a";
pub const GITLAB_TOKEN: &str = "gl-test-token-91bc";
/// base64 of "sluice-standard-webhooks-secret!".
pub const SIGNING_SECRET: &str = "whsec_c2x1aWNlLXN0YW5kYXJkLXdlYmhvb2tzLXNlY3JldCE=";

/// Secrets every test ingest starts with unless told otherwise.
pub fn test_secrets() -> Secrets {
    let gh = SecretString::from(GITHUB_SECRET.to_owned());
    let gl = SecretString::from(GITLAB_TOKEN.to_owned());
    let sw = SecretString::from(SIGNING_SECRET.to_owned());
    Secrets::load(SecretSources {
        github: Some(&gh),
        gitlab: Some(&gl),
        generic: Some(&sw),
        file: None,
    })
    .expect("secrets")
}

/// A running ingest.
#[derive(Debug)]
pub struct Ingest {
    /// The webhooks.
    pub addr: SocketAddr,
    /// `/healthz`, `/readyz` and `/metrics`, on their own listener as in production.
    pub admin: SocketAddr,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    task: Option<JoinHandle<sluice_ingest::Result<()>>>,
}

impl Ingest {
    /// Starts ingest against `nats_url` with the test secrets and default limits.
    pub async fn start(nats_url: &str) -> Ingest {
        Self::start_with(Self::config(nats_url)).await
    }

    /// Default test configuration: loopback, port chosen by the OS, test secrets.
    pub fn config(nats_url: &str) -> IngestConfig {
        let mut config = IngestConfig::new(
            "127.0.0.1:0".parse().expect("addr"),
            NatsOptions::new(nats_url, "sluice-test-ingest"),
            test_secrets(),
        );
        config.shutdown_grace = Duration::from_secs(5);
        // A port of its own per test (the default, 9464, would be shared).
        config.admin_listen = Some("127.0.0.1:0".parse().expect("addr"));
        config
    }

    /// Starts ingest with `config` and waits until `/readyz` says ready. The admin
    /// endpoints get a loopback port of their own unless `config.admin_listen` names one.
    pub async fn start_with(config: IngestConfig) -> Ingest {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let admin_listener = tokio::net::TcpListener::bind(
            config
                .admin_listen
                .unwrap_or_else(|| "127.0.0.1:0".parse().expect("addr")),
        )
        .await
        .expect("bind the admin endpoints");
        let admin = admin_listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(sluice_ingest::serve(
            listener,
            Some(admin_listener),
            config,
            shutdown.clone(),
        ));
        let ingest = Ingest {
            addr,
            admin,
            http: reqwest::Client::new(),
            shutdown,
            task: Some(task),
        };
        let url = ingest.admin_url("/readyz");
        let http = ingest.http.clone();
        wait_for("ingest to be ready", Duration::from_secs(20), || {
            let (url, http) = (url.clone(), http.clone());
            async move {
                let r = http.get(&url).send().await.ok()?;
                r.status().is_success().then_some(())
            }
        })
        .await;
        ingest
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `/healthz`, `/readyz`, `/metrics`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The text of `/metrics` now.
    pub async fn metrics(&self) -> String {
        self.http
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("/metrics answers")
            .text()
            .await
            .expect("/metrics body")
    }

    /// Trips the shutdown token and waits for `serve` to return.
    pub async fn stop(mut self) -> sluice_ingest::Result<()> {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("ingest stops within its grace period")
            .expect("ingest task did not panic")
    }

    /// Posts a JSON body to GitHub's endpoint, signed with `secret`.
    pub async fn post_github(&self, event: &str, delivery: &str, body: &[u8]) -> reqwest::Response {
        self.http
            .post(self.url("/webhooks/github"))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .header(
                "x-hub-signature-256",
                crate::sign::github_sha256(GITHUB_SECRET, body),
            )
            .body(body.to_vec())
            .send()
            .await
            .expect("request sent")
    }

    /// Posts a JSON body to GitLab's endpoint with the secret token.
    pub async fn post_gitlab(&self, event: &str, uuid: &str, body: &[u8]) -> reqwest::Response {
        self.http
            .post(self.url("/webhooks/gitlab"))
            .header("content-type", "application/json")
            .header("x-gitlab-event", event)
            .header("x-gitlab-event-uuid", uuid)
            .header("x-gitlab-token", GITLAB_TOKEN)
            .body(body.to_vec())
            .send()
            .await
            .expect("request sent")
    }

    /// Posts a Standard Webhooks delivery signed now.
    pub async fn post_generic(&self, id: &str, body: &[u8]) -> reqwest::Response {
        let ts = crate::sign::now();
        self.http
            .post(self.url("/webhooks/generic"))
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header(
                "webhook-signature",
                crate::sign::standard(SIGNING_SECRET, id, ts, body),
            )
            .body(body.to_vec())
            .send()
            .await
            .expect("request sent")
    }
}

impl Drop for Ingest {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A JetStream context on a fresh connection.
pub async fn jetstream(nats_url: &str) -> jetstream::Context {
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to nats");
    jetstream::new(client)
}

/// Every event in `SLUICE_EVENTS`, in order.
pub async fn stored_events(js: &jetstream::Context) -> Vec<(String, Event)> {
    let mut stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("events stream");
    let info = stream.info().await.expect("stream info").clone();
    let mut events = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if info.state.messages == 0 {
            break;
        }
        if let Ok(msg) = stream.get_raw_message(seq).await {
            let event: Event =
                serde_json::from_slice(&msg.payload).expect("stored events are envelopes");
            events.push((msg.subject.to_string(), event));
        }
    }
    events
}

/// How many messages `SLUICE_EVENTS` holds.
pub async fn stored_count(js: &jetstream::Context) -> u64 {
    let mut stream = js
        .get_stream(subjects::EVENTS_STREAM)
        .await
        .expect("events stream");
    stream.info().await.expect("stream info").state.messages
}
