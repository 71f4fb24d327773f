//! `sluice status`: the streams, each consumer's backlog, and the runners alive.

use futures::TryStreamExt;
use serde::Serialize;
use sluice_core::streams::StreamSettings;
use sluice_core::subjects;

use crate::args::{Global, Output};
use crate::output;

#[derive(Debug, Serialize)]
struct Status {
    streams: Vec<StreamStatus>,
    consumers: Vec<ConsumerStatus>,
    runners: Vec<RunnerStatus>,
    /// The delivery reconciler's last pass and how many deliveries it gave up on;
    /// `None` without its bucket.
    deliveries: Option<DeliveriesStatus>,
}

#[derive(Debug, Serialize)]
struct DeliveriesStatus {
    last_pass: Option<sluice_dispatcher::recover::Summary>,
    lost: usize,
}

#[derive(Debug, Serialize)]
struct StreamStatus {
    name: String,
    messages: u64,
    bytes: u64,
}

#[derive(Debug, Serialize)]
struct ConsumerStatus {
    stream: String,
    name: String,
    /// Messages not yet delivered: the backlog (for runners, the cluster's queue).
    pending: u64,
    /// Delivered and not yet acknowledged: work in hand.
    in_progress: usize,
    redelivered: usize,
}

#[derive(Debug, Serialize)]
struct RunnerStatus {
    cluster: String,
    runner: String,
    seen_seconds_ago: i64,
}

pub async fn run(
    global: &Global,
    output: Output,
    watch: bool,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let client = crate::connect(global).await?;
    let js = async_nats::jetstream::new(client);
    if watch {
        return output::watch(&shutdown, || show(&js, output)).await;
    }
    show(&js, output).await
}

async fn show(js: &async_nats::jetstream::Context, output: Output) -> anyhow::Result<()> {
    let mut status = Status {
        streams: Vec::new(),
        consumers: Vec::new(),
        runners: Vec::new(),
        deliveries: None,
    };
    for config in StreamSettings::default().all() {
        let Ok(mut stream) = js.get_stream(&config.name).await else {
            status.streams.push(StreamStatus {
                name: format!("{} (missing)", config.name),
                messages: 0,
                bytes: 0,
            });
            continue;
        };
        let info = stream.info().await?.clone();
        status.streams.push(StreamStatus {
            name: config.name.clone(),
            messages: info.state.messages,
            bytes: info.state.bytes,
        });
        let mut consumers = stream.consumers();
        while let Some(c) = consumers.try_next().await? {
            if c.config.durable_name.is_none() {
                continue;
            }
            status.consumers.push(ConsumerStatus {
                stream: config.name.clone(),
                name: c.name.clone(),
                pending: c.num_pending,
                in_progress: c.num_ack_pending,
                redelivered: c.num_redelivered,
            });
        }
    }
    if let Ok(kv) = js.get_key_value(subjects::RUNNERS_BUCKET).await {
        let now = time::OffsetDateTime::now_utc();
        let keys: Vec<String> = kv.keys().await?.try_collect().await.unwrap_or_default();
        for key in keys {
            if let Some(entry) = kv.entry(&key).await? {
                let (cluster, runner) =
                    subjects::parse_runner_key(&key).unwrap_or((key.as_str(), ""));
                status.runners.push(RunnerStatus {
                    cluster: cluster.to_owned(),
                    runner: runner.to_owned(),
                    seen_seconds_ago: (now - entry.created).whole_seconds(),
                });
            }
        }
    }
    if let Ok(report) = sluice_dispatcher::recover::lost(js).await {
        status.deliveries = Some(DeliveriesStatus {
            last_pass: report.last_pass,
            lost: report.lost.len(),
        });
    }
    if output != Output::Table {
        return output::structured(&status, output);
    }
    let rows: Vec<Vec<String>> = status
        .streams
        .iter()
        .map(|s| vec![s.name.clone(), s.messages.to_string(), human_bytes(s.bytes)])
        .collect();
    output::table(&["STREAM", "MESSAGES", "SIZE"], &rows);
    println!();
    let rows: Vec<Vec<String>> = status
        .consumers
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.stream.clone(),
                c.pending.to_string(),
                c.in_progress.to_string(),
                c.redelivered.to_string(),
            ]
        })
        .collect();
    output::table(
        &[
            "CONSUMER",
            "STREAM",
            "BACKLOG",
            "IN PROGRESS",
            "REDELIVERED",
        ],
        &rows,
    );
    println!();
    if status.runners.is_empty() {
        println!("No runner has reported in the last 30 s.");
    } else {
        let rows: Vec<Vec<String>> = status
            .runners
            .iter()
            .map(|r| {
                vec![
                    r.cluster.clone(),
                    r.runner.clone(),
                    format!("{}s ago", r.seen_seconds_ago),
                ]
            })
            .collect();
        output::table(&["CLUSTER", "RUNNER", "SEEN"], &rows);
    }
    if let Some(d) = &status.deliveries {
        println!();
        match &d.last_pass {
            Some(pass) => println!("Delivery reconciler: {}", crate::events::pass_line(pass)),
            None => println!("Delivery reconciler: no pass yet."),
        }
        if d.lost > 0 {
            println!(
                "{} webhook deliveries could not be recovered: see `sluice events lost`.",
                d.lost
            );
        }
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
