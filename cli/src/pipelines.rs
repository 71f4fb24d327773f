//! `sluice pipelines …`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use async_nats::jetstream;
use futures::TryStreamExt;
use sluice_core::pipeline::{parse_documents, Pipeline};
use sluice_core::repo_pipelines::{LastRead, Side};
use sluice_core::{streams, subjects};

use crate::args::{Global, Output, PipelinesCommand};
use crate::output;

pub async fn run(global: &Global, command: PipelinesCommand) -> anyhow::Result<()> {
    match command {
        PipelinesCommand::Validate { file, dir } => {
            if let Some(dir) = dir {
                return validate_checkout(&dir);
            }
            let pipelines = load(&file.unwrap_or_default())?;
            for p in &pipelines {
                println!("pipeline/{} is valid", p.name);
            }
            Ok(())
        }
        PipelinesCommand::Apply { file } => {
            let pipelines = load(&file).map_err(|e| anyhow::anyhow!("{e}: nothing was applied"))?;
            let kv = bucket(global).await?;
            for p in pipelines {
                let name = p.name.to_string();
                let value = serde_json::to_vec(&p)?;
                let existing = kv
                    .get(&name)
                    .await
                    .with_context(|| format!("reading pipeline {name}"))?;
                let verb = match existing {
                    Some(old) if old == value.as_slice() => "unchanged",
                    Some(_) => "configured",
                    None => "created",
                };
                if verb != "unchanged" {
                    kv.put(&name, value.into())
                        .await
                        .with_context(|| format!("storing pipeline {name}"))?;
                }
                println!("pipeline/{name} {verb}");
            }
            Ok(())
        }
        PipelinesCommand::List { output } => {
            let js = jetstream(global).await?;
            let kv = streams::bucket(&js, subjects::PIPELINES_BUCKET).await?;
            let mut names: Vec<String> = kv.keys().await?.try_collect().await?;
            names.sort();
            let mut pipelines = Vec::new();
            for name in names {
                if let Some(entry) = kv.entry(&name).await? {
                    if let Ok(p) = serde_json::from_slice::<Pipeline>(&entry.value) {
                        pipelines.push((p, entry.revision));
                    }
                }
            }
            // The JSON and YAML shapes stay a bare list of applied pipelines: scripts
            // read them, and repository pipelines have no definition stored here.
            if output != Output::Table {
                let list: Vec<&Pipeline> = pipelines.iter().map(|(p, _)| p).collect();
                return output::structured(&list, output);
            }
            let read = last_reads(&js).await?;
            if pipelines.is_empty() {
                println!("No pipelines. Add one with: sluice pipelines apply -f FILE");
                print_last_reads(&read);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = pipelines
                .iter()
                .map(|(p, rev)| {
                    let clusters: Vec<&str> =
                        p.runtime.cluster.0.iter().map(|c| c.as_str()).collect();
                    vec![
                        p.name.to_string(),
                        p.triggers.len().to_string(),
                        p.steps.len().to_string(),
                        if clusters.is_empty() {
                            "(default)".into()
                        } else {
                            clusters.join(",")
                        },
                        rev.to_string(),
                    ]
                })
                .collect();
            output::table(&["NAME", "TRIGGERS", "STEPS", "CLUSTER", "REVISION"], &rows);
            print_last_reads(&read);
            Ok(())
        }
        PipelinesCommand::Get { name, output } => {
            let kv = bucket(global).await?;
            let Some(value) = kv.get(&name).await? else {
                bail!("no pipeline named {name:?}; `sluice pipelines list` shows them");
            };
            let p: Pipeline = serde_json::from_slice(&value).context("stored pipeline")?;
            output::structured(&p, output)
        }
        PipelinesCommand::Delete { name } => {
            let kv = bucket(global).await?;
            if kv.get(&name).await?.is_none() {
                bail!("no pipeline named {name:?}; `sluice pipelines list` shows them");
            }
            kv.delete(&name).await?;
            println!("pipeline/{name} deleted");
            Ok(())
        }
    }
}

async fn jetstream(global: &Global) -> anyhow::Result<jetstream::Context> {
    Ok(jetstream::new(crate::connect(global).await?))
}

async fn bucket(global: &Global) -> anyhow::Result<jetstream::kv::Store> {
    let js = jetstream(global).await?;
    Ok(streams::bucket(&js, subjects::PIPELINES_BUCKET).await?)
}

// === Repository pipelines read ===

/// What the dispatchers last read from each repository's `.sluice/`, by provider and
/// repository; none when the bucket is missing (an install from before repository
/// pipelines).
async fn last_reads(js: &jetstream::Context) -> anyhow::Result<Vec<LastRead>> {
    let kv = match js.get_key_value(subjects::REPO_FILES_BUCKET).await {
        Ok(kv) => kv,
        Err(e) if bucket_missing(&e) => return Ok(Vec::new()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("opening bucket {}", subjects::REPO_FILES_BUCKET))
        }
    };
    // The other keys are cached listings of commits, which this does not show.
    let mut keys: Vec<String> = kv
        .keys()
        .await
        .with_context(|| format!("listing bucket {}", subjects::REPO_FILES_BUCKET))?
        .try_filter(|k| futures::future::ready(k.starts_with(subjects::REPO_LAST_READ_PREFIX)))
        .try_collect()
        .await?;
    keys.sort();
    let mut read = Vec::new();
    for key in keys {
        // Gone since the listing (its hour is up): nothing to show.
        let Some(value) = kv
            .get(&key)
            .await
            .with_context(|| format!("reading {key}"))?
        else {
            continue;
        };
        match serde_json::from_slice::<LastRead>(&value) {
            Ok(r) => read.push(r),
            Err(e) => eprintln!(
                "warning: {} {key} is not a repository read record ({e})",
                subjects::REPO_FILES_BUCKET
            ),
        }
    }
    read.sort_by(|a, b| (a.provider.as_str(), &a.repo).cmp(&(b.provider.as_str(), &b.repo)));
    Ok(read)
}

/// JetStream answered that the bucket's stream does not exist; any other failure (a
/// timeout, a refused permission) is not taken for an old install.
fn bucket_missing(e: &jetstream::context::KeyValueError) -> bool {
    use jetstream::context::{GetStreamError, GetStreamErrorKind, KeyValueErrorKind};
    e.kind() == KeyValueErrorKind::GetBucket
        && std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<GetStreamError>())
            .is_some_and(|s| {
                matches!(s.kind(), GetStreamErrorKind::JetStream(j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
            })
}

fn print_last_reads(read: &[LastRead]) {
    if read.is_empty() {
        return;
    }
    println!();
    println!("Repository pipelines (read in the last hour):");
    let mut rows = Vec::new();
    for r in read {
        let definitions = match r.side {
            Side::Head => "head",
            Side::Base => "base",
        };
        let commit = short_commit(&r.git_ref);
        let at = r
            .read_at
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        // A repository with nothing accepted still gets a row: its refusals are below.
        let names = if r.pipelines.is_empty() {
            vec!["(none)".to_owned()]
        } else {
            r.pipelines.clone()
        };
        for name in names {
            rows.push(vec![
                name,
                r.repo.clone(),
                definitions.to_owned(),
                commit.clone(),
                at.clone(),
            ]);
        }
    }
    output::table(
        &[
            "REPOSITORY PIPELINE",
            "REPOSITORY",
            "DEFINITIONS",
            "COMMIT",
            "READ",
        ],
        &rows,
    );
    for r in read.iter().filter(|r| r.errors > 0) {
        println!(
            "{}: {} file(s) or pipeline(s) refused; `sluice events why {}` lists them",
            r.repo, r.errors, r.event_id
        );
    }
}

/// A commit SHA cut to 12 characters, as `git log --oneline` shows it; a branch whole.
fn short_commit(git_ref: &str) -> String {
    if git_ref.len() == 40 && git_ref.bytes().all(|b| b.is_ascii_hexdigit()) {
        git_ref[..12].to_owned()
    } else {
        git_ref.to_owned()
    }
}

/// Reads and validates every pipeline in a file or folder; any error refuses all.
pub fn load(path: &Path) -> anyhow::Result<Vec<Pipeline>> {
    let files = yaml_files(path)?;
    if files.is_empty() {
        bail!("no .yaml or .yml files in {}", path.display());
    }
    let mut pipelines = Vec::new();
    let mut errors = Vec::new();
    let mut defined_in: HashMap<String, String> = HashMap::new();
    for file in &files {
        let shown = file.display().to_string();
        let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {shown}"))?;
        match parse_documents(&shown, &text) {
            Ok(ps) => {
                for p in ps {
                    if let Some(other) = defined_in.insert(p.name.to_string(), shown.clone()) {
                        errors.push(format!(
                            "{shown}: pipeline `{}` is also defined in {other}",
                            p.name
                        ));
                    }
                    pipelines.push(p);
                }
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("error: {e}");
        }
        bail!("{}", problems_found(errors.len()));
    }
    Ok(pipelines)
}

/// `1 problem found`, `2 problems found`.
fn problems_found(n: usize) -> String {
    match n {
        1 => "1 problem found".to_owned(),
        n => format!("{n} problems found"),
    }
}

fn yaml_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    let mut dirs = vec![path.to_owned()];
    while let Some(dir) = dirs.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        for entry in entries {
            let p = entry?.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// `sluice pipelines validate DIR`: the checkout's `.sluice/` as the dispatcher reads
/// it — each file on its own, the default limits — so an author sees before pushing
/// what the `sluice/config` status and `sluice events why` would say.
fn validate_checkout(dir: &Path) -> anyhow::Result<()> {
    use sluice_core::repo_pipelines::{self, Limits, RepoFile, DIR};
    let folder = if dir.file_name().is_some_and(|n| n == DIR) {
        dir.to_owned()
    } else {
        dir.join(DIR)
    };
    if !folder.is_dir() {
        bail!(
            "no {DIR}/ folder in {}: repository pipelines are the files {DIR}/*.yaml and {DIR}/*.yml",
            dir.display()
        );
    }
    let limits = Limits::default();
    let mut names = Vec::new();
    for entry in
        std::fs::read_dir(&folder).with_context(|| format!("cannot read {}", folder.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if entry.file_type()?.is_file() && repo_pipelines::is_pipeline_file(&name) {
            names.push(name);
        }
    }
    names.sort();
    if names.is_empty() {
        bail!("no .yaml or .yml files directly in {}", folder.display());
    }
    let mut files = Vec::new();
    let mut errors = Vec::new();
    for name in names {
        let path = format!("{DIR}/{name}");
        let size = std::fs::metadata(folder.join(&name))?.len();
        if size > limits.max_file_bytes as u64 {
            errors.push(format!(
                "{path}: the file is {size} bytes, more than the {} a repository pipeline file may have (--repo-pipelines-max-file-bytes)",
                limits.max_file_bytes
            ));
            continue;
        }
        // Read no more than the limit allows (and one byte to tell it was more).
        let mut text = String::new();
        let file = std::fs::File::open(folder.join(&name))
            .with_context(|| format!("cannot read {path}"))?;
        match std::io::Read::read_to_string(
            &mut std::io::Read::take(file, limits.max_file_bytes as u64 + 1),
            &mut text,
        ) {
            Ok(_) => files.push(RepoFile { path, text }),
            Err(e) => errors.push(format!("{path}: cannot be read as UTF-8 text: {e}")),
        }
    }
    // The repository's name only prefixes the pipelines' names; shown without it.
    let parsed = repo_pipelines::parse("", &files, &limits);
    for p in &parsed.pipelines {
        let name = p.name.as_str();
        println!(
            "pipeline/{} is valid",
            name.strip_prefix(':').unwrap_or(name)
        );
    }
    errors.extend(parsed.errors.iter().map(|e| e.to_string()));
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("error: {e}");
        }
        bail!(
            "{}: the dispatcher refuses these (failing the sluice/config status) and runs the others",
            problems_found(errors.len())
        );
    }
    Ok(())
}
