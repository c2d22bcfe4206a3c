//! The recovery scanner over the gateway's local event log (`<data dir>/events.sqlite`, the
//! embedded default): reads the three topics in log order, appends recovered completions to
//! the same table as the gateway's sink does (its own transaction; SQLite serializes writers).

use std::path::Path;
use std::time::{Duration, Instant};

use sqlx::sqlite::SqlitePool;
use sqlx::Row;
use tollgate_schemas::events::CompletionEvent;

use super::{EventLog, LogEvent, RecoveryError, Topic, Topics};

/// How long an idle log is left alone after an empty read.
const IDLE_BACKOFF: Duration = Duration::from_millis(250);

pub struct LocalLogEvents {
    runtime: tokio::runtime::Runtime,
    pool: SqlitePool,
    topics: Topics,
    next: i64,
    quiet_until: Option<Instant>,
}

impl LocalLogEvents {
    /// Opens the log at `path` (created if missing).
    pub fn open(path: &Path, topics: Topics) -> Result<LocalLogEvents, RecoveryError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| RecoveryError::Invalid(format!("runtime: {e}")))?;
        let pool = runtime.block_on(crate::source::local_log::open_log(path))?;
        Ok(LocalLogEvents {
            runtime,
            pool,
            topics,
            next: 0,
            quiet_until: None,
        })
    }

    fn topic(&self, name: &str) -> Option<Topic> {
        if name == self.topics.requests {
            Some(Topic::Requests)
        } else if name == self.topics.chunks {
            Some(Topic::Chunks)
        } else if name == self.topics.completions {
            Some(Topic::Completions)
        } else {
            None
        }
    }
}

impl EventLog for LocalLogEvents {
    fn newest_ms(&mut self) -> Result<Option<i64>, RecoveryError> {
        // The newest rows are at the end of the log; event times are nearly ordered there.
        Ok(self.runtime.block_on(
            sqlx::query_scalar(
                "SELECT max(timestamp_ms) FROM (
                   SELECT timestamp_ms FROM event_log ORDER BY log_offset DESC LIMIT 10000)",
            )
            .fetch_one(&self.pool),
        )?)
    }

    fn seek(&mut self, since_ms: i64) -> Result<(), RecoveryError> {
        // A full scan, once per start (the log has no index on time).
        let first: Option<i64> = self.runtime.block_on(
            sqlx::query_scalar("SELECT min(log_offset) FROM event_log WHERE timestamp_ms >= ?")
                .bind(since_ms)
                .fetch_one(&self.pool),
        )?;
        self.next = match first {
            Some(offset) => offset,
            None => self.runtime.block_on(
                sqlx::query_scalar("SELECT COALESCE(MAX(log_offset), 0) + 1 FROM event_log")
                    .fetch_one(&self.pool),
            )?,
        };
        Ok(())
    }

    fn poll(
        &mut self,
        max: usize,
        wait: Duration,
        out: &mut Vec<LogEvent>,
    ) -> Result<(), RecoveryError> {
        if self.quiet_until.is_some_and(|t| Instant::now() < t) {
            std::thread::sleep(wait.min(IDLE_BACKOFF));
            return Ok(());
        }
        let rows = self.runtime.block_on(
            sqlx::query(
                "SELECT log_offset, topic, timestamp_ms, payload FROM event_log
                 WHERE log_offset >= ? ORDER BY log_offset LIMIT ?",
            )
            .bind(self.next)
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&self.pool),
        )?;
        if rows.is_empty() {
            self.quiet_until = Some(Instant::now() + IDLE_BACKOFF);
        } else {
            self.quiet_until = None;
        }
        for r in rows {
            let offset: i64 = r.try_get(0)?;
            self.next = offset + 1;
            let name: String = r.try_get(1)?;
            let Some(topic) = self.topic(&name) else {
                continue;
            };
            out.push(LogEvent {
                topic,
                timestamp_ms: r.try_get(2)?,
                payload: r.try_get::<String, _>(3)?.into_bytes(),
            });
        }
        Ok(())
    }

    fn publish(
        &mut self,
        completion: &CompletionEvent,
        timestamp_ms: i64,
    ) -> Result<(), RecoveryError> {
        let payload = serde_json::to_string(completion)
            .map_err(|e| RecoveryError::Invalid(format!("serializing a completion: {e}")))?;
        self.runtime.block_on(
            sqlx::query(
                "INSERT INTO event_log (topic, event_key, event_id, timestamp_ms, payload)
                 VALUES (?, ?, ?, ?, ?)",
            )
            .bind(&self.topics.completions)
            .bind(&completion.tenant_id)
            .bind(&completion.event_id)
            .bind(timestamp_ms)
            .bind(payload)
            .execute(&self.pool),
        )?;
        Ok(())
    }
}

/// Runs the scanner over the local log at `path` until `stop` is set.
pub fn run(
    path: &Path,
    options: &super::RecoveryOptions,
    counters: std::sync::Arc<super::RecoveryCounters>,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), RecoveryError> {
    let mut log = LocalLogEvents::open(path, options.topics.clone())?;
    super::run(&mut log, options, counters, stop, &super::wall_ms)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use tollgate_schemas::events::recovered_event_id;
    use tollgate_schemas::UsageSource;

    use super::*;
    use crate::recovery::{RecoveryCounters, RecoveryOptions};

    /// The gateway's rows as its sink writes them: a request and two chunks of a stream cut
    /// by a crash, and a request that completed.
    fn seed(log: &mut LocalLogEvents, now: i64) {
        let rows = [
            (
                "llm.requests",
                "req_cut",
                now - 400_000,
                r#""prompt_tokens_estimate":17"#,
            ),
            ("llm.chunks", "req_cut", now - 399_000, r#""tokens":4"#),
            ("llm.chunks", "req_cut", now - 398_000, r#""tokens":11"#),
            (
                "llm.requests",
                "req_ok",
                now - 397_000,
                r#""prompt_tokens_estimate":5"#,
            ),
            (
                "llm.completions",
                "req_ok",
                now - 396_000,
                r#""status":"completed""#,
            ),
        ];
        for (topic, id, ms, extra) in rows {
            let t = tollgate_schemas::events::format_event_time(
                std::time::UNIX_EPOCH + Duration::from_millis(ms as u64),
            );
            let payload = format!(
                r#"{{"schema_version":1,"event_id":"{}","event_time":"{t}","request_id":"{id}",
                "tenant_id":"ten_1","key_id":"key_1","route":"chat","requested_model":"mock/m",
                "model_alias":"mock/*","deployment":"mock","provider":"mock","upstream_model":"m",
                "stream":true,"received_at":"{t}","sequence":0,"offset_us":0,"bytes":1,{extra}}}"#,
                tollgate_schemas::events::new_event_id()
            );
            log.runtime
                .block_on(
                    sqlx::query(
                        "INSERT INTO event_log (topic, event_key, event_id, timestamp_ms, payload)
                         VALUES (?, 'ten_1', 'x', ?, ?)",
                    )
                    .bind(topic)
                    .bind(ms)
                    .bind(payload)
                    .execute(&log.pool),
                )
                .unwrap();
        }
    }

    #[test]
    fn a_cut_stream_in_the_local_log_gets_one_recovered_completion_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.sqlite");
        let now = crate::recovery::wall_ms();
        let mut log = LocalLogEvents::open(&path, Topics::default()).unwrap();
        seed(&mut log, now);
        // Two scanner runs: the second (a restart) reads the first one's recovered
        // completion back and publishes nothing more.
        for _ in 0..2 {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            let path = path.clone();
            let scanner = std::thread::spawn(move || {
                run(
                    &path,
                    &RecoveryOptions {
                        poll_wait_ms: 10,
                        ..RecoveryOptions::default()
                    },
                    Arc::new(RecoveryCounters::default()),
                    &flag,
                )
            });
            std::thread::sleep(Duration::from_millis(700));
            stop.store(true, Ordering::Release);
            scanner.join().unwrap().unwrap();
        }
        log.seek(0).unwrap();
        let mut events = Vec::new();
        log.poll(100, Duration::ZERO, &mut events).unwrap();
        let recovered: Vec<CompletionEvent> = events
            .iter()
            .filter(|e| e.topic == Topic::Completions)
            .filter_map(|e| serde_json::from_slice::<CompletionEvent>(&e.payload).ok())
            .filter(|c| c.usage.source == UsageSource::Recovered)
            .collect();
        assert_eq!(recovered.len(), 1, "{recovered:?}");
        let c = &recovered[0];
        assert_eq!(c.event_id, recovered_event_id("req_cut"));
        assert_eq!((c.usage.input_tokens, c.usage.output_tokens), (17, 11));
    }
}
