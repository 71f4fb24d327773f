//! The dashboard over a real socket against a real nats-server: every page, escaping of
//! attacker-controlled values, the security headers, and the server-sent event streams
//! (a log resumed after `Last-Event-ID` with no gap and no repeat; the run list's live
//! changes).

use std::time::Duration;

use futures::StreamExt;
use sluice_core::run::{
    Decision, LogChunk, LogLine, PipelineDecision, PlannedRun, RunState, StatusUpdate,
    TriggerVerdict,
};
use sluice_core::{bus, subjects};
use sluice_tests::nats::NatsServer;
use sluice_tests::{dispatcher, wait_for};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

const XSS_REF: &str = "refs/heads/<script>alert(1)</script>";
const XSS_LINE: &str = "\x1b[31m<img src=x onerror=alert(1)>\x1b[0m done";

struct Env {
    _nats: NatsServer,
    js: async_nats::jetstream::Context,
    base: String,
    http: reqwest::Client,
    shutdown: CancellationToken,
    dashboard: Option<sluice_dashboard::Dashboard>,
}

impl Env {
    async fn start() -> Env {
        let nats = NatsServer::start().await;
        let client = async_nats::connect(nats.url()).await.expect("connect");
        let js = async_nats::jetstream::new(client.clone());
        dispatcher::provision(&js).await;
        let shutdown = CancellationToken::new();
        let dashboard = sluice_dashboard::start(
            client,
            "127.0.0.1:0".parse().expect("addr"),
            None,
            shutdown.clone(),
        )
        .await
        .expect("dashboard");
        Env {
            _nats: nats,
            js,
            base: format!("http://{}", dashboard.addr),
            http: reqwest::Client::new(),
            shutdown,
            dashboard: Some(dashboard),
        }
    }

    /// Opens the event stream at `path`, as a browser reconnecting after
    /// `last_event_id` would when one is given.
    async fn stream(&self, path: &str, last_event_id: Option<&str>) -> reqwest::Response {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id);
        }
        let res = req.send().await.expect("connect");
        assert_eq!(res.status(), 200, "{path}");
        assert_eq!(res.headers()["content-type"], "text/event-stream", "{path}");
        res
    }

    async fn get(&self, path: &str) -> (u16, reqwest::header::HeaderMap, String) {
        let res = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET");
        let status = res.status().as_u16();
        let headers = res.headers().clone();
        (status, headers, res.text().await.expect("body"))
    }

    /// Waits until the index has read every stored state and `path` shows `text`.
    async fn page_with(&self, path: &str, text: &str) -> String {
        wait_for(
            &format!("{path} to show {text}"),
            Duration::from_secs(10),
            || async {
                let (status, _, body) = self.get(path).await;
                (status == 200 && body.contains(text)).then_some(body)
            },
        )
        .await
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(d) = self.dashboard.take() {
            tokio::time::timeout(Duration::from_secs(10), d.wait())
                .await
                .expect("the dashboard stops on shutdown");
        }
    }
}

fn status(run: &str, step: Option<&str>, state: RunState, exit_code: Option<i32>) -> StatusUpdate {
    StatusUpdate {
        run_id: run.into(),
        pipeline: "ci".into(),
        state,
        step: step.map(str::to_owned),
        at: OffsetDateTime::now_utc(),
        cluster: Some("eu-1".into()),
        event_id: Some("github:d-1".into()),
        concurrency_group: None,
        exit_code,
        message: None,
        runner: Some("runner-a".into()),
        repo: Some("acme/app".into()),
        sha: Some("0123456789abcdef0123".into()),
        parent: None,
    }
}

async fn publish_status(js: &async_nats::jetstream::Context, u: &StatusUpdate) {
    bus::publish_json(js, u.subject(), &u.message_id(), u)
        .await
        .expect("status stored");
}

/// Stores one chunk of `lines` lines and returns its stream sequence.
async fn publish_log(
    js: &async_nats::jetstream::Context,
    run: &str,
    step: &str,
    seq: u64,
    lines: Vec<String>,
) -> u64 {
    let chunk = LogChunk {
        run_id: run.into(),
        step: step.into(),
        seq,
        lines: lines
            .into_iter()
            .map(|text| LogLine {
                stream: "stdout".into(),
                text,
            })
            .collect(),
    };
    bus::publish_json(
        js,
        subjects::logs("eu-1", run),
        &subjects::log_chunk_id(run, step, seq),
        &chunk,
    )
    .await
    .expect("log stored")
    .sequence
}

fn decision() -> Decision {
    Decision {
        event_id: "github:d-1".into(),
        provider: "github".into(),
        kind: "push".into(),
        action: None,
        repo: Some("acme/app".into()),
        git_ref: Some(XSS_REF.into()),
        sha: Some("0123456789abcdef0123".into()),
        clone_url: Some("https://github.com/acme/app.git".into()),
        pr: None,
        decided_at: OffsetDateTime::now_utc(),
        pipelines: vec![
            PipelineDecision {
                pipeline: "ci".into(),
                matched: true,
                triggers: vec![TriggerVerdict {
                    index: 0,
                    matched: true,
                    failed: None,
                    detail: "push to a branch".into(),
                }],
                note: None,
            },
            PipelineDecision {
                pipeline: "deploy".into(),
                matched: false,
                triggers: vec![TriggerVerdict {
                    index: 0,
                    matched: false,
                    failed: Some("branches".into()),
                    detail: "wanted main".into(),
                }],
                note: None,
            },
        ],
        not_considered: 3,
        runs: vec![PlannedRun {
            run_id: "run-1".into(),
            pipeline: "ci".into(),
            cluster: "eu-1".into(),
            outcome: "published".into(),
        }],
        repo_pipelines: None,
    }
}

#[tokio::test]
async fn every_page_renders_stored_data_escaped_and_with_strict_headers() {
    let env = Env::start().await;
    let js = &env.js;
    dispatcher::apply(
        js,
        "name: ci\ntriggers:\n  - provider: github\n    kinds: [push]\nsteps:\n  - name: build\n    image: alpine\n    commands: [make]\n",
    )
    .await;
    bus::publish_json_replacing(js, subjects::decision("github:d-1"), &decision())
        .await
        .expect("decision stored");
    publish_status(js, &status("run-1", None, RunState::Running, None)).await;
    publish_status(js, &status("run-1", Some("build"), RunState::Running, None)).await;
    publish_log(
        js,
        "run-1",
        "build",
        0,
        vec!["compiling".into(), XSS_LINE.into()],
    )
    .await;
    publish_status(
        js,
        &status("run-1", Some("build"), RunState::Failed, Some(2)),
    )
    .await;
    publish_status(js, &status("run-1", None, RunState::Failed, None)).await;
    publish_status(js, &status("run-2", None, RunState::Succeeded, None)).await;

    let list = env.page_with("/runs", "run-2").await;
    assert!(list.contains("href=\"/runs/run-1\""), "{list}");
    assert!(
        list.find("run-2") < list.find("run-1"),
        "newest first: {list}"
    );
    let failed = env.page_with("/runs?state=failed", "run-1").await;
    assert!(
        !failed.contains("run-2"),
        "the state filter applies: {failed}"
    );

    let (code, headers, run) = env.get("/runs/run-1").await;
    assert_eq!(code, 200);
    let csp = headers["content-security-policy"].to_str().expect("csp");
    assert_eq!(csp, sluice_dashboard::CSP);
    assert!(
        !csp.contains("unsafe-inline") && !csp.contains("http"),
        "{csp}"
    );
    assert_eq!(headers["x-content-type-options"], "nosniff");
    // The branch name and the log line are text, never markup.
    assert!(
        run.contains("refs/heads/&#60;script&#62;alert(1)&#60;/script&#62;")
            || run.contains("refs/heads/&lt;script&gt;"),
        "{run}"
    );
    assert!(
        !run.contains("<script>alert") && !run.contains("<img"),
        "{run}"
    );
    assert!(
        run.contains("<span class=\"ansi-red\">&#60;img src=x onerror=alert(1)&#62;</span>")
            || run.contains("<span class=\"ansi-red\">&lt;img src=x onerror=alert(1)&gt;</span>"),
        "ANSI red is a class and the text escaped: {run}"
    );
    assert!(!run.contains('\x1b'), "no raw escape code");
    assert!(run.contains("id=\"build-L2\""), "a link per line: {run}");
    assert!(run.contains("exit 2"), "{run}");
    assert!(run.contains("href=\"https://github.com/acme/app/commit/0123456789abcdef0123\""));
    assert!(run.contains("href=\"/events/github:d-1\""), "{run}");
    assert!(run.contains(" open>"), "the failed step is opened: {run}");

    let (code, headers, raw) = env.get("/runs/run-1/log.txt").await;
    assert_eq!(code, 200);
    assert!(headers["content-type"]
        .to_str()
        .expect("type")
        .starts_with("text/plain"));
    assert_eq!(raw, format!("── build ──\ncompiling\n{XSS_LINE}\n"));

    let (code, _, event) = env.get("/events/github:d-1").await;
    assert_eq!(code, 200);
    assert!(
        event.contains("wanted main") && event.contains("branches"),
        "{event}"
    );
    assert!(event.contains("href=\"/runs/run-1\""), "{event}");
    assert!(event.contains("3 others do not watch"), "{event}");

    let (code, _, pipelines) = env.get("/pipelines").await;
    assert_eq!(code, 200);
    assert!(pipelines.contains("href=\"/pipelines/ci\""), "{pipelines}");
    let (code, _, ci) = env.get("/pipelines/ci").await;
    assert_eq!(code, 200);
    assert!(
        ci.contains("Revision 1") && ci.contains("run-1") && ci.contains("make"),
        "{ci}"
    );

    let (code, _, clusters) = env.get("/clusters").await;
    assert_eq!(code, 200);
    assert!(
        clusters.contains("eu-1") && clusters.contains("in flight: 0"),
        "{clusters}"
    );

    for missing in [
        "/runs/nope",
        "/runs/a.b",
        "/events/github:none",
        "/pipelines/nope",
    ] {
        assert_eq!(env.get(missing).await.0, 404, "{missing}");
    }
    let (code, _, js_asset) = env.get("/assets/app.js").await;
    assert_eq!(code, 200);
    assert!(js_asset.contains("EventSource"));
    assert!(!js_asset.contains("innerHTML"), "the script sets text only");
    assert_eq!(env.get("/readyz").await.0, 200);
    for (name, value) in [
        ("sec-fetch-site", "cross-site"),
        ("origin", "https://evil.example"),
    ] {
        let res = env
            .http
            .post(format!("{}/runs/run-1", env.base))
            .header(name, value)
            .send()
            .await
            .expect("POST");
        assert_eq!(
            res.status().as_u16(),
            403,
            "a cross-site POST ({name}) is refused"
        );
    }
    env.stop().await;
}

/// The event page's "Repository pipelines" section: whose `.sluice/` at which commit
/// (linked to the forge), why, the pipelines read (linked to their runs) and every
/// refusal — file names and messages from the repository, shown as text. `/pipelines`
/// lists what was last read from each repository.
#[tokio::test]
async fn the_event_page_shows_the_repository_pipelines_read_and_refusals_as_text() {
    use sluice_core::repo_pipelines::{LastRead, Side};
    use sluice_core::run::RepoPipelinesRead;
    let env = Env::start().await;
    let js = &env.js;
    let sha = "9f1c2b3a4d5e6f708192a3b4c5d6e7f809112233";
    let refusal =
        ".sluice/<script>alert(1)</script>.yaml:3:7: unknown field `<script>alert(1)</script>`";
    let read = Decision {
        event_id: "github:d-9".into(),
        sha: Some(sha.into()),
        repo_pipelines: Some(RepoPipelinesRead {
            side: Some(Side::Head),
            git_ref: Some(sha.into()),
            reason: "a push runs the definitions it pushed".into(),
            pipelines: vec!["acme/app:build".into()],
            errors: vec![refusal.into()],
        }),
        pipelines: vec![sluice_core::run::PipelineDecision {
            pipeline: "acme/app:build".into(),
            matched: true,
            triggers: Vec::new(),
            note: None,
        }],
        ..decision()
    };
    bus::publish_json_replacing(js, subjects::decision("github:d-9"), &read)
        .await
        .expect("decision stored");
    bus::publish_json_replacing(js, subjects::decision("github:d-1"), &decision())
        .await
        .expect("decision stored");

    let (code, _, event) = env.get("/events/github:d-9").await;
    assert_eq!(code, 200);
    assert!(event.contains("<h2>Repository pipelines</h2>"), "{event}");
    assert!(
        event.contains("the event's own") || event.contains("the event&#39;s own"),
        "{event}"
    );
    assert!(
        event.contains(&format!(
            "<a href=\"https://github.com/acme/app/commit/{sha}\" rel=\"noreferrer\"><code>{sha}</code></a>"
        )),
        "the commit read links to the forge: {event}"
    );
    assert!(
        event.contains("a push runs the definitions it pushed"),
        "{event}"
    );
    assert!(
        event.contains("<a href=\"/runs?pipeline=acme%2Fapp%3Abuild\">acme/app:build</a>"),
        "each pipeline read links to its runs: {event}"
    );
    // Also where it is listed among the pipelines considered: it has no page of its
    // own (it is not applied), so its runs.
    assert_eq!(
        event
            .matches("<a href=\"/runs?pipeline=acme%2Fapp%3Abuild\">acme/app:build</a>")
            .count(),
        2,
        "{event}"
    );
    assert!(!event.contains("href=\"/pipelines/acme"), "{event}");
    let escaped = |open: &str, close: &str| {
        format!(
            "<li><code>.sluice/{open}script{close}alert(1){open}/script{close}.yaml:3:7: unknown field `{open}script{close}alert(1){open}/script{close}`</code></li>"
        )
    };
    assert!(
        event.contains(&escaped("&lt;", "&gt;")) || event.contains(&escaped("&#60;", "&#62;")),
        "the refusal is text: {event}"
    );
    assert!(!event.contains("<script>"), "{event}");

    let (code, _, plain) = env.get("/events/github:d-1").await;
    assert_eq!(code, 200);
    assert!(
        !plain.contains("Repository pipelines"),
        "no section for a repository not opted in: {plain}"
    );

    let cache = sluice_core::streams::bucket(js, subjects::REPO_FILES_BUCKET)
        .await
        .expect("bucket");
    let last = LastRead {
        provider: sluice_core::Provider::Github,
        repo: "acme/<b>app</b>".into(),
        side: Side::Base,
        git_ref: sha.into(),
        event_id: "github:d-9".into(),
        pipelines: vec!["acme/<b>app</b>:build".into()],
        errors: 1,
        read_at: time::macros::datetime!(2026-12-03 11:40:00 UTC),
    };
    cache
        .put(
            subjects::repo_last_read_key("github", "acme/<b>app</b>"),
            serde_json::to_vec(&last).expect("json").into(),
        )
        .await
        .expect("put");
    // A cached listing beside it is not a read record.
    cache
        .put(
            subjects::repo_files_key("github", "acme/ghost", sha),
            serde_json::to_vec(&LastRead {
                repo: "acme/ghost".into(),
                ..last
            })
            .expect("json")
            .into(),
        )
        .await
        .expect("put");
    let (code, _, pipelines) = env.get("/pipelines").await;
    assert_eq!(code, 200);
    assert!(
        pipelines.contains("Repository pipelines (read in the last hour)"),
        "{pipelines}"
    );
    assert!(
        pipelines.contains("<td><code>9f1c2b3a4d5e</code></td>")
            && pipelines.contains("<td>base</td>")
            && pipelines.contains("<a href=\"/events/github:d-9\">1</a>")
            && pipelines.contains("2026-12-03 11:40:00Z"),
        "{pipelines}"
    );
    assert!(
        pipelines.contains("href=\"/runs?pipeline=acme%2F%3Cb%3Eapp%3C%2Fb%3E%3Abuild\""),
        "{pipelines}"
    );
    assert!(!pipelines.contains("<b>"), "{pipelines}");
    assert!(!pipelines.contains("acme/ghost"), "{pipelines}");
    env.stop().await;
}

/// One parsed server-sent event.
#[derive(Debug)]
struct Sse {
    id: Option<String>,
    event: Option<String>,
    data: String,
}

/// Reads events from a streaming answer until `n` are in (comments are skipped).
async fn read_events(res: reqwest::Response, n: usize) -> Vec<Sse> {
    SseReader::new(res).next(n).await
}

/// A streaming answer read event by event, so a test can act between two of them.
struct SseReader {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<axum::body::Bytes>> + Send>>,
    buf: String,
}

impl SseReader {
    fn new(res: reqwest::Response) -> SseReader {
        SseReader {
            body: Box::pin(res.bytes_stream()),
            buf: String::new(),
        }
    }

    async fn next(&mut self, n: usize) -> Vec<Sse> {
        let mut out = Vec::new();
        let read = async {
            while out.len() < n {
                while let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    let mut e = Sse {
                        id: None,
                        event: None,
                        data: String::new(),
                    };
                    for line in block.lines() {
                        if let Some(v) = line.strip_prefix("id:") {
                            e.id = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("event:") {
                            e.event = Some(v.trim().to_owned());
                        } else if let Some(v) = line.strip_prefix("data:") {
                            e.data.push_str(v.trim_start());
                        }
                    }
                    if e.event.is_some() || !e.data.is_empty() {
                        out.push(e);
                    }
                    if out.len() == n {
                        return;
                    }
                }
                let bytes = self
                    .body
                    .next()
                    .await
                    .expect("the stream stays open")
                    .expect("bytes");
                self.buf
                    .push_str(std::str::from_utf8(&bytes).expect("utf-8"));
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the events arrive");
        out
    }
}

fn lines_of(events: &[Sse]) -> Vec<String> {
    events
        .iter()
        .flat_map(|e| {
            let v: serde_json::Value = serde_json::from_str(&e.data).expect("json");
            v["lines"]
                .as_array()
                .expect("lines")
                .iter()
                .map(|line| {
                    line["segments"]
                        .as_array()
                        .expect("segments")
                        .iter()
                        .map(|s| s["text"].as_str().expect("text").to_owned())
                        .collect::<String>()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test]
async fn the_log_stream_resumes_after_last_event_id_with_no_gap_and_no_repeat() {
    let env = Env::start().await;
    let js = &env.js;
    publish_status(js, &status("run-9", Some("build"), RunState::Running, None)).await;
    let mut sequences = Vec::new();
    for seq in 0..3u64 {
        let lines = vec![
            format!("line {}", 2 * seq + 1),
            format!("line {}", 2 * seq + 2),
        ];
        sequences.push(publish_log(js, "run-9", "build", seq, lines).await);
    }
    let url = "/runs/run-9/log/live";
    let res = env.stream(url, None).await;
    let first = read_events(res, 3).await;
    let ids: Vec<u64> = first
        .iter()
        .map(|e| e.id.as_deref().expect("id").parse().expect("number"))
        .collect();
    assert_eq!(
        ids, sequences,
        "each event's id is its chunk's stream sequence"
    );
    assert!(first.iter().all(|e| e.event.as_deref() == Some("log")));
    assert_eq!(lines_of(&first).len(), 6);
    // The connection drops; more is stored meanwhile; the browser reconnects with the
    // last id it saw.
    for seq in 3..5u64 {
        let lines = vec![
            format!("line {}", 2 * seq + 1),
            format!("line {}", 2 * seq + 2),
        ];
        sequences.push(publish_log(js, "run-9", "build", seq, lines).await);
    }
    let res = env.stream(url, Some(&ids[2].to_string())).await;
    let second = read_events(res, 2).await;
    let resumed: Vec<u64> = second
        .iter()
        .map(|e| e.id.as_deref().expect("id").parse().expect("number"))
        .collect();
    assert_eq!(
        resumed,
        sequences[3..],
        "exactly the chunks after the last id"
    );
    let all: Vec<String> = lines_of(&first)
        .into_iter()
        .chain(lines_of(&second))
        .collect();
    let want: Vec<String> = (1..=10).map(|n| format!("line {n}")).collect();
    assert_eq!(all, want, "no gap and no duplicate");

    // The page rendered before the reconnect names the sequence the stream goes on from.
    let page = env.page_with("/runs/run-9", "line 10").await;
    assert!(
        page.contains(&format!("data-after=\"{}\"", sequences[4])),
        "{page}"
    );
    env.stop().await;
}

#[tokio::test]
async fn new_runs_and_state_changes_reach_the_live_run_list() {
    let env = Env::start().await;
    let js = &env.js;
    env.page_with("/readyz", "").await;
    let res = env.stream("/runs/live?pipeline=ci", None).await;
    let mut other = status("run-x", None, RunState::Queued, None);
    other.pipeline = "other".into();
    publish_status(js, &other).await;
    publish_status(js, &status("run-live", None, RunState::Queued, None)).await;
    // Each event carries the run as it is when sent: the next state is stored only
    // once the first was seen, or both events could say `running`.
    let mut reader = SseReader::new(res);
    let mut events = reader.next(1).await;
    publish_status(js, &status("run-live", None, RunState::Running, None)).await;
    events.extend(reader.next(1).await);
    let rows: Vec<serde_json::Value> = events
        .iter()
        .map(|e| {
            assert_eq!(e.event.as_deref(), Some("run"));
            serde_json::from_str(&e.data).expect("json")
        })
        .collect();
    assert_eq!(
        rows[0]["run_id"], "run-live",
        "the filtered-out run is not sent"
    );
    assert_eq!(rows[0]["state"], "queued");
    assert_eq!(rows[1]["state"], "running");
    env.stop().await;
}

/// A run stored after the page was rendered but before its live list connected (the
/// browser test's race) is sent first; a reconnect naming the last event's id gets only
/// what changed after it.
#[tokio::test]
async fn a_live_list_that_connects_late_gets_the_runs_changed_since_its_page() {
    let env = Env::start().await;
    let js = &env.js;
    publish_status(js, &status("run-old", None, RunState::Queued, None)).await;
    let page = env.page_with("/runs", "run-old").await;
    let live = page
        .split("data-live=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("the page names its live list")
        .replace("&#38;", "&");
    assert!(live.starts_with("/runs/live?after="), "{live}");
    publish_status(js, &status("run-new", None, RunState::Queued, None)).await;
    publish_status(js, &status("run-old", None, RunState::Running, None)).await;
    env.page_with("/runs", "run-new").await;
    env.page_with("/runs?state=running", "run-old").await;

    let res = env.stream(&live, None).await;
    let events = read_events(res, 2).await;
    let rows: Vec<serde_json::Value> = events
        .iter()
        .map(|e| serde_json::from_str(&e.data).expect("json"))
        .collect();
    assert_eq!(rows[0]["run_id"], "run-new");
    assert_eq!(rows[1]["run_id"], "run-old");
    assert_eq!(rows[1]["state"], "running", "as it is now");
    let first = events[0].id.clone().expect("an id");

    // Reconnecting after the first event: only the second comes again, then live ones.
    let res = env.stream(&live, Some(&first)).await;
    publish_status(js, &status("run-3", None, RunState::Queued, None)).await;
    let events = read_events(res, 2).await;
    let ids: Vec<String> = events
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&e.data).expect("json")["run_id"]
                .as_str()
                .expect("id")
                .to_owned()
        })
        .collect();
    assert_eq!(ids, ["run-old", "run-3"], "no gap and no repeat");
    env.stop().await;
}

/// The dashboard on its own role's seed (`dashboard.nk` from `sluice nats init`) reads
/// every page without one permission violation: the role covers what it reads.
#[tokio::test]
async fn every_page_reads_with_the_dashboard_roles_credential_only() {
    use sluice_core::roles::Role;
    use sluice_tests::auth::AuthNats;
    let (server, js) = AuthNats::provisioned(&["eu-1"]).await;
    dispatcher::apply(
        &js,
        "name: ci\nsteps:\n  - name: build\n    image: alpine\n    commands: [make]\n",
    )
    .await;
    bus::publish_json_replacing(&js, subjects::decision("github:d-1"), &decision())
        .await
        .expect("decision");
    publish_status(
        &js,
        &status("run-1", Some("build"), RunState::Running, None),
    )
    .await;
    publish_log(&js, "run-1", "build", 0, vec!["hello".into()]).await;
    let runners = sluice_core::streams::bucket(&js, subjects::RUNNERS_BUCKET)
        .await
        .expect("runners bucket");
    let beat = sluice_core::run::Heartbeat {
        cluster: "eu-1".into(),
        runner: "runner-a".into(),
        max_running: 4,
        at: 0,
    };
    runners
        .put(
            subjects::runner_key("eu-1", "runner-a"),
            serde_json::to_vec(&beat).expect("json").into(),
        )
        .await
        .expect("heartbeat");

    let client = sluice_core::nats::connect(&server.options(&Role::Dashboard))
        .await
        .expect("the dashboard's seed connects");
    let shutdown = CancellationToken::new();
    let dashboard = sluice_dashboard::start(
        client,
        "127.0.0.1:0".parse().expect("addr"),
        None,
        shutdown.clone(),
    )
    .await
    .expect("dashboard");
    let base = format!("http://{}", dashboard.addr);
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let res = http.get(format!("{base}{path}")).send().await.expect("GET");
            (res.status().as_u16(), res.text().await.expect("body"))
        }
    };
    wait_for(
        "the index to read the states",
        Duration::from_secs(10),
        || async { (get("/readyz").await.0 == 200).then_some(()) },
    )
    .await;
    for (path, want) in [
        ("/runs", "run-1"),
        ("/runs/run-1", "hello"),
        ("/runs/run-1/log.txt", "hello"),
        ("/events/github:d-1", "wanted main"),
        ("/pipelines", "ci"),
        ("/pipelines/ci", "make"),
        ("/clusters", "runner-a"),
    ] {
        let (code, body) = get(path).await;
        assert_eq!(code, 200, "{path}: {body}");
        assert!(body.contains(want), "{path}: {body}");
    }
    let clusters = get("/clusters").await.1;
    assert!(
        clusters.contains("Backlog: 0"),
        "the runner consumer's backlog: {clusters}"
    );
    let res = http
        .get(format!("{base}/runs/run-1/log/live"))
        .send()
        .await
        .expect("live log");
    assert_eq!(read_events(res, 1).await.len(), 1);
    let violations: Vec<String> = server
        .log()
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect();
    assert!(violations.is_empty(), "{violations:#?}");
    shutdown.cancel();
    dashboard.wait().await;
}

fn decided(event: &str, kind: &str, git_ref: &str, run: &str) -> Decision {
    Decision {
        event_id: event.into(),
        kind: kind.into(),
        git_ref: Some(git_ref.into()),
        runs: vec![PlannedRun {
            run_id: run.into(),
            pipeline: "ci".into(),
            cluster: "eu-1".into(),
            outcome: "published".into(),
        }],
        ..decision()
    }
}

#[tokio::test]
async fn runs_filter_by_branch_and_event_kind_live_too_and_parents_list_their_children() {
    let env = Env::start().await;
    let js = &env.js;
    env.page_with("/readyz", "").await;
    let live = env
        .stream("/runs/live?branch=feature&kind=pull_request", None)
        .await;

    // run-a: a push to main, stored first; run-b: a pull request from `feature`, its
    // state stored before its decision (the live list sends it once the event is known).
    bus::publish_json_replacing(
        js,
        subjects::decision("github:d-a"),
        &decided("github:d-a", "push", "refs/heads/main", "run-a"),
    )
    .await
    .expect("decision");
    let mut a = status("run-a", None, RunState::Running, None);
    a.event_id = Some("github:d-a".into());
    publish_status(js, &a).await;
    let mut b = status("run-b", None, RunState::Queued, None);
    b.event_id = Some("github:d-b".into());
    publish_status(js, &b).await;
    bus::publish_json_replacing(
        js,
        subjects::decision("github:d-b"),
        &decided("github:d-b", "pull_request", "refs/heads/feature", "run-b"),
    )
    .await
    .expect("decision");
    let rows = read_events(live, 1).await;
    let row: serde_json::Value = serde_json::from_str(&rows[0].data).expect("json");
    assert_eq!(
        row["run_id"], "run-b",
        "only the matching run is sent: {row}"
    );
    assert_eq!(row["branch"], "feature");
    assert_eq!(row["kind"], "pull_request");

    // A child of run-a, started by its step `deploy`.
    let mut c = status("run-c", None, RunState::Running, None);
    c.event_id = Some("manual:child".into());
    c.parent = Some(sluice_core::run::ParentRef {
        run_id: "run-a".into(),
        cluster: "eu-1".into(),
        step: "deploy".into(),
    });
    publish_status(js, &c).await;

    let main = env.page_with("/runs?branch=main", "run-a").await;
    assert!(!main.contains("run-b"), "{main}");
    assert!(main.contains("name=\"branch\" value=\"main\""), "{main}");
    let whole_ref = env
        .page_with("/runs?branch=refs%2Fheads%2Fmain", "run-a")
        .await;
    assert!(!whole_ref.contains("run-b"), "{whole_ref}");
    let prs = env.page_with("/runs?kind=pull_request", "run-b").await;
    assert!(!prs.contains("href=\"/runs/run-a\""), "{prs}");
    assert!(
        prs.contains("<option value=\"pull_request\" selected>"),
        "the form keeps the choice: {prs}"
    );
    assert!(
        prs.contains("data-live=\"/runs/live?kind=pull_request&#38;after="),
        "{prs}"
    );
    let none = env.get("/runs?branch=feature&kind=push").await.2;
    assert!(none.contains("No runs match"), "{none}");
    let all = env.page_with("/runs", "run-c").await;
    assert!(all.contains("<td class=\"ref\">feature</td>"), "{all}");

    let parent = env.page_with("/runs/run-a", "Child runs").await;
    assert!(
        parent.contains("<a href=\"/runs/run-c\">ci</a> <code>run-c</code> from step deploy"),
        "{parent}"
    );
    let child = env.page_with("/runs/run-c", "Started by").await;
    assert!(child.contains("href=\"/runs/run-a\""), "{child}");
    assert!(!child.contains("Child runs"), "{child}");
    env.stop().await;
}

#[tokio::test]
async fn the_run_state_stream_sends_the_folded_state_then_each_change() {
    let env = Env::start().await;
    let js = &env.js;
    publish_status(js, &status("run-s", None, RunState::Running, None)).await;
    publish_status(js, &status("run-s", Some("build"), RunState::Running, None)).await;
    let page = env.page_with("/runs/run-s", "run-s").await;
    assert!(
        page.contains("data-state-live=\"/runs/run-s/live\""),
        "{page}"
    );
    let res = env.stream("/runs/run-s/live", None).await;
    // The stored two states come as one event; the next change as another.
    let mut reader = SseReader::new(res);
    let mut events = reader.next(1).await;
    publish_status(
        js,
        &status("run-s", Some("build"), RunState::Failed, Some(3)),
    )
    .await;
    events.extend(reader.next(1).await);
    let states: Vec<serde_json::Value> = events
        .iter()
        .map(|e| {
            assert_eq!(e.event.as_deref(), Some("state"));
            serde_json::from_str(&e.data).expect("json")
        })
        .collect();
    assert_eq!(states[0]["state"], "running");
    assert_eq!(states[0]["final"], false);
    assert_eq!(states[0]["steps"][0]["name"], "build");
    assert_eq!(states[0]["steps"][0]["state"], "running");
    assert_eq!(states[1]["steps"][0]["state"], "failed");
    assert_eq!(states[1]["steps"][0]["exit_code"], 3);
    assert_eq!(env.get("/runs/a.b/live").await.0, 404);
    env.stop().await;
}

#[tokio::test]
async fn group_markers_fold_into_details_with_escaped_titles() {
    let env = Env::start().await;
    let js = &env.js;
    publish_status(js, &status("run-g", Some("build"), RunState::Running, None)).await;
    publish_log(
        js,
        "run-g",
        "build",
        0,
        vec![
            "::group::<script>alert(1)</script>".into(),
            "inside".into(),
            "::endgroup::".into(),
            "\x1b[0Ksection_start:1700000000:deps\r\x1b[0KInstall <b>deps</b>".into(),
            "installing".into(),
            "\x1b[0Ksection_end:1700000001:deps\r\x1b[0K".into(),
            "::group::never ends".into(),
            "last".into(),
        ],
    )
    .await;
    let page = env.page_with("/runs/run-g", "installing").await;
    assert!(!page.contains("<script>alert"), "{page}");
    assert!(!page.contains("<b>deps"), "{page}");
    for want in [
        // GitHub's group opens folded, with its title escaped.
        "<li id=\"build-L1\" class=\"group\" data-group=\"\"><a class=\"ln\" href=\"#build-L1\" aria-label=\"line 1\" data-n=\"1\"></a><details><summary class=\"group-title\">&#60;script&#62;alert(1)&#60;/script&#62;</summary><ol class=\"log\">",
        "<li id=\"build-L2\"><a class=\"ln\"",
        "<li id=\"build-L3\" class=\"group-end\">",
        // GitLab's is open unless `[collapsed=true]`.
        "data-group=\"deps\"><a class=\"ln\" href=\"#build-L4\" aria-label=\"line 4\" data-n=\"4\"></a><details open><summary class=\"group-title\">Install &#60;b&#62;deps&#60;/b&#62;</summary>",
        // One still open is shown open.
        "<li id=\"build-L7\" class=\"group unclosed\" data-group=\"\">",
    ] {
        assert!(
            page.contains(want)
                || page.contains(&want.replace("&#60;", "&lt;").replace("&#62;", "&gt;")),
            "{want}\n{page}"
        );
    }
    let (code, _, lines) = env.get("/runs/run-g/steps/build/lines?from=1&to=3").await;
    assert_eq!(code, 200);
    let lines: serde_json::Value = serde_json::from_str(&lines).expect("json");
    assert_eq!(lines[0]["group"]["mark"], "start");
    assert_eq!(lines[0]["group"]["title"], "<script>alert(1)</script>");
    assert!(lines[1].get("group").is_none(), "{lines}");
    assert_eq!(lines[2]["group"]["mark"], "end");
    env.stop().await;
}

#[tokio::test]
async fn the_run_page_opens_on_each_steps_last_lines_and_pages_back_exactly() {
    let env = Env::start().await;
    let js = &env.js;
    publish_status(js, &status("run-t", Some("build"), RunState::Running, None)).await;
    let mut n = 0;
    let mut chunk = |count: usize| {
        let lines: Vec<String> = (0..count)
            .map(|_| {
                n += 1;
                format!("build line {n}")
            })
            .collect();
        lines
    };
    let (a, b, c) = (chunk(400), chunk(300), chunk(6));
    publish_log(js, "run-t", "build", 0, a).await;
    publish_log(js, "run-t", "test", 0, vec!["test line 1".into()]).await;
    publish_log(js, "run-t", "build", 1, b).await;
    publish_log(js, "run-t", "build", 2, c).await;
    let page = env.page_with("/runs/run-t", "build line 706").await;
    // 706 lines: the last 500 are 207..=706.
    assert!(
        page.contains("data-total=\"706\" data-first=\"207\""),
        "{page}"
    );
    assert!(page.contains("id=\"build-L207\"") && !page.contains("id=\"build-L206\""));
    assert!(page.contains("build line 207</li>") && !page.contains("build line 206<"));
    assert!(page.contains("206 earlier lines"), "{page}");
    assert!(page.contains("id=\"test-L1\""), "{page}");
    let (code, _, json) = env
        .get("/runs/run-t/steps/build/lines?from=395&to=405")
        .await;
    assert_eq!(code, 200);
    let lines: Vec<serde_json::Value> = serde_json::from_str(&json).expect("json");
    let got: Vec<(u64, String)> = lines
        .iter()
        .map(|l| {
            (
                l["n"].as_u64().expect("n"),
                l["segments"][0]["text"].as_str().expect("text").to_owned(),
            )
        })
        .collect();
    let want: Vec<(u64, String)> = (395..=405)
        .map(|n| (n, format!("build line {n}")))
        .collect();
    assert_eq!(got, want, "across the first two chunks of the step");

    // More is stored after the page was made: opened again (the map of the log is only
    // extended), the new lines are numbered on, and paging spans old and new chunks.
    let more: Vec<String> = (707..=716).map(|n| format!("build line {n}")).collect();
    publish_log(js, "run-t", "build", 3, more).await;
    let page = env.page_with("/runs/run-t", "build line 716").await;
    assert!(
        page.contains("data-total=\"716\" data-first=\"217\""),
        "{page}"
    );
    assert!(page.contains("id=\"build-L716\"") && !page.contains("id=\"build-L216\""));
    let (_, _, json) = env
        .get("/runs/run-t/steps/build/lines?from=700&to=712")
        .await;
    let lines: Vec<serde_json::Value> = serde_json::from_str(&json).expect("json");
    let texts: Vec<&str> = lines
        .iter()
        .map(|l| l["segments"][0]["text"].as_str().expect("text"))
        .collect();
    let want: Vec<String> = (700..=712).map(|n| format!("build line {n}")).collect();
    assert_eq!(texts, want);
    env.stop().await;
}
