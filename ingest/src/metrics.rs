//! Prometheus metrics of ingest. Labels are low-cardinality: never an id or a SHA.

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::publish::{BacklogReading, BacklogView};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub provider: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerifyFailure {
    pub provider: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutPhase {
    /// `header` (a request's headers too slow) or `idle` (no next request in time).
    pub phase: &'static str,
}

/// The accept loop's metrics.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    pub open: Gauge,
    pub limited: Counter,
    pub refused: Counter,
    pub timed_out: Family<TimeoutPhase, Counter>,
}

/// Every metric ingest exports; cheap to clone (each is a shared handle).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub requests: Family<Outcome, Counter>,
    pub verification_failures: Family<VerifyFailure, Counter>,
    pub duplicates: Family<ProviderLabel, Counter>,
    pub by_reference: Counter,
    pub publish_seconds: Histogram,
    pub answer_seconds: Histogram,
    pub in_flight: Gauge,
    pub connections: ConnectionMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Family::default(),
            verification_failures: Family::default(),
            duplicates: Family::default(),
            by_reference: Counter::default(),
            // 100 µs to ~6.5 s: a healthy publish is sub-millisecond, a sick one times out.
            publish_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            // 1 ms to ~16 s: past the forges' 10 s, where an answer reaches no one.
            answer_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            in_flight: Gauge::default(),
            connections: ConnectionMetrics::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric under `registry` (the admin surface's `sluice_ingest`
    /// prefix), the backlog's figures read through `backlog`.
    pub fn register(&self, registry: &mut Registry, backlog: &BacklogView) {
        Self::register_backlog(registry, backlog);
        registry.register(
            "requests",
            "Webhook requests by provider and outcome",
            self.requests.clone(),
        );
        registry.register(
            "verification_failures",
            "Webhook requests refused by signature or token verification, by reason",
            self.verification_failures.clone(),
        );
        registry.register(
            "duplicates",
            "Deliveries JetStream recognised as already stored",
            self.duplicates.clone(),
        );
        registry.register(
            "payloads_by_reference",
            "Webhook bodies too large for one message, stored in the object store",
            self.by_reference.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Webhook requests being received, verified or stored right now",
            self.in_flight.clone(),
        );
        registry.register(
            "publish_duration_seconds",
            "Time from publish to JetStream acknowledgement",
            self.publish_seconds.clone(),
        );
        registry.register(
            "answer_duration_seconds",
            "Time from a webhook request's arrival (a wait for a connection slot included) to its answer",
            self.answer_seconds.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections open right now",
            self.connections.open.clone(),
        );
        registry.register(
            "connections_limited",
            "Connections accepted only once a slot freed, because --max-connections were open",
            self.connections.limited.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections answered 503 because no slot freed within --queue-wait of --max-connections",
            self.connections.refused.clone(),
        );
        registry.register(
            "connections_timed_out",
            "Connections closed because a request's headers or the next request did not arrive in time",
            self.connections.timed_out.clone(),
        );
    }

    /// Registers what the publisher's backlog reads of JetStream as it decides whether
    /// to shed (see `publish::behind`): the figures that say why requests are shed. They
    /// are read when scraped, not kept up to date by every request: the oldest wait and
    /// the rate change with time alone, and a stalled JetStream answers no request to
    /// update them.
    fn register_backlog(registry: &mut Registry, backlog: &BacklogView) {
        let gauges: [(&str, &str, Figure); 4] = [
            (
                "backlog_waiting",
                "Publishes waiting for JetStream's acknowledgement that the shedding estimate counts",
                |r| r.waiting as f64,
            ),
            (
                "backlog_stranded",
                "Publishes still waiting that were set apart as stranded (their stream leader or connection went away)",
                |r| r.stranded as f64,
            ),
            (
                "backlog_ack_rate",
                "JetStream acknowledgements per second, as the shedding estimate reads it",
                |r| r.ack_rate,
            ),
            (
                "backlog_ack_latency_seconds",
                "How late JetStream acknowledgements are: recent ones (exponentially weighted), or the oldest publish still waiting if later",
                |r| r.ack_latency.as_secs_f64(),
            ),
        ];
        for (name, help, read) in gauges {
            registry.register(
                name,
                help,
                ReadGauge {
                    backlog: backlog.clone(),
                    read,
                },
            );
        }
    }

    /// Counts one answered request.
    pub fn request(&self, provider: &'static str, outcome: &'static str) {
        self.requests
            .get_or_create(&Outcome { provider, outcome })
            .inc();
    }
}

/// One figure of a backlog reading.
type Figure = fn(BacklogReading) -> f64;

/// A gauge whose value is read from the backlog when scraped.
#[derive(Debug)]
struct ReadGauge {
    backlog: BacklogView,
    read: Figure,
}

impl EncodeMetric for ReadGauge {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&(self.read)(self.backlog.read()))
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }
}
