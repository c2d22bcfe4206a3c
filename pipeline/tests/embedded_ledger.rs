//! The dataflow over in-memory records into the SQLite ledger: totals equal an independent
//! computation, duplicates count once, late events land in their minute, a price change
//! applies from its effective time only, and several workers agree with one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;

use rust_decimal::Decimal;
use sqlx::Row;
use tollgate_pipeline::config::{
    AnalyticsSpec, BalanceSpec, LedgerSpec, Options, PipelineConfig, SourceSpec,
};
use tollgate_pipeline::fact::billing_period;
use tollgate_pipeline::testkit::{Rng, Synthetic};
use tollgate_pipeline::Cluster;
use tollgate_schemas::events::CompletionStatus;

const T0: i64 = 1_780_000_000_000; // 2026-05-28T20:26:40Z
const PRICE_CHANGE: i64 = T0 + 30 * 60_000;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Prices per million tokens: model-k costs (k+1, k+1)/2, 4(k+1) before PRICE_CHANGE and
/// twice that after; ten_0 has its own override of model-0 (always 0.25/0.125/1).
fn expected_cost(s: &Synthetic) -> Decimal {
    let k: i64 = s.model.trim_start_matches("model-").parse().unwrap();
    let (input, cached, output) = if s.tenant_id == "ten_0" && k == 0 {
        (dec("0.25"), dec("0.125"), dec("1"))
    } else {
        let base = Decimal::from(k + 1)
            * if s.event_ms >= PRICE_CHANGE {
                dec("2")
            } else {
                dec("1")
            };
        (base, base / dec("2"), base * dec("4"))
    };
    let u = &s.usage;
    (Decimal::from(u.input_tokens - u.cached_input_tokens) * input
        + Decimal::from(u.cached_input_tokens) * cached
        + Decimal::from(u.output_tokens) * output)
        / dec("1000000")
}

async fn seed_prices(pool: &sqlx::SqlitePool, models: i64) {
    let ts = |ms: i64| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let mut rows = Vec::new();
    for k in 0..models {
        let base = Decimal::from(k + 1);
        rows.push((
            format!("model-{k}"),
            String::new(),
            ts(0),
            base,
            base / dec("2"),
            base * dec("4"),
        ));
        let b2 = base * dec("2");
        rows.push((
            format!("model-{k}"),
            String::new(),
            ts(PRICE_CHANGE),
            b2,
            b2 / dec("2"),
            b2 * dec("4"),
        ));
    }
    rows.push((
        "model-0".into(),
        "ten_0".into(),
        ts(0),
        dec("0.25"),
        dec("0.125"),
        dec("1"),
    ));
    for (model, tenant, from, i, c, o) in rows {
        sqlx::query(
            "INSERT INTO prices (model, tenant_id, effective_from, input_per_mtok, cached_input_per_mtok, output_per_mtok, currency, created_at)
             VALUES (?, ?, ?, ?, ?, ?, 'USD', ?)",
        )
        .bind(model).bind(tenant).bind(from)
        .bind(i.to_string()).bind(c.to_string()).bind(o.to_string()).bind(ts(0))
        .execute(pool).await.unwrap();
    }
}

struct Generated {
    records: Vec<tollgate_pipeline::fact::SourceRecord>,
    unique: Vec<Synthetic>,
    duplicates: usize,
}

/// `n` events over 4 partitions spanning an hour, with ~5% duplicates (later offsets,
/// same partition) and shuffled event times within each partition (late events).
fn generate(n: usize, seed: u64) -> Generated {
    let mut rng = Rng::new(seed);
    let mut unique = Vec::new();
    let mut per_partition: Vec<Vec<Synthetic>> = vec![Vec::new(); 4];
    let mut duplicates = 0;
    for i in 0..n {
        let at = T0 + (i as i64 * 3_600_000) / n as i64;
        // Some events are late: up to 10 minutes behind.
        let at = if rng.below(10) == 0 {
            at - rng.below(600_000) as i64
        } else {
            at
        };
        let s = Synthetic::random(&mut rng, 7, 3, at);
        let p = (rng.below(4)) as usize;
        per_partition[p].push(s.clone());
        if rng.below(20) == 0 {
            per_partition[p].push(s.clone());
            duplicates += 1;
        }
        unique.push(s);
    }
    let mut records = Vec::new();
    for (p, events) in per_partition.iter().enumerate() {
        for (offset, s) in events.iter().enumerate() {
            records.push(s.record(p as u32, offset as i64));
        }
    }
    Generated {
        records,
        unique,
        duplicates,
    }
}

async fn ledger_totals(
    pool: &sqlx::SqlitePool,
) -> (HashMap<(String, String), (i64, Decimal)>, i64, Decimal) {
    let mut by_tenant_period = HashMap::new();
    for r in sqlx::query("SELECT tenant_id, period, requests, cost FROM usage_periods")
        .fetch_all(pool)
        .await
        .unwrap()
    {
        by_tenant_period.insert(
            (r.get::<String, _>(0), r.get::<String, _>(1)),
            (r.get::<i64, _>(2), dec(&r.get::<String, _>(3))),
        );
    }
    let mut minute_requests = 0;
    let mut minute_cost = Decimal::ZERO;
    for r in sqlx::query("SELECT requests, cost FROM usage_minutes")
        .fetch_all(pool)
        .await
        .unwrap()
    {
        minute_requests += r.get::<i64, _>(0);
        minute_cost += dec(&r.get::<String, _>(1));
    }
    (by_tenant_period, minute_requests, minute_cost)
}

fn run(records: Vec<tollgate_pipeline::fact::SourceRecord>, dir: &std::path::Path, workers: usize) {
    let config = PipelineConfig {
        source: SourceSpec::Memory(Arc::new(records)),
        ledger: LedgerSpec::Sqlite {
            data_dir: dir.to_path_buf(),
        },
        balances: BalanceSpec::None,
        analytics: AnalyticsSpec::None,
        options: Options {
            epoch_ms: 20,
            ..Options::default()
        },
    };
    tollgate_pipeline::execute(config, &Cluster::local(workers)).unwrap();
}

async fn open(dir: &std::path::Path) -> sqlx::SqlitePool {
    // Opening the ledger applies the migrations.
    tollgate_pipeline::sink::sqlite::SqliteLedger::open(dir)
        .await
        .unwrap();
    sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.join("tollgate.db").display()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn ledger_equals_independent_totals_with_duplicates_late_events_and_a_price_change() {
    let generated = generate(6000, 7);
    assert!(generated.duplicates > 100);
    let mut want: HashMap<(String, String), (i64, Decimal)> = HashMap::new();
    for s in &generated.unique {
        let e = want
            .entry((s.tenant_id.clone(), billing_period(s.event_ms)))
            .or_default();
        e.0 += 1;
        e.1 += expected_cost(s);
    }
    assert!(generated
        .unique
        .iter()
        .any(|s| s.status == CompletionStatus::UpstreamError));

    let mut results = Vec::new();
    for workers in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let pool = open(dir.path()).await;
        seed_prices(&pool, 3).await;
        let records = generated.records.clone();
        let path = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || run(records, &path, workers))
            .await
            .unwrap();
        let (have, minute_requests, minute_cost) = ledger_totals(&pool).await;
        assert_eq!(have, want, "{workers} worker(s)");
        let total_cost: Decimal = want.values().map(|v| v.1).sum();
        assert_eq!(minute_requests, generated.unique.len() as i64);
        assert_eq!(minute_cost, total_cost);
        let dups: i64 = sqlx::query_scalar("SELECT sum(duplicates) FROM pipeline_commits")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(dups, generated.duplicates as i64);
        let unpriced: i64 = sqlx::query_scalar("SELECT sum(unpriced) FROM usage_minutes")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(unpriced, 0);
        results.push(have);
    }
    assert_eq!(results[0], results[1]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_resumes_after_the_committed_positions_and_still_drops_duplicates() {
    let generated = generate(3000, 11);
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path()).await;
    seed_prices(&pool, 3).await;
    // First run sees the first half of every partition; the second run everything (the
    // source resumes at the committed positions; the duplicates of first-half events that sit
    // in the second half must still be dropped).
    let half: Vec<_> = {
        let mut by_p: HashMap<u32, Vec<_>> = HashMap::new();
        for r in &generated.records {
            by_p.entry(r.partition).or_default().push(r.clone());
        }
        by_p.into_values()
            .flat_map(|v| {
                let n = v.len() / 2;
                v.into_iter().take(n)
            })
            .collect()
    };
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || run(half, &path, 2))
        .await
        .unwrap();
    let all = generated.records.clone();
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || run(all, &path, 2))
        .await
        .unwrap();
    let (_, minute_requests, minute_cost) = ledger_totals(&pool).await;
    let want_cost: Decimal = generated.unique.iter().map(expected_cost).sum();
    assert_eq!(minute_requests, generated.unique.len() as i64);
    assert_eq!(minute_cost, want_cost);
}

/// What a hostile producer or a hand-edited price book can put in front of the pipeline: it
/// refuses counts beyond the pricing bounds (a reject, not a negative ledger), ignores price
/// rows out of range (their model is unpriced), clamps durations, and bills the rest exactly.
#[tokio::test(flavor = "multi_thread")]
async fn numbers_out_of_range_are_refused_and_billing_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path()).await;
    seed_prices(&pool, 1).await;
    sqlx::query(
        "INSERT INTO prices (model, tenant_id, effective_from, input_per_mtok, cached_input_per_mtok, output_per_mtok, currency, created_at)
         VALUES ('model-1', '', '1970-01-01T00:00:00Z', '79228162514264337593543950335', '0', '0', 'USD', '1970-01-01T00:00:00Z')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let mut rng = Rng::new(5);
    let mut good: Vec<Synthetic> = (0..20)
        .map(|_| Synthetic::random(&mut rng, 2, 1, T0))
        .collect();
    good[3].ttft_ms = Some(u64::MAX);
    let mut unpriced = Synthetic::random(&mut rng, 1, 1, T0);
    unpriced.model = "model-1".into();
    let mut huge = Synthetic::random(&mut rng, 1, 1, T0);
    huge.usage.input_tokens = u64::MAX;
    let mut just_over = Synthetic::random(&mut rng, 1, 1, T0);
    just_over.usage.output_tokens = tollgate_schemas::usage::MAX_TOKENS_PER_COUNT + 1;
    let mut records: Vec<_> = good
        .iter()
        .enumerate()
        .map(|(i, s)| s.record(0, i as i64))
        .collect();
    records.push(unpriced.record(0, 20));
    records.push(huge.record(0, 21));
    records.push(just_over.record(0, 22));
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || run(records, &path, 1))
        .await
        .unwrap();

    let rejects: Vec<(i64, String)> =
        sqlx::query_as("SELECT \"offset\", reason FROM pipeline_rejects ORDER BY \"offset\"")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        rejects.iter().map(|r| r.0).collect::<Vec<_>>(),
        [21, 22],
        "{rejects:?}"
    );
    assert!(rejects[0].1.contains("input_tokens"), "{rejects:?}");
    let (_, requests, cost) = ledger_totals(&pool).await;
    assert_eq!(requests, 21);
    assert_eq!(cost, good.iter().map(expected_cost).sum::<Decimal>());
    let (input, unpriced_n): (i64, i64) =
        sqlx::query_as("SELECT sum(input_tokens), sum(unpriced) FROM usage_minutes")
            .fetch_one(&pool)
            .await
            .unwrap();
    let want_input: u64 = good
        .iter()
        .chain([&unpriced])
        .map(|s| s.usage.input_tokens)
        .sum();
    assert_eq!(input, want_input as i64);
    assert_eq!(unpriced_n, 1, "the model whose price row is out of range");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_messages_are_kept_as_rejects_not_billed() {
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path()).await;
    let mut rng = Rng::new(3);
    let good = Synthetic::random(&mut rng, 1, 1, T0);
    let records = vec![
        good.record(0, 0),
        tollgate_pipeline::fact::SourceRecord {
            partition: 0,
            offset: 1,
            timestamp_ms: T0,
            payload: b"{not json".to_vec(),
            replay_only: false,
        },
        tollgate_pipeline::fact::SourceRecord {
            partition: 0,
            offset: 2,
            timestamp_ms: T0,
            payload: br#"{"schema_version": 99}"#.to_vec(),
            replay_only: false,
        },
    ];
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || run(records, &path, 1))
        .await
        .unwrap();
    let rejects: Vec<(i64, String)> =
        sqlx::query_as("SELECT \"offset\", reason FROM pipeline_rejects ORDER BY \"offset\"")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(rejects.len(), 2, "{rejects:?}");
    assert_eq!(rejects[0].0, 1);
    assert_eq!(rejects[1].0, 2);
    let requests: i64 = sqlx::query_scalar("SELECT sum(requests) FROM usage_minutes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(requests, 1);
    let unpriced: i64 = sqlx::query_scalar("SELECT sum(unpriced) FROM usage_minutes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        unpriced, 1,
        "no price book: the completion is counted as unpriced"
    );
    let next: i64 = sqlx::query_scalar("SELECT next_offset FROM pipeline_positions")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(next, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn invoice_lines_split_by_price_and_late_events_of_a_closed_period_are_booked_later() {
    let generated = generate(3000, 5);
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path()).await;
    seed_prices(&pool, 3).await;
    let mut by_p: HashMap<u32, Vec<_>> = HashMap::new();
    for r in &generated.records {
        by_p.entry(r.partition).or_default().push(r.clone());
    }
    let first: Vec<_> = by_p
        .values()
        .flat_map(|v| v.iter().take(v.len() / 2).cloned())
        .collect();
    let first_ids: std::collections::HashSet<Vec<u8>> =
        first.iter().map(|r| r.payload.clone()).collect();
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || run(first, &path, 2))
        .await
        .unwrap();
    // Close the period, then let the rest arrive: it is booked into the next period.
    sqlx::query("INSERT INTO billing_periods (period, closed_at) VALUES ('2026-05', '2026-06-01T00:00:00Z')")
        .execute(&pool)
        .await
        .unwrap();
    let all = generated.records.clone();
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || run(all, &path, 2))
        .await
        .unwrap();

    let mut first_cost = Decimal::ZERO;
    let mut later_cost = Decimal::ZERO;
    let mut seen = std::collections::HashSet::new();
    let by_payload: HashMap<Vec<u8>, &Synthetic> =
        generated.unique.iter().map(|s| (s.payload(), s)).collect();
    for r in &generated.records {
        let s = by_payload[&r.payload];
        if !seen.insert(s.event_id.clone()) {
            continue;
        }
        if first_ids.contains(&r.payload) {
            first_cost += expected_cost(s);
        } else {
            later_cost += expected_cost(s);
        }
    }
    let lines: Vec<(String, String, String, i64, String, i64)> = sqlx::query_as(
        "SELECT period, event_period, model, price_from_ms, cost, requests FROM usage_price_lines",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let sum = |period: &str| -> Decimal {
        lines
            .iter()
            .filter(|l| l.0 == period)
            .map(|l| dec(&l.4))
            .sum()
    };
    assert_eq!(
        sum("2026-05"),
        first_cost,
        "lines booked in the closed period"
    );
    assert_eq!(
        sum("2026-06"),
        later_cost,
        "late lines booked into the next period"
    );
    assert!(lines
        .iter()
        .filter(|l| l.0 == "2026-06")
        .all(|l| l.1 == "2026-05"));
    // model-1 had two list prices during the period: two lines per booking period.
    let model1: std::collections::HashSet<i64> = lines
        .iter()
        .filter(|l| l.2 == "model-1" && l.0 == "2026-05")
        .map(|l| l.3)
        .collect();
    assert_eq!(model1.len(), 2, "{lines:?}");
    let requests: i64 = lines.iter().map(|l| l.5).sum();
    assert_eq!(requests, generated.unique.len() as i64);
}
