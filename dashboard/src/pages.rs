//! The pages: each a handler that reads what it shows and a compile-checked template
//! that escapes every value (branch names, log lines and commit data are attacker
//! controlled). No template marks anything `safe`.

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use sluice_core::run::{Decision, ParentRef, RunState, RunView, StatusUpdate};
use sluice_core::{bus, subjects};
use time::OffsetDateTime;

use crate::groups::{self, Row};
use crate::index::{RunFilter, RunSummary};
use crate::read::{self, ClusterView, StoredPipeline};
use crate::{AppState, Result, LOG_TAIL, PAGE_SIZE};

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/runs") }))
        .route("/runs", get(runs))
        .route("/runs/{run_id}", get(run))
        .route("/runs/{run_id}/log.txt", get(raw_log))
        .route("/runs/{run_id}/steps/{step}/lines", get(lines))
        .route("/events/{event_id}", get(event))
        .route("/pipelines", get(pipelines))
        .route("/pipelines/{name}", get(pipeline))
        .route("/clusters", get(clusters))
        .route("/assets/app.css", get(css))
        .route("/assets/app.js", get(js))
        // Browsers ask for it on every site; there is none.
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
}

fn page(t: impl Template) -> Result<Response> {
    Ok(Html(t.render()?).into_response())
}

fn not_found(what: String) -> Result<Response> {
    let t = NotFound { what };
    Ok((StatusCode::NOT_FOUND, Html(t.render()?)).into_response())
}

#[derive(Template)]
#[template(path = "not_found.html")]
struct NotFound {
    what: String,
}

// === /runs ===

#[derive(Debug, serde::Deserialize)]
struct RunsQuery {
    #[serde(flatten)]
    filter: RunFilter,
    #[serde(default)]
    page: usize,
}

#[derive(Template)]
#[template(path = "runs.html")]
struct RunsPage {
    filter: RunFilter,
    runs: Vec<RunRow>,
    page: usize,
    prev: Option<String>,
    next: Option<String>,
    total: usize,
    states: [&'static str; 7],
    /// The event kinds stored runs have, and the one asked for if none has it.
    kinds: Vec<String>,
    /// The live stream of this list: its filter, and the change the page shows.
    live: String,
}

/// One row of the run list.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct RunRow {
    pub run_id: String,
    pub pipeline: String,
    pub state: &'static str,
    pub repo: String,
    pub sha: String,
    pub cluster: String,
    pub branch: String,
    pub kind: String,
    pub updated: String,
}

impl RunRow {
    pub(crate) fn new(r: &RunSummary) -> RunRow {
        RunRow {
            run_id: r.view.run_id.clone(),
            pipeline: r.view.pipeline.clone(),
            state: r.view.state.as_str(),
            repo: r.view.repo.clone().unwrap_or_default(),
            sha: short_sha(r.sha.as_deref()),
            cluster: r.view.cluster.clone().unwrap_or_default(),
            branch: r
                .event
                .as_ref()
                .map(|e| e.branch().to_owned())
                .unwrap_or_default(),
            kind: r.event.as_ref().map(|e| e.kind.clone()).unwrap_or_default(),
            updated: timestamp(r.view.updated_at),
        }
    }
}

const STATES: [&str; 7] = [
    "queued",
    "scheduled",
    "running",
    "succeeded",
    "failed",
    "cancelled",
    "error",
];

/// The query string of a filter (and page), values percent-encoded.
pub(crate) fn query_string(f: &RunFilter, page: Option<usize>) -> String {
    let mut q = form_pairs(f);
    if let Some(p) = page {
        q.push(("page", p.to_string()));
    }
    q.iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}={}", percent(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// `/runs/live` for a list of `f` rendered at index position `at`.
fn live_url(f: &RunFilter, at: crate::index::Position) -> String {
    let filter = query_string(f, None);
    let sep = if filter.is_empty() { "" } else { "&" };
    format!("/runs/live?{filter}{sep}after={at}")
}

fn form_pairs(f: &RunFilter) -> Vec<(&'static str, String)> {
    vec![
        ("repo", f.repo.clone()),
        ("pipeline", f.pipeline.clone()),
        ("state", f.state.clone()),
        ("cluster", f.cluster.clone()),
        ("branch", f.branch.clone()),
        ("kind", f.kind.clone()),
    ]
}

fn percent(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn runs(State(s): State<AppState>, Query(q): Query<RunsQuery>) -> Result<Response> {
    // Read before the page: the page shows every change up to it, so the live list
    // replaying the changes after it misses none (one shown twice is replaced).
    let position = s.index.position();
    let (found, more) = s.index.page(&q.filter, q.page * PAGE_SIZE, PAGE_SIZE);
    let link = |p: usize| format!("/runs?{}", query_string(&q.filter, Some(p)));
    let mut kinds = s.index.kinds();
    if !q.filter.kind.is_empty() && !kinds.contains(&q.filter.kind) {
        kinds.push(q.filter.kind.clone());
    }
    page(RunsPage {
        kinds,
        runs: found.iter().map(RunRow::new).collect(),
        prev: (q.page > 0).then(|| link(q.page - 1)),
        next: more.then(|| link(q.page + 1)),
        page: q.page,
        total: s.index.len(),
        states: STATES,
        live: live_url(&q.filter, position),
        filter: q.filter,
    })
}

// === /runs/<id> ===

#[derive(Template)]
#[template(path = "run.html")]
struct RunPage {
    run: RunView,
    sha: String,
    parent: Option<ParentRef>,
    /// The runs this one started, from the index.
    children: Vec<ChildRow>,
    event: Option<EventInfo>,
    duration: String,
    steps: Vec<StepSection>,
    /// The stream sequence of the last log chunk shown: the live stream goes on after it.
    after: u64,
    live: bool,
    /// No step has a state or a line yet.
    no_steps: bool,
    /// Cancel and rerun buttons, and whether their forms ask for the token.
    actions: bool,
    ask_token: bool,
}

impl RunPage {
    fn pipeline_href(&self, pipeline: &str) -> String {
        pipeline_href(pipeline)
    }
}

struct ChildRow {
    run_id: String,
    pipeline: String,
    step: String,
    state: &'static str,
}

struct EventInfo {
    id: String,
    kind: String,
    git_ref: String,
    sha: String,
    sha_link: Option<String>,
    pr: Option<u64>,
}

struct StepSection {
    name: String,
    state: &'static str,
    exit_code: String,
    duration: String,
    message: String,
    /// Opened: the first failed step, else the last one.
    open: bool,
    total: u64,
    /// The first line shown, when earlier ones are left out.
    first_shown: u64,
    rows: Vec<Row>,
}

/// When each step started and ended, from the run's stored states.
#[derive(Default)]
pub(crate) struct Times {
    pub run: (Option<OffsetDateTime>, Option<OffsetDateTime>),
    pub steps: std::collections::HashMap<String, (Option<OffsetDateTime>, Option<OffsetDateTime>)>,
}

impl Times {
    pub(crate) fn apply(&mut self, u: &StatusUpdate) {
        let slot = match &u.step {
            Some(step) => self.steps.entry(step.clone()).or_default(),
            None => &mut self.run,
        };
        if u.state == RunState::Running && slot.0.is_none() {
            slot.0 = Some(u.at);
        }
        if u.state.is_final() {
            slot.1 = Some(u.at);
        }
    }
}

pub(crate) fn duration(span: (Option<OffsetDateTime>, Option<OffsetDateTime>)) -> String {
    let Some(start) = span.0 else {
        return String::new();
    };
    let end = span.1.unwrap_or_else(OffsetDateTime::now_utc);
    let secs = (end - start).whole_seconds().max(0);
    if secs >= 60 {
        format!("{}m {:02}s", secs / 60, secs % 60)
    } else {
        format!("{secs}s")
    }
}

async fn run(State(s): State<AppState>, Path(run_id): Path<String>) -> Result<Response> {
    if !valid_token(&run_id) {
        return not_found(format!("run {run_id}"));
    }
    let mut view: Option<RunView> = None;
    let mut times = Times::default();
    let mut sha = None;
    let mut parent = None;
    bus::read_subject(
        &s.js,
        subjects::STATUS_STREAM,
        subjects::status_of_run(&run_id),
        |m| {
            if let Ok(u) = serde_json::from_slice::<StatusUpdate>(&m.payload) {
                view.get_or_insert_with(|| RunView::new(&u)).apply(&u);
                times.apply(&u);
                sha = u.sha.clone().or(sha.take());
                parent = u.parent.clone().or(parent.take());
            }
        },
    )
    .await?;
    let Some(run) = view else {
        return not_found(format!("run {run_id}"));
    };
    let live = !run.state.is_final();
    let (logs, after) = read::run_logs(&s.js, &s.logs, &run_id, LOG_TAIL).await?;
    let event = match &run.event_id {
        Some(id) => read::decision(&s.js, id).await?.map(|d| event_info(&d)),
        None => None,
    };
    let first_failed = run
        .steps
        .iter()
        .position(|st| matches!(st.state, RunState::Failed | RunState::Error));
    let mut steps: Vec<StepSection> = run
        .steps
        .iter()
        .map(|st| StepSection {
            name: st.name.clone(),
            state: st.state.as_str(),
            exit_code: st.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            duration: duration(times.steps.get(&st.name).copied().unwrap_or_default()),
            message: st.message.clone().unwrap_or_default(),
            open: false,
            total: 0,
            first_shown: 1,
            rows: Vec::new(),
        })
        .collect();
    for log in logs {
        let i = match steps.iter().position(|st| st.name == log.step) {
            Some(i) => i,
            None => {
                steps.push(StepSection {
                    name: log.step.clone(),
                    state: "running",
                    exit_code: String::new(),
                    duration: String::new(),
                    message: String::new(),
                    open: false,
                    total: 0,
                    first_shown: 1,
                    rows: Vec::new(),
                });
                steps.len() - 1
            }
        };
        let section = &mut steps[i];
        section.total = log.total;
        section.first_shown = log.tail.front().map_or(1, |l| l.n);
        section.rows = groups::rows(log.tail.into_iter().collect());
    }
    let open = first_failed.or(steps.len().checked_sub(1));
    if let Some(i) = open {
        steps[i].open = true;
    }
    page(RunPage {
        no_steps: steps.is_empty(),
        duration: duration(times.run),
        sha: short_sha(sha.as_deref()),
        parent,
        children: s
            .index
            .children(&run_id)
            .into_iter()
            .map(|c| ChildRow {
                state: c.view.state.as_str(),
                step: c.parent.map(|p| p.step).unwrap_or_default(),
                pipeline: c.view.pipeline,
                run_id: c.view.run_id,
            })
            .collect(),
        event,
        steps,
        after,
        live,
        actions: s.actions.is_some(),
        ask_token: s
            .actions
            .as_deref()
            .is_some_and(crate::Actions::asks_for_token),
        run,
    })
}

fn event_info(d: &Decision) -> EventInfo {
    EventInfo {
        id: d.event_id.clone(),
        kind: match &d.action {
            Some(a) => format!("{} {a}", d.kind),
            None => d.kind.clone(),
        },
        git_ref: d.git_ref.clone().unwrap_or_default(),
        sha: d.sha.clone().unwrap_or_default(),
        sha_link: commit_link(d),
        pr: d.pr,
    }
}

/// The forge's page of the commit, when the event's clone URL is an `https` one.
fn commit_link(d: &Decision) -> Option<String> {
    commit_url(d, d.sha.as_deref()?)
}

/// The forge's page of `sha` in the event's repository; none for a branch name.
fn commit_url(d: &Decision, sha: &str) -> Option<String> {
    if sha.is_empty() || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    // Only an https URL may become a link: a `javascript:` one must stay text.
    let base = d.clone_url.as_deref()?.strip_prefix("https://")?;
    let base = base.strip_suffix(".git").unwrap_or(base);
    let path = match d.provider.as_str() {
        "gitlab" => "/-/commit/",
        _ => "/commit/",
    };
    Some(format!("https://{base}{path}{sha}"))
}

/// Run and step names are subject tokens or file-like names: refuse anything else before
/// it becomes part of a subject.
pub(crate) fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

async fn raw_log(State(s): State<AppState>, Path(run_id): Path<String>) -> Result<Response> {
    if !valid_token(&run_id) {
        return not_found(format!("run {run_id}"));
    }
    let text = read::raw_log(&s.js, &run_id).await?;
    Ok((
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("inline; filename=\"{run_id}.log\""),
            ),
        ],
        text,
    )
        .into_response())
}

#[derive(Debug, serde::Deserialize)]
struct LinesQuery {
    from: u64,
    to: u64,
}

/// The most lines one request for earlier lines returns.
const MAX_PAGE_LINES: u64 = 2_000;

/// Earlier lines of a step, as JSON, for the log view's paging.
async fn lines(
    State(s): State<AppState>,
    Path((run_id, step)): Path<(String, String)>,
    Query(q): Query<LinesQuery>,
) -> Result<Response> {
    if !valid_token(&run_id) || q.from == 0 || q.to < q.from || q.to - q.from >= MAX_PAGE_LINES {
        return Ok(StatusCode::BAD_REQUEST.into_response());
    }
    let lines = read::step_lines(&s.js, &s.logs, &run_id, &step, q.from, q.to).await?;
    Ok(axum::Json(lines).into_response())
}

// === /events/<id> ===

#[derive(Template)]
#[template(path = "event.html")]
struct EventPage {
    d: Decision,
    decided: String,
    repo: Option<RepoSection>,
}

impl EventPage {
    fn pipeline_href(&self, pipeline: &str) -> String {
        pipeline_href(pipeline)
    }
}

/// The decision's record of the repository's `.sluice/`: every value in it (file
/// names, messages, pipeline names) comes from the repository, so all of it is text.
struct RepoSection {
    /// Whose definitions: `None` when nothing was read (`reason` says why).
    definitions: Option<&'static str>,
    git_ref: String,
    git_ref_link: Option<String>,
    reason: String,
    /// Each pipeline read and the link to its runs.
    pipelines: Vec<(String, String)>,
    errors: Vec<String>,
}

impl RepoSection {
    fn new(d: &Decision) -> Option<RepoSection> {
        use sluice_core::repo_pipelines::Side;
        let r = d.repo_pipelines.as_ref()?;
        let git_ref = r.git_ref.clone().unwrap_or_default();
        Some(RepoSection {
            definitions: r.side.map(|side| match side {
                Side::Head => "the event's own",
                Side::Base => "the target branch's",
            }),
            git_ref_link: commit_url(d, &git_ref),
            git_ref,
            reason: r.reason.clone(),
            pipelines: r
                .pipelines
                .iter()
                .map(|name| (name.clone(), runs_of(name)))
                .collect(),
            errors: r.errors.clone(),
        })
    }
}

async fn event(State(s): State<AppState>, Path(event_id): Path<String>) -> Result<Response> {
    match read::decision(&s.js, &event_id).await? {
        Some(d) => page(EventPage {
            decided: timestamp(d.decided_at),
            repo: RepoSection::new(&d),
            d,
        }),
        None => not_found(format!("a decision for event {event_id}")),
    }
}

// === /pipelines ===

#[derive(Template)]
#[template(path = "pipelines.html")]
struct PipelinesPage {
    pipelines: Vec<StoredPipeline>,
    repo_reads: Vec<RepoReadRow>,
}

/// What was last read from one repository's `.sluice/`.
struct RepoReadRow {
    provider: &'static str,
    repo: String,
    definitions: &'static str,
    git_ref: String,
    event_id: String,
    pipelines: Vec<(String, String)>,
    errors: usize,
    read_at: String,
}

impl RepoReadRow {
    fn new(r: &sluice_core::repo_pipelines::LastRead) -> RepoReadRow {
        use sluice_core::repo_pipelines::Side;
        RepoReadRow {
            provider: r.provider.as_str(),
            repo: r.repo.clone(),
            definitions: match r.side {
                Side::Head => "head",
                Side::Base => "base",
            },
            git_ref: short_ref(&r.git_ref),
            event_id: r.event_id.clone(),
            pipelines: r
                .pipelines
                .iter()
                .map(|name| (name.clone(), runs_of(name)))
                .collect(),
            errors: r.errors,
            read_at: timestamp(r.read_at),
        }
    }
}

async fn pipelines(State(s): State<AppState>) -> Result<Response> {
    page(PipelinesPage {
        pipelines: read::pipelines(&s.js).await?,
        repo_reads: read::last_reads(&s.js)
            .await?
            .iter()
            .map(RepoReadRow::new)
            .collect(),
    })
}

#[derive(Template)]
#[template(path = "pipeline.html")]
struct PipelinePage {
    p: StoredPipeline,
    triggers: Vec<String>,
    definition: String,
    runs: Vec<RunRow>,
}

async fn pipeline(State(s): State<AppState>, Path(name): Path<String>) -> Result<Response> {
    let Some(p) = read::pipeline(&s.js, &name).await? else {
        return not_found(format!("pipeline {name}"));
    };
    let (triggers, definition) = match &p.pipeline {
        Some(def) => (
            def.triggers
                .iter()
                .map(|t| serde_json::to_string(t).unwrap_or_default())
                .collect(),
            serde_json::to_string_pretty(def).unwrap_or_default(),
        ),
        None => (Vec::new(), String::new()),
    };
    let filter = RunFilter {
        pipeline: name,
        ..RunFilter::default()
    };
    let (recent, _) = s.index.page(&filter, 0, 20);
    page(PipelinePage {
        triggers,
        definition,
        runs: recent.iter().map(RunRow::new).collect(),
        p,
    })
}

// === /clusters ===

#[derive(Template)]
#[template(path = "clusters.html")]
struct ClustersPage {
    clusters: Vec<ClusterView>,
}

async fn clusters(State(s): State<AppState>) -> Result<Response> {
    page(ClustersPage {
        clusters: read::clusters(&s.js, s.index.in_flight()).await?,
    })
}

// === Assets, embedded in the binary ===

async fn css() -> Response {
    asset("text/css; charset=utf-8", include_str!("../assets/app.css"))
}

async fn js() -> Response {
    asset(
        "text/javascript; charset=utf-8",
        include_str!("../assets/app.js"),
    )
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=300"),
        ],
        body,
    )
        .into_response()
}

// === Formatting ===

/// Where a pipeline's name links: its page, or for a repository pipeline
/// (`<repo>:<name>`, read per event and not among the applied ones) its runs.
fn pipeline_href(pipeline: &str) -> String {
    if pipeline.contains(':') {
        runs_of(pipeline)
    } else {
        format!("/pipelines/{pipeline}")
    }
}

/// The run list filtered to one pipeline.
fn runs_of(pipeline: &str) -> String {
    let filter = RunFilter {
        pipeline: pipeline.to_owned(),
        ..RunFilter::default()
    };
    format!("/runs?{}", query_string(&filter, None))
}

/// A commit SHA cut as [`short_sha`] cuts it; a branch name (`refs/heads/…`) whole.
fn short_ref(git_ref: &str) -> String {
    if git_ref.chars().all(|c| c.is_ascii_hexdigit()) {
        short_sha(Some(git_ref))
    } else {
        git_ref.to_owned()
    }
}

fn short_sha(sha: Option<&str>) -> String {
    sha.map(|s| s.chars().take(12).collect())
        .unwrap_or_default()
}

pub(crate) fn timestamp(t: OffsetDateTime) -> String {
    t.format(&time::macros::format_description!(
        "[year]-[month]-[day] [hour]:[minute]:[second]Z"
    ))
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_become_escaped_query_strings() {
        let f = RunFilter {
            repo: "a/b c&d".into(),
            state: "failed".into(),
            ..RunFilter::default()
        };
        assert_eq!(
            query_string(&f, Some(2)),
            "repo=a%2Fb%20c%26d&state=failed&page=2"
        );
        assert_eq!(query_string(&RunFilter::default(), None), "");
        let f = RunFilter {
            branch: "fix/a b".into(),
            kind: "pull_request".into(),
            ..RunFilter::default()
        };
        assert_eq!(
            query_string(&f, Some(1)),
            "branch=fix%2Fa%20b&kind=pull_request&page=1"
        );
    }

    #[test]
    fn only_https_clone_urls_become_commit_links() {
        let mut d: Decision = serde_json::from_value(serde_json::json!({
            "event_id": "github:1", "provider": "github", "kind": "push", "action": null,
            "repo": "acme/app", "ref": "main", "sha": "abc123",
            "clone_url": "https://github.com/acme/app.git",
            "decided_at": "2024-01-01T00:00:00Z", "pipelines": [], "not_considered": 0,
            "runs": []
        }))
        .expect("decision");
        assert_eq!(
            commit_link(&d).as_deref(),
            Some("https://github.com/acme/app/commit/abc123")
        );
        d.clone_url = Some("javascript:alert(1)//".into());
        assert_eq!(commit_link(&d), None);
        d.clone_url = Some("https://x".into());
        d.sha = Some("\"><script>".into());
        assert_eq!(commit_link(&d), None);
    }

    #[test]
    fn a_branch_read_is_shown_whole_and_never_linked_as_a_commit() {
        let d: Decision = serde_json::from_value(serde_json::json!({
            "event_id": "github:1", "provider": "github", "kind": "pull_request",
            "action": "opened", "repo": "acme/app", "ref": "refs/heads/fix",
            "clone_url": "https://github.com/acme/app.git",
            "decided_at": "2024-01-01T00:00:00Z", "pipelines": [], "not_considered": 0,
            "runs": []
        }))
        .expect("decision");
        assert_eq!(commit_url(&d, "refs/heads/main"), None);
        assert_eq!(commit_url(&d, ""), None);
        assert_eq!(short_ref("refs/heads/main"), "refs/heads/main");
        assert_eq!(
            short_ref("9f1c2b3a4d5e6f708192a3b4c5d6e7f809112233"),
            "9f1c2b3a4d5e"
        );
    }

    #[test]
    fn names_that_are_no_subject_token_are_refused() {
        assert!(valid_token("0a1b2c"));
        assert!(!valid_token("a.b"));
        assert!(!valid_token("*"));
        assert!(!valid_token(""));
    }
}
