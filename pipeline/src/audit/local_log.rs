//! Audit events from the gateway's local event log (`<data dir>/events.sqlite`): read by
//! offset; the next offset to read is kept in the same file, in
//! `audit_positions(consumer, next_offset)`, written only after ClickHouse acknowledged.

use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::sqlite::SqlitePool;
use sqlx::Row;

use super::{AuditError, AuditSource};

/// How long an idle log is left alone after an empty read.
const IDLE_BACKOFF: Duration = Duration::from_millis(250);
/// Rows of other topics skipped per read (their payloads are not fetched).
const SCAN_ROWS: i64 = 20_000;

pub struct LocalLogAudit {
    runtime: tokio::runtime::Runtime,
    pool: SqlitePool,
    topic: String,
    consumer: String,
    /// The next offset to read.
    next: i64,
    /// The committed one.
    committed: i64,
    quiet_until: Option<Instant>,
}

impl LocalLogAudit {
    /// Opens the log at `path` and resumes at `consumer`'s committed position (the log's
    /// start the first time).
    pub fn open(path: &Path, topic: &str, consumer: &str) -> Result<LocalLogAudit, AuditError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| AuditError::Invalid(format!("runtime: {e}")))?;
        let pool = runtime.block_on(crate::source::local_log::open_log(path))?;
        runtime.block_on(
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS audit_positions (
                   consumer TEXT PRIMARY KEY, next_offset INTEGER NOT NULL)",
            )
            .execute(&pool),
        )?;
        let next: Option<i64> = runtime.block_on(
            sqlx::query_scalar("SELECT next_offset FROM audit_positions WHERE consumer = ?")
                .bind(consumer)
                .fetch_optional(&pool),
        )?;
        let next = next.unwrap_or(1);
        Ok(LocalLogAudit {
            runtime,
            pool,
            topic: topic.to_string(),
            consumer: consumer.to_string(),
            next,
            committed: next,
            quiet_until: None,
        })
    }
}

impl AuditSource for LocalLogAudit {
    fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Vec<u8>>, AuditError> {
        if self.quiet_until.is_some_and(|t| Instant::now() < t) {
            std::thread::sleep(wait.min(IDLE_BACKOFF));
            return Ok(Vec::new());
        }
        // Every topic is scanned (the log has no index on topic), fetching payloads of the
        // audit topic only, so that the position moves past other events too.
        let rows = self.runtime.block_on(
            sqlx::query(
                "SELECT log_offset, CASE WHEN topic = ? THEN payload END FROM event_log
                 WHERE log_offset >= ? ORDER BY log_offset LIMIT ?",
            )
            .bind(&self.topic)
            .bind(self.next)
            .bind(SCAN_ROWS)
            .fetch_all(&self.pool),
        )?;
        self.quiet_until = rows.is_empty().then(|| Instant::now() + IDLE_BACKOFF);
        let mut out = Vec::new();
        for r in rows {
            let offset: i64 = r.try_get(0)?;
            let payload: Option<String> = r.try_get(1)?;
            if let Some(p) = payload {
                if out.len() >= max {
                    break;
                }
                out.push(p.into_bytes());
            }
            self.next = offset + 1;
        }
        Ok(out)
    }

    fn commit(&mut self) -> Result<(), AuditError> {
        if self.next == self.committed {
            return Ok(());
        }
        self.runtime.block_on(
            sqlx::query(
                "INSERT INTO audit_positions (consumer, next_offset) VALUES (?, ?)
                 ON CONFLICT (consumer) DO UPDATE SET next_offset = excluded.next_offset",
            )
            .bind(&self.consumer)
            .bind(self.next)
            .execute(&self.pool),
        )?;
        self.committed = self.next;
        Ok(())
    }
}

/// Runs the audit consumer over the local log at `path` until `stop` is set.
pub fn run(
    path: &Path,
    topic: &str,
    options: &super::AuditOptions,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), AuditError> {
    let mut source = LocalLogAudit::open(path, topic, "audit")?;
    super::run(&mut source, options, stop)
}
