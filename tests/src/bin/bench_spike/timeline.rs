//! What the spike looked like from inside while it ran: every ingest's backlog, as it
//! read JetStream when deciding to shed, and every process's CPU share, sampled on a
//! fixed period from the first webhook until ingest has nothing left in flight.
//!
//! The answer times alone cannot tell a JetStream that acknowledged slowly from an
//! ingest that was slow to reach its publish (starved of CPU, or waiting for a
//! connection slot): the two read differently here.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_tests::process::{self, Service};

use crate::{gauge, samples};

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
            accepted: samples(
                text,
                "sluice_ingest_requests_total",
                Some("outcome=\"accepted\""),
            ),
            shed: samples(
                text,
                "sluice_ingest_requests_total",
                Some("outcome=\"shed\""),
            ),
        }
    }
}

/// The load generator's own count: requests it has sent (their task started) and
/// answers it has read. What is sent and not answered is somewhere between the two
/// processes; ingest's figures say how much of it ingest holds.
#[derive(Debug, Default)]
pub struct Progress {
    pub sent: AtomicUsize,
    pub answered: AtomicUsize,
}

/// One moment: each ingest's figures, the load generator's progress, and each watched
/// process's CPU time so far.
#[derive(Debug, Clone)]
pub struct Sample {
    pub at: Duration,
    pub ingests: Vec<IngestFigures>,
    pub sent: usize,
    pub answered: usize,
    pub cpu: Vec<Option<Duration>>,
}

/// What the sampler hands back: the processes watched, the samples, and each ingest's
/// last `/metrics` text (its answer-time histogram is read from it).
pub struct Timeline {
    pub names: Vec<String>,
    pub samples: Vec<Sample>,
    pub last_metrics: Vec<String>,
    /// The requests due per second on the schedule.
    pub per_second: f64,
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

/// Starts sampling every [`PERIOD`] on a thread and runtime of its own, so that the
/// load generator's work never delays a sample: a gap in the timeline is a stall of
/// what was scraped, not of the scraper. Stops once `stop` is set and ingest holds
/// nothing more, or after `limit`. Ingest is scraped on its admin port, outside the
/// webhooks' connection cap.
pub async fn start(
    watched: Watched,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    limit: Duration,
    per_second: f64,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<Timeline>>> {
    let (ready, warmed) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(1))
                .build()?;
            for url in &watched.ingests {
                http.get(format!("{url}/metrics")).send().await?;
            }
            let _ = ready.send(());
            sample(watched, http, progress, stop, limit, per_second).await
        })
    });
    // The thread's error, if it failed before its scrapes were ready, comes with join.
    if warmed.await.is_err() {
        return match thread.join() {
            Ok(Err(e)) => Err(e.context("the timeline's first scrapes")),
            _ => anyhow::bail!("the timeline's sampler ended before it started"),
        };
    }
    Ok(thread)
}

async fn sample(
    watched: Watched,
    http: reqwest::Client,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    limit: Duration,
    per_second: f64,
) -> anyhow::Result<Timeline> {
    let start = Instant::now();
    let mut samples = Vec::new();
    let mut last_metrics = vec![String::new(); watched.ingests.len()];
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let scrapes = watched.ingests.iter().map(|url| {
            let http = http.clone();
            async move {
                let r = http.get(format!("{url}/metrics")).send().await.ok()?;
                r.text().await.ok()
            }
        });
        let texts = futures::future::join_all(scrapes).await;
        let mut ingests = Vec::new();
        for (text, last) in texts.into_iter().zip(&mut last_metrics) {
            match text {
                Some(text) => {
                    ingests.push(IngestFigures::read(&text));
                    *last = text;
                }
                None => ingests.push(IngestFigures::default()),
            }
        }
        let cpu = watched.pids.iter().map(|p| process::cpu_time(*p)).collect();
        // Webhooks only: the scrape is not counted in flight.
        let idle = ingests
            .iter()
            .all(|f| f.requests_in_flight.is_some_and(|n| n < 0.5));
        samples.push(Sample {
            at: start.elapsed(),
            ingests,
            sent: progress.sent.load(Ordering::Relaxed),
            answered: progress.answered.load(Ordering::Relaxed),
            cpu,
        });
        if (stop.load(Ordering::Relaxed) && idle) || start.elapsed() > limit {
            break;
        }
    }
    Ok(Timeline {
        names: watched.names,
        samples,
        last_metrics,
        per_second,
    })
}

/// Ingest's own answer times summed over the ingests'
/// `sluice_ingest_answer_duration_seconds` histograms: each bucket's upper bound (s)
/// with its cumulative count, in order.
pub fn ingest_answers(texts: &[String]) -> Vec<(f64, f64)> {
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for text in texts {
        for line in text.lines() {
            let Some(rest) =
                line.strip_prefix("sluice_ingest_answer_duration_seconds_bucket{le=\"")
            else {
                continue;
            };
            let Some((le, value)) = rest.split_once("\"}") else {
                continue;
            };
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                match le.parse() {
                    Ok(le) => le,
                    Err(_) => continue,
                }
            };
            let Ok(count) = value.trim().parse::<f64>() else {
                continue;
            };
            match buckets.iter_mut().find(|(b, _)| *b == le) {
                Some((_, c)) => *c += count,
                None => buckets.push((le, count)),
            }
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    buckets
}

/// Ingest's own answer times, as the share answered within each bucket bound from a
/// quarter second to 8 s.
pub fn print_ingest_answers(texts: &[String]) {
    let buckets = ingest_answers(texts);
    let total = buckets.last().map_or(0.0, |(_, c)| *c);
    if total == 0.0 {
        println!("| ingest's own answer times (arrival → answer) | no histogram read |");
        return;
    }
    let shares: Vec<String> = buckets
        .iter()
        .filter(|(le, _)| (0.25..9.0).contains(le))
        .map(|(le, c)| format!("≤ {le} s {:.1} %", c / total * 100.0))
        .collect();
    println!(
        "| ingest's own answer times (arrival → answer, {total:.0} webhooks) | {} |",
        shares.join(", ")
    );
}

/// The timeline as a Markdown table: per ingest, its requests in flight, the
/// backlog's waiting count, acknowledgement rate and latency, and what it accepted and
/// shed in the period; then the CPU share (100 % = one core) of each group of
/// processes in the period.
pub fn print(timeline: &Timeline) {
    let (names, samples) = (&timeline.names, &timeline.samples);
    let groups: Vec<&str> = {
        let mut g: Vec<&str> = names.iter().map(|n| group(n)).collect();
        g.dedup();
        g
    };
    let ingests = samples.first().map_or(0, |s| s.ingests.len());
    let mut header = vec![
        "t (s)".to_owned(),
        "load: sent (behind schedule) / unanswered".to_owned(),
    ];
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
        // Due by now on the schedule, counted from the first sample (the spike's start).
        let total = samples.iter().map(|s| s.sent).max().unwrap_or(0);
        let due = ((now.at.as_secs_f64() * timeline.per_second) as usize).min(total);
        let mut row = vec![
            format!("{:.1}", now.at.as_secs_f64()),
            format!(
                "{} ({}) / {}",
                now.sent,
                due.saturating_sub(now.sent),
                now.sent.saturating_sub(now.answered)
            ),
        ];
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
    use super::{group, ingest_answers};
    use crate::samples;

    #[test]
    fn a_labelled_sample_is_picked_by_one_label_among_several() {
        let text = "sluice_ingest_requests_total{provider=\"github\",outcome=\"accepted\"} 7\n\
                    sluice_ingest_requests_total{provider=\"gitlab\",outcome=\"accepted\"} 2\n\
                    sluice_ingest_requests_total{provider=\"github\",outcome=\"shed\"} 5\n\
                    sluice_ingest_requests_totals{outcome=\"accepted\"} 100\n";
        assert_eq!(
            samples(
                text,
                "sluice_ingest_requests_total",
                Some("outcome=\"accepted\"")
            ),
            Some(9.0)
        );
        assert_eq!(
            samples(
                text,
                "sluice_ingest_requests_total",
                Some("outcome=\"shed\"")
            ),
            Some(5.0)
        );
        assert_eq!(
            samples(
                text,
                "sluice_ingest_requests_total",
                Some("outcome=\"timeout\"")
            ),
            None
        );
    }

    #[test]
    fn ingest_answer_histograms_are_summed_bucket_by_bucket() {
        let one = "sluice_ingest_answer_duration_seconds_bucket{le=\"0.5\"} 3\n\
                   sluice_ingest_answer_duration_seconds_bucket{le=\"1.0\"} 5\n\
                   sluice_ingest_answer_duration_seconds_bucket{le=\"+Inf\"} 6\n\
                   sluice_ingest_answer_duration_seconds_count 6\n";
        let other = "sluice_ingest_answer_duration_seconds_bucket{le=\"1.0\"} 1\n\
                     sluice_ingest_answer_duration_seconds_bucket{le=\"0.5\"} 0\n\
                     sluice_ingest_answer_duration_seconds_bucket{le=\"+Inf\"} 4\n";
        assert_eq!(
            ingest_answers(&[one.to_owned(), other.to_owned()]),
            vec![(0.5, 3.0), (1.0, 6.0), (f64::INFINITY, 10.0)]
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
