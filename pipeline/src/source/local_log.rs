//! The gateway's local event log (`<data dir>/events.sqlite`, table `event_log`, written by
//! the gateway's local event sink): one partition (0) whose offsets are `log_offset`.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;
use tollgate_schemas::events::topics;

use super::{committed, Source, SourceError};

/// Opens (creating, with its schema) the gateway's local event log: one connection, WAL mode.
pub(crate) async fn open_log(path: &Path) -> Result<SqlitePool, sqlx::Error> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await?;
    for statement in tollgate_schemas::events::LOCAL_EVENT_LOG_DDL {
        sqlx::query(statement).execute(&pool).await?;
    }
    Ok(pool)
}
use crate::fact::SourceRecord;
use crate::sink::Position;

pub struct LocalLogSource {
    name: String,
    runtime: tokio::runtime::Runtime,
    pool: Option<SqlitePool>,
    next: i64,
    replay_until: i64,
    /// After an empty read, the log is not queried again before this instant.
    quiet_until: Option<std::time::Instant>,
}

/// How long an idle log is left alone after an empty read (the gateway appends in batches;
/// querying SQLite every couple of milliseconds while idle would cost a core's tenth).
const IDLE_BACKOFF: Duration = Duration::from_millis(25);

impl LocalLogSource {
    /// Opens the log at `path` (created if missing) for worker `index`: only worker 0 reads
    /// the one partition.
    pub fn open(
        path: &Path,
        index: usize,
        positions: &[Position],
        dedup_horizon_ms: i64,
    ) -> Result<LocalLogSource, SourceError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SourceError::Invalid(format!("runtime: {e}")))?;
        let name = format!("local:{}", topics::COMPLETIONS);
        if index != 0 {
            return Ok(LocalLogSource {
                name,
                runtime,
                pool: None,
                next: 0,
                replay_until: 0,
                quiet_until: None,
            });
        }
        let pool = runtime.block_on(open_log(path))?;
        let (next, replay_until) = match committed(positions, 0) {
            Some(c) => {
                let warm: Option<i64> = runtime.block_on(
                    sqlx::query_scalar(
                        "SELECT min(log_offset) FROM event_log WHERE topic = ? AND timestamp_ms >= ?",
                    )
                    .bind(topics::COMPLETIONS)
                    .bind(c.max_event_ms.saturating_sub(dedup_horizon_ms))
                    .fetch_one(&pool),
                )?;
                (
                    warm.map_or(c.next_offset, |w| w.min(c.next_offset)),
                    c.next_offset,
                )
            }
            None => (0, 0),
        };
        Ok(LocalLogSource {
            name,
            runtime,
            pool: Some(pool),
            next,
            replay_until,
            quiet_until: None,
        })
    }
}

impl Source for LocalLogSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn wake(&mut self) {
        self.quiet_until = None;
    }

    fn poll(
        &mut self,
        max: usize,
        wait: Duration,
        out: &mut Vec<SourceRecord>,
    ) -> Result<(), SourceError> {
        let Some(pool) = &self.pool else {
            std::thread::sleep(wait);
            return Ok(());
        };
        if self
            .quiet_until
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            std::thread::sleep(wait);
            return Ok(());
        }
        let rows = self.runtime.block_on(
            sqlx::query(
                "SELECT log_offset, timestamp_ms, payload FROM event_log
                 WHERE topic = ? AND log_offset >= ? ORDER BY log_offset LIMIT ?",
            )
            .bind(topics::COMPLETIONS)
            .bind(self.next)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(pool),
        )?;
        if rows.is_empty() {
            self.quiet_until = Some(std::time::Instant::now() + IDLE_BACKOFF);
            std::thread::sleep(wait);
        } else {
            self.quiet_until = None;
        }
        for r in rows {
            let offset: i64 = r.try_get(0)?;
            out.push(SourceRecord {
                partition: 0,
                offset,
                timestamp_ms: r.try_get(1)?,
                payload: r.try_get::<String, _>(2)?.into_bytes(),
                replay_only: offset < self.replay_until,
            });
            self.next = offset + 1;
        }
        Ok(())
    }
}
