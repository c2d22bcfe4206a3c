//! The whole billing dataflow over records held in memory: parse (JSON), dedup, price
//! lookup, the two aggregates and the commit operator, on 1 and on 2 worker threads.
//!
//! `cargo bench -p tollgate-pipeline --bench dataflow`. One run is one call of
//! [`tollgate_pipeline::execute`] over all the records, timed from the call to its return, so
//! it includes the start (each worker copies its partitions' records out of the shared
//! vector) and the final drain. Variants:
//!
//! * `discard`: no ledger ([`LedgerSpec::Discard`]): the commit operator merges the closed
//!   epochs and drops them. Without a ledger there is no price book either, so every
//!   completion goes through the price lookup unpriced.
//! * `sqlite`: the embedded SQLite ledger in a fresh directory per run, with a list price for
//!   each model: every completion is priced, and the closed epochs are committed (one
//!   transaction per commit, on worker 0's thread, as in production).
//!
//! Environment (defaults in brackets): `EVENTS` [1000000] records over 12 partitions,
//! 200 tenants × 20 models, event times spread over the last 10 minutes; `WORKERS` [1,2];
//! `ROUNDS` [3] runs per variant and worker count (the median is reported); `LEDGER`
//! [discard,sqlite] the variants; `EPOCH_MS` [200, the pipeline's default] the epoch length.

// A benchmark binary: it prints its results and stops at the first failure.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rust_decimal::Decimal;
use tollgate_pipeline::config::{
    AnalyticsSpec, BalanceSpec, LedgerSpec, Options, PipelineConfig, SourceSpec,
};
use tollgate_pipeline::fact::SourceRecord;
use tollgate_pipeline::testkit::{Rng, Synthetic};
use tollgate_pipeline::Cluster;

/// The same allocator as the `tollgate-pipeline` binary, so the numbers are the service's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PARTITIONS: u32 = 12;
const TENANTS: u64 = 200;
const MODELS: u64 = 20;
/// Event times are spread evenly over this span, ending now.
const SPAN_MS: i64 = 10 * 60_000;

/// What the commit operator writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Discard,
    Sqlite,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Discard => "discard",
            Variant::Sqlite => "sqlite",
        }
    }
}

impl FromStr for Variant {
    type Err = String;
    fn from_str(s: &str) -> Result<Variant, String> {
        match s.trim() {
            "discard" => Ok(Variant::Discard),
            "sqlite" => Ok(Variant::Sqlite),
            other => Err(format!(
                "LEDGER: unknown variant {other:?} (discard, sqlite)"
            )),
        }
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_string())
}

/// A comma-separated list from the environment variable `name`.
fn env_list<T: FromStr>(name: &str, default: &str) -> Result<Vec<T>, String>
where
    T::Err: std::fmt::Display,
{
    env_or(name, default)
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse::<T>()
                .map_err(|e| format!("{name}: {s:?}: {e}"))
        })
        .collect()
}

fn env_num(name: &str, default: &str) -> Result<usize, String> {
    let v = env_or(name, default).replace('_', "");
    v.trim().parse().map_err(|e| format!("{name}: {v:?}: {e}"))
}

fn now_ms() -> i64 {
    tollgate_schemas::events::unix_ms(SystemTime::now())
}

/// `n` completions over [`PARTITIONS`] partitions, offsets dense per partition, event times
/// increasing over the [`SPAN_MS`] before now.
fn generate(n: usize) -> Vec<SourceRecord> {
    let mut rng = Rng::new(0x7011_6a7e);
    let mut next_offset = [0i64; PARTITIONS as usize];
    let start = now_ms() - SPAN_MS;
    let n_i64 = i64::try_from(n.max(1)).unwrap_or(i64::MAX);
    let mut records = Vec::with_capacity(n);
    for i in 0..n {
        let i = i64::try_from(i).unwrap_or(i64::MAX);
        let at = start + i.saturating_mul(SPAN_MS) / n_i64;
        let s = Synthetic::random(&mut rng, TENANTS, MODELS, at);
        let p = u32::try_from(rng.below(u64::from(PARTITIONS))).unwrap_or(0);
        let slot = &mut next_offset[p as usize];
        records.push(s.record(p, *slot));
        *slot += 1;
    }
    records
}

/// A fresh SQLite ledger in `dir` with a list price (from the Unix epoch on) for every model.
fn sqlite_ledger_with_prices(dir: &std::path::Path) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        // Opening the ledger applies the migrations.
        tollgate_pipeline::sink::sqlite::SqliteLedger::open(dir)
            .await
            .map_err(|e| format!("sqlite ledger: {e}"))?;
        let url = format!("sqlite://{}", dir.join("tollgate.db").display());
        let pool = sqlx::SqlitePool::connect(&url)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        for k in 0..MODELS {
            let base = Decimal::from(k + 1);
            sqlx::query(
                "INSERT INTO prices (model, tenant_id, effective_from, input_per_mtok,
                   cached_input_per_mtok, output_per_mtok, currency, created_at)
                 VALUES (?, '', '1970-01-01T00:00:00Z', ?, ?, ?, 'USD', '1970-01-01T00:00:00Z')",
            )
            .bind(format!("model-{k}"))
            .bind(base.to_string())
            .bind((base / Decimal::from(4)).to_string())
            .bind((base * Decimal::from(4)).to_string())
            .execute(&pool)
            .await
            .map_err(|e| format!("seeding prices: {e}"))?;
        }
        pool.close().await;
        Ok(())
    })
}

/// One run: the wall time of `execute` over all `records`.
fn run_once(
    records: &Arc<Vec<SourceRecord>>,
    variant: Variant,
    workers: usize,
    epoch_ms: u64,
) -> Result<Duration, String> {
    // Kept alive until the run is over; removed on drop.
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
    let ledger = match variant {
        Variant::Discard => LedgerSpec::Discard,
        Variant::Sqlite => {
            sqlite_ledger_with_prices(dir.path())?;
            LedgerSpec::Sqlite {
                data_dir: dir.path().to_path_buf(),
            }
        }
    };
    let config = PipelineConfig {
        source: SourceSpec::Memory(Arc::clone(records)),
        ledger,
        balances: BalanceSpec::None,
        analytics: AnalyticsSpec::None,
        options: Options {
            epoch_ms,
            ..Options::default()
        },
    };
    let reports = tollgate_pipeline::execute(config, &Cluster::local(workers))
        .map_err(|e| format!("execute: {e}"))?;
    // The dataflow's time: from the first poll to the last commit of the slowest worker
    // (setting up the source — here copying the records into memory — is not the dataflow).
    let elapsed = reports.iter().map(|r| r.running).max().unwrap_or_default();
    let read: u64 = reports.iter().map(|r| r.records).sum();
    let committed: u64 = reports.iter().map(|r| r.events_committed).sum();
    let want = records.len() as u64;
    if read != want || committed != want {
        return Err(format!(
            "{} with {workers} worker(s): read {read} and committed {committed} of {want} records",
            variant.name()
        ));
    }
    Ok(elapsed)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn run() -> Result<(), String> {
    let events = env_num("EVENTS", "1000000")?;
    let rounds = env_num("ROUNDS", "3")?.max(1);
    let workers: Vec<usize> = env_list("WORKERS", "1,2")?;
    let variants: Vec<Variant> = env_list("LEDGER", "discard,sqlite")?;
    let epoch_ms = env_num("EPOCH_MS", "200")? as u64;
    if events == 0 || workers.contains(&0) {
        return Err("EVENTS and WORKERS must be above 0".into());
    }

    let started = Instant::now();
    let records = Arc::new(generate(events));
    let bytes: usize = records.iter().map(|r| r.payload.len()).sum();
    println!(
        "dataflow bench: {events} records ({} partitions, {TENANTS} tenants × {MODELS} models, \
         mean JSON payload {} bytes) generated in {:.1} s; epoch {epoch_ms} ms; {} cores",
        PARTITIONS,
        bytes / events,
        started.elapsed().as_secs_f64(),
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    // What every run pays before the dataflow sees a record: the memory source copies its
    // partitions' records (each worker its share, in parallel).
    let copy = Instant::now();
    let copied: Vec<SourceRecord> = records.iter().cloned().collect();
    let copy_s = copy.elapsed().as_secs_f64();
    drop(copied);
    println!(
        "(not counted: copying the records into the memory source at start, {:.0} ms on one \
         thread)",
        copy_s * 1000.0
    );
    println!();
    println!(
        "| ledger | workers | rounds | median s | events/s | events/s per worker | min–max events/s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");

    for &variant in &variants {
        for &w in &workers {
            let mut rates = Vec::with_capacity(rounds);
            let mut secs = Vec::with_capacity(rounds);
            for round in 1..=rounds {
                let elapsed = run_once(&records, variant, w, epoch_ms)?.as_secs_f64();
                let rate = events as f64 / elapsed.max(1e-9);
                eprintln!(
                    "  {} workers={w} round {round}: {elapsed:.3} s, {rate:.0} events/s",
                    variant.name()
                );
                rates.push(rate);
                secs.push(elapsed);
            }
            let min = rates.iter().copied().fold(f64::INFINITY, f64::min);
            let max = rates.iter().copied().fold(0.0, f64::max);
            let rate = median(rates);
            println!(
                "| {} | {w} | {rounds} | {:.3} | {rate:.0} | {:.0} | {min:.0}–{max:.0} |",
                variant.name(),
                median(secs),
                rate / w as f64,
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dataflow bench: {e}");
            ExitCode::FAILURE
        }
    }
}
