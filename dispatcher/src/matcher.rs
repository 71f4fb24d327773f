//! Trigger matching: for one event, which pipelines start, and for every pipeline
//! considered, which filter decided.

use std::sync::Arc;

use sluice_core::envelope::kind;
use sluice_core::pipeline::{passes, Cel, Pipeline, Trigger};
use sluice_core::run::{PipelineDecision, TriggerVerdict};
use sluice_core::Event;

use crate::registry::Index;

/// Authors whose comment commands act when a trigger does not say otherwise.
pub const DEFAULT_COMMAND_AUTHORS: [&str; 3] = ["OWNER", "MEMBER", "COLLABORATOR"];

/// The outcome of matching one event.
#[derive(Debug)]
pub struct Evaluation {
    pub decisions: Vec<PipelineDecision>,
    pub matched: Vec<Arc<Pipeline>>,
    pub not_considered: usize,
}

/// Matches `event` against the pipelines of `index` that watch its repository.
///
/// `files_note` says why the changed files are unknown when a look-up failed.
pub fn evaluate(
    index: &Index,
    event: &Event,
    cel: &CelEvent<'_>,
    files_note: Option<&str>,
) -> Evaluation {
    evaluate_with(index, &[], event, cel, files_note)
}

/// [`evaluate`] with the event repository's own pipelines (`.sluice/`) considered
/// after the applied ones that watch it.
pub fn evaluate_with(
    index: &Index,
    repo_pipelines: &[Arc<Pipeline>],
    event: &Event,
    cel: &CelEvent<'_>,
    files_note: Option<&str>,
) -> Evaluation {
    // A manual event may name its pipeline: it runs whatever its triggers say.
    if let Some(name) = &event.pipeline {
        let named = index
            .get(name)
            .or_else(|| repo_pipelines.iter().find(|p| p.name.as_str() == name));
        let (decisions, matched) = match named {
            Some(p) => (
                vec![PipelineDecision {
                    pipeline: name.clone(),
                    matched: true,
                    triggers: Vec::new(),
                    note: Some("started directly by the event's `pipeline` field".into()),
                }],
                vec![p.clone()],
            ),
            None => (
                vec![PipelineDecision {
                    pipeline: name.clone(),
                    matched: false,
                    triggers: Vec::new(),
                    note: Some(if sluice_core::repo_pipelines::is_repo_pipeline(name) {
                        format!("the event names pipeline `{name}`, which the repository's .sluice/ as read does not define")
                    } else {
                        format!("the event names pipeline `{name}`, which does not exist")
                    }),
                }],
                Vec::new(),
            ),
        };
        return Evaluation {
            decisions,
            matched,
            not_considered: index.len().saturating_sub(1),
        };
    }

    let repo = event.repo.as_deref().unwrap_or("").to_ascii_lowercase();
    let mut candidates = index.candidates(&repo);
    candidates.extend(repo_pipelines.iter().cloned());
    let mut decisions = Vec::with_capacity(candidates.len());
    let mut matched = Vec::new();
    for pipeline in &candidates {
        let triggers: Vec<TriggerVerdict> = pipeline
            .triggers
            .iter()
            .enumerate()
            .map(|(i, t)| verdict(i, t, event, &repo, cel, files_note))
            .collect();
        let any = triggers.iter().any(|t| t.matched);
        if any {
            matched.push(Arc::clone(pipeline));
        }
        // A pipeline whose repository globs all exclude this repository does not watch
        // it: counted, not listed, like the pipelines the index skipped.
        if !triggers.is_empty()
            && triggers
                .iter()
                .all(|t| t.failed.as_deref() == Some("repos"))
        {
            continue;
        }
        decisions.push(PipelineDecision {
            pipeline: pipeline.name.to_string(),
            matched: any,
            triggers,
            note: None,
        });
    }
    let not_considered = (index.len() + repo_pipelines.len()).saturating_sub(decisions.len());
    Evaluation {
        decisions,
        matched,
        not_considered,
    }
}

/// Matches one trigger; the first filter that fails is the verdict.
pub fn verdict(
    index: usize,
    t: &Trigger,
    event: &Event,
    repo_lower: &str,
    cel: &CelEvent<'_>,
    files_note: Option<&str>,
) -> TriggerVerdict {
    let fail = |filter: &str, detail: String| TriggerVerdict {
        index,
        matched: false,
        failed: Some(filter.to_owned()),
        detail,
    };
    if let Some(p) = t.provider {
        if p.as_str() != event.provider.as_str() {
            return fail(
                "provider",
                format!(
                    "event from {}, trigger wants {}",
                    event.provider,
                    p.as_str()
                ),
            );
        }
    }
    if !t.repos.is_empty() && !passes(&t.repos, repo_lower) {
        return fail(
            "repos",
            format!(
                "repository {} is not in {}",
                show(event.repo.as_deref()),
                list(t.repos.iter().map(|g| g.as_str()))
            ),
        );
    }
    if !t.kinds.is_empty() && !t.kinds.contains(&event.kind) {
        return fail(
            "kinds",
            format!(
                "event is a {}, trigger wants {}",
                event.kind,
                list(t.kinds.iter().map(String::as_str))
            ),
        );
    }
    if !t.actions.is_empty() && !event.action.as_ref().is_some_and(|a| t.actions.contains(a)) {
        return fail(
            "actions",
            format!(
                "action {} is not in {}",
                show(event.action.as_deref()),
                list(t.actions.iter().map(String::as_str))
            ),
        );
    }
    if let Some(failed) = refs(t, event) {
        return failed(index);
    }
    let mut caveat = String::new();
    if !t.paths.is_empty() {
        match (&event.changed_files, event.changed_files_complete) {
            (Some(files), true) => {
                if !files.iter().any(|f| passes(&t.paths, f)) {
                    return fail(
                        "paths",
                        format!(
                            "none of the {} changed files passes {}",
                            files.len(),
                            list(t.paths.iter().map(|g| g.as_str()))
                        ),
                    );
                }
            }
            (files, _) => {
                // Firing is safer than silently skipping a build that was needed.
                caveat = match files {
                    Some(f) => format!(
                        "changed files may be incomplete ({} listed): paths not checked, trigger fires",
                        f.len()
                    ),
                    None => match files_note {
                        Some(why) => format!("changed files unknown ({why}): paths not checked, trigger fires"),
                        None => "changed files unknown for this event: paths not checked, trigger fires".into(),
                    },
                };
            }
        }
    }
    if let Some(command) = &t.command {
        let first = event
            .comment
            .as_deref()
            .and_then(|c| c.split_whitespace().next());
        if first != Some(command.as_str()) {
            return fail("command", format!("comment does not start with {command}"));
        }
        let association = event.actor_association.as_deref().unwrap_or("");
        let allowed = if t.command_authors.is_empty() {
            DEFAULT_COMMAND_AUTHORS.contains(&association)
        } else {
            t.command_authors.iter().any(|a| a == association)
        };
        if !allowed {
            return fail(
                "command_authors",
                format!(
                    "{} ({}) may not run {command}",
                    show(event.actor.as_deref()),
                    if association.is_empty() {
                        "association unknown"
                    } else {
                        association
                    }
                ),
            );
        }
    }
    if let Some(when) = &t.when {
        match cel.eval(when) {
            Ok(true) => {}
            Ok(false) => return fail("when", format!("`{}` is false", when.as_str())),
            Err(e) => return fail("when", format!("`{}`: {e}", when.as_str())),
        }
    }
    TriggerVerdict {
        index,
        matched: true,
        failed: None,
        detail: if caveat.is_empty() {
            "matched".into()
        } else {
            format!("matched; {caveat}")
        },
    }
}

type Failed = Box<dyn FnOnce(usize) -> TriggerVerdict>;

/// Branch and tag filters. A branch filter alone never matches a tag, and a tag filter
/// alone never matches a branch. Pull requests and comments match on the target branch.
fn refs(t: &Trigger, event: &Event) -> Option<Failed> {
    if t.branches.is_empty() && t.tags.is_empty() {
        return None;
    }
    let fail = |filter: &'static str, detail: String| -> Option<Failed> {
        Some(Box::new(move |index| TriggerVerdict {
            index,
            matched: false,
            failed: Some(filter.to_owned()),
            detail,
        }))
    };
    let tag = (event.kind == kind::TAG)
        .then(|| {
            event
                .git_ref
                .as_deref()
                .and_then(|r| r.strip_prefix("refs/tags/"))
        })
        .flatten();
    let branch_ref = match event.kind.as_str() {
        kind::PULL_REQUEST | kind::COMMENT => event.base_ref.as_deref(),
        _ => event.git_ref.as_deref(),
    };
    let branch = branch_ref.and_then(|r| r.strip_prefix("refs/heads/"));
    match (tag, branch) {
        (Some(tag), _) => {
            if t.tags.is_empty() {
                return fail(
                    "branches",
                    format!("event is tag {tag}, trigger wants branches"),
                );
            }
            if !passes(&t.tags, tag) {
                return fail(
                    "tags",
                    format!(
                        "tag {tag} is not in {}",
                        list(t.tags.iter().map(|g| g.as_str()))
                    ),
                );
            }
        }
        (None, Some(branch)) => {
            if t.branches.is_empty() {
                return fail(
                    "tags",
                    format!("event is on branch {branch}, trigger wants tags"),
                );
            }
            if !passes(&t.branches, branch) {
                return fail(
                    "branches",
                    format!(
                        "branch {branch} is not in {}",
                        list(t.branches.iter().map(|g| g.as_str()))
                    ),
                );
            }
        }
        (None, None) => {
            let filter = if t.branches.is_empty() {
                "tags"
            } else {
                "branches"
            };
            return fail(filter, "event has no branch or tag".into());
        }
    }
    None
}

fn show(v: Option<&str>) -> String {
    v.map_or_else(|| "(none)".into(), str::to_owned)
}

fn list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    format!("[{}]", items.collect::<Vec<_>>().join(", "))
}

// === CEL ===

thread_local! {
    // Building a context registers every standard function; do it once per thread
    // and give each evaluation a child scope.
    static CEL_ROOT: cel::Context<'static, 'static> = cel::Context::default();
}

/// The envelope's fields without the payload, which is added only when needed.
#[derive(serde::Serialize)]
struct CelView<'a> {
    id: &'a str,
    provider: &'a str,
    kind: &'a str,
    action: Option<&'a str>,
    repo: Option<&'a str>,
    clone_url: Option<&'a str>,
    default_branch: Option<&'a str>,
    #[serde(rename = "ref")]
    git_ref: Option<&'a str>,
    sha: Option<&'a str>,
    base_ref: Option<&'a str>,
    pr: Option<u64>,
    pr_draft: Option<bool>,
    actor: Option<&'a str>,
    actor_association: Option<&'a str>,
    changed_files: Option<&'a [String]>,
    changed_files_complete: bool,
    comment: Option<&'a str>,
    pipeline: Option<&'a str>,
}

impl<'a> From<&'a Event> for CelView<'a> {
    fn from(e: &'a Event) -> Self {
        CelView {
            id: &e.id,
            provider: e.provider.as_str(),
            kind: &e.kind,
            action: e.action.as_deref(),
            repo: e.repo.as_deref(),
            clone_url: e.clone_url.as_deref(),
            default_branch: e.default_branch.as_deref(),
            git_ref: e.git_ref.as_deref(),
            sha: e.sha.as_deref(),
            base_ref: e.base_ref.as_deref(),
            pr: e.pr,
            pr_draft: e.pr_draft,
            actor: e.actor.as_deref(),
            actor_association: e.actor_association.as_deref(),
            changed_files: e.changed_files.as_deref(),
            changed_files_complete: e.changed_files_complete,
            comment: e.comment.as_deref(),
            pipeline: e.pipeline.as_deref(),
        }
    }
}

/// The event as CEL sees it (`event.*`), built on first use and only once per event.
pub struct CelEvent<'e> {
    event: &'e Event,
    plain: std::cell::OnceCell<Result<cel::Value, String>>,
    with_payload: std::cell::OnceCell<Result<cel::Value, String>>,
}

impl std::fmt::Debug for CelEvent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CelEvent")
            .field("event", &self.event.id)
            .finish()
    }
}

impl<'e> CelEvent<'e> {
    pub fn new(event: &'e Event) -> Self {
        CelEvent {
            event,
            plain: std::cell::OnceCell::new(),
            with_payload: std::cell::OnceCell::new(),
        }
    }

    fn value(&self, payload: bool) -> Result<&cel::Value, String> {
        let cell = if payload {
            &self.with_payload
        } else {
            &self.plain
        };
        cell.get_or_init(|| {
            let mut json =
                serde_json::to_value(CelView::from(self.event)).map_err(|e| e.to_string())?;
            if let (true, Some(raw), Some(obj)) =
                (payload, &self.event.payload, json.as_object_mut())
            {
                // Parsed only for expressions that read it: a payload can be large.
                let parsed: serde_json::Value =
                    serde_json::from_str(raw.get()).map_err(|e| e.to_string())?;
                obj.insert("payload".into(), parsed);
            }
            cel::to_value(json).map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    /// Evaluates `expr`; anything but a boolean is an error.
    pub fn eval(&self, expr: &Cel) -> Result<bool, String> {
        let value = self.value(expr.uses_payload)?.clone();
        let result = CEL_ROOT.with(|root| {
            let mut scope = root.new_inner_scope();
            scope.add_variable_from_value("event", value);
            expr.program().execute(&scope)
        });
        match result {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(format!("returned {other:?}, not a bool")),
            Err(e) => Err(format!("evaluation failed: {e}")),
        }
    }
}
