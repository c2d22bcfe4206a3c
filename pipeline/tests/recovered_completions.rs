//! Recovered completions through the dataflow into the SQLite ledger: a recovered completion
//! is billed; a real completion arriving after it replaces it exactly once (the ledger holds
//! the real usage only); a recovered completion arriving after the real one, and duplicates
//! of either, are dropped; the same with several workers and across a restart between the
//! recovered completion and the real one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::str::FromStr;
use std::sync::Arc;

use rust_decimal::Decimal;
use sqlx::Row;
use tollgate_pipeline::config::{
    AnalyticsSpec, BalanceSpec, LedgerSpec, Options, PipelineConfig, SourceSpec,
};
use tollgate_pipeline::fact::SourceRecord;
use tollgate_pipeline::testkit::{Rng, Synthetic};
use tollgate_pipeline::Cluster;

const T0: i64 = 1_780_000_000_000;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// model-k: input (k+1), cached input (k+1)/2, output 4(k+1) per million tokens.
fn cost(s: &Synthetic) -> Decimal {
    let k: i64 = s.model.trim_start_matches("model-").parse().unwrap();
    let base = Decimal::from(k + 1);
    let u = &s.usage;
    (Decimal::from(u.input_tokens - u.cached_input_tokens) * base
        + Decimal::from(u.cached_input_tokens) * base / dec("2")
        + Decimal::from(u.output_tokens) * base * dec("4"))
        / dec("1000000")
}

async fn open(dir: &std::path::Path) -> sqlx::SqlitePool {
    tollgate_pipeline::sink::sqlite::SqliteLedger::open(dir)
        .await
        .unwrap();
    let pool =
        sqlx::SqlitePool::connect(&format!("sqlite://{}", dir.join("tollgate.db").display()))
            .await
            .unwrap();
    for k in 0..2i64 {
        let base = Decimal::from(k + 1);
        sqlx::query(
            "INSERT INTO prices (model, tenant_id, effective_from, input_per_mtok, cached_input_per_mtok, output_per_mtok, currency, created_at)
             VALUES (?, '', '1970-01-01T00:00:00Z', ?, ?, ?, 'USD', '1970-01-01T00:00:00Z')",
        )
        .bind(format!("model-{k}"))
        .bind(base.to_string())
        .bind((base / dec("2")).to_string())
        .bind((base * dec("4")).to_string())
        .execute(&pool)
        .await
        .unwrap();
    }
    pool
}

fn run(records: Vec<SourceRecord>, dir: &std::path::Path, workers: usize) {
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

/// What the ledger must hold: requests, input tokens, output tokens, cost.
#[derive(Debug, Default, PartialEq, Eq, Clone, Copy)]
struct Want {
    requests: i64,
    input: i64,
    output: i64,
    cost: Decimal,
}

impl Want {
    fn add(&mut self, s: &Synthetic) {
        self.requests += 1;
        self.input += s.usage.input_tokens as i64;
        self.output += s.usage.output_tokens as i64;
        self.cost += cost(s);
    }
}

struct Scenario {
    /// Per partition, in offset order: first phase, then second phase.
    phases: [Vec<Vec<Synthetic>>; 2],
    want: Want,
    duplicates: i64,
    /// Requests whose recovered completion is billed in the first phase and replaced in the
    /// second.
    replaced: usize,
}

/// `n` requests over two partitions (by tenant), four kinds in turn:
/// - lost: only a recovered completion (published twice: a scanner restart);
/// - replaced: recovered first, the real completion in the second phase (then the recovered
///   one once more, as a scanner that had not seen the real one yet would);
/// - raced: the real completion first, the recovered one in the second phase;
/// - plain: only the real completion, duplicated now and then.
fn scenario(n: usize) -> Scenario {
    let mut rng = Rng::new(17);
    let mut phases: [Vec<Vec<Synthetic>>; 2] = [vec![Vec::new(); 2], vec![Vec::new(); 2]];
    let mut want = Want::default();
    let mut duplicates = 0;
    let mut replaced = 0;
    for i in 0..n {
        let at = T0 + (i as i64) * 1_000;
        let real = Synthetic::random(&mut rng, 4, 2, at);
        let p = real
            .tenant_id
            .trim_start_matches("ten_")
            .parse::<usize>()
            .unwrap()
            % 2;
        let recovered = real.recovered(real.usage.output_tokens / 2, at - 500);
        match i % 4 {
            0 => {
                phases[0][p].push(recovered.clone());
                phases[1][p].push(recovered.clone());
                duplicates += 1;
                want.add(&recovered);
            }
            1 => {
                phases[0][p].push(recovered.clone());
                phases[1][p].push(real.clone());
                phases[1][p].push(recovered.clone());
                duplicates += 1;
                want.add(&real);
                replaced += 1;
            }
            2 => {
                phases[0][p].push(real.clone());
                phases[1][p].push(recovered.clone());
                duplicates += 1;
                want.add(&real);
            }
            _ => {
                phases[0][p].push(real.clone());
                if rng.below(3) == 0 {
                    phases[1][p].push(real.clone());
                    duplicates += 1;
                }
                want.add(&real);
            }
        }
    }
    Scenario {
        phases,
        want,
        duplicates,
        replaced,
    }
}

impl Scenario {
    /// Records of the first phase only (`all = false`) or of both.
    fn records(&self, all: bool) -> Vec<SourceRecord> {
        let mut out = Vec::new();
        for p in 0..2 {
            let events = self.phases[0][p]
                .iter()
                .chain(self.phases[1][p].iter().filter(|_| all));
            for (offset, s) in events.enumerate() {
                out.push(s.record(p as u32, offset as i64));
            }
        }
        out
    }
}

async fn ledger(pool: &sqlx::SqlitePool) -> (Want, i64) {
    let mut have = Want::default();
    for r in sqlx::query("SELECT requests, input_tokens, output_tokens, cost FROM usage_minutes")
        .fetch_all(pool)
        .await
        .unwrap()
    {
        have.requests += r.get::<i64, _>(0);
        have.input += r.get::<i64, _>(1);
        have.output += r.get::<i64, _>(2);
        have.cost += dec(&r.get::<String, _>(3));
    }
    let mut period_requests = 0;
    let mut period_cost = Decimal::ZERO;
    for r in sqlx::query("SELECT requests, cost FROM usage_periods")
        .fetch_all(pool)
        .await
        .unwrap()
    {
        period_requests += r.get::<i64, _>(0);
        period_cost += dec(&r.get::<String, _>(1));
    }
    assert_eq!(
        (period_requests, period_cost),
        (have.requests, have.cost),
        "periods agree with minutes"
    );
    let duplicates: i64 = sqlx::query_scalar("SELECT sum(duplicates) FROM pipeline_commits")
        .fetch_one(pool)
        .await
        .unwrap();
    (have, duplicates)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_completion_replaces_the_recovered_one_exactly_once() {
    let s = scenario(400);
    // Billing the recovered completions as well would show up as a difference.
    let mut naive = Want::default();
    for p in 0..2 {
        for e in s.phases[0][p].iter() {
            naive.add(e);
        }
    }
    assert_ne!(naive, s.want);
    for workers in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let pool = open(dir.path()).await;
        let records = s.records(true);
        let path = dir.path().to_path_buf();
        tokio::task::spawn_blocking(move || run(records, &path, workers))
            .await
            .unwrap();
        let (have, duplicates) = ledger(&pool).await;
        assert_eq!(have, s.want, "{workers} worker(s)");
        assert_eq!(duplicates, s.duplicates, "{workers} worker(s)");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_replacement_survives_a_restart_between_recovered_and_real() {
    let s = scenario(400);
    assert!(s.replaced >= 100);
    let dir = tempfile::tempdir().unwrap();
    let pool = open(dir.path()).await;
    // First run: the first phase only (the recovered completions of the replaced requests
    // are billed); second run: everything, resuming at the committed positions (the first
    // phase is replayed only to refill the dedup memory).
    let first = s.records(false);
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || run(first, &path, 2))
        .await
        .unwrap();
    let (after_first, _) = ledger(&pool).await;
    assert_eq!(
        after_first.requests, 400,
        "one billed completion per request"
    );

    let all = s.records(true);
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || run(all, &path, 2))
        .await
        .unwrap();
    let (have, duplicates) = ledger(&pool).await;
    assert_eq!(have, s.want);
    assert_eq!(duplicates, s.duplicates);

    // A third run over the same records changes nothing.
    let all = s.records(true);
    let path = dir.path().to_path_buf();
    tokio::task::spawn_blocking(move || run(all, &path, 1))
        .await
        .unwrap();
    let (again, duplicates) = ledger(&pool).await;
    assert_eq!(again, s.want);
    assert_eq!(duplicates, s.duplicates);
}
