//! Billing inside the gateway process: the `[billing]` configuration and the embedded pipeline.
//!
//! In the embedded default (`[events] type = "local"`) the gateway runs the same billing
//! pipeline as the `tollgate-pipeline` service ([`tollgate_pipeline`]), in process, on its own
//! OS thread `billing-pipeline`: it reads completions from the local event log, writes the
//! ledger (`usage_minutes`, `usage_periods`, `pipeline_*`) into the store's own database
//! (SQLite `tollgate.db`, or PostgreSQL when the store is there) and publishes live balances to
//! the in-memory [`MemoryBalances`] that [`crate::app::AppState::balances`] hands out.
//!
//! With Kafka (or log-only) events the pipeline cannot run here: `tollgate-pipeline` runs as
//! its own service, and `billing.pipeline` defaults to `off`.
//!
//! Failure and restart: serving never waits on billing. If the pipeline stops with an error
//! ([`PipelineFailed`]: logged and counted in one place), `tollgate_billing_pipeline_up` drops
//! to 0 and the pipeline restarts after a backoff (1 s, doubling up to 30 s, back to 1 s after
//! a run of a minute). A restart resumes from the positions committed with the ledger and drops
//! replayed duplicates, so nothing is counted twice.
//!
//! Lost requests: beside the pipeline, a second thread `billing-recovery` runs the recovery
//! scanner ([`tollgate_pipeline::recovery`]) over the same local log (`billing.recovery`, on by
//! default): a request whose gateway died before writing its completion (SIGKILL mid-stream)
//! gets a recovered completion (`usage.source = recovered`) appended to the log once it has
//! been silent for `billing.orphan_timeout_ms` (5 minutes), billed from its prompt estimate
//! and its last chunk's token count; the pipeline replaces it exactly once should the real
//! completion turn up. The scanner restarts after a failure like the pipeline does.
//!
//! Shutdown: once the HTTP server and the event sink have flushed, [`EmbeddedPipeline::stop`]
//! sets the pipeline's stop flag; the worker reads what the log holds, commits its last epoch
//! and the threads are joined.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tollgate_pipeline::config::{
    AnalyticsSpec, BalanceSpec, LedgerSpec, Options, PipelineConfig, SourceSpec,
};
use tollgate_pipeline::dataflow::PipelineError;
use tollgate_pipeline::recovery::{RecoveryCounters, RecoveryError, RecoveryOptions, Topics};
use tollgate_pipeline::sink::memory::MemoryBalances;
use tollgate_pipeline::Cluster;

use crate::config::ConfigError;
use crate::events::EventsConfig;
use crate::metrics::BillingMetrics;
use crate::store::LedgerLocation;
pub use tollgate_pipeline::metrics::RecoveryCollector;

/// First wait before a failed pipeline is restarted.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A run at least this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// `[billing]`: whether this gateway runs the billing pipeline, and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// `embedded` or `off`. Unset: `embedded` with the local event log, else `off`.
    pub pipeline: Option<PipelineMode>,
    /// Epoch length: completions read within one epoch are committed together, so this is
    /// about how far the ledger trails the requests.
    pub epoch_ms: u64,
    /// How long (in event time) event ids are remembered to drop duplicates.
    pub dedup_horizon_ms: u64,
    /// Whether the embedded pipeline also recovers the completions of requests a gateway
    /// lost (crashed mid-request).
    pub recovery: bool,
    /// A request silent this long without a completion is recovered; keep it well above the
    /// longest stream.
    pub orphan_timeout_ms: u64,
}

impl Default for BillingConfig {
    fn default() -> Self {
        BillingConfig {
            pipeline: None,
            epoch_ms: 200,
            dedup_horizon_ms: 6 * 3600 * 1000,
            recovery: true,
            orphan_timeout_ms: 300_000,
        }
    }
}

/// `billing.pipeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineMode {
    /// Run the pipeline in this process over the local event log.
    Embedded,
    /// Do not run it here (it runs as its own service, or billing is not wanted).
    Off,
}

impl BillingConfig {
    /// The mode in force with these events: the configured one, else the default.
    pub fn mode(&self, events: &EventsConfig) -> PipelineMode {
        match (self.pipeline, events) {
            (Some(mode), _) => mode,
            (None, EventsConfig::Local(_)) => PipelineMode::Embedded,
            (None, EventsConfig::Kafka(_) | EventsConfig::Log) => PipelineMode::Off,
        }
    }

    /// Refuses settings the embedded pipeline cannot honour, naming the key.
    pub fn validate(&self, events: &EventsConfig) -> Result<(), ConfigError> {
        if self.epoch_ms == 0 {
            return Err(ConfigError::Invalid(
                "billing.epoch_ms must be at least 1".to_string(),
            ));
        }
        if i64::try_from(self.dedup_horizon_ms).is_err() {
            return Err(ConfigError::Invalid(
                "billing.dedup_horizon_ms is too large".to_string(),
            ));
        }
        if self.orphan_timeout_ms < 1000 || i64::try_from(self.orphan_timeout_ms).is_err() {
            return Err(ConfigError::Invalid(
                "billing.orphan_timeout_ms must be between 1000 and 2^63 - 1 (and well above \
                 the longest stream)"
                    .to_string(),
            ));
        }
        if self.mode(events) == PipelineMode::Off {
            return Ok(());
        }
        match events {
            EventsConfig::Local(local) => {
                let default = tollgate_schemas::events::topics::COMPLETIONS;
                if local.completions_topic != default {
                    return Err(ConfigError::Invalid(format!(
                        "billing.pipeline = \"embedded\" reads the `{default}` topic of the local \
                         event log, but events.completions_topic is `{}`: keep the default or set \
                         billing.pipeline = \"off\"",
                        local.completions_topic
                    )));
                }
                Ok(())
            }
            EventsConfig::Kafka(_) | EventsConfig::Log => Err(ConfigError::Invalid(
                "billing.pipeline = \"embedded\" needs events.type = \"local\" (it reads the local \
                 event log); with other events run `tollgate-pipeline` as its own service and \
                 set billing.pipeline = \"off\""
                    .to_string(),
            )),
        }
    }

    fn options(&self, stop: Arc<AtomicBool>) -> Options {
        Options {
            epoch_ms: self.epoch_ms,
            dedup_horizon_ms: i64::try_from(self.dedup_horizon_ms).unwrap_or(i64::MAX),
            stop: Some(stop),
            ..Options::default()
        }
    }

    fn recovery_options(&self, events: &EventsConfig) -> RecoveryOptions {
        let topics = match events {
            EventsConfig::Local(local) => Topics {
                requests: local.requests_topic.clone(),
                chunks: local.chunks_topic.clone(),
                completions: local.completions_topic.clone(),
            },
            EventsConfig::Kafka(_) | EventsConfig::Log => Topics::default(),
        };
        RecoveryOptions {
            orphan_timeout_ms: i64::try_from(self.orphan_timeout_ms).unwrap_or(i64::MAX),
            topics,
            ..RecoveryOptions::default()
        }
    }
}

/// The pipeline stopped with an error: logs it (the error names no secret: sqlx and the
/// pipeline's errors do not carry connection URLs) and counts it, in one place.
pub struct PipelineFailed<'a> {
    pub error: &'a PipelineError,
    /// When it will be restarted.
    pub retry_in: Duration,
}

impl PipelineFailed<'_> {
    fn emit(&self, metrics: &BillingMetrics) {
        metrics.up.set(0);
        metrics.failures.inc();
        tracing::error!(
            error = %self.error,
            retry_in_ms = u64::try_from(self.retry_in.as_millis()).unwrap_or(u64::MAX),
            "billing pipeline failed; the ledger is behind until it restarts"
        );
    }
}

/// The recovery scanner stopped with an error: logged and counted in one place.
pub struct RecoveryFailed<'a> {
    pub error: &'a RecoveryError,
    pub retry_in: Duration,
}

impl RecoveryFailed<'_> {
    fn emit(&self, metrics: &BillingMetrics) {
        metrics.failures.inc();
        tracing::error!(
            error = %self.error,
            retry_in_ms = u64::try_from(self.retry_in.as_millis()).unwrap_or(u64::MAX),
            "recovery scanner failed; lost requests are recovered once it restarts"
        );
    }
}

/// The billing pipeline (and the recovery scanner) running on their own threads, restarted
/// after failures.
pub struct EmbeddedPipeline {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    recovery: Option<JoinHandle<()>>,
    recovery_counters: Arc<RecoveryCounters>,
}

impl EmbeddedPipeline {
    /// Starts the pipeline over the local event log at `log_path` (with the topic names of
    /// `events`), writing the ledger at `ledger` and balances to `balances`; and the recovery
    /// scanner over the same log, unless `billing.recovery` is off.
    pub fn start(
        config: &BillingConfig,
        events: &EventsConfig,
        log_path: &Path,
        ledger: LedgerLocation,
        balances: MemoryBalances,
        metrics: BillingMetrics,
    ) -> std::io::Result<EmbeddedPipeline> {
        let stop = Arc::new(AtomicBool::new(false));
        let pipeline = PipelineConfig {
            source: SourceSpec::LocalLog {
                path: log_path.to_path_buf(),
            },
            ledger: match ledger {
                LedgerLocation::Sqlite { data_dir } => LedgerSpec::Sqlite { data_dir },
                LedgerLocation::Postgres { url } => LedgerSpec::Postgres { url },
            },
            balances: BalanceSpec::Memory(balances),
            analytics: AnalyticsSpec::None,
            options: Options {
                metrics: Some(metrics.pipeline.clone()),
                ..config.options(stop.clone())
            },
        };
        let recovery_counters = Arc::new(RecoveryCounters::default());
        let recovery = if config.recovery {
            let (flag, counters, metrics) =
                (stop.clone(), recovery_counters.clone(), metrics.clone());
            let (path, options) = (log_path.to_path_buf(), config.recovery_options(events));
            Some(
                std::thread::Builder::new()
                    .name("billing-recovery".to_string())
                    .spawn(move || {
                        supervise_recovery(&path, &options, &counters, &flag, &metrics)
                    })?,
            )
        } else {
            None
        };
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("billing-pipeline".to_string())
            .spawn(move || supervise(&pipeline, &flag, &metrics))?;
        tracing::info!(
            log = %log_path.display(),
            epoch_ms = config.epoch_ms,
            recovery = config.recovery,
            orphan_timeout_ms = config.orphan_timeout_ms,
            "embedded billing pipeline started"
        );
        Ok(EmbeddedPipeline {
            stop,
            thread: Some(thread),
            recovery,
            recovery_counters,
        })
    }

    /// What the recovery scanner did so far.
    pub fn recovery_counters(&self) -> &RecoveryCounters {
        &self.recovery_counters
    }

    /// The recovery scanner's counters as Prometheus metrics (read at each scrape).
    pub fn recovery_collector(&self) -> Result<RecoveryCollector, prometheus::Error> {
        RecoveryCollector::new(self.recovery_counters.clone())
    }

    /// Asks the pipeline to stop without waiting for it.
    fn signal(&self) {
        self.stop.store(true, Ordering::Release);
        // Cuts a restart backoff short.
        for t in [&self.thread, &self.recovery].into_iter().flatten() {
            t.thread().unpark();
        }
    }

    /// Stops the pipeline and waits until its last epoch is committed.
    pub async fn stop(mut self) {
        self.signal();
        if let Some(thread) = self.recovery.take() {
            match tokio::task::spawn_blocking(move || thread.join()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => {
                    tracing::error!("the recovery scanner thread ended abnormally");
                }
            }
        }
        if let Some(thread) = self.thread.take() {
            match tokio::task::spawn_blocking(move || thread.join()).await {
                Ok(Ok(())) => tracing::info!("embedded billing pipeline stopped"),
                Ok(Err(_)) | Err(_) => {
                    tracing::error!("the billing pipeline thread ended abnormally");
                }
            }
        }
    }
}

impl Drop for EmbeddedPipeline {
    /// Dropped without [`EmbeddedPipeline::stop`] (tests): still stop, but do not wait.
    fn drop(&mut self) {
        self.signal();
    }
}

/// The `billing-pipeline` thread: runs the pipeline until the stop flag is set, restarting it
/// with a backoff when it fails.
fn supervise(config: &PipelineConfig, stop: &AtomicBool, metrics: &BillingMetrics) {
    let mut backoff = FIRST_BACKOFF;
    while !stop.load(Ordering::Acquire) {
        metrics.up.set(1);
        let started = Instant::now();
        let result = tollgate_pipeline::execute(config.clone(), &Cluster::local(1));
        if started.elapsed() >= HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        let error = match result {
            Ok(reports) if stop.load(Ordering::Acquire) => {
                for r in reports {
                    tracing::debug!(
                        records = r.records,
                        commits = r.commits,
                        events = r.events_committed,
                        "billing pipeline worker stopped"
                    );
                }
                break;
            }
            // The local log never runs dry, so a return without the stop flag is a fault.
            Ok(_) => PipelineError::Setup("stopped without being asked to".to_string()),
            Err(e) => e,
        };
        PipelineFailed {
            error: &error,
            retry_in: backoff,
        }
        .emit(metrics);
        sleep_unless_stopped(backoff, stop);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
    metrics.up.set(0);
}

/// The `billing-recovery` thread: runs the recovery scanner until the stop flag is set,
/// restarting it with a backoff when it fails (it rebuilds its state from the log).
fn supervise_recovery(
    log_path: &Path,
    options: &RecoveryOptions,
    counters: &Arc<RecoveryCounters>,
    stop: &AtomicBool,
    metrics: &BillingMetrics,
) {
    let mut backoff = FIRST_BACKOFF;
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        let result =
            tollgate_pipeline::recovery::local_log::run(log_path, options, counters.clone(), stop);
        if started.elapsed() >= HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        let Err(error) = result else {
            break;
        };
        RecoveryFailed {
            error: &error,
            retry_in: backoff,
        }
        .emit(metrics);
        sleep_unless_stopped(backoff, stop);
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Sleeps for `wait`, or less if `stop` gets set (the setter unparks this thread).
fn sleep_unless_stopped(wait: Duration, stop: &AtomicBool) {
    let until = Instant::now() + wait;
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::park_timeout(left);
    }
}

/// The local log path the embedded pipeline reads, when the mode and the sink allow it.
pub fn embedded_log_path(
    config: &BillingConfig,
    events: &EventsConfig,
    sink_log: Option<&Path>,
) -> Option<PathBuf> {
    if config.mode(events) != PipelineMode::Embedded {
        return None;
    }
    match sink_log {
        Some(p) => Some(p.to_path_buf()),
        None => {
            // Only an injected sink (tests) gets here: the configured local sink has a log.
            tracing::warn!(
                "billing.pipeline is embedded but the event sink has no local log: \
                 the embedded billing pipeline is not started"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::config::Config;

    #[test]
    fn embedded_is_the_default_with_local_events_only() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.billing.mode(&c.events), PipelineMode::Embedded);
        assert_eq!(c.billing.epoch_ms, 200);
        assert_eq!(c.billing.dedup_horizon_ms, 21_600_000);
        assert!(c.billing.recovery);
        assert_eq!(c.billing.orphan_timeout_ms, 300_000);
        let c = Config::from_toml("[events]\ntype = \"kafka\"\n").unwrap();
        assert_eq!(c.billing.mode(&c.events), PipelineMode::Off);
        let c = Config::from_toml("[events]\ntype = \"log\"\n").unwrap();
        assert_eq!(c.billing.mode(&c.events), PipelineMode::Off);
        let c = Config::from_toml("[billing]\npipeline = \"off\"\nepoch_ms = 50\n").unwrap();
        assert_eq!(c.billing.mode(&c.events), PipelineMode::Off);
        assert_eq!(c.billing.epoch_ms, 50);
    }

    #[test]
    fn embedded_with_kafka_is_an_error_naming_the_key() {
        let err =
            Config::from_toml("[billing]\npipeline = \"embedded\"\n[events]\ntype = \"kafka\"\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains("billing.pipeline"), "{err}");
        let err = Config::from_toml("[events]\ntype = \"local\"\ncompletions_topic = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("events.completions_topic"), "{err}");
        // Off: any topic is fine.
        Config::from_toml(
            "[billing]\npipeline = \"off\"\n[events]\ntype = \"local\"\ncompletions_topic = \"x\"\n",
        )
        .unwrap();
    }

    #[test]
    fn typos_and_bad_values_name_the_key() {
        let err = Config::from_toml("[billing]\nepoch = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("epoch"), "{err}");
        let err = Config::from_toml("[billing]\npipeline = \"on\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("on"), "{err}");
        let err = Config::from_toml("[billing]\nepoch_ms = 0\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("billing.epoch_ms"), "{err}");
        let err = Config::from_toml("[billing]\norphan_timeout_ms = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("billing.orphan_timeout_ms"), "{err}");
        let c =
            Config::from_toml("[billing]\nrecovery = false\norphan_timeout_ms = 600000\n").unwrap();
        assert!(!c.billing.recovery);
    }

    #[test]
    fn the_recovery_counters_are_exported_when_scraped() {
        use prometheus::core::Collector;
        let counters = Arc::new(RecoveryCounters::default());
        let collector = RecoveryCollector::new(counters.clone()).unwrap();
        assert_eq!(collector.desc().len(), 4);
        counters.published.fetch_add(3, Ordering::Relaxed);
        counters.evicted.fetch_add(2, Ordering::Relaxed);
        let value = |name: &str| {
            collector
                .collect()
                .into_iter()
                .find(|f| f.name() == name)
                .map(|f| f.get_metric()[0].get_counter().get_value())
        };
        assert_eq!(value("tollgate_billing_recovered_total"), Some(3.0));
        assert_eq!(value("tollgate_billing_recovery_evicted_total"), Some(2.0));
        counters.published.fetch_add(1, Ordering::Relaxed);
        assert_eq!(value("tollgate_billing_recovered_total"), Some(4.0));
        assert_eq!(
            value("tollgate_billing_recovery_unrecoverable_total"),
            Some(0.0)
        );
    }

    #[tokio::test]
    async fn a_failing_pipeline_is_counted_restarted_and_still_stops() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = crate::metrics::Metrics::new().unwrap().billing().unwrap();
        // A ledger directory that cannot be created: every run fails at once.
        let pipeline = EmbeddedPipeline::start(
            &BillingConfig::default(),
            &crate::config::Config::from_toml("").unwrap().events,
            &dir.path().join("events.sqlite"),
            LedgerLocation::Sqlite {
                data_dir: PathBuf::from("/dev/null/ledger"),
            },
            MemoryBalances::new(),
            metrics.clone(),
        )
        .unwrap();
        // The first restart comes after the first backoff (1 s).
        for _ in 0..200 {
            if metrics.failures.get() >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(metrics.failures.get() >= 2, "restarted after a failure");
        // Stopping cuts the (now 2 s) backoff short and joins the thread.
        pipeline.stop().await;
        assert_eq!(metrics.up.get(), 0);
    }
}
