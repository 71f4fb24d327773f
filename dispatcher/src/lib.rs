//! `sluice dispatcher`: matches events against pipeline triggers, plans one run per
//! match on its cluster's subject, and records why for every event.
//!
//! Replicas share one durable consumer; run ids are deterministic and carried as
//! message ids, so a redelivered event, a crashed replica or two replicas racing never
//! produce a second run.
#![forbid(unsafe_code)]

pub mod budget;
mod bus;
pub mod consume;
pub mod decisions;
mod error;
pub mod forge;
pub mod github;
pub mod groups;
pub mod liveness;
pub mod matcher;
pub mod members;
pub mod metrics;
pub mod pending;
pub mod plan;
pub mod recover;
pub mod registry;
pub mod repo_files;
pub mod repo_pipelines;
pub mod reporter;
pub mod rerun;
pub mod service;

use std::sync::Arc;
use std::time::Duration;

use sluice_core::nats::NatsOptions;
use sluice_core::streams::{self, StreamSettings};
use sluice_core::subjects;
use tokio_util::sync::CancellationToken;

pub use bus::{Bus, ChildEnd};
pub use consume::{Consumers, Consuming};
pub use error::{Error, Result};

/// Default `--concurrency`: events processed at once.
pub const CONCURRENCY: usize = 256;
/// Default `--max-attempts`: deliveries of one event before it is dead-lettered.
pub const MAX_ATTEMPTS: i64 = 5;
/// Time JetStream has to acknowledge what the dispatcher publishes.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
/// Time an event may be in hand before NATS redelivers it.
pub const ACK_WAIT: Duration = Duration::from_secs(30);
/// Default `--shutdown-grace`: time the events in hand get to finish after SIGTERM
/// before they are handed back.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

/// Everything `sluice dispatcher` is configured with.
#[derive(Debug, Clone)]
pub struct DispatcherConfig {
    pub nats: NatsOptions,
    pub streams: StreamSettings,
    /// Cluster for pipelines whose runtime names none.
    pub default_cluster: String,
    /// Events processed at once.
    pub concurrency: usize,
    /// Deliveries of one event before it is dead-lettered.
    pub max_attempts: i64,
    pub publish_timeout: Duration,
    /// How long an event may be in hand before NATS redelivers it (to another replica
    /// when this one died).
    pub ack_wait: Duration,
    /// Forge API access for changed-file look-ups and commit statuses.
    pub forge: forge::ForgeConfig,
    /// Which repositories' own `.sluice/` pipelines are read, and the limits.
    pub repo_pipelines: repo_pipelines::RepoPipelinesConfig,
    /// Commit statuses back to the forges; off when `None`.
    pub reporter: Option<reporter::ReporterConfig>,
    /// Redeliveries of the forge deliveries that never reached `SLUICE_EVENTS`; off
    /// when `None`.
    pub recover: Option<recover::RecoverConfig>,
    /// After shutdown starts, how long the events in hand may take to finish; those
    /// still running then are handed back to NATS unfinished.
    pub shutdown_grace: Duration,
    /// Where the dispatcher counts what it does; register it on the admin surface.
    pub metrics: metrics::Metrics,
}

impl DispatcherConfig {
    pub fn new(nats: NatsOptions) -> Self {
        DispatcherConfig {
            nats,
            streams: StreamSettings::default(),
            default_cluster: plan::DEFAULT_CLUSTER.into(),
            concurrency: CONCURRENCY,
            max_attempts: MAX_ATTEMPTS,
            publish_timeout: PUBLISH_TIMEOUT,
            ack_wait: ACK_WAIT,
            forge: forge::ForgeConfig::default(),
            repo_pipelines: repo_pipelines::RepoPipelinesConfig::default(),
            reporter: None,
            recover: None,
            shutdown_grace: SHUTDOWN_GRACE,
            metrics: metrics::Metrics::default(),
        }
    }

    /// Refuses settings under which the dispatcher would take no event, or give up on
    /// every one before trying (the command line refuses them before this, with the
    /// flag's name).
    pub fn check(&self) -> Result<()> {
        let invalid = |setting, requirement| {
            Err(Error::InvalidSetting {
                setting,
                requirement,
            })
        };
        if self.concurrency == 0 {
            return invalid("concurrency", "must be at least 1");
        }
        if self.max_attempts < 1 {
            return invalid("max attempts", "must be at least 1");
        }
        if self
            .reporter
            .as_ref()
            .is_some_and(|r| r.requests_per_hour == 0)
        {
            return invalid("forge requests per hour", "must be at least 1");
        }
        if let Some(r) = &self.recover {
            r.check()?;
        }
        Ok(())
    }
}

/// A dispatcher started with [`start`]: whether each of its consumer loops is
/// consuming, and its end.
#[derive(Debug)]
pub struct Handle {
    consumers: Consumers,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Handle {
    /// Each consumer loop's state, for readiness: a loop that stopped pulling (and is
    /// waiting to start again) is named by [`Consumers::stopped`].
    pub fn consumers(&self) -> &Consumers {
        &self.consumers
    }

    /// Waits until the dispatcher has stopped.
    pub async fn wait(self) -> Result<()> {
        self.task.await?
    }

    /// Stops it where it is, acknowledging nothing more (a crash, for tests).
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Starts the dispatcher on the current runtime; it runs until `shutdown`.
pub fn start(config: DispatcherConfig, shutdown: CancellationToken) -> Handle {
    let consumers = Consumers::new(config.reporter.is_some());
    let task = tokio::spawn(run_with(config, consumers.clone(), shutdown));
    Handle { consumers, task }
}

/// Runs the dispatcher until `shutdown`. Then it stops pulling, finishes the messages
/// in hand, hands back (nak without delay) those still running when
/// `config.shutdown_grace` is over, and returns: nothing taken is lost, and each is
/// dispatched once by whichever replica takes it next.
pub async fn run(config: DispatcherConfig, shutdown: CancellationToken) -> Result<()> {
    let consumers = Consumers::new(config.reporter.is_some());
    run_with(config, consumers, shutdown).await
}

async fn run_with(
    config: DispatcherConfig,
    consumers: Consumers,
    shutdown: CancellationToken,
) -> Result<()> {
    config.check()?;
    let changed_files = forge::ChangedFiles::new(config.forge.clone())?;
    let client = sluice_core::nats::connect(&config.nats).await?;
    let bus = Bus::new(client.clone(), config.publish_timeout);
    let mut delay = Duration::from_millis(100);
    loop {
        match streams::prepare(
            &bus.js,
            &config.streams,
            needs(
                config.recover.is_some(),
                !config.repo_pipelines.repos.is_empty(),
            ),
        )
        .await
        {
            Ok(differences) => {
                streams::report("dispatcher", &differences);
                break;
            }
            Err(e) => tracing::warn!(error = %e, retry_in = ?delay, "streams not ready yet"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
    let pipelines = streams::bucket(&bus.js, subjects::PIPELINES_BUCKET).await?;
    let groups = streams::bucket(&bus.js, subjects::GROUPS_BUCKET).await?;
    let runners = streams::bucket(&bus.js, subjects::RUNNERS_BUCKET).await?;
    let liveness = Arc::new(liveness::Liveness::default());
    let liveness_task = tokio::spawn(liveness::watch(runners, liveness.clone(), shutdown.clone()));
    let registry = Arc::new(registry::Registry::default());
    let watcher = registry::load_and_watch(pipelines, registry.clone(), shutdown.clone()).await?;
    let rerun_requests = rerun::subscribe(&client).await?;
    let reruns = tokio::spawn(rerun::serve(
        rerun_requests,
        client.clone(),
        bus.js.clone(),
        registry.clone(),
        shutdown.clone(),
    ));
    // One GitHub and GitLab budget for the commit statuses, the delivery reconciler
    // and the repository reads: they may use the same credential, and a forge's
    // "wait" holds them all. Without statuses, nothing is limited.
    let forge_budget = config
        .reporter
        .as_ref()
        .map(|r| budget::ForgeBudget::new(r.requests_per_hour));
    let reporting = config
        .reporter
        .clone()
        .zip(consumers.reporter.clone())
        .zip(forge_budget.clone())
        .map(|((r, consuming), budget)| {
            tokio::spawn(reporter::run(
                bus.js.clone(),
                config.forge.clone(),
                r,
                budget,
                consuming,
                config.metrics.clone(),
                shutdown.clone(),
            ))
        });
    let recovering = match config.recover.clone() {
        Some(r) => {
            let reconciler =
                recover::Reconciler::new(bus.js.clone(), &config.forge, r, config.metrics.clone())
                    .await?;
            let reconciler = match forge_budget.clone() {
                Some(budget) => reconciler.sharing(budget),
                None => reconciler,
            };
            Some(tokio::spawn(recover::run(
                Arc::new(reconciler),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    // GitLab members, looked up within the same budget; one cache for merge requests
    // and comment commands.
    let members = members::Members::new(&config.forge)?.map(|m| {
        Arc::new(match forge_budget.clone() {
            Some(budget) => m.sharing(budget),
            None => m,
        })
    });
    let repo_pipelines = if config.repo_pipelines.repos.is_empty() {
        None
    } else {
        let cache = streams::bucket(&bus.js, subjects::REPO_FILES_BUCKET).await?;
        let reports = match &config.reporter {
            Some(_) => Some(streams::bucket(&bus.js, subjects::REPORTS_BUCKET).await?),
            None => None,
        };
        let reader = repo_pipelines::RepoPipelines::new(
            config.repo_pipelines.clone(),
            &config.forge,
            Some(cache),
            reports,
            forge_budget.clone(),
        )?;
        Some(Arc::new(match &members {
            Some(m) => reader.with_members(m.clone()),
            None => reader,
        }))
    };
    let ctx = Arc::new(service::Context {
        bus,
        registry,
        groups,
        default_cluster: config.default_cluster,
        max_attempts: config.max_attempts,
        ack_wait: config.ack_wait,
        changed_files,
        liveness,
        repo_pipelines,
        members,
        metrics: config.metrics.clone(),
        hand_back: CancellationToken::new(),
    });
    let backlog = tokio::spawn(pending::watch(
        ctx.bus.js.clone(),
        config.metrics.clone(),
        pending::INTERVAL,
        shutdown.clone(),
    ));
    // The grace period starts with shutdown; at its end, whatever is still in hand is
    // handed back.
    let grace = tokio::spawn({
        let (shutdown, hand_back, grace) = (
            shutdown.clone(),
            ctx.hand_back.clone(),
            config.shutdown_grace,
        );
        async move {
            shutdown.cancelled().await;
            tracing::info!(
                ?grace,
                "shutting down: no new messages, finishing those in hand"
            );
            tokio::time::sleep(grace).await;
            hand_back.cancel();
        }
    });
    tracing::info!(
        concurrency = config.concurrency,
        "dispatcher consuming events"
    );
    let consuming = async {
        tokio::join!(
            service::consume_events(
                ctx.clone(),
                config.concurrency,
                consumers.events.clone(),
                shutdown.clone()
            ),
            service::consume_statuses(ctx.clone(), consumers.statuses.clone(), shutdown.clone()),
            service::consume_children(ctx.clone(), consumers.children.clone(), shutdown.clone()),
        )
    };
    tokio::select! {
        _ = consuming => {}
        // Handing back is a publish each; a loop still busy after that (opening a
        // consumer on a server that does not answer) holds nothing to hand back.
        () = async {
            ctx.hand_back.cancelled().await;
            tokio::time::sleep(HAND_BACK_TIME).await;
        } => tracing::warn!("consumers still busy after the grace period; stopping them"),
    }
    watcher.abort();
    reruns.abort();
    liveness_task.abort();
    backlog.abort();
    if let Some(mut task) = reporting {
        // Statuses not yet sent stay queued in their bucket for the next dispatcher.
        let ended = tokio::select! {
            ended = &mut task => Some(ended),
            () = ctx.hand_back.cancelled() => None,
        };
        match ended {
            Some(Ok(Err(e))) => tracing::error!(error = %e, "the commit status reporter failed"),
            Some(Err(e)) => tracing::error!(error = %e, "the commit status reporter panicked"),
            Some(Ok(Ok(()))) => {}
            None => {
                tracing::warn!("shutdown grace period over; stopping the commit status reporter");
                task.abort();
            }
        }
    }
    if let Some(mut task) = recovering {
        // It stops between requests on shutdown; at the end of the grace period it is
        // stopped where it is (a claimed redelivery not made is retried next pass).
        if tokio::time::timeout(HAND_BACK_TIME, &mut task)
            .await
            .is_err()
        {
            tracing::warn!("the delivery reconciler did not stop in time; stopping it");
            task.abort();
        }
    }
    grace.abort();
    let _ = tokio::time::timeout(Duration::from_secs(1), client.flush()).await;
    tracing::info!("dispatcher stopped");
    Ok(())
}

/// Time the messages still in hand at the end of the grace period get to be handed back.
const HAND_BACK_TIME: Duration = Duration::from_secs(1);

/// Everything the dispatcher reads or writes: the delivery reconciler's bucket only
/// when it runs, and the repository files' only when `--repo-pipelines` names some, so
/// that a dispatcher without them still starts against streams applied before those
/// buckets existed.
fn needs(recovering: bool, repo_pipelines: bool) -> streams::Needs {
    const ALWAYS: [&str; 4] = [
        subjects::PIPELINES_BUCKET,
        subjects::RUNNERS_BUCKET,
        subjects::REPORTS_BUCKET,
        subjects::GROUPS_BUCKET,
    ];
    const WITH_RECOVERY: [&str; 5] = [
        subjects::PIPELINES_BUCKET,
        subjects::RUNNERS_BUCKET,
        subjects::REPORTS_BUCKET,
        subjects::GROUPS_BUCKET,
        subjects::DELIVERIES_BUCKET,
    ];
    const WITH_REPO_FILES: [&str; 5] = [
        subjects::PIPELINES_BUCKET,
        subjects::RUNNERS_BUCKET,
        subjects::REPORTS_BUCKET,
        subjects::GROUPS_BUCKET,
        subjects::REPO_FILES_BUCKET,
    ];
    streams::Needs {
        streams: &subjects::STREAMS,
        buckets: match (recovering, repo_pipelines) {
            (true, true) => &subjects::BUCKETS,
            (true, false) => &WITH_RECOVERY,
            (false, true) => &WITH_REPO_FILES,
            (false, false) => &ALWAYS,
        },
        object_stores: &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_buckets_are_needed_only_when_their_feature_runs() {
        let base = needs(false, false).buckets;
        assert!(!base.contains(&subjects::DELIVERIES_BUCKET));
        assert!(!base.contains(&subjects::REPO_FILES_BUCKET));
        assert_eq!(
            base.len() + 2,
            subjects::BUCKETS.len(),
            "every other bucket"
        );
        assert!(base.iter().all(|b| subjects::BUCKETS.contains(b)));
        let recovering = needs(true, false).buckets;
        assert!(recovering.contains(&subjects::DELIVERIES_BUCKET));
        assert!(!recovering.contains(&subjects::REPO_FILES_BUCKET));
        let reading = needs(false, true).buckets;
        assert!(reading.contains(&subjects::REPO_FILES_BUCKET));
        assert!(!reading.contains(&subjects::DELIVERIES_BUCKET));
        assert_eq!(needs(true, true).buckets, subjects::BUCKETS);
    }

    #[test]
    fn settings_that_would_take_no_event_are_refused() {
        let config = || DispatcherConfig::new(NatsOptions::new("nats://127.0.0.1:4222", "t"));
        assert!(config().check().is_ok(), "the defaults are valid");
        for bad in [
            DispatcherConfig {
                concurrency: 0,
                ..config()
            },
            DispatcherConfig {
                max_attempts: 0,
                ..config()
            },
            DispatcherConfig {
                reporter: Some(reporter::ReporterConfig {
                    requests_per_hour: 0,
                    ..Default::default()
                }),
                ..config()
            },
        ] {
            let e = bad.check().expect_err("refused");
            assert!(matches!(e, Error::InvalidSetting { .. }), "{e}");
            assert_eq!(e.metric_label(), "config");
        }
    }
}
