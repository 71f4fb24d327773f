//! `sluice pipelines …`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use futures::TryStreamExt;
use sluice_core::pipeline::{parse_documents, Pipeline};
use sluice_core::streams;

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
            let pipelines = load(&file)?;
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
            let kv = bucket(global).await?;
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
            if output != Output::Table {
                let list: Vec<&Pipeline> = pipelines.iter().map(|(p, _)| p).collect();
                return output::structured(&list, output);
            }
            if pipelines.is_empty() {
                println!("No pipelines. Add one with: sluice pipelines apply -f FILE");
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

async fn bucket(global: &Global) -> anyhow::Result<async_nats::jetstream::kv::Store> {
    let client = crate::connect(global).await?;
    let js = async_nats::jetstream::new(client);
    Ok(streams::bucket(&js, sluice_core::subjects::PIPELINES_BUCKET).await?)
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
        bail!("{} problem(s) found: nothing was applied", errors.len());
    }
    Ok(pipelines)
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
            "{} problem(s) found: the dispatcher refuses these (failing the sluice/config status) and runs the others",
            errors.len()
        );
    }
    Ok(())
}
