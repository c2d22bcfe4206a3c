//! The pipeline's Prometheus metrics: what it read, dropped and committed, how far behind the
//! events it is, and how its sinks fare. `tollgate-pipeline --metrics-listen ADDR` serves them
//! at `GET /metrics` ([`serve`]); the gateway registers the same collectors when it runs the
//! pipeline embedded. Labels are bounded: a record kind and the worker index.
//!
//! | metric | set where |
//! |---|---|
//! | `tollgate_pipeline_records_read_total{kind}` | the worker loop, per poll (`live`, or `replay`: re-read after a restart to remember event ids) |
//! | `tollgate_pipeline_duplicates_dropped_total` | the ledger commit (duplicates the batch dropped) |
//! | `tollgate_pipeline_rejected_events_total` | the ledger commit (records that are not valid completions, kept in the ledger's rejects) |
//! | `tollgate_pipeline_events_committed_total`, `tollgate_pipeline_commits_total` | the ledger commit |
//! | `tollgate_pipeline_ledger_commit_seconds` | the ledger transaction |
//! | `tollgate_pipeline_ledger_commit_failures_total` | the ledger transaction (the pipeline then stops and restarts from the ledger) |
//! | `tollgate_pipeline_balance_publish_failures_total` | balances to Redis (retried by a refresh) |
//! | `tollgate_pipeline_analytics_write_failures_total` | analytics to ClickHouse (left in the outbox) |
//! | `tollgate_pipeline_epochs_in_flight{worker}` | the worker loop: epochs read but not yet committed |
//! | `tollgate_pipeline_watermark_lag_seconds` | the ledger commit: commit time minus the newest event time it covers |
//! | `tollgate_pipeline_last_commit_timestamp_seconds` | the ledger commit |
//! | `tollgate_billing_recovered_total` and the other `tollgate_billing_recovery_*` | the recovery scanner ([`RecoveryCollector`]) |

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::recovery::RecoveryCounters;
use crate::sink::LedgerBatch;

/// Buckets of the ledger commit latency, 1 ms to 1 minute.
const COMMIT_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The pipeline's metrics. Cloning shares them (every worker of a process updates the same).
#[derive(Clone)]
pub struct PipelineMetrics {
    records_read: IntCounterVec,
    duplicates: IntCounter,
    rejected: IntCounter,
    events_committed: IntCounter,
    commits: IntCounter,
    commit_seconds: Histogram,
    commit_failures: IntCounter,
    balance_publish_failures: IntCounter,
    analytics_write_failures: IntCounter,
    epochs_in_flight: IntGaugeVec,
    watermark_lag: Gauge,
    last_commit: Gauge,
}

impl PipelineMetrics {
    pub fn new() -> Result<PipelineMetrics, prometheus::Error> {
        let counter = |name: &str, help: &str| IntCounter::new(name, help);
        Ok(PipelineMetrics {
            records_read: IntCounterVec::new(
                Opts::new(
                    "tollgate_pipeline_records_read_total",
                    "Completion events read from the source, by kind (live, or replay: re-read after a restart to remember event ids)",
                ),
                &["kind"],
            )?,
            duplicates: counter(
                "tollgate_pipeline_duplicates_dropped_total",
                "Completion events dropped as duplicates (same event id, or a recovered completion after the real one)",
            )?,
            rejected: counter(
                "tollgate_pipeline_rejected_events_total",
                "Records that are not valid completion events (kept in the ledger's rejects table)",
            )?,
            events_committed: counter(
                "tollgate_pipeline_events_committed_total",
                "Completions billed in committed ledger transactions",
            )?,
            commits: counter(
                "tollgate_pipeline_commits_total",
                "Ledger transactions committed",
            )?,
            commit_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_pipeline_ledger_commit_seconds",
                    "Duration of one ledger transaction (rows and source positions)",
                )
                .buckets(COMMIT_BUCKETS.to_vec()),
            )?,
            commit_failures: counter(
                "tollgate_pipeline_ledger_commit_failures_total",
                "Ledger transactions that failed (the pipeline stops and restarts from the ledger)",
            )?,
            balance_publish_failures: counter(
                "tollgate_pipeline_balance_publish_failures_total",
                "Balance publications that failed (retried with a full refresh)",
            )?,
            analytics_write_failures: counter(
                "tollgate_pipeline_analytics_write_failures_total",
                "Analytics batches that failed to write (left in the ledger's outbox, retried)",
            )?,
            epochs_in_flight: IntGaugeVec::new(
                Opts::new(
                    "tollgate_pipeline_epochs_in_flight",
                    "Epochs a worker has read but the ledger has not committed yet",
                ),
                &["worker"],
            )?,
            watermark_lag: Gauge::new(
                "tollgate_pipeline_watermark_lag_seconds",
                "At the last commit that moved a source position: commit time minus the newest event time committed",
            )?,
            last_commit: Gauge::new(
                "tollgate_pipeline_last_commit_timestamp_seconds",
                "Unix time of the last ledger commit",
            )?,
        })
    }

    /// The collectors, to register in a registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.records_read.clone()),
            Box::new(self.duplicates.clone()),
            Box::new(self.rejected.clone()),
            Box::new(self.events_committed.clone()),
            Box::new(self.commits.clone()),
            Box::new(self.commit_seconds.clone()),
            Box::new(self.commit_failures.clone()),
            Box::new(self.balance_publish_failures.clone()),
            Box::new(self.analytics_write_failures.clone()),
            Box::new(self.epochs_in_flight.clone()),
            Box::new(self.watermark_lag.clone()),
            Box::new(self.last_commit.clone()),
        ]
    }

    /// Records read by one poll.
    pub fn read(&self, live: u64, replay: u64) {
        if live > 0 {
            self.records_read.with_label_values(&["live"]).inc_by(live);
        }
        if replay > 0 {
            self.records_read
                .with_label_values(&["replay"])
                .inc_by(replay);
        }
    }

    /// Epochs worker `worker` has read ahead of the ledger.
    pub fn epochs_in_flight(&self, worker: usize, epochs: u64) {
        self.epochs_in_flight
            .with_label_values(&[&worker.to_string()])
            .set(i64::try_from(epochs).unwrap_or(i64::MAX));
    }

    /// A ledger transaction of `batch` that took `took`.
    pub fn committed(&self, batch: &LedgerBatch, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.commits.inc();
        self.events_committed.inc_by(batch.events);
        self.duplicates.inc_by(batch.duplicates);
        self.rejected.inc_by(batch.rejects.len() as u64);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_commit.set(now.as_secs_f64());
        if let Some(newest) = batch.positions.iter().map(|p| p.max_event_ms).max() {
            let lag_ms = i64::try_from(now.as_millis()).unwrap_or(i64::MAX) - newest;
            // An event stamped in the future (clock skew) is no lag.
            self.watermark_lag.set(lag_ms.max(0) as f64 / 1000.0);
        }
    }

    /// A ledger transaction that failed (after `took`).
    pub fn commit_failed(&self, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.commit_failures.inc();
    }

    pub fn balance_publish_failed(&self) {
        self.balance_publish_failures.inc();
    }

    pub fn analytics_write_failed(&self) {
        self.analytics_write_failures.inc();
    }
}

/// `tollgate_billing_recovered_total`, `..._recovery_evicted_total`,
/// `..._recovery_unrecoverable_total` and `..._recovery_publish_failures_total`: the
/// recovery scanner's own atomic counters, copied into Prometheus counters when scraped.
pub struct RecoveryCollector {
    counters: Arc<RecoveryCounters>,
    published: IntCounter,
    evicted: IntCounter,
    unrecoverable: IntCounter,
    publish_failures: IntCounter,
}

impl RecoveryCollector {
    pub fn new(counters: Arc<RecoveryCounters>) -> Result<RecoveryCollector, prometheus::Error> {
        Ok(RecoveryCollector {
            counters,
            published: IntCounter::new(
                "tollgate_billing_recovered_total",
                "Recovered completions published for requests a gateway lost (re-publishes included)",
            )?,
            evicted: IntCounter::new(
                "tollgate_billing_recovery_evicted_total",
                "Open requests the recovery scanner evicted at its memory bound (not recovered)",
            )?,
            unrecoverable: IntCounter::new(
                "tollgate_billing_recovery_unrecoverable_total",
                "Requests seen only by their chunks that timed out (nothing to recover them from)",
            )?,
            publish_failures: IntCounter::new(
                "tollgate_billing_recovery_publish_failures_total",
                "Recovered completions that failed to publish (retried)",
            )?,
        })
    }

    fn pairs(&self) -> [(&IntCounter, &std::sync::atomic::AtomicU64); 4] {
        let c = &self.counters;
        [
            (&self.published, &c.published),
            (&self.evicted, &c.evicted),
            (&self.unrecoverable, &c.unrecoverable),
            (&self.publish_failures, &c.publish_failures),
        ]
    }
}

impl Collector for RecoveryCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.pairs()
            .into_iter()
            .flat_map(|(m, _)| m.desc())
            .collect()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.pairs()
            .into_iter()
            .flat_map(|(m, value)| {
                m.reset();
                m.inc_by(value.load(Ordering::Relaxed));
                m.collect()
            })
            .collect()
    }
}

/// The Prometheus text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    if TextEncoder::new()
        .encode(&registry.gather(), &mut buf)
        .is_err()
    {
        return String::new();
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// Why the metrics listener could not start.
#[derive(Debug, thiserror::Error)]
#[error("metrics listener on {addr}: {source}")]
pub struct ServeError {
    addr: String,
    source: std::io::Error,
}

/// Serves `GET /metrics` (and `GET /healthz`) for `registry` on `addr`, on a thread of its
/// own with a one-threaded runtime, until the process ends. Returns the bound address once it
/// listens (so `127.0.0.1:0` works in tests).
pub fn serve(addr: &str, registry: Registry) -> Result<SocketAddr, ServeError> {
    let err = |source| ServeError {
        addr: addr.to_string(),
        source,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    let bound = listener.local_addr().map_err(err)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(err)?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let body = render(&registry);
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }));
    std::thread::Builder::new()
        .name("metrics".to_string())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => {
                        if let Err(e) = axum::serve(l, app).await {
                            tracing::error!(error = %e, "metrics listener stopped");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "metrics listener"),
                }
            });
        })
        .map_err(err)?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::sink::Position;

    #[test]
    fn a_commit_counts_its_events_duplicates_rejects_and_lag() {
        let m = PipelineMetrics::new().unwrap();
        let registry = Registry::new();
        for c in m.collectors() {
            registry.register(c).unwrap();
        }
        let now_ms = tollgate_schemas::events::unix_ms(SystemTime::now());
        let batch = LedgerBatch {
            seq: 1,
            events: 5,
            duplicates: 2,
            positions: vec![Position {
                partition: 0,
                next_offset: 7,
                max_event_ms: now_ms - 3_000,
            }],
            ..LedgerBatch::default()
        };
        m.read(7, 1);
        m.committed(&batch, Duration::from_millis(4));
        m.epochs_in_flight(0, 2);
        let text = render(&registry);
        for line in [
            "tollgate_pipeline_events_committed_total 5",
            "tollgate_pipeline_duplicates_dropped_total 2",
            "tollgate_pipeline_rejected_events_total 0",
            "tollgate_pipeline_commits_total 1",
            "tollgate_pipeline_records_read_total{kind=\"live\"} 7",
            "tollgate_pipeline_records_read_total{kind=\"replay\"} 1",
            "tollgate_pipeline_epochs_in_flight{worker=\"0\"} 2",
            "tollgate_pipeline_ledger_commit_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing in:\n{text}");
        }
        let lag: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tollgate_pipeline_watermark_lag_seconds "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((3.0..60.0).contains(&lag), "lag {lag}");
    }
}
