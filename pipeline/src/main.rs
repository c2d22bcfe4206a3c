//! `tollgate-pipeline`: the billing dataflow as a service.
//!
//! Reads `llm.completions` from Kafka (or the gateway's local log), writes the ledger to
//! PostgreSQL (or SQLite), balances to Redis and analytics to ClickHouse. Run several worker
//! threads with `--workers`, and a cluster of processes with `--process I --addresses
//! host:port,host:port,...` (every process gets the same list and its own index).
//!
//! Process 0 also runs the recovery scanner ([`tollgate_pipeline::recovery`]) on a thread of
//! its own, over the same Kafka cluster (or local log): requests a gateway lost get a recovered
//! completion after `--orphan-timeout-ms`. `--no-recovery` turns it off.
//!
//! With `--audit` (and `--clickhouse-url`), process 0 also runs the audit consumer
//! ([`tollgate_pipeline::audit`]) on a thread of its own: the `llm.audit` topic into
//! ClickHouse's `audit_log`, exactly once.
//!
//! `--metrics-listen ADDR` serves Prometheus metrics at `GET /metrics` (see
//! [`tollgate_pipeline::metrics`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

/// The dataflow allocates a few strings per event and frees them an epoch later, from other
/// threads; mimalloc handles that pattern markedly faster than the system allocator
/// (measured with `cargo bench -p tollgate-pipeline --bench dataflow`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use tollgate_pipeline::config::{
    AbortAfterCommit, AnalyticsSpec, BalanceSpec, LedgerSpec, Options, PipelineConfig, SourceSpec,
};
use tollgate_pipeline::metrics::{PipelineMetrics, RecoveryCollector};
use tollgate_pipeline::recovery::{RecoveryCounters, RecoveryOptions, Topics};
use tollgate_pipeline::Cluster;
use tollgate_schemas::events::topics;

#[derive(Parser, Debug)]
#[command(
    name = "tollgate-pipeline",
    version,
    about = "Tollgate's billing pipeline"
)]
struct Args {
    /// Kafka bootstrap servers; read the completions topic from Kafka.
    #[arg(long, env = "KAFKA_BOOTSTRAP", conflicts_with = "local_log")]
    kafka_bootstrap: Option<String>,
    /// The completions topic.
    #[arg(long, default_value = topics::COMPLETIONS)]
    topic: String,
    /// The requests topic (read by the recovery scanner).
    #[arg(long, default_value = topics::REQUESTS)]
    requests_topic: String,
    /// The chunks topic (read by the recovery scanner).
    #[arg(long, default_value = topics::CHUNKS)]
    chunks_topic: String,
    /// Do not run the recovery scanner (requests a gateway lost are then never billed).
    #[arg(long)]
    no_recovery: bool,
    /// A request silent this long without a completion gets a recovered one; keep it well
    /// above the longest stream.
    #[arg(long, default_value_t = 300_000)]
    orphan_timeout_ms: i64,
    /// Kafka consumer group id (offsets are kept in the ledger, not in Kafka).
    #[arg(long, default_value = "tollgate-pipeline")]
    group: String,
    /// Read the gateway's local event log (`<data dir>/events.sqlite`) instead of Kafka.
    #[arg(long)]
    local_log: Option<PathBuf>,
    /// PostgreSQL ledger.
    #[arg(long, env = "DATABASE_URL", conflicts_with = "data_dir")]
    database_url: Option<String>,
    /// SQLite ledger in this data directory (the gateway's `tollgate.db`).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Redis for live balances.
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// Prefix of the balance keys in Redis.
    #[arg(long, default_value = "tollgate:")]
    redis_prefix: String,
    /// ClickHouse HTTP URL for the analytics tables.
    #[arg(long, env = "CLICKHOUSE_URL")]
    clickhouse_url: Option<String>,
    #[arg(long, default_value = "default")]
    clickhouse_database: String,
    /// Run the audit consumer (process 0): the audit topic into ClickHouse's `audit_log`
    /// (needs --clickhouse-url).
    #[arg(long, requires = "clickhouse_url")]
    audit: bool,
    /// The audit topic.
    #[arg(long, default_value = topics::AUDIT)]
    audit_topic: String,
    /// Audit rows older than this many days are removed.
    #[arg(long, default_value_t = 30)]
    audit_retention_days: u32,
    /// Fault injection for crash tests: abort right after the n-th audit insert, before its
    /// read position is committed.
    #[arg(long, env = "TOLLGATE_PIPELINE_ABORT_AFTER_AUDIT_INSERT", hide = true)]
    abort_after_audit_insert: Option<u64>,
    /// Worker threads in this process.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// This process's index in `--addresses`.
    #[arg(long, default_value_t = 0)]
    process: usize,
    /// Comma-separated `host:port` of every process of a cluster.
    #[arg(long, value_delimiter = ',')]
    addresses: Vec<String>,
    /// Epoch length: records read within one are committed together.
    #[arg(long, default_value_t = 200)]
    epoch_ms: u64,
    /// How long (event time) event ids are remembered to drop duplicates.
    #[arg(long, default_value_t = 6 * 3600 * 1000)]
    dedup_horizon_ms: i64,
    /// How often the price book is re-read.
    #[arg(long, default_value_t = 1000)]
    price_refresh_ms: u64,
    /// Exit after this long without a new record (benchmarks, tests).
    #[arg(long)]
    exit_when_idle_ms: Option<u64>,
    /// Serve Prometheus metrics at `GET /metrics` on this address (e.g. `127.0.0.1:9465`);
    /// unset: no metrics listener.
    #[arg(long, env = "TOLLGATE_PIPELINE_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Fault injection for crash tests: abort right after the n-th ledger commit.
    #[arg(long, env = "TOLLGATE_PIPELINE_ABORT_AFTER_COMMIT", hide = true)]
    abort_after_commit: Option<u64>,
    /// Log lines as `text` (coloured on a terminal only) or `json`.
    #[arg(long, value_enum, default_value_t, env = "TOLLGATE_LOG_FORMAT")]
    log_format: tollgate_pipeline::logging::LogFormat,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tollgate_pipeline::logging::init(args.log_format);
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Where the recovery scanner runs.
enum RecoverySpec {
    Kafka { bootstrap: String, group: String },
    LocalLog { path: PathBuf },
}

/// Runs the recovery scanner until `stop` is set, restarting it after a failure (it rebuilds
/// its state from its look-back window): [`supervise`].
fn supervise_recovery(
    spec: &RecoverySpec,
    options: &RecoveryOptions,
    counters: &Arc<RecoveryCounters>,
    stop: &AtomicBool,
) {
    supervise("recovery scanner", stop, || match spec {
        RecoverySpec::Kafka { bootstrap, group } => tollgate_pipeline::recovery::kafka::run(
            bootstrap,
            group,
            options,
            counters.clone(),
            stop,
        ),
        RecoverySpec::LocalLog { path } => {
            tollgate_pipeline::recovery::local_log::run(path, options, counters.clone(), stop)
        }
    });
}

/// Runs the audit consumer until `stop` is set, restarting it after a failure (from its
/// committed position): [`supervise`].
fn supervise_audit(
    spec: &RecoverySpec,
    topic: &str,
    options: &tollgate_pipeline::audit::AuditOptions,
    stop: &AtomicBool,
) {
    supervise("audit consumer", stop, || match spec {
        RecoverySpec::Kafka { bootstrap, group } => {
            tollgate_pipeline::audit::kafka::run(bootstrap, group, topic, options, stop)
        }
        RecoverySpec::LocalLog { path } => {
            tollgate_pipeline::audit::local_log::run(path, topic, options, stop)
        }
    });
}

/// Calls `run` until it returns `Ok` or `stop` is set, logging each failure of `what` and
/// waiting before the next try: 1 s, doubling up to 30 s, back to 1 s after a run that
/// lasted a minute.
fn supervise<E: std::fmt::Display>(
    what: &str,
    stop: &AtomicBool,
    mut run: impl FnMut() -> Result<(), E>,
) {
    let mut backoff = Duration::from_secs(1);
    while !stop.load(Ordering::Acquire) {
        let started = Instant::now();
        let result = run();
        if started.elapsed() >= Duration::from_secs(60) {
            backoff = Duration::from_secs(1);
        }
        let Err(e) = result else {
            break;
        };
        tracing::error!(
            error = %e,
            retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
            "{what} failed"
        );
        let until = Instant::now() + backoff;
        while !stop.load(Ordering::Acquire) && Instant::now() < until {
            std::thread::park_timeout(Duration::from_millis(200));
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Registers the pipeline's and the recovery scanner's metrics and serves them on `addr`.
fn serve_metrics(addr: &str, recovery: &Arc<RecoveryCounters>) -> Result<PipelineMetrics, String> {
    let metrics = PipelineMetrics::new().map_err(|e| e.to_string())?;
    let registry = prometheus::Registry::new();
    let recovery = RecoveryCollector::new(recovery.clone()).map_err(|e| format!("metrics: {e}"))?;
    for c in metrics
        .collectors()
        .into_iter()
        .chain([Box::new(recovery) as Box<dyn prometheus::core::Collector>])
    {
        registry.register(c).map_err(|e| format!("metrics: {e}"))?;
    }
    let bound = tollgate_pipeline::metrics::serve(addr, registry).map_err(|e| e.to_string())?;
    tracing::info!(%bound, "serving metrics at /metrics");
    Ok(metrics)
}

fn run(args: Args) -> Result<(), String> {
    if args.orphan_timeout_ms < 1000 {
        return Err("--orphan-timeout-ms must be at least 1000".into());
    }
    let recovery = match (&args.kafka_bootstrap, &args.local_log) {
        _ if args.no_recovery || args.process != 0 => None,
        (Some(bootstrap), None) => Some(RecoverySpec::Kafka {
            bootstrap: bootstrap.clone(),
            group: format!("{}-recovery", args.group),
        }),
        (None, Some(path)) => Some(RecoverySpec::LocalLog { path: path.clone() }),
        _ => None,
    };
    let audit = match (&args.kafka_bootstrap, &args.local_log, &args.clickhouse_url) {
        _ if !args.audit || args.process != 0 => None,
        (Some(bootstrap), None, Some(url)) => Some((
            RecoverySpec::Kafka {
                bootstrap: bootstrap.clone(),
                group: format!("{}-audit", args.group),
            },
            url.clone(),
        )),
        (None, Some(path), Some(url)) => {
            Some((RecoverySpec::LocalLog { path: path.clone() }, url.clone()))
        }
        _ => None,
    };
    let recovery_options = RecoveryOptions {
        orphan_timeout_ms: args.orphan_timeout_ms,
        topics: Topics {
            requests: args.requests_topic.clone(),
            chunks: args.chunks_topic.clone(),
            completions: args.topic.clone(),
        },
        ..RecoveryOptions::default()
    };
    let source = match (args.kafka_bootstrap, args.local_log) {
        (Some(bootstrap), None) => SourceSpec::Kafka {
            bootstrap,
            topic: args.topic,
            group: args.group,
        },
        (None, Some(path)) => SourceSpec::LocalLog { path },
        _ => return Err("give --kafka-bootstrap (or KAFKA_BOOTSTRAP) or --local-log".into()),
    };
    let ledger = match (args.database_url, args.data_dir) {
        (Some(url), None) => LedgerSpec::Postgres { url },
        (None, Some(data_dir)) => LedgerSpec::Sqlite { data_dir },
        _ => return Err("give --database-url (or DATABASE_URL) or --data-dir".into()),
    };
    let balances = match args.redis_url {
        Some(url) => BalanceSpec::Redis {
            url,
            prefix: args.redis_prefix,
        },
        None => BalanceSpec::None,
    };
    let analytics = match args.clickhouse_url {
        Some(url) => AnalyticsSpec::ClickHouse {
            url,
            database: args.clickhouse_database.clone(),
        },
        None => AnalyticsSpec::None,
    };
    let recovery_counters = Arc::new(RecoveryCounters::default());
    let metrics = match &args.metrics_listen {
        Some(addr) => Some(serve_metrics(addr, &recovery_counters)?),
        None => None,
    };
    let config = PipelineConfig {
        source,
        ledger,
        balances,
        analytics,
        options: Options {
            epoch_ms: args.epoch_ms,
            dedup_horizon_ms: args.dedup_horizon_ms,
            price_refresh_ms: args.price_refresh_ms,
            exit_when_idle_ms: args.exit_when_idle_ms,
            abort_after_commit: args.abort_after_commit.map(AbortAfterCommit),
            metrics,
            ..Options::default()
        },
    };
    let cluster = Cluster {
        workers: args.workers.max(1),
        process: args.process,
        addresses: args.addresses,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let scanner = match recovery {
        Some(spec) => {
            let flag = stop.clone();
            let counters = recovery_counters.clone();
            Some(
                std::thread::Builder::new()
                    .name("recovery".to_string())
                    .spawn(move || supervise_recovery(&spec, &recovery_options, &counters, &flag))
                    .map_err(|e| format!("cannot start the recovery scanner: {e}"))?,
            )
        }
        None => None,
    };
    let audit_thread = match audit {
        Some((spec, url)) => {
            let flag = stop.clone();
            let mut options = tollgate_pipeline::audit::AuditOptions::new(
                &url,
                &args.clickhouse_database,
                args.audit_retention_days,
            );
            options.abort_after_insert = args.abort_after_audit_insert;
            let topic = args.audit_topic.clone();
            Some(
                std::thread::Builder::new()
                    .name("audit".to_string())
                    .spawn(move || supervise_audit(&spec, &topic, &options, &flag))
                    .map_err(|e| format!("cannot start the audit consumer: {e}"))?,
            )
        }
        None => None,
    };
    let result = tollgate_pipeline::execute(config, &cluster).map_err(|e| e.to_string());
    stop.store(true, Ordering::Release);
    if let Some(t) = audit_thread {
        t.thread().unpark();
        if t.join().is_err() {
            tracing::error!("the audit consumer thread ended abnormally");
        }
    }
    if let Some(t) = scanner {
        t.thread().unpark();
        if t.join().is_err() {
            tracing::error!("the recovery scanner thread ended abnormally");
        }
    }
    let reports = result?;
    for r in reports {
        tracing::info!(
            worker = r.index,
            records = r.records,
            commits = r.commits,
            events = r.events_committed,
            "worker stopped"
        );
    }
    Ok(())
}
