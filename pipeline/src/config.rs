//! What the pipeline reads and where it writes: built from the `tollgate-pipeline` flags, or
//! by the gateway for the embedded pipeline.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::fact::SourceRecord;
use crate::metrics::PipelineMetrics;
use crate::sink::memory::MemoryBalances;

/// Where completion events come from.
#[derive(Clone)]
pub enum SourceSpec {
    Kafka {
        bootstrap: String,
        topic: String,
        group: String,
    },
    /// The gateway's local event log file (`<data dir>/events.sqlite`).
    LocalLog { path: PathBuf },
    /// Records in memory (tests, the dataflow benchmark).
    Memory(Arc<Vec<SourceRecord>>),
}

/// The ledger.
#[derive(Clone)]
pub enum LedgerSpec {
    Postgres {
        url: String,
    },
    /// `<data_dir>/tollgate.db`.
    Sqlite {
        data_dir: PathBuf,
    },
    /// No ledger: results are counted and dropped (the dataflow benchmark).
    Discard,
}

/// Live balances.
#[derive(Clone)]
pub enum BalanceSpec {
    Redis { url: String, prefix: String },
    Memory(MemoryBalances),
    None,
}

/// Analytics tables.
#[derive(Clone)]
pub enum AnalyticsSpec {
    ClickHouse { url: String, database: String },
    None,
}

/// A crash injected by tests: the process aborts right after the n-th ledger commit of its
/// life, before balances and analytics are written.
#[derive(Clone, Copy, Debug)]
pub struct AbortAfterCommit(pub u64);

/// How the dataflow runs.
#[derive(Clone)]
pub struct Options {
    /// Length of an epoch: records read within it are committed together.
    pub epoch_ms: u64,
    /// Event ids are remembered this long (in event time) to drop duplicates.
    pub dedup_horizon_ms: i64,
    /// Records read per poll.
    pub max_poll_records: usize,
    /// How often worker 0 re-reads the price book.
    pub price_refresh_ms: u64,
    /// Epochs the source may run ahead of the ledger commit.
    pub max_epochs_in_flight: u64,
    /// Stop once no record has arrived for this long (benchmarks, tests); run forever if None.
    pub exit_when_idle_ms: Option<u64>,
    /// Stop when set (the embedded pipeline's shutdown): the worker first reads what its
    /// source holds at that moment, then commits it all and returns.
    pub stop: Option<Arc<AtomicBool>>,
    pub abort_after_commit: Option<AbortAfterCommit>,
    /// Where the workers and the committer count what they do (none: not counted).
    pub metrics: Option<PipelineMetrics>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            epoch_ms: 200,
            dedup_horizon_ms: 6 * 3600 * 1000,
            max_poll_records: 4096,
            price_refresh_ms: 1000,
            max_epochs_in_flight: 10,
            exit_when_idle_ms: None,
            stop: None,
            abort_after_commit: None,
            metrics: None,
        }
    }
}

/// Everything a worker needs to build and run its part of the pipeline.
#[derive(Clone)]
pub struct PipelineConfig {
    pub source: SourceSpec,
    pub ledger: LedgerSpec,
    pub balances: BalanceSpec,
    pub analytics: AnalyticsSpec,
    pub options: Options,
}
