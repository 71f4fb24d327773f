//! `sluice events …`: what happened to an event, and publishing manual ones.

use anyhow::{bail, Context};
use async_nats::jetstream::{self, message::PublishMessage};
use sluice_core::run::Decision;
use sluice_core::{subjects, Event, Provider};
use time::OffsetDateTime;

use crate::args::{EventsCommand, Global, Output};
use crate::output;

pub async fn run(global: &Global, command: EventsCommand) -> anyhow::Result<()> {
    let client = crate::connect(global).await?;
    let js = jetstream::new(client);
    match command {
        EventsCommand::Why {
            event_id,
            pipeline,
            output,
        } => why(&js, &event_id, pipeline.as_deref(), output).await,
        EventsCommand::List { limit, output } => list(&js, limit, output).await,
        EventsCommand::Lost { output } => lost(&js, output).await,
        EventsCommand::Publish {
            kind,
            pipeline,
            repo,
            clone_url,
            git_ref,
            sha,
            id,
        } => {
            let delivery = id.unwrap_or_else(new_id);
            let mut event = Event::new(Provider::Manual, &delivery, subjects::token(&kind));
            event.pipeline = pipeline;
            event.repo = repo;
            event.clone_url = clone_url;
            event.git_ref = git_ref;
            event.sha = sha;
            let ack = js
                .send_publish(
                    event.subject(),
                    PublishMessage::build()
                        .payload(serde_json::to_vec(&event)?.into())
                        .message_id(&event.id),
                )
                .await?
                .await
                .context("JetStream did not store the event: is SLUICE_EVENTS provisioned (start ingest or the dispatcher once)?")?;
            println!(
                "{}{}",
                event.id,
                if ack.duplicate {
                    " (duplicate: already stored)"
                } else {
                    ""
                }
            );
            Ok(())
        }
    }
}

async fn decision_for(js: &jetstream::Context, event_id: &str) -> anyhow::Result<Option<Decision>> {
    sluice_core::bus::decision(js, event_id).await.context(
        "cannot read SLUICE_DECISIONS: has `sluice streams apply` (or `sluice dispatcher`) run against this NATS?",
    )
}

/// Where the repository's own pipelines came from, and what was refused.
fn print_repo_pipelines(r: &sluice_core::run::RepoPipelinesRead) {
    match (&r.side, &r.git_ref) {
        (Some(side), Some(at)) => {
            let side = match side {
                sluice_core::repo_pipelines::Side::Head => "the event's own",
                sluice_core::repo_pipelines::Side::Base => "the target branch's",
            };
            println!("repository pipelines: {side} .sluice/ at {at}");
            println!("  why: {}", r.reason);
            if r.pipelines.is_empty() {
                println!("  read: none");
            } else {
                println!("  read: {}", r.pipelines.join(", "));
            }
        }
        _ => println!("repository pipelines: not read: {}", r.reason),
    }
    for e in &r.errors {
        println!("  refused: {e}");
    }
}

async fn why(
    js: &jetstream::Context,
    event_id: &str,
    pipeline: Option<&str>,
    output: Output,
) -> anyhow::Result<()> {
    let Some(d) = decision_for(js, event_id).await? else {
        bail!(
            "no decision recorded for {event_id}: the dispatcher has not processed it yet (is `sluice dispatcher` running?), \
             the id is wrong (ingest answers it as `event_id`), or it is older than the events' retention"
        );
    };
    if output != Output::Table {
        return output::structured(&d, output);
    }
    println!(
        "event {}  {}{}  {}  {}",
        d.event_id,
        d.kind,
        d.action
            .as_deref()
            .map(|a| format!(" {a}"))
            .unwrap_or_default(),
        d.repo.as_deref().unwrap_or("(no repository)"),
        d.git_ref.as_deref().unwrap_or("")
    );
    println!(
        "decided {}",
        d.decided_at
            .format(&time::format_description::well_known::Rfc3339)?
    );
    if d.runs.is_empty() {
        println!("runs: none");
    } else {
        println!("runs:");
        for r in &d.runs {
            println!(
                "  {}  run {}  on cluster {}  ({})",
                r.pipeline, r.run_id, r.cluster, r.outcome
            );
        }
    }
    if let Some(r) = &d.repo_pipelines {
        print_repo_pipelines(r);
    }
    println!(
        "pipelines considered: {} ({} others do not watch this repository)",
        d.pipelines.len(),
        d.not_considered
    );
    for p in &d.pipelines {
        if pipeline.is_some_and(|want| want != p.pipeline) {
            continue;
        }
        let mark = if p.matched { "✓" } else { "✗" };
        println!("  {mark} {}", p.pipeline);
        if let Some(note) = &p.note {
            println!("      {note}");
        }
        for t in &p.triggers {
            match &t.failed {
                None => println!("      trigger {}: {}", t.index + 1, t.detail),
                Some(filter) => println!("      trigger {}: {filter}: {}", t.index + 1, t.detail),
            }
        }
        if p.triggers.is_empty() && p.note.is_none() {
            println!(
                "      has no triggers: it only starts from a manual event or another pipeline"
            );
        }
    }
    if let Some(want) = pipeline {
        if !d.pipelines.iter().any(|p| p.pipeline == want) {
            println!(
                "  pipeline {want} was not considered: none of its triggers names repository {} \
                 (or it did not exist when the event was dispatched)",
                d.repo.as_deref().unwrap_or("(none)")
            );
        }
    }
    Ok(())
}

async fn list(js: &jetstream::Context, limit: usize, output: Output) -> anyhow::Result<()> {
    let mut stream = js.get_stream(subjects::DECISIONS_STREAM).await.context(
        "no SLUICE_DECISIONS stream: has `sluice dispatcher` ever run against this NATS?",
    )?;
    let state = stream.info().await?.state.clone();
    let mut decisions = Vec::new();
    let mut seq = state.last_sequence;
    // Older decisions for a re-dispatched event are removed, leaving gaps: bound the walk.
    let mut budget = limit * 20 + 100;
    while decisions.len() < limit && seq >= state.first_sequence && seq > 0 && budget > 0 {
        if let Ok(msg) = stream.get_raw_message(seq).await {
            if let Ok(d) = serde_json::from_slice::<Decision>(&msg.payload) {
                decisions.push(d);
            }
        }
        seq -= 1;
        budget -= 1;
    }
    if output != Output::Table {
        return output::structured(&decisions, output);
    }
    if decisions.is_empty() {
        println!("No events dispatched yet.");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = decisions
        .iter()
        .map(|d| {
            vec![
                d.decided_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                d.event_id.clone(),
                format!(
                    "{}{}",
                    d.kind,
                    d.action
                        .as_deref()
                        .map(|a| format!("/{a}"))
                        .unwrap_or_default()
                ),
                d.repo.clone().unwrap_or_default(),
                d.runs.len().to_string(),
            ]
        })
        .collect();
    output::table(&["DECIDED", "EVENT", "KIND", "REPO", "RUNS"], &rows);
    Ok(())
}

/// A new manual event id: time-ordered, with the process id against collisions.
fn new_id() -> String {
    let now = OffsetDateTime::now_utc();
    format!("{}-{}", now.unix_timestamp_nanos(), std::process::id())
}

/// `sluice events lost`: the deliveries the reconciler gave up on, and its last pass.
async fn lost(js: &jetstream::Context, output: Output) -> anyhow::Result<()> {
    let report = sluice_dispatcher::recover::lost(js)
        .await
        .context("cannot read SLUICE_DELIVERIES: run `sluice streams apply` first")?;
    if output != Output::Table {
        return output::structured(&report, output);
    }
    let rfc3339 = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    match &report.last_pass {
        None => println!(
            "No reconcile pass yet (is `sluice dispatcher --recover-deliveries` running?)."
        ),
        Some(p) => {
            println!("Last pass: {}", pass_line(p));
            for e in &p.errors {
                println!("  cannot list {e}");
            }
        }
    }
    if report.lost.is_empty() {
        println!("No delivery lost.");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = report
        .lost
        .iter()
        .map(|r| {
            vec![
                rfc3339(r.first_delivered_at),
                format!("{}:{}", r.forge, r.guid),
                format!(
                    "{}{}",
                    r.event,
                    r.action
                        .as_deref()
                        .map(|a| format!("/{a}"))
                        .unwrap_or_default()
                ),
                r.hook.clone(),
                r.attempts.to_string(),
                r.reason.map(|x| x.as_str()).unwrap_or("").to_owned(),
                r.detail.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(
        &[
            "DELIVERED",
            "EVENT ID",
            "KIND",
            "HOOK",
            "ATTEMPTS",
            "REASON",
            "DETAIL",
        ],
        &rows,
    );
    println!(
        "Redeliver these by hand: GitHub (within 3 days) in the hook's settings, Recent Deliveries, Redeliver; \
         GitLab (within 7 days) in the hook's settings, Recent events, View details, Resend request."
    );
    Ok(())
}

/// One reconcile pass in a line: when, by which replica, and what it did.
pub(crate) fn pass_line(p: &sluice_dispatcher::recover::Summary) -> String {
    let at =
        p.at.and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    format!(
        "{at} by {}: {} listed, {} redelivered, {} recovered, {} lost, {} deferred",
        p.holder, p.listed, p.redelivered, p.recovered, p.lost, p.deferred
    )
}
