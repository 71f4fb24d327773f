//! The dispatcher's Prometheus metrics (`tests/golden/metrics/dispatcher.txt` lists them;
//! `docs/operations.md` says what each means). Labels are low-cardinality: a provider, an
//! outcome, a cluster, a forge — never an event id or a repository.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use sluice_core::admin::Admin;
use sluice_core::Provider;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventOutcome {
    pub provider: &'static str,
    /// One of [`EventOutcome`]'s constants.
    pub outcome: &'static str,
}

impl EventOutcome {
    /// Handled: at least one run planned (stored, or queued for its concurrency group).
    pub const DISPATCHED: &'static str = "dispatched";
    /// Handled: no pipeline matched, or every match was a duplicate of a stored run.
    pub const NO_RUN: &'static str = "no_run";
    /// Failed for now: handed back to be redelivered after a delay.
    pub const RETRIED: &'static str = "retried";
    /// Unreadable, or failing after `--max-attempts`: moved to the dead-letter stream.
    pub const DEAD_LETTERED: &'static str = "dead_lettered";
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusOutcome {
    /// `github` or `gitlab`.
    pub forge: &'static str,
    /// `sent`, `rate_limited`, `failed` or `dropped`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForgeLabel {
    /// `github`.
    pub forge: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Unrecoverable {
    pub forge: &'static str,
    /// `attempts_exhausted` or `refused`.
    pub reason: &'static str,
}

/// Every metric the dispatcher exports; cheap to clone (each is a shared handle).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub events: Family<EventOutcome, Counter>,
    pub runs_planned: Family<ClusterLabel, Counter>,
    pub dispatch_seconds: Histogram,
    pub dead_letters: Counter,
    pub runs_pending: Family<ClusterLabel, Gauge>,
    pub reporter_statuses: Family<StatusOutcome, Counter>,
    pub reporter_pending: Gauge,
    pub deliveries_recovered: Family<ForgeLabel, Counter>,
    pub deliveries_unrecoverable: Family<Unrecoverable, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            events: Family::default(),
            runs_planned: Family::default(),
            // 1 ms to ~65 s: milliseconds when healthy, seconds behind a backlog or a
            // slow forge API (changed files).
            dispatch_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            dead_letters: Counter::default(),
            runs_pending: Family::default(),
            reporter_statuses: Family::default(),
            reporter_pending: Gauge::default(),
            deliveries_recovered: Family::default(),
            deliveries_unrecoverable: Family::default(),
        }
    }
}

impl Metrics {
    /// Registers every metric on `admin`: the dispatcher's own under `sluice_dispatcher`,
    /// the backlog and the reporter's under the names the contract fixes.
    pub fn register(&self, admin: &mut Admin) {
        let own = admin.registry("sluice_dispatcher");
        own.register(
            "events",
            "Events handled, by provider and what became of them",
            self.events.clone(),
        );
        own.register(
            "runs_planned",
            "Run requests stored, by target cluster",
            self.runs_planned.clone(),
        );
        own.register(
            "dispatch_duration_seconds",
            "From an event stored to its run requests stored",
            self.dispatch_seconds.clone(),
        );
        own.register(
            "dead_letters",
            "Events moved to the dead-letter stream",
            self.dead_letters.clone(),
        );
        let root = admin.root_registry();
        root.register(
            "sluice_runs_pending",
            "Each cluster's backlog: run requests no runner has taken yet",
            self.runs_pending.clone(),
        );
        let reporter = root.sub_registry_with_prefix("sluice_reporter");
        reporter.register(
            "statuses",
            "Commit status requests, by forge and outcome",
            self.reporter_statuses.clone(),
        );
        reporter.register(
            "pending",
            "Commit statuses waiting to be sent",
            self.reporter_pending.clone(),
        );
        root.register(
            "sluice_deliveries_recovered",
            "Forge deliveries that failed, were redelivered by the reconciler and stored",
            self.deliveries_recovered.clone(),
        );
        root.register(
            "sluice_deliveries_unrecoverable",
            "Forge deliveries the reconciler gave up on, by reason (sluice events lost)",
            self.deliveries_unrecoverable.clone(),
        );
    }

    /// Counts one delivery recovered.
    pub fn delivery_recovered(&self, forge: &'static str) {
        self.deliveries_recovered
            .get_or_create(&ForgeLabel { forge })
            .inc();
    }

    /// Counts one delivery given up on.
    pub fn delivery_unrecoverable(&self, forge: &'static str, reason: &'static str) {
        self.deliveries_unrecoverable
            .get_or_create(&Unrecoverable { forge, reason })
            .inc();
    }

    /// Counts one event handled.
    pub fn event(&self, provider: &str, outcome: &'static str) {
        self.events
            .get_or_create(&EventOutcome {
                provider: provider_label(provider),
                outcome,
            })
            .inc();
    }

    /// Counts one commit status request.
    pub fn status(&self, forge: Provider, outcome: &'static str) {
        self.reporter_statuses
            .get_or_create(&StatusOutcome {
                forge: forge.as_str(),
                outcome,
            })
            .inc();
    }
}

/// A provider as a label: one of the known ones, `other` for anything else a
/// hand-published subject names, so a label's values stay few.
fn provider_label(provider: &str) -> &'static str {
    match provider {
        "github" => "github",
        "gitlab" => "gitlab",
        "generic" => "generic",
        "manual" => "manual",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_outside_the_known_few_share_one_label() {
        assert_eq!(provider_label("github"), "github");
        assert_eq!(provider_label("manual"), "manual");
        assert_eq!(provider_label("some-repo-name"), "other");
    }
}
