//! What the spike looked like from inside while it ran: every ingest's backlog, as it
//! read JetStream when deciding to shed, and every process's CPU share, sampled on a
//! fixed period from the first webhook until ingest has nothing left in flight.
//!
//! The answer times alone cannot tell a JetStream that acknowledged slowly from an
//! ingest that was slow to reach its publish (starved of CPU, or waiting for a
//! connection slot): the two read differently here.

use std::time::{Duration, Instant};

use sluice_tests::process::{self, Service};
use tokio::sync::watch;

use crate::gauge;

/// Time between samples.
pub const PERIOD: Duration = Duration::from_millis(500);

/// One ingest's figures at one moment; `None` where its `/metrics` did not answer.
#[derive(Debug, Clone, Default)]
pub struct IngestFigures {
    pub requests_in_flight: Option<f64>,
    pub connections_open: Option<f64>,
    pub backlog_waiting: Option<f64>,
    pub backlog_stranded: Option<f64>,
    pub ack_rate: Option<f64>,
    pub ack_latency: Option<f64>,
    pub accepted: Option<f64>,
    pub shed: Option<f64>,
}

impl IngestFigures {
    fn read(text: &str) -> IngestFigures {
        IngestFigures {
            requests_in_flight: gauge(text, "sluice_ingest_requests_in_flight"),
            connections_open: gauge(text, "sluice_ingest_connections_open"),
            backlog_waiting: gauge(text, "sluice_ingest_backlog_waiting"),
            backlog_stranded: gauge(text, "sluice_ingest_backlog_stranded"),
            ack_rate: gauge(text, "sluice_ingest_backlog_ack_rate"),
            ack_latency: gauge(text, "sluice_ingest_backlog_ack_latency_seconds"),
            accepted: labelled(text, "sluice_ingest_requests_total", "outcome=\"accepted\""),
            shed: labelled(text, "sluice_ingest_requests_total", "outcome=\"shed\""),
        }
    }
}

/// The sum of a metric's samples whose labels include `label` (`outcome="shed"`).
fn labelled(text: &str, name: &str, label: &str) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix('{')) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once('}') else {
            continue;
        };
        if !labels.split(',').any(|l| l == label) {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

/// One moment: each ingest's figures, and each watched process's CPU time so far.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Duration,
    pub ingests: Vec<IngestFigures>,
    pub cpu: Vec<Option<Duration>>,
}

/// The processes whose CPU is watched, by name, and the ingest admin URLs.
pub struct Watched {
    pub names: Vec<String>,
    pub pids: Vec<u32>,
    pub ingests: Vec<String>,
}

impl Watched {
    pub fn new(services: &[Service], nats: &[u32]) -> Watched {
        let mut names = Vec::new();
        let mut pids = Vec::new();
        for s in services {
            if let Some(pid) = s.pid() {
                names.push(s.name.clone());
                pids.push(pid);
            }
        }
        for (i, pid) in nats.iter().enumerate() {
            names.push(format!("nats-{}", i + 1));
            pids.push(*pid);
        }
        let ingests = services
            .iter()
            .filter(|s| s.name.starts_with("ingest-"))
            .map(|s| s.admin.clone())
            .collect();
        Watched {
            names,
            pids,
            ingests,
        }
    }
}

/// Samples every [`PERIOD`] until `stop` says so and ingest holds nothing more, or
/// for at most `limit`. The client is made (and its connections opened) before the
/// spike, so a scrape is not queued behind the spike's connections for a slot.
pub async fn sample(
    watched: Watched,
    http: reqwest::Client,
    mut stop: watch::Receiver<bool>,
    limit: Duration,
) -> (Vec<String>, Vec<Sample>) {
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tick.tick().await;
        let mut ingests = Vec::new();
        for url in &watched.ingests {
            let figures = match http.get(format!("{url}/metrics")).send().await {
                Ok(r) => match r.text().await {
                    Ok(text) => IngestFigures::read(&text),
                    Err(_) => IngestFigures::default(),
                },
                Err(_) => IngestFigures::default(),
            };
            ingests.push(figures);
        }
        let cpu = watched.pids.iter().map(|p| process::cpu_time(*p)).collect();
        let idle = ingests
            .iter()
            .all(|f| f.requests_in_flight.is_some_and(|n| n <= 1.0));
        samples.push(Sample {
            at: start.elapsed(),
            ingests,
            cpu,
        });
        // The scrape itself is one request in flight.
        if (*stop.borrow_and_update() && idle) || start.elapsed() > limit {
            break;
        }
    }
    (watched.names, samples)
}

/// The timeline as a Markdown table: per ingest, its requests in flight, the
/// backlog's waiting count, acknowledgement rate and latency, and what it accepted and
/// shed in the period; then the CPU share (100 % = one core) of each group of
/// processes in the period.
pub fn print(names: &[String], samples: &[Sample]) {
    let groups: Vec<&str> = {
        let mut g: Vec<&str> = names.iter().map(|n| group(n)).collect();
        g.dedup();
        g
    };
    let ingests = samples.first().map_or(0, |s| s.ingests.len());
    let mut header = vec!["t (s)".to_owned()];
    for i in 1..=ingests {
        header.push(format!(
            "ingest-{i}: in flight / conns / waiting (stranded) / acks/s / ack latency / +accepted / +shed"
        ));
    }
    for g in &groups {
        header.push(format!("CPU {g}"));
    }
    println!();
    println!("| {} |", header.join(" | "));
    println!("|{}", "---|".repeat(header.len()));
    let fmt =
        |v: Option<f64>, unit: &str| v.map_or_else(|| "?".to_owned(), |v| format!("{v:.0}{unit}"));
    for pair in samples.windows(2) {
        let (before, now) = (&pair[0], &pair[1]);
        let mut row = vec![format!("{:.1}", now.at.as_secs_f64())];
        for (b, n) in before.ingests.iter().zip(&now.ingests) {
            let delta = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => Some(b - a),
                _ => None,
            };
            row.push(format!(
                "{} / {} / {} ({}) / {} / {} / {} / {}",
                fmt(n.requests_in_flight, ""),
                fmt(n.connections_open, ""),
                fmt(n.backlog_waiting, ""),
                fmt(n.backlog_stranded, ""),
                fmt(n.ack_rate, ""),
                n.ack_latency
                    .map_or_else(|| "?".to_owned(), |s| format!("{:.0} ms", s * 1000.0)),
                fmt(delta(b.accepted, n.accepted), ""),
                fmt(delta(b.shed, n.shed), ""),
            ));
        }
        let span = (now.at - before.at).as_secs_f64();
        for g in &groups {
            let used: f64 = names
                .iter()
                .enumerate()
                .filter(|(_, n)| group(n) == *g)
                .filter_map(|(i, _)| match (before.cpu[i], now.cpu[i]) {
                    (Some(b), Some(n)) => Some(n.saturating_sub(b).as_secs_f64()),
                    _ => None,
                })
                .sum();
            row.push(format!("{:.0} %", used / span * 100.0));
        }
        println!("| {} |", row.join(" | "));
    }
}

/// The group a process's CPU is shown in: each ingest and NATS node alone, the
/// dispatchers together, the runners together.
fn group(name: &str) -> &str {
    if name.starts_with("dispatcher-") {
        "dispatchers"
    } else if name.starts_with("runner-") {
        "runners"
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::{group, labelled};

    #[test]
    fn a_labelled_sample_is_picked_by_one_label_among_several() {
        let text = "sluice_ingest_requests_total{provider=\"github\",outcome=\"accepted\"} 7\n\
                    sluice_ingest_requests_total{provider=\"gitlab\",outcome=\"accepted\"} 2\n\
                    sluice_ingest_requests_total{provider=\"github\",outcome=\"shed\"} 5\n\
                    sluice_ingest_requests_totals{outcome=\"accepted\"} 100\n";
        assert_eq!(
            labelled(text, "sluice_ingest_requests_total", "outcome=\"accepted\""),
            Some(9.0)
        );
        assert_eq!(
            labelled(text, "sluice_ingest_requests_total", "outcome=\"shed\""),
            Some(5.0)
        );
        assert_eq!(
            labelled(text, "sluice_ingest_requests_total", "outcome=\"timeout\""),
            None
        );
    }

    #[test]
    fn dispatchers_and_runners_are_grouped_and_the_rest_stand_alone() {
        assert_eq!(group("dispatcher-2"), "dispatchers");
        assert_eq!(group("runner-c1-0"), "runners");
        assert_eq!(group("ingest-1"), "ingest-1");
        assert_eq!(group("nats-3"), "nats-3");
    }
}
