//! Pipelines: the YAML users write, parsed and validated in one pass so that every
//! error names the file, line and column it comes from.
//!
//! Values that can be wrong on their own (names, globs, CEL, durations) are checked by
//! their own `Deserialize`, so the YAML parser reports the position of the offending
//! value; checks that need a whole step or pipeline run right after, at the position
//! of the mapping they belong to.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

// === Errors ===

/// A pipeline that cannot be accepted, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub file: String,
    /// 1-based; 0 when the parser could not tell.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        } else {
            write!(f, "{}: {}", self.file, self.message)
        }
    }
}

impl std::error::Error for SpecError {}

/// Parses every YAML document in `text` (separated by `---`) as a pipeline. Nothing is
/// returned unless every document is valid: a file is accepted or refused whole.
pub fn parse_documents(file: &str, text: &str) -> Result<Vec<Pipeline>, SpecError> {
    parse_documents_limited(file, text, crate::yaml::MAX_DEPTH)
}

/// [`parse_documents`] with at most `max_depth` levels of nesting (repository
/// pipelines have their own limit).
pub fn parse_documents_limited(
    file: &str,
    text: &str,
    max_depth: usize,
) -> Result<Vec<Pipeline>, SpecError> {
    let refuse = |line, column, message| SpecError {
        file: file.to_owned(),
        line,
        column,
        message,
    };
    crate::yaml::check_size(text).map_err(|m| refuse(0, 0, m))?;
    let documents: Vec<Document> =
        serde_saphyr::from_multiple_with_options(text, crate::yaml::options_with_depth(max_depth))
            .map_err(|e| {
                let message = clean_message(&e.without_snippet().to_string());
                let (line, column) = match e.location() {
                    Some(l) => {
                        let (line, column) = (l.line() as usize, l.column() as usize);
                        l.span()
                            .byte_offset()
                            .and_then(|index| value_position(text, index as usize, &message))
                            .unwrap_or_else(|| list_item_position(text, line, column))
                    }
                    None => (0, 0),
                };
                refuse(line, column, message)
            })?;
    let pipelines: Vec<Pipeline> = documents.into_iter().flat_map(|d| d.0).collect();
    if pipelines.is_empty() {
        return Err(refuse(0, 0, "no pipeline in this file".into()));
    }
    let mut seen = HashSet::new();
    for p in &pipelines {
        if !seen.insert(p.name.as_str()) {
            return Err(refuse(
                0,
                0,
                format!("pipeline `{}` is defined twice", p.name),
            ));
        }
    }
    Ok(pipelines)
}

/// One YAML document of a pipelines file: a pipeline (a mapping), or a list of them —
/// the shape people write when they keep several pipelines in one document.
struct Document(Vec<Pipeline>);

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Shape;
        impl<'de> de::Visitor<'de> for Shape {
            type Value = Document;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a pipeline (a mapping with `name` and `steps`) or a list of pipelines")
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<Document, A::Error> {
                Pipeline::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(|p| Document(vec![p]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, seq: A) -> Result<Document, A::Error> {
                Vec::<Pipeline>::deserialize(de::value::SeqAccessDeserializer::new(seq))
                    .map(Document)
            }
        }
        d.deserialize_any(Shape)
    }
}

/// The parser reports errors raised by a value's own checks at the start of the
/// mapping holding it. Those messages quote the value first (`` `Bad_Name` is not…``,
/// ``bad glob `…` ``): find that value after the mapping's start to point at it.
fn value_position(text: &str, from: usize, message: &str) -> Option<(usize, usize)> {
    // The message may start with the field's path (`triggers[0].branches: …`).
    let candidates =
        std::iter::once(message).chain(message.match_indices(": ").map(|(i, _)| &message[i + 2..]));
    let quoted = candidates.into_iter().find_map(|m| {
        [
            "`",
            "bad glob `",
            "bad CEL `",
            "bad duration `",
            "empty pattern `",
        ]
        .iter()
        .find_map(|prefix| m.strip_prefix(prefix))
    })?;
    let value = &quoted[..quoted.find('`')?];
    if value.is_empty() {
        return None;
    }
    let at = from + text.get(from..)?.find(value)?;
    let line = text[..at].matches('\n').count() + 1;
    let column = at - text[..at].rfind('\n').map_or(0, |i| i + 1) + 1;
    Some((line, column))
}

/// A mapping that is a list item (`  - name: a`) is reported at its `-`, where the item
/// starts, rather than at its first key: the position pipelines errors have always had.
fn list_item_position(text: &str, line: usize, column: usize) -> (usize, usize) {
    let Some(before) = text
        .lines()
        .nth(line.saturating_sub(1))
        .and_then(|l| l.get(..column.saturating_sub(1)))
    else {
        return (line, column);
    };
    match before.trim_end().strip_suffix('-') {
        Some(indent) if indent.trim().is_empty() && before.ends_with(' ') => {
            (line, indent.len() + 1)
        }
        _ => (line, column),
    }
}

/// The parser ends its messages with " at line L, column C"; the position is reported
/// separately. Positions inside the message (where an alias was defined) stay.
fn clean_message(message: &str) -> String {
    let message = message.trim_end();
    if let Some(i) = message.rfind(" at line ") {
        let position = &message[i + " at line ".len()..];
        let is_position = position
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|w| !w.is_empty())
            .all(|w| w == "column" || w.chars().all(|c| c.is_ascii_digit()));
        if is_position {
            return message[..i].to_owned();
        }
    }
    message.to_owned()
}

// === The pipeline ===

/// A pipeline as stored and served: what `sluice pipelines apply` accepted.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "PipelineSpec")]
pub struct Pipeline {
    pub name: Name,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<Trigger>,
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
}

/// The same fields, before the checks that need the whole pipeline.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PipelineSpec {
    name: Name,
    #[serde(default)]
    triggers: Vec<Trigger>,
    #[serde(default)]
    runtime: Runtime,
    #[serde(default)]
    concurrency: Option<Concurrency>,
    #[serde(default)]
    timeout: Option<HumanDuration>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    steps: Vec<Step>,
    #[serde(default)]
    cache: Option<Cache>,
}

impl TryFrom<PipelineSpec> for Pipeline {
    type Error = String;
    fn try_from(s: PipelineSpec) -> Result<Self, String> {
        if s.steps.is_empty() {
            return Err(format!(
                "pipeline `{}` has no steps: add at least one under `steps:`",
                s.name
            ));
        }
        let mut names = HashSet::new();
        for step in &s.steps {
            if !names.insert(step.name.as_str()) {
                return Err(format!(
                    "pipeline `{}`: two steps are named `{}`",
                    s.name, step.name
                ));
            }
        }
        for key in s.env.keys() {
            check_env_name(key)?;
        }
        if let Some(c) = &s.concurrency {
            if c.max_running == Some(0) {
                return Err("concurrency.max_running must be at least 1".into());
            }
            check_template(&c.group).map_err(|e| format!("concurrency.group: {e}"))?;
        }
        if let Some(key) = s.cache.as_ref().and_then(|c| c.key.as_deref()) {
            check_template(key).map_err(|e| format!("cache.key: {e}"))?;
        }
        Ok(Pipeline {
            name: s.name,
            triggers: s.triggers,
            runtime: s.runtime,
            concurrency: s.concurrency,
            timeout: s.timeout,
            env: s.env,
            steps: s.steps,
            cache: s.cache,
        })
    }
}

/// When a pipeline starts. Every filter that is set must pass; an empty list passes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "TriggerSpec")]
pub struct Trigger {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderName>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repos: Vec<Glob>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<String>,
    /// Target branch of a pull request, or the pushed branch; `!` excludes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches: Vec<Glob>,
    /// Pushed tag names; `!` excludes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<Glob>,
    /// Changed paths; `!` excludes. Fires if any changed file passes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<Glob>,
    /// A CEL expression over `event` that must be `true`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Cel>,
    /// A comment command such as `/retest`: the comment's first word must be it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Who may run `command` (the forge's author association). Default: owners,
    /// members and collaborators.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command_authors: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TriggerSpec {
    #[serde(default)]
    provider: Option<ProviderName>,
    #[serde(default)]
    repos: Vec<Glob>,
    #[serde(default)]
    kinds: Vec<String>,
    #[serde(default)]
    actions: Vec<String>,
    #[serde(default)]
    branches: Vec<Glob>,
    #[serde(default)]
    tags: Vec<Glob>,
    #[serde(default)]
    paths: Vec<Glob>,
    #[serde(default)]
    when: Option<Cel>,
    #[serde(default)]
    command: Option<String>,
    #[serde(default)]
    command_authors: Vec<String>,
}

impl TryFrom<TriggerSpec> for Trigger {
    type Error = String;
    fn try_from(s: TriggerSpec) -> Result<Self, String> {
        let mut kinds = s.kinds;
        if let Some(command) = &s.command {
            if !command.starts_with('/') || command.contains(char::is_whitespace) {
                return Err(format!(
                    "command `{command}` must be one word starting with `/`, such as /retest"
                ));
            }
            // A command only ever comes in a comment.
            if kinds.is_empty() {
                kinds.push("comment".into());
            } else if !kinds.iter().any(|k| k == "comment") {
                return Err("a trigger with `command` must include the `comment` kind".into());
            }
        } else if kinds.is_empty() {
            // Without `kinds`, a trigger starts builds for code changes, never for
            // pings, comments or the forge's other events.
            kinds = DEFAULT_KINDS.iter().map(|k| (*k).to_owned()).collect();
        }
        for k in &kinds {
            if k.is_empty()
                || k.chars()
                    .any(|c| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()))
            {
                return Err(format!("kind `{k}` is not a lower-case event kind such as push, tag, pull_request or comment"));
            }
        }
        let command_authors = s
            .command_authors
            .iter()
            .map(|a| a.to_ascii_uppercase())
            .collect();
        // Forges treat repository names case-insensitively; so does matching.
        let repos = s
            .repos
            .iter()
            .map(|g| Glob::parse(&g.as_str().to_ascii_lowercase()))
            .collect::<Result<_, _>>()?;
        Ok(Trigger {
            provider: s.provider,
            repos,
            kinds,
            actions: s.actions,
            branches: s.branches,
            tags: s.tags,
            paths: s.paths,
            when: s.when,
            command: s.command,
            command_authors,
        })
    }
}

/// Where a pipeline runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Runtime {
    /// A cluster, or a list of clusters to fall back through in order.
    #[serde(default, skip_serializing_if = "Clusters::is_empty")]
    pub cluster: Clusters,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<String>,
}

/// One cluster name or a fallback list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Clusters(pub Vec<Name>);

impl Clusters {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Clusters {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0.as_slice() {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for Clusters {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(Name),
            Many(Vec<Name>),
        }
        match OneOrMany::deserialize(d) {
            Ok(OneOrMany::One(n)) => Ok(Clusters(vec![n])),
            Ok(OneOrMany::Many(v)) => Ok(Clusters(v)),
            Err(_) => Err(de::Error::custom(
                "cluster must be a name (lower-case letters, digits, -) or a list of names",
            )),
        }
    }
}

/// Concurrency groups.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// A template over `${repo}`, `${pr}`, `${ref}`, `${branch}`, `${sha}`,
    /// `${pipeline}`, `${kind}`.
    pub group: String,
    #[serde(default)]
    pub cancel_in_progress: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<u32>,
}

/// One step: commands in an image, or a child pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "StepSpec")]
pub struct Step {
    pub name: Name,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Kubernetes Secret names, mounted as env (`env`) and files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<Cel>,
    /// Start this pipeline and wait for its result instead of running commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Name>,
    /// Where the child pipeline runs, when not where its own definition says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepSpec {
    name: Name,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    commands: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    secrets: Vec<String>,
    #[serde(default)]
    resources: Option<Resources>,
    #[serde(default)]
    timeout: Option<HumanDuration>,
    #[serde(default)]
    when: Option<Cel>,
    #[serde(default)]
    pipeline: Option<Name>,
    #[serde(default)]
    runtime: Option<Runtime>,
}

impl TryFrom<StepSpec> for Step {
    type Error = String;
    fn try_from(s: StepSpec) -> Result<Self, String> {
        let name = &s.name;
        match (&s.image, &s.pipeline) {
            (None, None) => {
                return Err(format!(
                    "step `{name}` has no image: set `image:` (and `commands:`), or `pipeline:` to start another pipeline"
                ))
            }
            (Some(_), Some(_)) => {
                return Err(format!("step `{name}` sets both `image` and `pipeline`: a step does one or the other"))
            }
            (Some(image), None) if image.trim().is_empty() => {
                return Err(format!("step `{name}` has an empty image"))
            }
            (None, Some(_)) if !s.commands.is_empty() => {
                return Err(format!("step `{name}` starts a pipeline and cannot also have `commands`"))
            }
            (Some(_), None) if s.runtime.is_some() => {
                return Err(format!("step `{name}`: `runtime` is only for `pipeline:` steps"))
            }
            _ => {}
        }
        for key in s.env.keys() {
            check_env_name(key)?;
        }
        Ok(Step {
            name: s.name,
            image: s.image,
            commands: s.commands,
            env: s.env,
            secrets: s.secrets,
            resources: s.resources,
            timeout: s.timeout,
            when: s.when,
            pipeline: s.pipeline,
            runtime: s.runtime,
        })
    }
}

/// Container resources, in Kubernetes quantities (`500m`, `1Gi`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<String>,
}

/// What to keep between runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    /// Template for the cache key; default `${repo}/${branch}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub paths: Vec<String>,
}

/// The kinds a trigger without `kinds` (and without `command`) fires on.
pub const DEFAULT_KINDS: [&str; 3] = ["push", "tag", "pull_request"];

/// Variables a `${…}` template may use.
pub const TEMPLATE_VARS: [&str; 7] = ["repo", "pr", "ref", "branch", "sha", "pipeline", "kind"];

fn check_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{template}`"))?;
        let var = &after[..end];
        if !TEMPLATE_VARS.contains(&var) {
            return Err(format!(
                "unknown variable `${{{var}}}` in `{template}`: use {}",
                TEMPLATE_VARS.map(|v| format!("${{{v}}}")).join(", ")
            ));
        }
        rest = &after[end + 1..];
    }
    Ok(())
}

/// Fills a checked template; `value` answers each variable (empty when unknown).
pub fn render_template(template: &str, value: impl Fn(&str) -> String) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find('}') {
            Some(end) => {
                out.push_str(&value(&after[..end]));
                rest = &after[end + 1..];
            }
            None => {
                out.push_str(&rest[start..]);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn check_env_name(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && !key.starts_with(|c: char| c.is_ascii_digit())
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{key}` is not a valid environment variable name (letters, digits, _)"
        ))
    }
}

// === Checked scalar values ===

/// A lower-case DNS label (≤ 63 of `a-z`, `0-9`, `-`): usable in subjects, Pod names
/// and labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A repository pipeline's name, `<repo>:<name>`: outside the naming rule on
    /// purpose, so it never equals an applied pipeline's. It is not a label value; the
    /// runner turns it into one.
    pub fn qualified(repo: &str, name: &str) -> Name {
        Name(crate::repo_pipelines::qualified_name(repo, name))
    }

    /// Checks `s` against the naming rule.
    pub fn parse(s: &str) -> Result<Name, String> {
        let ok = !s.is_empty()
            && s.len() <= 63
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !s.starts_with('-')
            && !s.ends_with('-');
        if ok {
            Ok(Name(s.to_owned()))
        } else {
            Err(format!(
                "`{s}` is not a valid name: use at most 63 lower-case letters, digits and `-`, starting and ending with a letter or digit"
            ))
        }
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Name::parse(&s).map_err(de::Error::custom)
    }
}

/// A trigger's provider: the envelope's own type, so a pipeline and an event can never
/// disagree on the names (`github`, `gitlab`, `generic`, `manual`).
pub type ProviderName = crate::envelope::Provider;

/// A glob (`*` within a path segment, `**` across, `?`, `[a-z]`, `{a,b}`); a leading
/// `!` makes it an exclusion.
#[derive(Clone)]
pub struct Glob {
    source: String,
    negated: bool,
    matcher: globset::GlobMatcher,
}

impl Glob {
    pub fn parse(source: &str) -> Result<Glob, String> {
        let (negated, pattern) = match source.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, source),
        };
        if pattern.is_empty() {
            return Err(format!("empty pattern `{source}`"));
        }
        let glob = globset::GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| format!("bad glob `{source}`: {}", e.kind()))?;
        Ok(Glob {
            source: source.to_owned(),
            negated,
            matcher: glob.compile_matcher(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn is_negated(&self) -> bool {
        self.negated
    }

    /// True when the pattern (ignoring `!`) matches `text`.
    pub fn matches(&self, text: &str) -> bool {
        self.matcher.is_match(text)
    }

    /// True when the pattern has no glob characters: matching is string equality.
    pub fn is_literal(&self) -> bool {
        !self.source.contains(['*', '?', '[', '{', '!'])
    }
}

/// True when `text` passes a list of includes and `!` excludes: some include matches (or
/// there is none) and no exclude does. An empty list passes everything.
pub fn passes(list: &[Glob], text: &str) -> bool {
    let mut any_include = false;
    let mut included = false;
    for g in list {
        if g.negated {
            if g.matches(text) {
                return false;
            }
        } else {
            any_include = true;
            included = included || g.matches(text);
        }
    }
    included || !any_include
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Glob({:?})", self.source)
    }
}

impl Serialize for Glob {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Glob::parse(&s).map_err(de::Error::custom)
    }
}

/// A compiled CEL expression.
#[derive(Clone)]
pub struct Cel {
    source: String,
    program: Arc<cel::Program>,
    /// Whether the expression reads `event.payload`; converting a large payload for
    /// CEL is skipped when it does not.
    pub uses_payload: bool,
}

impl Cel {
    pub fn parse(source: &str) -> Result<Cel, String> {
        let program =
            cel::Program::compile(source).map_err(|e| format!("bad CEL `{source}`: {e}"))?;
        Ok(Cel {
            source: source.to_owned(),
            program: Arc::new(program),
            uses_payload: source.contains("payload"),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn program(&self) -> &cel::Program {
        &self.program
    }
}

impl fmt::Debug for Cel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Cel({:?})", self.source)
    }
}

impl Serialize for Cel {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for Cel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cel::parse(&s).map_err(de::Error::custom)
    }
}

/// A duration written as `30m`, `2h`, …
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl fmt::Display for HumanDuration {
    /// The largest unit `duration::parse` reads back exactly, so `500ms` stays `500ms`
    /// and `2h` stays `2h`. A sub-millisecond remainder (only possible for a duration
    /// built in code) is rounded up, so a non-zero timeout never prints as zero.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        let ms = d.as_millis() + u128::from(!d.subsec_nanos().is_multiple_of(1_000_000));
        if ms == 0 {
            return f.write_str("0s");
        }
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        let secs = ms / 1000;
        for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60)] {
            if secs.is_multiple_of(size) {
                return write!(f, "{}{unit}", secs / size);
            }
        }
        write!(f, "{secs}s")
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        crate::duration::parse(&s)
            .map(HumanDuration)
            .map_err(|e| de::Error::custom(format!("bad duration `{s}`: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> SpecError {
        parse_documents("p.yaml", text).expect_err("must be refused")
    }

    const GOOD: &str = r#"
name: app-ci
triggers:
  - provider: github
    repos: ["acme/app", "acme/lib-*"]
    kinds: [pull_request]
    actions: [opened, synchronize, reopened]
    branches: ["main", "release/*"]
    paths: ["src/**", "!docs/**"]
    when: "event.pr_draft == false"
  - kinds: [comment]
    command: /retest
runtime: { cluster: eu-1 }
concurrency: { group: "${repo}/${pr}", cancel_in_progress: true }
steps:
  - { name: test, image: "rust:1.85", commands: ["cargo test"] }
  - { name: deploy, pipeline: deploy-prod, runtime: { cluster: us-1 }, when: "event.ref == 'refs/heads/main'" }
"#;

    #[test]
    fn the_documented_example_is_valid_and_round_trips() {
        let p = parse_documents("p.yaml", GOOD).expect("valid");
        assert_eq!(p.len(), 1);
        let p = &p[0];
        assert_eq!(p.name.as_str(), "app-ci");
        assert_eq!(p.triggers[1].kinds, ["comment"]);
        assert_eq!(p.runtime.cluster.0[0].as_str(), "eu-1");
        let yaml = serde_saphyr::to_string(p).expect("yaml");
        let again = parse_documents("again.yaml", &yaml).expect("round trip");
        assert_eq!(
            serde_json::to_value(&again[0]).ok(),
            serde_json::to_value(p).ok()
        );
    }

    #[test]
    fn errors_point_at_the_offending_value() {
        let e = err("name: x\nsteps:\n  - name: a\n    image: i\n    comands: [x]\n");
        assert_eq!((e.line, e.column), (5, 5), "{e}");
        assert!(e.message.contains("unknown field `comands`"), "{e}");

        let e = err("name: x\ntriggers:\n  - branches: [\"main\", \"rel[ease\"]\nsteps:\n  - {name: a, image: i}\n");
        assert_eq!((e.line, e.column), (3, 25), "{e}");
        assert!(e.message.contains("bad glob `rel[ease`"), "{e}");

        let e = err("name: x\ntimeout: 10 minutes\nsteps:\n  - {name: a, image: i}\n");
        assert_eq!((e.line, e.column), (2, 10), "{e}");

        let e = err("name: x\ntriggers:\n  - kinds: [push]\n    when: \"event.kind ==\"\nsteps:\n  - {name: a, image: i}\n");
        assert_eq!((e.line, e.column), (4, 12), "{e}");
        assert!(e.message.contains("bad CEL"), "{e}");

        let e = err("name: x\nsteps:\n  - name: a\n    commands: [make]\n");
        assert_eq!((e.line, e.column), (3, 3), "{e}");
        assert!(e.message.contains("step `a` has no image"), "{e}");

        let e = err("name: Bad_Name\nsteps:\n  - {name: a, image: i}\n");
        assert_eq!((e.line, e.column), (1, 7), "{e}");
        assert_eq!(e.to_string().split(": ").next(), Some("p.yaml:1:7"));
    }

    #[test]
    fn globs_include_and_exclude() {
        let list: Vec<Glob> = ["src/**", "!src/gen/**"]
            .iter()
            .map(|s| Glob::parse(s).expect("glob"))
            .collect();
        assert!(passes(&list, "src/main.rs"));
        assert!(passes(&list, "src/a/b.rs"));
        assert!(!passes(&list, "src/gen/x.rs"));
        assert!(!passes(&list, "docs/x.md"));
        let excludes: Vec<Glob> = ["!docs/**"]
            .iter()
            .map(|s| Glob::parse(s).expect("glob"))
            .collect();
        assert!(passes(&excludes, "src/x"));
        assert!(!passes(&excludes, "docs/x"));
        let branch = Glob::parse("release/*").expect("glob");
        assert!(branch.matches("release/1.0"));
        assert!(!branch.matches("release/1/2"));
        assert!(passes(&[], "anything"));
    }

    #[test]
    fn templates_are_checked_and_rendered() {
        let e = err("name: x\nconcurrency: { group: \"${repo}/${prr}\" }\nsteps:\n  - {name: a, image: i}\n");
        assert!(e.message.contains("unknown variable `${prr}`"), "{e}");
        let out = render_template("${repo}/${pr}-x", |v| match v {
            "repo" => "acme/app".into(),
            "pr" => "7".into(),
            _ => String::new(),
        });
        assert_eq!(out, "acme/app/7-x");
    }

    #[test]
    fn durations_serialize_in_a_unit_that_reads_back_exactly() {
        let cases = [
            (Duration::from_millis(500), "500ms"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(0), "0s"),
            (Duration::from_secs(45), "45s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(1800), "30m"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_secs(7 * 86_400), "7d"),
            (Duration::from_micros(1), "1ms"),
        ];
        for (d, text) in cases {
            let json = serde_json::to_value(HumanDuration(d)).expect("serialize");
            assert_eq!(json, serde_json::json!(text), "{d:?}");
            let back: HumanDuration = serde_json::from_value(json).expect("parse back");
            if d.subsec_nanos().is_multiple_of(1_000_000) {
                assert_eq!(back.0, d, "{text}");
            }
        }
    }

    /// Refuses `text` within a second and returns the error.
    fn refused_quickly(text: &str) -> SpecError {
        let started = std::time::Instant::now();
        let e = err(text);
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "took {took:?}: {e}");
        e
    }

    /// A pipeline whose tolerations (free-form values) are `values`.
    const HOSTILE: &str = "name: x\nsteps:\n  - {name: a, image: i}\nruntime:\n  tolerations:\n";

    #[test]
    fn a_billion_laughs_is_refused_quickly() {
        // Nine levels of ten aliases each: 10^9 strings if the aliases were expanded.
        let mut text = format!("{HOSTILE}    - &l0 lol\n");
        for level in 1..10 {
            let refs = vec![format!("*l{}", level - 1); 10].join(", ");
            text.push_str(&format!("    - &l{level} [{refs}]\n"));
        }
        let e = refused_quickly(&text);
        assert!(e.message.contains("alias"), "{e}");
        assert!(e.line >= 6, "{e}");
    }

    #[test]
    fn deep_nesting_is_refused_quickly() {
        let depth = 10_000;
        let flow = format!(
            "{HOSTILE}    - {}{}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let e = refused_quickly(&flow);
        assert!(
            e.message.contains("nesting")
                || e.message.contains("depth")
                || e.message.contains("recursion"),
            "{e}"
        );
        assert_eq!(e.line, 6, "{e}");

        let block = format!("{HOSTILE}    {}x\n", "- ".repeat(depth));
        let e = refused_quickly(&block);
        assert!(
            e.message.contains("nesting")
                || e.message.contains("depth")
                || e.message.contains("recursion"),
            "{e}"
        );
        assert_eq!(e.line, 6, "{e}");
    }

    #[test]
    fn an_oversized_file_is_refused_before_parsing() {
        let text = format!("name: x\n# {}\n", "x".repeat(crate::yaml::MAX_BYTES));
        let e = refused_quickly(&text);
        assert!(e.message.contains("more than the"), "{e}");
        assert_eq!(e.line, 0);
    }

    #[test]
    fn a_document_may_be_a_list_of_pipelines() {
        let text = "- name: lint\n  steps:\n    - {name: a, image: i}\n- name: test\n  steps:\n    - {name: b, image: i}\n---\nname: deploy\nsteps:\n  - {name: c, image: i}\n";
        let names: Vec<String> = parse_documents("p.yaml", text)
            .expect("valid")
            .into_iter()
            .map(|p| p.name.to_string())
            .collect();
        assert_eq!(names, ["lint", "test", "deploy"]);

        // An error in the second item points into it, as in a file of one pipeline.
        let e = err("- name: lint\n  steps:\n    - {name: a, image: i}\n- name: test\n  steps:\n    - name: b\n      image: i\n      comands: [x]\n");
        assert_eq!((e.line, e.column), (8, 7), "{e}");
        assert!(e.message.contains("unknown field `comands`"), "{e}");
        let e = err("- name: lint\n  steps:\n    - {name: a, image: i}\n- name: Bad_Name\n  steps:\n    - {name: b, image: i}\n");
        assert_eq!((e.line, e.column), (4, 9), "{e}");
        let e = err("- name: a\n  steps: [{name: s, image: i}]\n- name: a\n  steps: [{name: s, image: i}]\n");
        assert!(e.message.contains("`a` is defined twice"), "{e}");
        // Neither a mapping nor a list: the message says what a document may be.
        let e = err("just words\n");
        assert!(e.message.contains("a list of pipelines"), "{e}");
        let e = err("name: x\nsteps:\n  - name: a\n    commands: [make]\n");
        assert_eq!((e.line, e.column), (3, 3), "{e}");
    }

    #[test]
    fn a_whole_pipeline_check_points_at_the_pipeline() {
        // The file's one pipeline: the file and the pipeline's name say where.
        let e = err("name: x\nsteps: []\n");
        assert!(e.message.contains("has no steps"), "{e}");
        assert_eq!(e.line, 0, "{e}");
        // One of a list: its item.
        let e = err("- name: y\n  steps: [{name: s, image: i}]\n- name: x\n  steps: []\n");
        assert!(e.message.contains("has no steps"), "{e}");
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn a_file_is_refused_whole() {
        let text = format!("{GOOD}\n---\nname: second\nsteps: []\n");
        let e = err(&text);
        assert!(e.message.contains("has no steps"), "{e}");
    }
}
