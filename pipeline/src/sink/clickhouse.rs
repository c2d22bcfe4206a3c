//! Request facts and per-minute rollups in ClickHouse: the [`Analytics`] sink.
//!
//! Tables (DDL in `schemas/clickhouse/0001_analytics.sql`, run by [`Analytics::prepare`];
//! written for ClickHouse 18.16 and current releases alike):
//!
//! | table | rows |
//! |---|---|
//! | `request_facts` | one per billed completion, every dimension of a [`PricedFact`] |
//! | `usage_minutes` | per tenant × model × minute × currency deltas of one batch; `sum()` them |
//! | `analytics_batches` | one marker per fully written batch |
//!
//! Every row carries `batch_seq`, the ledger commit it came from. Writing a batch is
//! idempotent, so the committer may retry it after any failure or crash:
//!
//! 1. If `analytics_batches` holds a marker for the batch, it is already written: done.
//! 2. Facts: if no `request_facts` row has the batch's `batch_seq`, insert all of them in ONE
//!    `INSERT`. If some do (an earlier attempt died after, or while, inserting), insert only
//!    the facts whose `event_id` is missing.
//! 3. Minutes (consolidated to one row per key first): the same, keyed by
//!    (tenant, model, minute, currency).
//! 4. Insert the marker.
//!
//! One `INSERT` of fewer than `max_insert_block_size` rows (1 048 576 by default) is one block
//! and lands atomically in each partition; a batch that straddles a month boundary lands as
//! one part per month, which is why step 2 and 3 complete missing keys instead of trusting a
//! bare count. The rule assumes one writer per database (the committer); two concurrent
//! writers of the same batch could both see it missing and both insert.
//!
//! The `batch_seq` checks are bounded by the batch's own time range so that ClickHouse reads
//! only the partitions the batch can be in.
//!
//! Wire details: rows go as `RowBinary` without schema validation (18.16 lacks
//! `RowBinaryWithNamesAndTypes`), uncompressed. `Decimal(38, 18)` is a little-endian `i128`
//! mantissa at scale 18, converted exactly from [`Decimal`] (an error if it does not fit),
//! `UUID` the two little-endian `u64` halves (high first), `DateTime` a `u32` of seconds.
//! Decimals are read back through `toString` and parsed exactly.

use std::collections::{BTreeMap, HashSet};

use clickhouse::{Client, Compression, Row};
use rust_decimal::Decimal;
use serde::Serialize;

use super::{Analytics, OutboxBatch, SinkError};
use crate::fact::{MinuteKey, PricedFact, Totals};

/// The analytics DDL, statements separated by `;`.
const DDL: &str = include_str!("../../../schemas/clickhouse/0001_analytics.sql");

/// Columns added after the tables were first created, as (table, column, type): `prepare`
/// adds each one a table lacks (ClickHouse 18.16 has no `ADD COLUMN IF NOT EXISTS`).
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("request_facts", "cache_hit", "UInt8 DEFAULT 0"),
    (
        "request_facts",
        "cache_savings",
        "Decimal(38, 18) DEFAULT 0",
    ),
    ("usage_minutes", "cache_hits", "Int64 DEFAULT 0"),
    (
        "usage_minutes",
        "cache_savings",
        "Decimal(38, 18) DEFAULT 0",
    ),
];

/// Scale of every `Decimal(38, 18)` column.
const SCALE: u32 = 18;

/// Analytics tables in one ClickHouse database, over HTTP.
#[derive(Debug, Clone)]
pub struct ClickHouseAnalytics {
    client: Client,
}

impl ClickHouseAnalytics {
    /// A sink writing to `database` at `url` (the HTTP interface, e.g. `http://127.0.0.1:8123`).
    pub fn new(url: &str, database: &str) -> ClickHouseAnalytics {
        let client = Client::default()
            .with_url(url)
            .with_database(database)
            .with_validation(false)
            .with_compression(Compression::None);
        ClickHouseAnalytics { client }
    }

    /// Authenticates as `user` with `password`.
    pub fn with_credentials(mut self, user: &str, password: &str) -> ClickHouseAnalytics {
        self.client = self.client.with_user(user).with_password(password);
        self
    }

    /// (tenant, currency, completions, exact cost) from `request_facts`, ordered.
    pub async fn totals_by_tenant(&self) -> Result<Vec<(String, String, i64, Decimal)>, SinkError> {
        self.totals(
            "SELECT tenant_id, currency, toInt64(count()), toString(sum(cost)) \
             FROM request_facts GROUP BY tenant_id, currency ORDER BY tenant_id, currency",
        )
        .await
    }

    /// (tenant, currency, requests, exact cost) from `usage_minutes`, ordered.
    pub async fn minute_totals_by_tenant(
        &self,
    ) -> Result<Vec<(String, String, i64, Decimal)>, SinkError> {
        self.totals(
            "SELECT tenant_id, currency, toInt64(sum(requests)), toString(sum(cost)) \
             FROM usage_minutes GROUP BY tenant_id, currency ORDER BY tenant_id, currency",
        )
        .await
    }

    async fn totals(&self, sql: &str) -> Result<Vec<(String, String, i64, Decimal)>, SinkError> {
        let rows: Vec<(String, String, i64, String)> =
            self.client.query_raw(sql).fetch_all().await?;
        rows.into_iter()
            .map(|(tenant, currency, requests, cost)| {
                Ok((tenant, currency, requests, parse_decimal(&cost)?))
            })
            .collect()
    }

    /// Whether the marker of batch `seq` exists.
    async fn batch_written(&self, seq: u64) -> Result<bool, SinkError> {
        let n: u64 = self
            .client
            .query("SELECT count() FROM analytics_batches WHERE batch_seq = ?")
            .bind(seq)
            .fetch_one()
            .await?;
        Ok(n > 0)
    }

    /// Inserts the facts of batch `seq` that `request_facts` does not hold yet.
    async fn write_facts(&self, seq: u64, facts: &[PricedFact]) -> Result<usize, SinkError> {
        let (Some(from), Some(to)) = (
            facts.iter().map(|f| seconds(f.fact.event_ms)).min(),
            facts.iter().map(|f| seconds(f.fact.event_ms)).max(),
        ) else {
            return Ok(0);
        };
        let present: u64 = self
            .client
            .query(
                "SELECT count() FROM request_facts \
                 WHERE event_time >= toDateTime(?) AND event_time <= toDateTime(?) AND batch_seq = ?",
            )
            .bind(from)
            .bind(to)
            .bind(seq)
            .fetch_one()
            .await?;
        let existing: HashSet<String> = if present == 0 {
            HashSet::new()
        } else {
            self.client
                .query(
                    "SELECT toString(event_id) FROM request_facts \
                     WHERE event_time >= toDateTime(?) AND event_time <= toDateTime(?) AND batch_seq = ?",
                )
                .bind(from)
                .bind(to)
                .bind(seq)
                .fetch_all::<String>()
                .await?
                .into_iter()
                .collect()
        };
        let rows = facts
            .iter()
            .filter(|f| {
                existing.is_empty()
                    || !existing.contains(&uuid::Uuid::from_u128(f.fact.event_id).to_string())
            })
            .map(|f| FactRow::new(f, seq))
            .collect::<Result<Vec<_>, _>>()?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut insert = self.client.insert::<FactRow<'_>>("request_facts").await?;
        for row in &rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        Ok(rows.len())
    }

    /// Inserts the minute rows of batch `seq` that `usage_minutes` does not hold yet.
    async fn write_minutes(
        &self,
        seq: u64,
        minutes: &BTreeMap<&MinuteKey, Totals>,
    ) -> Result<usize, SinkError> {
        let (Some(from), Some(to)) = (
            minutes.keys().map(|k| seconds(k.minute_ms)).min(),
            minutes.keys().map(|k| seconds(k.minute_ms)).max(),
        ) else {
            return Ok(0);
        };
        let present: u64 = self
            .client
            .query(
                "SELECT count() FROM usage_minutes \
                 WHERE minute >= toDateTime(?) AND minute <= toDateTime(?) AND batch_seq = ?",
            )
            .bind(from)
            .bind(to)
            .bind(seq)
            .fetch_one()
            .await?;
        let existing: HashSet<(String, String, u32, String)> = if present == 0 {
            HashSet::new()
        } else {
            self.client
                .query(
                    "SELECT tenant_id, model, toUInt32(minute), currency FROM usage_minutes \
                     WHERE minute >= toDateTime(?) AND minute <= toDateTime(?) AND batch_seq = ?",
                )
                .bind(from)
                .bind(to)
                .bind(seq)
                .fetch_all::<(String, String, u32, String)>()
                .await?
                .into_iter()
                .collect()
        };
        let rows = minutes
            .iter()
            .filter(|(k, _)| {
                existing.is_empty()
                    || !existing.contains(&(
                        k.tenant_id.clone(),
                        k.model.clone(),
                        seconds(k.minute_ms),
                        k.currency.clone(),
                    ))
            })
            .map(|(k, t)| MinuteRow::new(k, t, seq))
            .collect::<Result<Vec<_>, _>>()?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut insert = self.client.insert::<MinuteRow<'_>>("usage_minutes").await?;
        for row in &rows {
            insert.write(row).await?;
        }
        insert.end().await?;
        Ok(rows.len())
    }

    async fn mark_written(&self, seq: u64, rows: u64) -> Result<(), SinkError> {
        let written_at = seconds(unix_now_ms());
        let mut insert = self.client.insert::<BatchRow>("analytics_batches").await?;
        insert
            .write(&BatchRow {
                batch_seq: seq,
                rows,
                written_at,
            })
            .await?;
        insert.end().await?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Analytics for ClickHouseAnalytics {
    async fn prepare(&self) -> Result<(), SinkError> {
        for statement in ddl_statements(DDL) {
            self.client.query_raw(&statement).execute().await?;
        }
        for (table, column, kind) in ADDED_COLUMNS {
            let present: u64 = self
                .client
                .query(
                    "SELECT count() FROM system.columns
                     WHERE database = currentDatabase() AND table = ? AND name = ?",
                )
                .bind(*table)
                .bind(*column)
                .fetch_one()
                .await?;
            if present == 0 {
                self.client
                    .query_raw(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))
                    .execute()
                    .await?;
            }
        }
        Ok(())
    }

    async fn write(&self, batch: &OutboxBatch) -> Result<(), SinkError> {
        if self.batch_written(batch.seq).await? {
            tracing::debug!(seq = batch.seq, "analytics batch already written");
            return Ok(());
        }
        let minutes = consolidate(&batch.minutes);
        let facts_inserted = self.write_facts(batch.seq, &batch.facts).await?;
        let minutes_inserted = self.write_minutes(batch.seq, &minutes).await?;
        let batch_rows = u64::try_from(batch.facts.len() + minutes.len()).unwrap_or(u64::MAX);
        self.mark_written(batch.seq, batch_rows).await?;
        tracing::debug!(
            seq = batch.seq,
            facts_inserted,
            minutes_inserted,
            "analytics batch written"
        );
        Ok(())
    }
}

/// The statements of a DDL file: whole-line `--` comments dropped, split on `;`.
fn ddl_statements(sql: &str) -> Vec<String> {
    let code: String = sql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .map(|line| format!("{line}\n"))
        .collect();
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Sums minute deltas per key (a batch normally has one per key already) and drops zeros.
fn consolidate(minutes: &[(MinuteKey, Totals)]) -> BTreeMap<&MinuteKey, Totals> {
    let mut by_key: BTreeMap<&MinuteKey, Totals> = BTreeMap::new();
    for (key, totals) in minutes {
        by_key.entry(key).or_default().add(totals);
    }
    by_key.retain(|_, t| *t != Totals::default());
    by_key
}

/// A `DateTime` value: whole seconds, clamped to its range (1970 to 2106); the exact
/// milliseconds are kept in the `*_ms` columns.
fn seconds(ms: i64) -> u32 {
    u32::try_from(ms.div_euclid(1000).max(0)).unwrap_or(u32::MAX)
}

fn unix_now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    i64::try_from(now).unwrap_or(i64::MAX)
}

/// The `Decimal(38, 18)` mantissa of `d`: exact, or an error when `d` has more than 18
/// decimal places or more than 38 digits at scale 18.
fn decimal_mantissa(d: Decimal) -> Result<i128, SinkError> {
    let d = d.normalize();
    let scale = d.scale();
    let exact = SCALE
        .checked_sub(scale)
        .and_then(|up| d.mantissa().checked_mul(10i128.pow(up)))
        .filter(|m| m.unsigned_abs() < 10u128.pow(38));
    exact.ok_or_else(|| SinkError::Invalid(format!("{d} does not fit Decimal(38, 18) exactly")))
}

/// Parses a decimal printed by ClickHouse (18.16 pads to the full scale: `1.500000000000000000`).
fn parse_decimal(s: &str) -> Result<Decimal, SinkError> {
    let trimmed = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    };
    Decimal::from_str_exact(trimmed)
        .map_err(|e| SinkError::Invalid(format!("clickhouse decimal {s:?}: {e}")))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// One `request_facts` row.
#[derive(Debug, Row, Serialize)]
struct FactRow<'a> {
    #[serde(with = "clickhouse::serde::uuid")]
    event_id: uuid::Uuid,
    event_time: u32,
    event_ms: i64,
    received_ms: i64,
    tenant_id: &'a str,
    key_id: &'a str,
    request_id: &'a str,
    route: &'a str,
    requested_model: &'a str,
    model: &'a str,
    provider: &'a str,
    deployment: &'a str,
    stream: u8,
    outcome: &'static str,
    input_tokens: u64,
    cached_input_tokens: u64,
    cache_write_input_tokens: u64,
    output_tokens: u64,
    usage_counted: u8,
    /// -1: no first token.
    ttft_ms: i64,
    latency_ms: u64,
    retries: u32,
    fallbacks: u32,
    cost: i128,
    currency: &'a str,
    /// -1: unpriced.
    price_from_ms: i64,
    price_override: u8,
    kafka_partition: u32,
    kafka_offset: i64,
    batch_seq: u64,
    cache_hit: u8,
    cache_savings: i128,
}

impl<'a> FactRow<'a> {
    fn new(p: &'a PricedFact, batch_seq: u64) -> Result<FactRow<'a>, SinkError> {
        let f = &p.fact;
        Ok(FactRow {
            event_id: uuid::Uuid::from_u128(f.event_id),
            event_time: seconds(f.event_ms),
            event_ms: f.event_ms,
            received_ms: f.received_ms,
            tenant_id: &f.tenant_id,
            key_id: &f.key_id,
            request_id: &f.request_id,
            route: &f.route,
            requested_model: &f.requested_model,
            model: &f.model,
            provider: &f.provider,
            deployment: &f.deployment,
            stream: u8::from(f.stream),
            outcome: f.outcome.as_str(),
            input_tokens: f.input_tokens,
            cached_input_tokens: f.cached_input_tokens,
            cache_write_input_tokens: f.cache_write_input_tokens,
            output_tokens: f.output_tokens,
            usage_counted: u8::from(f.usage_counted),
            ttft_ms: f.ttft_ms.map_or(-1, to_i64),
            latency_ms: f.latency_ms,
            retries: f.retries,
            fallbacks: f.fallbacks,
            cost: decimal_mantissa(p.cost)?,
            currency: &p.currency,
            price_from_ms: p.price_from_ms.unwrap_or(-1),
            price_override: u8::from(p.price_override),
            kafka_partition: f.partition,
            kafka_offset: f.offset,
            batch_seq,
            cache_hit: u8::from(p.cache_savings.is_some()),
            cache_savings: decimal_mantissa(p.cache_savings.unwrap_or_default())?,
        })
    }
}

/// One `usage_minutes` row.
#[derive(Debug, Row, Serialize)]
struct MinuteRow<'a> {
    tenant_id: &'a str,
    model: &'a str,
    minute: u32,
    currency: &'a str,
    requests: i64,
    input_tokens: i64,
    cached_input_tokens: i64,
    cache_write_input_tokens: i64,
    output_tokens: i64,
    cost: i128,
    errors: i64,
    client_disconnects: i64,
    unpriced: i64,
    ttft_count: i64,
    ttft_sum_ms: i64,
    /// A `Vec`, not an array: serde writes arrays as tuples, ClickHouse wants a length prefix.
    ttft_buckets: Vec<i64>,
    batch_seq: u64,
    cache_hits: i64,
    cache_savings: i128,
}

impl<'a> MinuteRow<'a> {
    fn new(k: &'a MinuteKey, t: &Totals, batch_seq: u64) -> Result<MinuteRow<'a>, SinkError> {
        Ok(MinuteRow {
            tenant_id: &k.tenant_id,
            model: &k.model,
            minute: seconds(k.minute_ms),
            currency: &k.currency,
            requests: t.requests,
            input_tokens: t.input_tokens,
            cached_input_tokens: t.cached_input_tokens,
            cache_write_input_tokens: t.cache_write_input_tokens,
            output_tokens: t.output_tokens,
            cost: decimal_mantissa(t.cost)?,
            errors: t.errors,
            client_disconnects: t.client_disconnects,
            unpriced: t.unpriced,
            ttft_count: t.ttft_count,
            ttft_sum_ms: t.ttft_sum_ms,
            ttft_buckets: t.ttft_buckets.to_vec(),
            batch_seq,
            cache_hits: t.cache_hits,
            cache_savings: decimal_mantissa(t.cache_savings)?,
        })
    }
}

/// One `analytics_batches` row.
#[derive(Debug, Row, Serialize)]
struct BatchRow {
    batch_seq: u64,
    rows: u64,
    written_at: u32,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::str::FromStr;

    use super::*;
    use crate::fact::{Fact, Outcome};

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn ddl_splits_into_three_create_statements() {
        let statements = ddl_statements(DDL);
        assert_eq!(statements.len(), 3, "{statements:#?}");
        for s in &statements {
            assert!(s.starts_with("CREATE TABLE IF NOT EXISTS"), "{s}");
        }
    }

    #[test]
    fn decimals_convert_exactly_or_fail() {
        assert_eq!(decimal_mantissa(dec("0.000000000000000001")).unwrap(), 1);
        assert_eq!(
            decimal_mantissa(dec("123456789.123456789012345678")).unwrap(),
            123_456_789_123_456_789_012_345_678
        );
        assert_eq!(
            decimal_mantissa(dec("-2.50")).unwrap(),
            -2_500_000_000_000_000_000
        );
        assert_eq!(decimal_mantissa(Decimal::ZERO).unwrap(), 0);
        // Trailing zeros beyond scale 18 are not precision.
        assert_eq!(
            decimal_mantissa(dec("1.0000000000000000000000000")).unwrap(),
            1_000_000_000_000_000_000
        );
        assert!(decimal_mantissa(dec("0.0000000000000000001")).is_err());
        assert!(decimal_mantissa(Decimal::MAX).is_err());

        assert_eq!(parse_decimal("1.500000000000000000").unwrap(), dec("1.5"));
        assert_eq!(parse_decimal("0.000000000000000001").unwrap(), dec("1e-18"));
        assert_eq!(parse_decimal("-3").unwrap(), dec("-3"));
        assert_eq!(parse_decimal("100").unwrap(), dec("100"));
        assert_eq!(
            parse_decimal("0.000000000000000000").unwrap(),
            Decimal::ZERO
        );
        assert!(parse_decimal("abc").is_err());
    }

    /// A fresh database `tollgate_test_<random>` with the tables, or `None` (test skipped)
    /// without `TOLLGATE_CLICKHOUSE_URL`.
    async fn analytics(test: &str) -> Option<(ClickHouseAnalytics, Client, String)> {
        let Ok(url) = std::env::var("TOLLGATE_CLICKHOUSE_URL") else {
            #[allow(clippy::print_stderr)]
            {
                eprintln!("SKIPPED {test}: TOLLGATE_CLICKHOUSE_URL is not set");
            }
            return None;
        };
        let db = format!("tollgate_test_{}", uuid::Uuid::new_v4().simple());
        let admin = Client::default().with_url(&url).with_validation(false);
        admin
            .query_raw(&format!("CREATE DATABASE {db}"))
            .execute()
            .await
            .unwrap();
        let sink = ClickHouseAnalytics::new(&url, &db);
        sink.prepare().await.unwrap();
        sink.prepare().await.unwrap();
        Some((sink, admin, db))
    }

    async fn drop_db(admin: &Client, db: &str) {
        admin
            .query_raw(&format!("DROP DATABASE IF EXISTS {db}"))
            .execute()
            .await
            .unwrap();
    }

    fn priced(id: u128, tenant: &str, event_ms: i64, cost: &str, ttft: Option<u64>) -> PricedFact {
        PricedFact {
            fact: Fact {
                event_id: id,
                event_ms,
                received_ms: event_ms + 5,
                tenant_id: tenant.into(),
                key_id: "k1".into(),
                request_id: format!("req-{id}"),
                route: "/v1/chat/completions".into(),
                requested_model: "gpt".into(),
                model: "gpt-4o-2024".into(),
                provider: "openai".into(),
                deployment: "eu".into(),
                stream: true,
                outcome: if id.is_multiple_of(3) {
                    Outcome::UpstreamError
                } else {
                    Outcome::Completed
                },
                input_tokens: 100,
                cached_input_tokens: 20,
                cache_write_input_tokens: 0,
                output_tokens: 7,
                usage_counted: false,
                ttft_ms: ttft,
                latency_ms: 900,
                retries: 1,
                fallbacks: 0,
                partition: 2,
                offset: i64::try_from(id % 1_000_000).unwrap(),
            },
            cost: dec(cost),
            currency: "USD".into(),
            price_from_ms: if cost == "0" { None } else { Some(1_000) },
            price_override: false,
            unit: crate::fact::UnitPrices::default(),
            cache_savings: None,
        }
    }

    /// A batch with its minute deltas computed from its facts, as the dataflow would.
    fn batch(seq: u64, facts: Vec<PricedFact>) -> OutboxBatch {
        let mut minutes: BTreeMap<MinuteKey, Totals> = BTreeMap::new();
        for f in &facts {
            minutes.entry(f.minute_key()).or_default().add(&f.totals());
        }
        OutboxBatch {
            seq,
            facts,
            minutes: minutes.into_iter().collect(),
        }
    }

    // 2026-03-01T00:00:30Z and a minute before the month boundary.
    const MARCH: i64 = 1_772_323_230_000;
    const FEB: i64 = 1_772_323_170_000;

    fn sample(seq: u64, first_id: u128) -> OutboxBatch {
        batch(
            seq,
            vec![
                priced(first_id, "t1", MARCH, "0.000000000000000001", Some(80)),
                priced(
                    first_id + 1,
                    "t1",
                    FEB,
                    "123456789.123456789012345678",
                    None,
                ),
                priced(first_id + 2, "t2", MARCH + 61_000, "0", Some(20_000)),
                priced(first_id + 3, "t1", MARCH + 1, "2.5", Some(300)),
            ],
        )
    }

    fn expected_totals() -> Vec<(String, String, i64, Decimal)> {
        vec![
            (
                "t1".into(),
                "USD".into(),
                3,
                dec("123456791.623456789012345679"),
            ),
            ("t2".into(), "USD".into(), 1, Decimal::ZERO),
        ]
    }

    async fn count(admin: &Client, sql: &str) -> u64 {
        admin.query_raw(sql).fetch_one::<u64>().await.unwrap()
    }

    #[tokio::test]
    async fn clickhouse_same_batch_twice_is_written_once_and_exactly() {
        let Some((sink, admin, db)) = analytics("clickhouse_same_batch_twice").await else {
            return;
        };
        let b = sample(1, 0x0190_0000_0000_7000_8000_0000_0000_0001);
        sink.write(&b).await.unwrap();
        sink.write(&b).await.unwrap();

        assert_eq!(sink.totals_by_tenant().await.unwrap(), expected_totals());
        assert_eq!(
            sink.minute_totals_by_tenant().await.unwrap(),
            expected_totals()
        );
        assert_eq!(
            count(&admin, &format!("SELECT count() FROM {db}.request_facts")).await,
            4
        );
        assert_eq!(
            count(
                &admin,
                &format!("SELECT count() FROM {db}.analytics_batches")
            )
            .await,
            1
        );

        // Every value reads back exactly, the UUID in ClickHouse's own text form.
        let rows: Vec<(String, String, i64, i64)> = admin
            .query_raw(&format!(
                "SELECT toString(event_id), toString(cost), ttft_ms, price_from_ms \
                 FROM {db}.request_facts ORDER BY event_ms, event_id"
            ))
            .fetch_all()
            .await
            .unwrap();
        let mut facts = b.facts.clone();
        facts.sort_by_key(|f| (f.fact.event_ms, f.fact.event_id));
        assert_eq!(rows.len(), facts.len());
        for (row, f) in rows.iter().zip(&facts) {
            assert_eq!(row.0, uuid::Uuid::from_u128(f.fact.event_id).to_string());
            assert_eq!(parse_decimal(&row.1).unwrap(), f.cost);
            assert_eq!(row.2, f.fact.ttft_ms.map_or(-1, to_i64));
            assert_eq!(row.3, f.price_from_ms.unwrap_or(-1));
        }
        // Minute rows: TTFT buckets add up to the count, and the slow one is in the last bucket.
        let (ttft_count, bucket_sum, last): (i64, i64, i64) = admin
            .query_raw(&format!(
                "SELECT sum(ttft_count), sum(arraySum(ttft_buckets)), \
                 sum(ttft_buckets[8]) FROM {db}.usage_minutes"
            ))
            .fetch_one()
            .await
            .unwrap();
        assert_eq!((ttft_count, bucket_sum, last), (3, 3, 1));
        drop_db(&admin, &db).await;
    }

    #[tokio::test]
    async fn clickhouse_partial_write_is_completed_without_duplicates() {
        let Some((sink, admin, db)) = analytics("clickhouse_partial_write").await else {
            return;
        };
        let b = sample(7, 1_000);
        // A crash after some facts and some minutes landed, before the marker.
        sink.write_facts(b.seq, &b.facts[..2]).await.unwrap();
        let minutes = consolidate(&b.minutes);
        let first_minute: BTreeMap<&MinuteKey, Totals> = minutes
            .iter()
            .take(1)
            .map(|(k, t)| (*k, t.clone()))
            .collect();
        sink.write_minutes(b.seq, &first_minute).await.unwrap();
        assert!(!sink.batch_written(b.seq).await.unwrap());

        sink.write(&b).await.unwrap();
        sink.write(&b).await.unwrap();
        assert!(sink.batch_written(b.seq).await.unwrap());
        assert_eq!(sink.totals_by_tenant().await.unwrap(), expected_totals());
        assert_eq!(
            sink.minute_totals_by_tenant().await.unwrap(),
            expected_totals()
        );
        assert_eq!(
            count(&admin, &format!("SELECT count() FROM {db}.request_facts")).await,
            4
        );
        assert_eq!(
            count(&admin, &format!("SELECT count() FROM {db}.usage_minutes")).await,
            u64::try_from(minutes.len()).unwrap()
        );

        // Facts fully inserted but no marker: nothing is inserted again.
        let b2 = sample(8, 2_000);
        sink.write_facts(b2.seq, &b2.facts).await.unwrap();
        sink.write(&b2).await.unwrap();
        assert_eq!(
            count(&admin, &format!("SELECT count() FROM {db}.request_facts")).await,
            8
        );
        let totals = sink.totals_by_tenant().await.unwrap();
        assert_eq!(totals[0].2, 6);
        assert_eq!(
            totals[0].3,
            dec("123456791.623456789012345679") * Decimal::TWO
        );
        drop_db(&admin, &db).await;
    }

    #[tokio::test]
    async fn clickhouse_empty_batch_is_marked() {
        let Some((sink, admin, db)) = analytics("clickhouse_empty_batch").await else {
            return;
        };
        let empty = OutboxBatch {
            seq: 3,
            ..OutboxBatch::default()
        };
        sink.write(&empty).await.unwrap();
        sink.write(&empty).await.unwrap();
        assert!(sink.batch_written(3).await.unwrap());
        assert!(sink.totals_by_tenant().await.unwrap().is_empty());
        assert!(sink.minute_totals_by_tenant().await.unwrap().is_empty());
        assert_eq!(
            count(
                &admin,
                &format!("SELECT count() FROM {db}.analytics_batches")
            )
            .await,
            1
        );
        drop_db(&admin, &db).await;
    }
}
