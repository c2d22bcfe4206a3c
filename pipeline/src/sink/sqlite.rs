//! The embedded ledger: the same tables as PostgreSQL in the gateway's SQLite database
//! (`<data dir>/tollgate.db`). Decimals are exact decimal strings; SQLite cannot add them, so
//! each delta is read, added in Rust and written back inside the one transaction (SQLite
//! allows one writer at a time, so nothing interleaves).

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{Row, Sqlite, Transaction};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tollgate_schemas::events::{offset_unix_ms, rfc3339_from_unix_ms};
use tollgate_schemas::pricing::PriceRow;

use super::{Balance, Ledger, LedgerBatch, OutboxBatch, Position, SinkError};
use crate::fact::Totals;

pub struct SqliteLedger {
    pool: SqlitePool,
}

impl SqliteLedger {
    /// Opens `<data_dir>/tollgate.db` (creating it if needed) and applies the migrations.
    pub async fn open(data_dir: &Path) -> Result<SqliteLedger, SinkError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            SinkError::Invalid(format!("cannot create {}: {e}", data_dir.display()))
        })?;
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join("tollgate.db"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await?;
        sqlx::migrate!("../schemas/migrations/sqlite")
            .run(&pool)
            .await?;
        Ok(SqliteLedger { pool })
    }
}

fn parse_ms(s: &str) -> i64 {
    OffsetDateTime::parse(s, &Rfc3339)
        .map(offset_unix_ms)
        .unwrap_or(0)
}

fn dec(s: &str) -> Result<Decimal, SinkError> {
    Decimal::from_str(s).map_err(|e| SinkError::Invalid(format!("stored decimal {s:?}: {e}")))
}

fn seq_i64(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

async fn add_minute(
    tx: &mut Transaction<'_, Sqlite>,
    k: &crate::fact::MinuteKey,
    t: &Totals,
    seq: i64,
) -> Result<(), SinkError> {
    let minute = rfc3339_from_unix_ms(k.minute_ms);
    let old = sqlx::query(
        "SELECT cost, ttft_buckets, cache_savings FROM usage_minutes WHERE tenant_id = ? AND model = ? AND minute = ?",
    )
    .bind(&k.tenant_id)
    .bind(&k.model)
    .bind(&minute)
    .fetch_optional(&mut **tx)
    .await?;
    let (mut cost, mut buckets, mut savings) = (Decimal::ZERO, [0i64; 8], Decimal::ZERO);
    if let Some(r) = old {
        cost = dec(&r.try_get::<String, _>(0)?)?;
        buckets = serde_json::from_str(&r.try_get::<String, _>(1)?).unwrap_or([0; 8]);
        savings = dec(&r.try_get::<String, _>(2)?)?;
    }
    cost += t.cost;
    savings += t.cache_savings;
    for (a, b) in buckets.iter_mut().zip(t.ttft_buckets.iter()) {
        *a += b;
    }
    let buckets = serde_json::to_string(&buckets).unwrap_or_default();
    sqlx::query(
        "INSERT INTO usage_minutes (tenant_id, model, minute, currency, requests, input_tokens,
           cached_input_tokens, cache_write_input_tokens, output_tokens, cost, errors,
           client_disconnects, unpriced, ttft_count, ttft_sum_ms, ttft_buckets, cache_hits,
           cache_savings, updated_seq)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (tenant_id, model, minute) DO UPDATE SET
           currency = excluded.currency,
           requests = requests + excluded.requests,
           input_tokens = input_tokens + excluded.input_tokens,
           cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
           cache_write_input_tokens = cache_write_input_tokens + excluded.cache_write_input_tokens,
           output_tokens = output_tokens + excluded.output_tokens,
           cost = excluded.cost,
           errors = errors + excluded.errors,
           client_disconnects = client_disconnects + excluded.client_disconnects,
           unpriced = unpriced + excluded.unpriced,
           ttft_count = ttft_count + excluded.ttft_count,
           ttft_sum_ms = ttft_sum_ms + excluded.ttft_sum_ms,
           ttft_buckets = excluded.ttft_buckets,
           cache_hits = cache_hits + excluded.cache_hits,
           cache_savings = excluded.cache_savings,
           updated_seq = excluded.updated_seq",
    )
    .bind(&k.tenant_id)
    .bind(&k.model)
    .bind(&minute)
    .bind(&k.currency)
    .bind(t.requests)
    .bind(t.input_tokens)
    .bind(t.cached_input_tokens)
    .bind(t.cache_write_input_tokens)
    .bind(t.output_tokens)
    .bind(cost.to_string())
    .bind(t.errors)
    .bind(t.client_disconnects)
    .bind(t.unpriced)
    .bind(t.ttft_count)
    .bind(t.ttft_sum_ms)
    .bind(buckets)
    .bind(t.cache_hits)
    .bind(savings.to_string())
    .bind(seq)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn add_line(
    tx: &mut Transaction<'_, Sqlite>,
    k: &crate::fact::LineKey,
    t: &Totals,
    booked: &str,
    seq: i64,
) -> Result<(), SinkError> {
    let old = sqlx::query(
        "SELECT cost, cache_savings FROM usage_price_lines WHERE tenant_id = ? AND period = ?
           AND event_period = ? AND model = ? AND currency = ? AND price_from_ms = ?
           AND price_override = ?",
    )
    .bind(&k.tenant_id)
    .bind(booked)
    .bind(&k.period)
    .bind(&k.model)
    .bind(&k.currency)
    .bind(k.price_from_ms)
    .bind(k.price_override)
    .fetch_optional(&mut **tx)
    .await?;
    let (mut cost, mut savings) = (Decimal::ZERO, Decimal::ZERO);
    if let Some(r) = old {
        cost = dec(&r.try_get::<String, _>(0)?)?;
        savings = dec(&r.try_get::<String, _>(1)?)?;
    }
    cost += t.cost;
    savings += t.cache_savings;
    sqlx::query(
        "INSERT INTO usage_price_lines (tenant_id, period, event_period, model, currency,
           price_from_ms, price_override, input_per_mtok, cached_input_per_mtok, output_per_mtok,
           requests, input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens,
           cost, cache_hits, cache_savings, updated_seq)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (tenant_id, period, event_period, model, currency, price_from_ms,
           price_override) DO UPDATE SET
           requests = requests + excluded.requests,
           input_tokens = input_tokens + excluded.input_tokens,
           cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
           cache_write_input_tokens = cache_write_input_tokens + excluded.cache_write_input_tokens,
           output_tokens = output_tokens + excluded.output_tokens,
           cost = excluded.cost,
           cache_hits = cache_hits + excluded.cache_hits,
           cache_savings = excluded.cache_savings,
           updated_seq = excluded.updated_seq",
    )
    .bind(&k.tenant_id)
    .bind(booked)
    .bind(&k.period)
    .bind(&k.model)
    .bind(&k.currency)
    .bind(k.price_from_ms)
    .bind(k.price_override)
    .bind(k.unit.input_per_mtok.to_string())
    .bind(k.unit.cached_input_per_mtok.to_string())
    .bind(k.unit.output_per_mtok.to_string())
    .bind(t.requests)
    .bind(t.input_tokens)
    .bind(t.cached_input_tokens)
    .bind(t.cache_write_input_tokens)
    .bind(t.output_tokens)
    .bind(cost.to_string())
    .bind(t.cache_hits)
    .bind(savings.to_string())
    .bind(seq)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn add_period(
    tx: &mut Transaction<'_, Sqlite>,
    k: &crate::fact::PeriodKey,
    t: &Totals,
    seq: u64,
) -> Result<Balance, SinkError> {
    let old: Option<String> = sqlx::query_scalar(
        "SELECT cost FROM usage_periods WHERE tenant_id = ? AND period = ? AND currency = ?",
    )
    .bind(&k.tenant_id)
    .bind(&k.period)
    .bind(&k.currency)
    .fetch_optional(&mut **tx)
    .await?;
    let cost = old.as_deref().map(dec).transpose()?.unwrap_or_default() + t.cost;
    let r = sqlx::query(
        "INSERT INTO usage_periods (tenant_id, period, currency, requests, input_tokens,
           cached_input_tokens, cache_write_input_tokens, output_tokens, cost, errors, updated_seq)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
         ON CONFLICT (tenant_id, period, currency) DO UPDATE SET
           requests = requests + excluded.requests,
           input_tokens = input_tokens + excluded.input_tokens,
           cached_input_tokens = cached_input_tokens + excluded.cached_input_tokens,
           cache_write_input_tokens = cache_write_input_tokens + excluded.cache_write_input_tokens,
           output_tokens = output_tokens + excluded.output_tokens,
           cost = excluded.cost,
           errors = errors + excluded.errors,
           updated_seq = excluded.updated_seq
         RETURNING tenant_id, period, currency, requests, input_tokens, cached_input_tokens,
           output_tokens, cost",
    )
    .bind(&k.tenant_id)
    .bind(&k.period)
    .bind(&k.currency)
    .bind(t.requests)
    .bind(t.input_tokens)
    .bind(t.cached_input_tokens)
    .bind(t.cache_write_input_tokens)
    .bind(t.output_tokens)
    .bind(cost.to_string())
    .bind(t.errors)
    .bind(seq_i64(seq))
    .fetch_one(&mut **tx)
    .await?;
    balance_from(&r, seq)
}

fn balance_from(r: &sqlx::sqlite::SqliteRow, version: u64) -> Result<Balance, SinkError> {
    Ok(Balance {
        tenant_id: r.try_get("tenant_id")?,
        period: r.try_get("period")?,
        currency: r.try_get("currency")?,
        spend: dec(&r.try_get::<String, _>("cost")?)?,
        requests: r.try_get("requests")?,
        input_tokens: r.try_get("input_tokens")?,
        cached_input_tokens: r.try_get("cached_input_tokens")?,
        output_tokens: r.try_get("output_tokens")?,
        version,
    })
}

#[async_trait::async_trait]
impl Ledger for SqliteLedger {
    async fn positions(&self, source: &str) -> Result<Vec<Position>, SinkError> {
        let rows = sqlx::query(
            "SELECT partition, next_offset, max_event_ms FROM pipeline_positions
             WHERE source = ? ORDER BY partition",
        )
        .bind(source)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Position {
                    partition: u32::try_from(r.try_get::<i64, _>(0)?).unwrap_or(0),
                    next_offset: r.try_get(1)?,
                    max_event_ms: r.try_get(2)?,
                })
            })
            .collect()
    }

    async fn last_seq(&self) -> Result<u64, SinkError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM pipeline_commits")
            .fetch_one(&self.pool)
            .await?;
        Ok(seq.and_then(|s| u64::try_from(s).ok()).unwrap_or(0))
    }

    async fn prices(&self) -> Result<Vec<PriceRow>, SinkError> {
        let rows = sqlx::query(
            "SELECT model, tenant_id, effective_from, input_per_mtok, cached_input_per_mtok,
                    output_per_mtok, currency FROM prices",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let tenant: String = r.try_get(1)?;
                Ok(PriceRow {
                    model: r.try_get(0)?,
                    tenant_id: (!tenant.is_empty()).then_some(tenant),
                    effective_from_ms: parse_ms(&r.try_get::<String, _>(2)?),
                    input_per_mtok: dec(&r.try_get::<String, _>(3)?)?,
                    cached_input_per_mtok: dec(&r.try_get::<String, _>(4)?)?,
                    output_per_mtok: dec(&r.try_get::<String, _>(5)?)?,
                    currency: r.try_get(6)?,
                })
            })
            .collect()
    }

    async fn commit(
        &self,
        batch: &LedgerBatch,
        with_outbox: bool,
    ) -> Result<Vec<Balance>, SinkError> {
        let seq = seq_i64(batch.seq);
        let mut tx = self.pool.begin().await?;
        // Write first: the transaction then holds SQLite's write lock, so the closed periods
        // read below cannot change before it commits.
        sqlx::query(
            "INSERT INTO pipeline_commits (seq, events, duplicates, rejects) VALUES (?, ?, ?, ?)",
        )
        .bind(seq)
        .bind(i64::try_from(batch.events).unwrap_or(i64::MAX))
        .bind(i64::try_from(batch.duplicates).unwrap_or(i64::MAX))
        .bind(i64::try_from(batch.rejects.len()).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;
        if !batch.lines.is_empty() {
            let closed: std::collections::HashSet<String> =
                sqlx::query_scalar("SELECT period FROM billing_periods")
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .collect();
            for (k, t) in &batch.lines {
                add_line(
                    &mut tx,
                    k,
                    t,
                    &super::booking_period(&k.period, &closed),
                    seq,
                )
                .await?;
            }
        }
        for (k, t) in &batch.minutes {
            add_minute(&mut tx, k, t, seq).await?;
        }
        let mut balances = Vec::with_capacity(batch.periods.len());
        for (k, t) in &batch.periods {
            balances.push(add_period(&mut tx, k, t, batch.seq).await?);
        }
        for p in &batch.positions {
            sqlx::query(
                "INSERT INTO pipeline_positions (source, partition, next_offset, max_event_ms)
                 VALUES (?, ?, ?, ?)
                 ON CONFLICT (source, partition) DO UPDATE SET
                   next_offset = excluded.next_offset,
                   max_event_ms = max(max_event_ms, excluded.max_event_ms)",
            )
            .bind(&batch.source)
            .bind(i64::from(p.partition))
            .bind(p.next_offset)
            .bind(p.max_event_ms)
            .execute(&mut *tx)
            .await?;
        }
        for r in &batch.rejects {
            sqlx::query(
                "INSERT OR IGNORE INTO pipeline_rejects (source, partition, \"offset\", reason, payload, seq)
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(&batch.source)
            .bind(i64::from(r.partition))
            .bind(r.offset)
            .bind(&r.reason)
            .bind(&r.payload)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        }
        if let Some(payload) = batch.outbox_payload()?.filter(|_| with_outbox) {
            sqlx::query("INSERT INTO pipeline_outbox (seq, payload) VALUES (?, ?)")
                .bind(seq)
                .bind(payload)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(balances)
    }

    async fn balances(&self, period: &str) -> Result<Vec<Balance>, SinkError> {
        let version = self.last_seq().await?;
        let rows = sqlx::query(
            "SELECT tenant_id, period, currency, requests, input_tokens, cached_input_tokens,
                    output_tokens, cost FROM usage_periods WHERE period = ?",
        )
        .bind(period)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| balance_from(r, version)).collect()
    }

    async fn outbox(&self) -> Result<Vec<OutboxBatch>, SinkError> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT payload FROM pipeline_outbox ORDER BY seq")
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|p| {
                serde_json::from_str(p).map_err(|e| SinkError::Invalid(format!("outbox row: {e}")))
            })
            .collect()
    }

    async fn ack_outbox(&self, seq: u64) -> Result<(), SinkError> {
        sqlx::query("DELETE FROM pipeline_outbox WHERE seq = ?")
            .bind(seq_i64(seq))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
