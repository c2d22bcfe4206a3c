//! The audit consumer: `llm.audit` events in, ClickHouse's `audit_log` rows out, each event
//! exactly once.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`AuditStore`] (the table: DDL, idempotent inserts, retention, queries), [`run`] (the loop) |
//! | `local_log.rs` | reading the gateway's local event log by offset; the position in the same file |
//! | `kafka.rs` | reading Kafka with a consumer group; offsets committed to Kafka |
//!
//! **Exactly once.** The loop reads a batch, inserts it, and only after ClickHouse acknowledged
//! the insert commits its read position (the local log's `audit_positions` row, or the Kafka
//! group's offsets). A crash between the two re-reads the batch after a restart
//! (at least once); [`AuditStore::write`] first asks ClickHouse which of the batch's events it
//! already holds (by request id and event id, within the batch's time range) and inserts only
//! the others (idempotent), so every event lands once. One writer per table is assumed (as for
//! the analytics sink); two concurrent writers could both insert an event, which the
//! `ReplacingMergeTree` then collapses at its next merge.
//!
//! **Retention.** `TTL ts + INTERVAL <retention_days> DAY` where the server supports TTL
//! (19.6 and later); on every version the loop also drops the daily partitions older than the
//! retention (at start and every hour).
//!
//! A malformed message (not an [`AuditEvent`]) is logged and skipped: the audit trail never
//! blocks on one bad record.

pub mod kafka;
pub mod local_log;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clickhouse::{Client, Compression, Row};
use serde::{Deserialize, Serialize};
use tollgate_schemas::events::{parse_event_time, unix_ms, AuditEvent};

/// The audit table's DDL (`{ttl}` is filled in by [`AuditStore::prepare`]).
const DDL: &str = include_str!("../../../schemas/clickhouse/0002_audit.sql");

/// How often expired partitions are dropped.
const EXPIRE_EVERY: Duration = Duration::from_secs(3600);

/// Failures of the audit consumer.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ::clickhouse::error::Error),
    #[error("local event log: {0}")]
    Database(#[from] sqlx::Error),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0}")]
    Invalid(String),
}

/// One `audit_log` row (columns in table order).
#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
pub struct AuditRow {
    pub event_id: String,
    /// Seconds since the Unix epoch (`DateTime`).
    pub ts: u32,
    pub event_ms: i64,
    pub received_ms: i64,
    pub tenant_id: String,
    pub key_id: String,
    pub request_id: String,
    pub route: String,
    pub requested_model: String,
    pub model_alias: String,
    pub deployment: String,
    pub provider: String,
    pub upstream_model: String,
    pub stream: u8,
    pub status: String,
    pub error: String,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub usage_source: String,
    pub request_body: String,
    pub request_bytes: u64,
    pub request_truncated: u8,
    pub response_kind: String,
    pub response_body: String,
    pub response_bytes: u64,
    pub response_truncated: u8,
}

/// The column list, in table order (for SELECTs read as [`AuditRow`]).
const COLUMNS: &str = "event_id, ts, event_ms, received_ms, tenant_id, key_id, request_id, \
    route, requested_model, model_alias, deployment, provider, upstream_model, stream, status, \
    error, input_tokens, cached_input_tokens, output_tokens, usage_source, request_body, \
    request_bytes, request_truncated, response_kind, response_body, response_bytes, \
    response_truncated";

/// A label of a serde enum value (`"completed"`), without the quotes.
fn label<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl AuditRow {
    /// The row of an event; `None` when its times do not parse.
    pub fn from_event(e: &AuditEvent) -> Option<AuditRow> {
        let event_ms = unix_ms(parse_event_time(&e.event_time)?);
        let received_ms = parse_event_time(&e.received_at).map_or(event_ms, unix_ms);
        Some(AuditRow {
            event_id: e.event_id.clone(),
            ts: u32::try_from(event_ms.div_euclid(1000)).ok()?,
            event_ms,
            received_ms,
            tenant_id: e.tenant_id.clone(),
            key_id: e.key_id.clone(),
            request_id: e.request_id.clone(),
            route: e.route.clone(),
            requested_model: e.requested_model.clone(),
            model_alias: e.model_alias.clone(),
            deployment: e.deployment.clone(),
            provider: e.provider.clone(),
            upstream_model: e.upstream_model.clone(),
            stream: u8::from(e.stream),
            status: label(&e.status),
            error: e.error.clone().unwrap_or_default(),
            input_tokens: e.usage.input_tokens,
            cached_input_tokens: e.usage.cached_input_tokens,
            output_tokens: e.usage.output_tokens,
            usage_source: label(&e.usage.source),
            request_body: e.request_body.clone(),
            request_bytes: e.request_bytes,
            request_truncated: u8::from(e.request_truncated),
            response_kind: label(&e.response_kind),
            response_body: e.response_body.clone(),
            response_bytes: e.response_bytes,
            response_truncated: u8::from(e.response_truncated),
        })
    }
}

/// The `audit_log` table in one ClickHouse database, over HTTP.
#[derive(Clone)]
pub struct AuditStore {
    client: Client,
    retention_days: u32,
}

impl AuditStore {
    /// The table in `database` at `url` (the HTTP interface), keeping rows `retention_days`.
    pub fn new(url: &str, database: &str, retention_days: u32) -> AuditStore {
        let client = Client::default()
            .with_url(url)
            .with_database(database)
            .with_validation(false)
            .with_compression(Compression::None);
        AuditStore {
            client,
            retention_days: retention_days.max(1),
        }
    }

    /// Creates the table if it is missing.
    pub async fn prepare(&self) -> Result<(), AuditError> {
        let version: String = self.client.query("SELECT version()").fetch_one().await?;
        let ttl = if supports_ttl(&version) {
            format!("TTL ts + INTERVAL {} DAY", self.retention_days)
        } else {
            String::new()
        };
        let code: String = DDL
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .map(|l| format!("{l}\n"))
            .collect();
        self.client
            .query_raw(&code.replace("{ttl}", &ttl))
            .execute()
            .await?;
        Ok(())
    }

    /// Inserts the events ClickHouse does not hold yet; returns how many it inserted.
    pub async fn write(&self, events: &[AuditEvent]) -> Result<usize, AuditError> {
        let rows: Vec<AuditRow> = events.iter().filter_map(AuditRow::from_event).collect();
        let (Some(from), Some(to)) = (
            rows.iter().map(|r| r.ts).min(),
            rows.iter().map(|r| r.ts).max(),
        ) else {
            return Ok(0);
        };
        let request_ids: Vec<String> = rows
            .iter()
            .map(|r| r.request_id.clone())
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let present: HashSet<String> = self
            .client
            .query(
                "SELECT event_id FROM audit_log WHERE ts >= toDateTime(?) AND ts <= toDateTime(?) \
                 AND request_id IN (SELECT arrayJoin(?))",
            )
            .bind(from)
            .bind(to)
            .bind(request_ids)
            .fetch_all::<String>()
            .await?
            .into_iter()
            .collect();
        let mut seen = HashSet::new();
        let fresh: Vec<&AuditRow> = rows
            .iter()
            .filter(|r| !present.contains(&r.event_id) && seen.insert(r.event_id.as_str()))
            .collect();
        if fresh.is_empty() {
            return Ok(0);
        }
        let mut insert = self.client.insert::<AuditRow>("audit_log").await?;
        for row in &fresh {
            insert.write(row).await?;
        }
        insert.end().await?;
        Ok(fresh.len())
    }

    /// Drops the daily partitions older than the retention; returns how many.
    pub async fn expire(&self) -> Result<usize, AuditError> {
        let cutoff: u32 = self
            .client
            .query("SELECT toUInt32(toYYYYMMDD(today() - ?))")
            .bind(self.retention_days)
            .fetch_one()
            .await?;
        let partitions: Vec<String> = self
            .client
            .query(
                "SELECT DISTINCT partition FROM system.parts \
                 WHERE database = currentDatabase() AND table = 'audit_log' AND active",
            )
            .fetch_all()
            .await?;
        let mut dropped = 0;
        for p in partitions {
            // Daily partitions are named `YYYYMMDD`; anything else is not ours to drop.
            let Ok(day) = p.trim_matches('\'').parse::<u32>() else {
                continue;
            };
            if day < cutoff {
                self.client
                    .query_raw(&format!("ALTER TABLE audit_log DROP PARTITION {day}"))
                    .execute()
                    .await?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Rows of `tenant_id`, newest first: one request's (`request_id`) or the latest `limit`.
    /// A request id of another tenant finds nothing: both columns are matched together.
    pub async fn find(
        &self,
        tenant_id: &str,
        request_id: Option<&str>,
        limit: u64,
    ) -> Result<Vec<AuditRow>, AuditError> {
        Ok(self
            .find_query(tenant_id, request_id, limit)
            .fetch_all::<AuditRow>()
            .await?)
    }

    /// The query of [`AuditStore::find`]. The tenant and request ids (caller input) are bound
    /// as escaped string literals by the client (`bind`), never formatted into the SQL: the
    /// supported servers include 18.x, which predates server-side query parameters.
    fn find_query(
        &self,
        tenant_id: &str,
        request_id: Option<&str>,
        limit: u64,
    ) -> clickhouse::query::Query {
        let sql = match request_id {
            Some(_) => format!(
                "SELECT {COLUMNS} FROM audit_log WHERE tenant_id = ? AND request_id = ? \
                 ORDER BY ts DESC, event_id DESC LIMIT ?"
            ),
            None => format!(
                "SELECT {COLUMNS} FROM audit_log WHERE tenant_id = ? \
                 ORDER BY ts DESC, event_id DESC LIMIT ?"
            ),
        };
        let mut q = self.client.query(&sql).bind(tenant_id);
        if let Some(id) = request_id {
            q = q.bind(id);
        }
        q.bind(limit)
    }
}

/// Whether a server of `version` (`"18.16.1"`, `"24.8.4.13"`) knows table TTLs (19.6+).
fn supports_ttl(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (19, 6)
}

/// A source of audit messages with a committable read position.
pub trait AuditSource {
    /// Up to `max` messages after the last ones returned (waiting at most `wait` for some).
    fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Vec<u8>>, AuditError>;
    /// Makes the position after everything returned so far durable.
    fn commit(&mut self) -> Result<(), AuditError>;
}

/// How the consumer runs.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    pub url: String,
    pub database: String,
    pub retention_days: u32,
    /// Messages per batch.
    pub max_batch: usize,
    /// Longest wait for a message.
    pub poll_wait: Duration,
    /// Fault injection for crash tests: abort the process right after the n-th insert, before
    /// its position is committed.
    pub abort_after_insert: Option<u64>,
}

impl AuditOptions {
    pub fn new(url: &str, database: &str, retention_days: u32) -> AuditOptions {
        AuditOptions {
            url: url.to_string(),
            database: database.to_string(),
            retention_days,
            max_batch: 1000,
            poll_wait: Duration::from_millis(250),
            abort_after_insert: None,
        }
    }
}

/// Reads `source` into ClickHouse until `stop` is set (then commits what it wrote and
/// returns). An error returns at once: the caller restarts the consumer, which resumes from
/// the committed position.
pub fn run(
    source: &mut dyn AuditSource,
    options: &AuditOptions,
    stop: &AtomicBool,
) -> Result<(), AuditError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AuditError::Invalid(format!("runtime: {e}")))?;
    let store = AuditStore::new(&options.url, &options.database, options.retention_days);
    runtime.block_on(store.prepare())?;
    let mut expired_at: Option<Instant> = None;
    let mut inserts = 0u64;
    loop {
        if expired_at.is_none_or(|t| t.elapsed() >= EXPIRE_EVERY) {
            match runtime.block_on(store.expire()) {
                Ok(n) if n > 0 => tracing::info!(partitions = n, "expired audit partitions"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot drop expired audit partitions"),
            }
            expired_at = Some(Instant::now());
        }
        let stopping = stop.load(Ordering::Acquire);
        let messages = source.poll(options.max_batch, options.poll_wait)?;
        let events: Vec<AuditEvent> = messages
            .iter()
            .filter_map(|m| match serde_json::from_slice::<AuditEvent>(m) {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a malformed audit event");
                    None
                }
            })
            .collect();
        if !events.is_empty() {
            let inserted = runtime.block_on(store.write(&events))?;
            inserts += 1;
            tracing::debug!(events = events.len(), inserted, "audit batch written");
            if options.abort_after_insert.is_some_and(|n| inserts >= n) {
                tracing::error!("aborting after an audit insert (fault injection)");
                std::process::abort();
            }
        }
        source.commit()?;
        if stopping && messages.is_empty() {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn find_binds_the_ids_as_escaped_literals() {
        let store = AuditStore::new("http://127.0.0.1:1", "default", 1);
        let hostile = "ten_1' OR tenant_id != '";
        let sql = store
            .find_query(hostile, Some("req_1' OR 1 = 1 --\\"), 20)
            .sql_display()
            .to_string();
        assert!(
            sql.ends_with(
                "WHERE tenant_id = 'ten_1\\' OR tenant_id != \\'' \
                 AND request_id = 'req_1\\' OR 1 = 1 --\\\\' ORDER BY ts DESC, event_id DESC LIMIT 20"
            ),
            "{sql}"
        );
        let sql = store.find_query("ten_2", None, 5).sql_display().to_string();
        assert!(
            sql.ends_with("WHERE tenant_id = 'ten_2' ORDER BY ts DESC, event_id DESC LIMIT 5"),
            "{sql}"
        );
    }

    #[test]
    fn ttl_is_used_from_19_6_on() {
        assert!(!supports_ttl("18.16.1"));
        assert!(!supports_ttl("19.5.3"));
        assert!(supports_ttl("19.6.1"));
        assert!(supports_ttl("24.8.4.13"));
        assert!(!supports_ttl("garbage"));
    }
}
