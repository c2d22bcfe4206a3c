//! Where the dataflow's results go, one closed epoch (or several) at a time.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the seams: [`Ledger`], [`BalanceStore`], [`Analytics`]; the batch they receive |
//! | `postgres.rs` | the production ledger: rows and source positions in ONE transaction |
//! | `sqlite.rs` | the embedded ledger (same tables, decimals as text) |
//! | `redis.rs` | live balances in Redis, versioned so they never move backwards |
//! | `memory.rs` | live balances in process memory (embedded default) |
//! | `clickhouse.rs` | request facts and minute rollups in ClickHouse, idempotent per batch |
//! | `committer.rs` | the order of writes per batch and the recovery after a crash |
//!
//! Exactly-once, in one paragraph: the ledger commit is the only point of truth. It writes the
//! aggregate deltas of a batch and the next offset of every source partition in one
//! transaction, so after a crash the source resumes exactly after the last committed batch.
//! Balances are absolute figures read back from that same transaction and stamped with the
//! batch's sequence number; a store keeps a balance only if its stamp is newer. Analytics rows
//! go through an outbox written in the same transaction and are inserted under the batch's
//! sequence number, which is checked before inserting again.

pub mod clickhouse;
pub mod committer;
pub mod memory;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tollgate_schemas::pricing::PriceRow;

use crate::fact::{LineKey, MinuteKey, PeriodKey, PricedFact, Reject, Totals};

/// Errors of any sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ::clickhouse::error::Error),
    #[error("{0}")]
    Invalid(String),
}

/// How far the ledger has consumed one source partition.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Position {
    pub partition: u32,
    /// The offset of the next message to read.
    pub next_offset: i64,
    /// The largest event time (ms) consumed from this partition.
    pub max_event_ms: i64,
}

/// What one ledger transaction writes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LedgerBatch {
    /// Increases with every commit, across restarts: the version of the balances it yields.
    pub seq: u64,
    /// Identifies the source (e.g. `kafka:llm.completions`) whose positions are committed.
    pub source: String,
    pub minutes: Vec<(MinuteKey, Totals)>,
    pub periods: Vec<(PeriodKey, Totals)>,
    /// Invoice-line deltas (booked into the first open period at or after their own).
    pub lines: Vec<(LineKey, Totals)>,
    pub positions: Vec<Position>,
    pub rejects: Vec<Reject>,
    /// Request facts for analytics; written to the outbox in the same transaction when an
    /// analytics sink is configured, empty otherwise.
    pub facts: Vec<PricedFact>,
    /// Completions billed in this batch.
    pub events: u64,
    /// Duplicates (same event id) dropped since the previous batch.
    pub duplicates: u64,
}

impl LedgerBatch {
    /// The batch's analytics rows, as kept in the outbox; `None` when it has none.
    pub fn outbox(&self) -> Option<OutboxBatch> {
        (!self.facts.is_empty() || !self.minutes.is_empty()).then(|| OutboxBatch {
            seq: self.seq,
            facts: self.facts.clone(),
            minutes: self.minutes.clone(),
        })
    }

    /// [`LedgerBatch::outbox`] as the JSON the ledgers store.
    pub fn outbox_payload(&self) -> Result<Option<String>, SinkError> {
        self.outbox()
            .map(|o| {
                serde_json::to_string(&o)
                    .map_err(|e| SinkError::Invalid(format!("outbox payload: {e}")))
            })
            .transpose()
    }
}

/// A tenant's absolute usage in one billing period, as of ledger commit `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub tenant_id: String,
    pub period: String,
    pub currency: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub spend: Decimal,
    pub requests: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub version: u64,
}

/// Analytics rows of one committed batch, kept in the ledger's outbox until written.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OutboxBatch {
    pub seq: u64,
    pub facts: Vec<PricedFact>,
    pub minutes: Vec<(MinuteKey, Totals)>,
}

/// The billing ledger: PostgreSQL in production, SQLite embedded.
#[async_trait::async_trait]
pub trait Ledger: Send + Sync {
    /// Committed positions of `source`'s partitions.
    async fn positions(&self, source: &str) -> Result<Vec<Position>, SinkError>;
    /// The sequence number of the last commit (0 before the first).
    async fn last_seq(&self) -> Result<u64, SinkError>;
    /// Every row of the price book.
    async fn prices(&self) -> Result<Vec<PriceRow>, SinkError>;
    /// Writes `batch` in one transaction (plus an outbox row when `with_outbox`) and returns
    /// the absolute balances of the periods it touched, stamped with `batch.seq`.
    async fn commit(
        &self,
        batch: &LedgerBatch,
        with_outbox: bool,
    ) -> Result<Vec<Balance>, SinkError>;
    /// All balances of `period`, stamped with the last commit's sequence number.
    async fn balances(&self, period: &str) -> Result<Vec<Balance>, SinkError>;
    /// Outbox batches not yet written to analytics, oldest first.
    async fn outbox(&self) -> Result<Vec<OutboxBatch>, SinkError>;
    /// Forgets an outbox batch once analytics has it.
    async fn ack_outbox(&self, seq: u64) -> Result<(), SinkError>;
}

/// The period after `period` (`YYYY-MM`), or `None` if it is malformed.
pub fn next_period(period: &str) -> Option<String> {
    let (y, m) = period.split_once('-')?;
    let (y, m): (i32, u32) = (y.parse().ok()?, m.parse().ok()?);
    if !(1..=12).contains(&m) {
        return None;
    }
    Some(if m == 12 {
        format!("{:04}-01", y + 1)
    } else {
        format!("{:04}-{:02}", y, m + 1)
    })
}

/// Where a line of `period` is booked when the periods in `closed` are closed: its own
/// period if open, else the first open one after it (an adjustment there).
pub fn booking_period(period: &str, closed: &std::collections::HashSet<String>) -> String {
    let mut p = period.to_string();
    // At most as many steps as there are closed periods.
    for _ in 0..=closed.len() {
        if !closed.contains(&p) {
            return p;
        }
        match next_period(&p) {
            Some(n) => p = n,
            None => return p,
        }
    }
    p
}

/// Live balances the gateway's budget checks read: Redis in production, memory embedded.
#[async_trait::async_trait]
pub trait BalanceStore: Send + Sync {
    /// Stores each balance unless the store holds one with a newer or equal version.
    async fn publish(&self, balances: &[Balance]) -> Result<(), SinkError>;
    /// The stored balance of a tenant's period in `currency`.
    async fn get(
        &self,
        tenant_id: &str,
        period: &str,
        currency: &str,
    ) -> Result<Option<Balance>, SinkError>;
}

/// Analytics tables: ClickHouse.
#[async_trait::async_trait]
pub trait Analytics: Send + Sync {
    /// Creates the tables if needed.
    async fn prepare(&self) -> Result<(), SinkError>;
    /// Writes one committed batch; writing the same `seq` again changes nothing.
    async fn write(&self, batch: &OutboxBatch) -> Result<(), SinkError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_closed_periods_go_to_the_first_open_one() {
        assert_eq!(next_period("2026-12").as_deref(), Some("2027-01"));
        assert_eq!(next_period("2026-02").as_deref(), Some("2026-03"));
        assert_eq!(next_period("2026-13"), None);
        let closed: std::collections::HashSet<String> = ["2026-10", "2026-11"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(booking_period("2026-09", &closed), "2026-09");
        assert_eq!(booking_period("2026-10", &closed), "2026-12");
        assert_eq!(booking_period("2026-11", &closed), "2026-12");
    }
}
