//! The production ledger in PostgreSQL.
//!
//! One batch, one transaction: minute and period deltas are added to `usage_minutes` and
//! `usage_periods` (NUMERIC, exact), the next offset of every partition read is stored in
//! `pipeline_positions`, unbillable messages in `pipeline_rejects`, the batch's analytics rows
//! in `pipeline_outbox`, and the batch itself in `pipeline_commits`. Either all of it is
//! committed or none; the source resumes from the committed positions.

use rust_decimal::Decimal;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Postgres, QueryBuilder, Row};
use tollgate_schemas::events::{from_unix_ms, offset_unix_ms};
use tollgate_schemas::pricing::PriceRow;

use super::{Balance, Ledger, LedgerBatch, OutboxBatch, Position, SinkError};

/// Rows per multi-row statement.
const CHUNK: usize = 500;

pub struct PostgresLedger {
    pool: PgPool,
}

impl PostgresLedger {
    /// Connects and applies the migrations (shared with the gateway's metadata store).
    pub async fn connect(url: &str) -> Result<PostgresLedger, SinkError> {
        let pool = PgPoolOptions::new().max_connections(4).connect(url).await?;
        sqlx::migrate!("../schemas/migrations/postgres")
            .run(&pool)
            .await?;
        Ok(PostgresLedger { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn seq_i64(seq: u64) -> i64 {
    i64::try_from(seq).unwrap_or(i64::MAX)
}

fn balance_from(r: &sqlx::postgres::PgRow, version: u64) -> Result<Balance, sqlx::Error> {
    Ok(Balance {
        tenant_id: r.try_get("tenant_id")?,
        period: r.try_get("period")?,
        currency: r.try_get("currency")?,
        spend: r.try_get::<Decimal, _>("cost")?,
        requests: r.try_get("requests")?,
        input_tokens: r.try_get("input_tokens")?,
        cached_input_tokens: r.try_get("cached_input_tokens")?,
        output_tokens: r.try_get("output_tokens")?,
        version,
    })
}

#[async_trait::async_trait]
impl Ledger for PostgresLedger {
    async fn positions(&self, source: &str) -> Result<Vec<Position>, SinkError> {
        let rows = sqlx::query(
            "SELECT partition, next_offset, max_event_ms FROM pipeline_positions
             WHERE source = $1 ORDER BY partition",
        )
        .bind(source)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Position {
                    partition: u32::try_from(r.try_get::<i32, _>(0)?).unwrap_or(0),
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
                    effective_from_ms: offset_unix_ms(r.try_get(2)?),
                    input_per_mtok: r.try_get(3)?,
                    cached_input_per_mtok: r.try_get(4)?,
                    output_per_mtok: r.try_get(5)?,
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

        for rows in batch.minutes.chunks(CHUNK) {
            let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
                "INSERT INTO usage_minutes (tenant_id, model, minute, currency, requests,
                 input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens, cost,
                 errors, client_disconnects, unpriced, ttft_count, ttft_sum_ms, ttft_buckets,
                 cache_hits, cache_savings, updated_seq) ",
            );
            q.push_values(rows, |mut b, (k, t)| {
                b.push_bind(&k.tenant_id)
                    .push_bind(&k.model)
                    .push_bind(from_unix_ms(k.minute_ms))
                    .push_bind(&k.currency)
                    .push_bind(t.requests)
                    .push_bind(t.input_tokens)
                    .push_bind(t.cached_input_tokens)
                    .push_bind(t.cache_write_input_tokens)
                    .push_bind(t.output_tokens)
                    .push_bind(t.cost)
                    .push_bind(t.errors)
                    .push_bind(t.client_disconnects)
                    .push_bind(t.unpriced)
                    .push_bind(t.ttft_count)
                    .push_bind(t.ttft_sum_ms)
                    .push_bind(t.ttft_buckets.to_vec())
                    .push_bind(t.cache_hits)
                    .push_bind(t.cache_savings)
                    .push_bind(seq);
            });
            q.push(
                " ON CONFLICT (tenant_id, model, minute) DO UPDATE SET
                  currency = EXCLUDED.currency,
                  requests = usage_minutes.requests + EXCLUDED.requests,
                  input_tokens = usage_minutes.input_tokens + EXCLUDED.input_tokens,
                  cached_input_tokens = usage_minutes.cached_input_tokens + EXCLUDED.cached_input_tokens,
                  cache_write_input_tokens = usage_minutes.cache_write_input_tokens + EXCLUDED.cache_write_input_tokens,
                  output_tokens = usage_minutes.output_tokens + EXCLUDED.output_tokens,
                  cost = usage_minutes.cost + EXCLUDED.cost,
                  errors = usage_minutes.errors + EXCLUDED.errors,
                  client_disconnects = usage_minutes.client_disconnects + EXCLUDED.client_disconnects,
                  unpriced = usage_minutes.unpriced + EXCLUDED.unpriced,
                  ttft_count = usage_minutes.ttft_count + EXCLUDED.ttft_count,
                  ttft_sum_ms = usage_minutes.ttft_sum_ms + EXCLUDED.ttft_sum_ms,
                  ttft_buckets = ARRAY(SELECT a + b FROM unnest(usage_minutes.ttft_buckets, EXCLUDED.ttft_buckets) AS u(a, b)),
                  cache_hits = usage_minutes.cache_hits + EXCLUDED.cache_hits,
                  cache_savings = usage_minutes.cache_savings + EXCLUDED.cache_savings,
                  updated_seq = EXCLUDED.updated_seq",
            );
            q.build().execute(&mut *tx).await?;
        }

        let mut balances = Vec::with_capacity(batch.periods.len());
        for rows in batch.periods.chunks(CHUNK) {
            let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
                "INSERT INTO usage_periods (tenant_id, period, currency, requests, input_tokens,
                 cached_input_tokens, cache_write_input_tokens, output_tokens, cost, errors,
                 updated_seq) ",
            );
            q.push_values(rows, |mut b, (k, t)| {
                b.push_bind(&k.tenant_id)
                    .push_bind(&k.period)
                    .push_bind(&k.currency)
                    .push_bind(t.requests)
                    .push_bind(t.input_tokens)
                    .push_bind(t.cached_input_tokens)
                    .push_bind(t.cache_write_input_tokens)
                    .push_bind(t.output_tokens)
                    .push_bind(t.cost)
                    .push_bind(t.errors)
                    .push_bind(seq);
            });
            q.push(
                " ON CONFLICT (tenant_id, period, currency) DO UPDATE SET
                  requests = usage_periods.requests + EXCLUDED.requests,
                  input_tokens = usage_periods.input_tokens + EXCLUDED.input_tokens,
                  cached_input_tokens = usage_periods.cached_input_tokens + EXCLUDED.cached_input_tokens,
                  cache_write_input_tokens = usage_periods.cache_write_input_tokens + EXCLUDED.cache_write_input_tokens,
                  output_tokens = usage_periods.output_tokens + EXCLUDED.output_tokens,
                  cost = usage_periods.cost + EXCLUDED.cost,
                  errors = usage_periods.errors + EXCLUDED.errors,
                  updated_seq = EXCLUDED.updated_seq
                 RETURNING tenant_id, period, currency, requests, input_tokens,
                           cached_input_tokens, output_tokens, cost",
            );
            for r in q.build().fetch_all(&mut *tx).await? {
                balances.push(balance_from(&r, batch.seq)?);
            }
        }

        if !batch.lines.is_empty() {
            // Closing a period takes an EXCLUSIVE lock on billing_periods: a period cannot be
            // closed between reading it open here and committing lines into it.
            sqlx::query("LOCK TABLE billing_periods IN SHARE MODE")
                .execute(&mut *tx)
                .await?;
            let closed: std::collections::HashSet<String> =
                sqlx::query_scalar("SELECT period FROM billing_periods")
                    .fetch_all(&mut *tx)
                    .await?
                    .into_iter()
                    .collect();
            for rows in batch.lines.chunks(CHUNK) {
                let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
                    "INSERT INTO usage_price_lines (tenant_id, period, event_period, model,
                     currency, price_from_ms, price_override, input_per_mtok,
                     cached_input_per_mtok, output_per_mtok, requests, input_tokens,
                     cached_input_tokens, cache_write_input_tokens, output_tokens, cost,
                     cache_hits, cache_savings, updated_seq) ",
                );
                q.push_values(rows, |mut b, (k, t)| {
                    b.push_bind(&k.tenant_id)
                        .push_bind(super::booking_period(&k.period, &closed))
                        .push_bind(&k.period)
                        .push_bind(&k.model)
                        .push_bind(&k.currency)
                        .push_bind(k.price_from_ms)
                        .push_bind(k.price_override)
                        .push_bind(k.unit.input_per_mtok)
                        .push_bind(k.unit.cached_input_per_mtok)
                        .push_bind(k.unit.output_per_mtok)
                        .push_bind(t.requests)
                        .push_bind(t.input_tokens)
                        .push_bind(t.cached_input_tokens)
                        .push_bind(t.cache_write_input_tokens)
                        .push_bind(t.output_tokens)
                        .push_bind(t.cost)
                        .push_bind(t.cache_hits)
                        .push_bind(t.cache_savings)
                        .push_bind(seq);
                });
                q.push(
                    " ON CONFLICT (tenant_id, period, event_period, model, currency,
                      price_from_ms, price_override) DO UPDATE SET
                      requests = usage_price_lines.requests + EXCLUDED.requests,
                      input_tokens = usage_price_lines.input_tokens + EXCLUDED.input_tokens,
                      cached_input_tokens = usage_price_lines.cached_input_tokens + EXCLUDED.cached_input_tokens,
                      cache_write_input_tokens = usage_price_lines.cache_write_input_tokens + EXCLUDED.cache_write_input_tokens,
                      output_tokens = usage_price_lines.output_tokens + EXCLUDED.output_tokens,
                      cost = usage_price_lines.cost + EXCLUDED.cost,
                      cache_hits = usage_price_lines.cache_hits + EXCLUDED.cache_hits,
                      cache_savings = usage_price_lines.cache_savings + EXCLUDED.cache_savings,
                      updated_seq = EXCLUDED.updated_seq",
                );
                q.build().execute(&mut *tx).await?;
            }
        }

        for rows in batch.positions.chunks(CHUNK) {
            let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
                "INSERT INTO pipeline_positions (source, partition, next_offset, max_event_ms) ",
            );
            q.push_values(rows, |mut b, p| {
                b.push_bind(&batch.source)
                    .push_bind(i32::try_from(p.partition).unwrap_or(i32::MAX))
                    .push_bind(p.next_offset)
                    .push_bind(p.max_event_ms);
            });
            q.push(
                " ON CONFLICT (source, partition) DO UPDATE SET
                  next_offset = EXCLUDED.next_offset,
                  max_event_ms = GREATEST(pipeline_positions.max_event_ms, EXCLUDED.max_event_ms)",
            );
            q.build().execute(&mut *tx).await?;
        }

        for rows in batch.rejects.chunks(CHUNK) {
            let mut q: QueryBuilder<Postgres> = QueryBuilder::new(
                "INSERT INTO pipeline_rejects (source, partition, \"offset\", reason, payload, seq) ",
            );
            q.push_values(rows, |mut b, r| {
                b.push_bind(&batch.source)
                    .push_bind(i32::try_from(r.partition).unwrap_or(i32::MAX))
                    .push_bind(r.offset)
                    .push_bind(&r.reason)
                    .push_bind(r.payload.replace('\0', "\u{fffd}"))
                    .push_bind(seq);
            });
            q.push(" ON CONFLICT DO NOTHING");
            q.build().execute(&mut *tx).await?;
        }

        if let Some(payload) = batch.outbox_payload()?.filter(|_| with_outbox) {
            sqlx::query("INSERT INTO pipeline_outbox (seq, payload) VALUES ($1, $2)")
                .bind(seq)
                .bind(payload)
                .execute(&mut *tx)
                .await?;
        }

        sqlx::query(
            "INSERT INTO pipeline_commits (seq, events, duplicates, rejects) VALUES ($1, $2, $3, $4)",
        )
        .bind(seq)
        .bind(i64::try_from(batch.events).unwrap_or(i64::MAX))
        .bind(i64::try_from(batch.duplicates).unwrap_or(i64::MAX))
        .bind(i64::try_from(batch.rejects.len()).unwrap_or(i64::MAX))
        .execute(&mut *tx)
        .await?;

        tx.commit().await?;
        Ok(balances)
    }

    async fn balances(&self, period: &str) -> Result<Vec<Balance>, SinkError> {
        let version = self.last_seq().await?;
        let rows = sqlx::query(
            "SELECT tenant_id, period, currency, requests, input_tokens, cached_input_tokens,
                    output_tokens, cost FROM usage_periods WHERE period = $1",
        )
        .bind(period)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| balance_from(r, version))
            .collect::<Result<_, _>>()?)
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
        sqlx::query("DELETE FROM pipeline_outbox WHERE seq = $1")
            .bind(seq_i64(seq))
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
