//! The billing pipeline against real services: Kafka in, PostgreSQL ledger, Redis balances and
//! ClickHouse analytics out, with the real `tollgate-pipeline` binary killed (SIGKILL) at
//! random moments and restarted, and once aborting itself right after a ledger commit, before
//! Redis and ClickHouse were written. When it has caught up, the ledger, the balances and the
//! analytics sums must equal totals computed here, independently, from the events produced:
//! to the last decimal place.
//!
//! Needs `scripts/services.sh up postgres redis kafka clickhouse` and the variables
//! `TOLLGATE_DATABASE_URL`, `TOLLGATE_KAFKA_BOOTSTRAP`, `TOLLGATE_REDIS_URL`,
//! `TOLLGATE_CLICKHOUSE_URL` (the test command sets them). Without them each test prints
//! SKIPPED and passes without doing anything (under CI it fails).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
)] // test code: failing loudly and printing the numbers is the point

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use rust_decimal::Decimal;
use sqlx::Row;
use tollgate_pipeline::fact::billing_period;
use tollgate_pipeline::sink::clickhouse::ClickHouseAnalytics;
use tollgate_pipeline::sink::redis::RedisBalances;
use tollgate_pipeline::sink::BalanceStore;
use tollgate_pipeline::testkit::{Rng, Synthetic};
use tollgate_tests::process::{bin_dir, free_port, fresh_postgres_database};

const TENANTS: u64 = 12;
const MODELS: u64 = 3;
const EVENTS: usize = 30_000;

/// The services, or None (with a SKIPPED line; a failure under CI) when the variables are unset.
struct Services {
    database_url: String,
    kafka: String,
    redis: String,
    clickhouse: String,
}

async fn services(test: &str) -> Option<Services> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    match (
        var("TOLLGATE_KAFKA_BOOTSTRAP"),
        var("TOLLGATE_REDIS_URL"),
        var("TOLLGATE_CLICKHOUSE_URL"),
    ) {
        (Some(kafka), Some(redis), Some(clickhouse)) => {
            let Some(database_url) = fresh_postgres_database().await else {
                tollgate_tests::service_missing(
                    test,
                    "TOLLGATE_DATABASE_URL is not set (scripts/services.sh up postgres)",
                );
                return None;
            };
            Some(Services {
                database_url,
                kafka,
                redis,
                clickhouse,
            })
        }
        _ => {
            tollgate_tests::service_missing(
                test,
                "needs TOLLGATE_DATABASE_URL, TOLLGATE_KAFKA_BOOTSTRAP, TOLLGATE_REDIS_URL and \
                 TOLLGATE_CLICKHOUSE_URL (scripts/services.sh up)",
            );
            None
        }
    }
}

fn producer(bootstrap: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap()
}

fn produce(p: &BaseProducer, topic: &str, key: &str, ts: i64, payload: &[u8]) {
    let mut record = BaseRecord::to(topic)
        .key(key)
        .payload(payload)
        .timestamp(ts);
    loop {
        match p.send(record) {
            Ok(()) => break,
            Err((e, r)) => {
                assert!(
                    matches!(
                        e,
                        rdkafka::error::KafkaError::MessageProduction(
                            rdkafka::types::RDKafkaErrorCode::QueueFull
                        )
                    ),
                    "{e}"
                );
                record = r;
                p.poll(Duration::from_millis(10));
            }
        }
    }
    p.poll(Duration::ZERO);
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Prices per million tokens, computed here without the pipeline's code: model-k costs
/// input 1.1·(k+1), cached input a quarter of that, output 4.4·(k+1); from `change_ms` on,
/// model-0's prices are 3 times higher. Tenant ten_1 has its own price for model-1:
/// 0.000001 / 0 / 0.000003 (tiny, to exercise the 18 decimal places).
struct Book {
    change_ms: i64,
}

impl Book {
    fn prices(&self, tenant: &str, model: &str, at_ms: i64) -> (Decimal, Decimal, Decimal) {
        let k: i64 = model.trim_start_matches("model-").parse().unwrap();
        if tenant == "ten_1" && k == 1 {
            return (dec("0.000001"), Decimal::ZERO, dec("0.000003"));
        }
        let mut input = dec("1.1") * Decimal::from(k + 1);
        if k == 0 && at_ms >= self.change_ms {
            input *= Decimal::from(3);
        }
        (input, input / Decimal::from(4), input * Decimal::from(4))
    }

    fn cost(&self, s: &Synthetic) -> Decimal {
        let (i, c, o) = self.prices(&s.tenant_id, &s.model, s.event_ms);
        let u = &s.usage;
        (Decimal::from(u.input_tokens - u.cached_input_tokens) * i
            + Decimal::from(u.cached_input_tokens) * c
            + Decimal::from(u.output_tokens) * o)
            / Decimal::from(1_000_000)
    }
}

async fn insert_price(
    pool: &sqlx::PgPool,
    model: &str,
    tenant: &str,
    from_ms: i64,
    p: (Decimal, Decimal, Decimal),
) {
    sqlx::query(
        "INSERT INTO prices (model, tenant_id, effective_from, input_per_mtok, cached_input_per_mtok, output_per_mtok, currency)
         VALUES ($1, $2, to_timestamp($3::double precision / 1000), $4, $5, $6, 'USD')",
    )
    .bind(model)
    .bind(tenant)
    .bind(from_ms as f64)
    .bind(p.0)
    .bind(p.1)
    .bind(p.2)
    .execute(pool)
    .await
    .unwrap();
}

/// Expected figures per (tenant, period) and per (tenant, model, minute).
#[derive(Default, Debug)]
struct Expected {
    periods: BTreeMap<(String, String), (i64, Decimal)>,
    minutes: BTreeMap<(String, String, i64), (i64, Decimal)>,
    tenants: BTreeMap<String, (i64, Decimal)>,
}

impl Expected {
    fn add(&mut self, s: &Synthetic, cost: Decimal) {
        let p = self
            .periods
            .entry((s.tenant_id.clone(), billing_period(s.event_ms)))
            .or_default();
        p.0 += 1;
        p.1 += cost;
        let m = self
            .minutes
            .entry((
                s.tenant_id.clone(),
                s.model.clone(),
                s.event_ms.div_euclid(60_000) * 60_000,
            ))
            .or_default();
        m.0 += 1;
        m.1 += cost;
        let t = self.tenants.entry(s.tenant_id.clone()).or_default();
        t.0 += 1;
        t.1 += cost;
    }
}

struct Pipeline {
    child: Child,
}

impl Pipeline {
    fn start(
        s: &Services,
        topic: &str,
        redis_prefix: &str,
        ch_db: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Pipeline {
        let mut cmd = Command::new(bin_dir().join("tollgate-pipeline"));
        // The recovery scanner reads the request and chunk topics; a test that does not
        // give its own would have it read the shared default ones, whose requests' completions
        // are not in this test's topic, and bill them as lost.
        if !extra.contains(&"--requests-topic") {
            cmd.arg("--no-recovery");
        }
        cmd.args([
            "--kafka-bootstrap",
            &s.kafka,
            "--topic",
            topic,
            "--database-url",
            &s.database_url,
            "--redis-url",
            &s.redis,
            "--redis-prefix",
            redis_prefix,
            "--clickhouse-url",
            &s.clickhouse,
            "--clickhouse-database",
            ch_db,
            "--epoch-ms",
            "100",
            "--price-refresh-ms",
            "200",
        ])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Pipeline {
            child: cmd
                .spawn()
                .expect("tollgate-pipeline starts (cargo build --workspace --bins)"),
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn ledger_requests(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>("SELECT sum(requests)::BIGINT FROM usage_periods")
        .fetch_one(pool)
        .await
        .unwrap()
        .unwrap_or(0)
}

async fn wait_for_ledger(pool: &sqlx::PgPool, want: i64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let have = ledger_requests(pool).await;
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM pipeline_outbox")
            .fetch_one(pool)
            .await
            .unwrap();
        if have == want && outbox == 0 {
            return;
        }
        assert!(
            have <= want,
            "ledger counts {have} completions, more than the {want} produced"
        );
        assert!(
            Instant::now() < deadline,
            "ledger has {have} of {want} completions, outbox {outbox}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn check_all(
    s: &Services,
    pool: &sqlx::PgPool,
    expected: &Expected,
    redis_prefix: &str,
    ch_db: &str,
) {
    // Ledger: per tenant × period, and per tenant × model × minute.
    let mut periods = BTreeMap::new();
    for r in sqlx::query("SELECT tenant_id, period, requests, cost FROM usage_periods")
        .fetch_all(pool)
        .await
        .unwrap()
    {
        periods.insert(
            (r.get::<String, _>(0), r.get::<String, _>(1)),
            (r.get::<i64, _>(2), r.get::<Decimal, _>(3)),
        );
    }
    assert_eq!(periods, expected.periods, "usage_periods");
    let mut minutes = BTreeMap::new();
    for r in sqlx::query(
        "SELECT tenant_id, model, (extract(epoch FROM minute) * 1000)::BIGINT, requests, cost FROM usage_minutes",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    {
        minutes.insert(
            (r.get::<String, _>(0), r.get::<String, _>(1), r.get::<i64, _>(2)),
            (r.get::<i64, _>(3), r.get::<Decimal, _>(4)),
        );
    }
    assert_eq!(minutes.len(), expected.minutes.len(), "minute rows");
    assert_eq!(
        minutes, expected.minutes,
        "usage_minutes (late events must land in their minute)"
    );

    // Invoice lines (per tenant × period × model × price in force), summed per tenant.
    let mut lines: BTreeMap<String, (i64, Decimal)> = BTreeMap::new();
    for r in sqlx::query("SELECT tenant_id, requests, cost FROM usage_price_lines")
        .fetch_all(pool)
        .await
        .unwrap()
    {
        let e = lines.entry(r.get::<String, _>(0)).or_default();
        e.0 += r.get::<i64, _>(1);
        e.1 += r.get::<Decimal, _>(2);
    }
    assert_eq!(lines, expected.tenants, "usage_price_lines");

    // Redis balances.
    let balances = RedisBalances::connect(&s.redis, redis_prefix)
        .await
        .unwrap();
    for ((tenant, period), (requests, cost)) in &expected.periods {
        let b = balances
            .get(tenant, period, "USD")
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no Redis balance for {tenant} {period}"));
        assert_eq!(
            (b.requests, b.spend),
            (*requests, *cost),
            "Redis balance of {tenant} {period}"
        );
    }

    // ClickHouse: plain sums over the fact table and the minute rollups.
    let ch = ClickHouseAnalytics::new(&s.clickhouse, ch_db);
    let facts: BTreeMap<String, (i64, Decimal)> = ch
        .totals_by_tenant()
        .await
        .unwrap()
        .into_iter()
        .map(|(t, _currency, n, c)| (t, (n, c)))
        .collect();
    assert_eq!(facts, expected.tenants, "ClickHouse request_facts");
    let rollups: BTreeMap<String, (i64, Decimal)> = ch
        .minute_totals_by_tenant()
        .await
        .unwrap()
        .into_iter()
        .map(|(t, _currency, n, c)| (t, (n, c)))
        .collect();
    assert_eq!(rollups, expected.tenants, "ClickHouse usage_minutes");
}

async fn clickhouse_database(url: &str, name: &str, create: bool) {
    let q = if create {
        format!("CREATE DATABASE IF NOT EXISTS {name}")
    } else {
        format!("DROP DATABASE IF EXISTS {name}")
    };
    let r = reqwest::Client::new()
        .post(url)
        .body(q)
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "{}",
        r.text().await.unwrap_or_default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_at_random_moments_lose_and_double_count_nothing() {
    let Some(s) = services("crashes_at_random_moments_lose_and_double_count_nothing").await else {
        return;
    };
    let id = tollgate_tests::kafka::unique_suffix();
    let topic = format!("llm.completions.crash_{id}");
    let redis_prefix = format!("tollgate_test_{id}:");
    let ch_db = format!("tollgate_test_{id}");
    tollgate_tests::kafka::create_topic(&s.kafka, &topic, 6).await;
    clickhouse_database(&s.clickhouse, &ch_db, true).await;
    let pool = sqlx::PgPool::connect(&s.database_url).await.unwrap();
    // The pipeline migrates the database; so does this (same migrations) to seed prices first.
    tollgate_pipeline::sink::postgres::PostgresLedger::connect(&s.database_url)
        .await
        .unwrap();

    let seed = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("seed {seed}");
    let mut rng = Rng::new(seed);
    let now = tollgate_schemas::events::unix_ms(SystemTime::now());
    let start = now - 2 * 3_600_000;
    let book = Book {
        change_ms: start + 3_600_000,
    };
    for k in 0..MODELS {
        let model = format!("model-{k}");
        insert_price(&pool, &model, "", 0, book.prices("ten_0", &model, 0)).await;
    }
    insert_price(
        &pool,
        "model-1",
        "ten_1",
        0,
        book.prices("ten_1", "model-1", 0),
    )
    .await;

    // Events: the first half before the price change, the second half after it (plus late
    // events from before it); 3% duplicates sent again a little later; two malformed
    // messages that must end up as rejects, not bills.
    let mut expected = Expected::default();
    let mut first = Vec::new();
    let mut second = Vec::new();
    for i in 0..EVENTS {
        let half = i >= EVENTS / 2;
        let base = if half { book.change_ms } else { start };
        let mut at = base + (i % (EVENTS / 2)) as i64 * 3_600_000 / (EVENTS / 2) as i64;
        if rng.below(8) == 0 {
            at -= rng.below(20 * 60_000) as i64; // late, possibly before the change
            if !half {
                at = at.max(start - 20 * 60_000);
            }
        }
        if !half {
            at = at.min(book.change_ms - 1);
        }
        let s = Synthetic::random(&mut rng, TENANTS, MODELS, at);
        expected.add(&s, book.cost(&s));
        let out = if half { &mut second } else { &mut first };
        out.push(s.clone());
        if rng.below(33) == 0 {
            let later = if half || rng.below(2) == 0 {
                &mut second
            } else {
                &mut first
            };
            later.push(s);
        }
    }
    let third = second.split_off(second.len() * 2 / 3);
    let t0 = Instant::now();
    let p = producer(&s.kafka);
    let send_all = |events: &[Synthetic]| {
        for e in events {
            produce(&p, &topic, &e.tenant_id, e.event_ms, &e.payload());
        }
        p.flush(Duration::from_secs(30)).unwrap();
    };
    send_all(&first);
    produce(&p, &topic, "ten_0", now, b"{\"not\": \"a completion\"}");
    p.flush(Duration::from_secs(30)).unwrap();

    println!(
        "{:?} phase 1: ledger has {}",
        t0.elapsed(),
        ledger_requests(&pool).await
    );
    // Phase 1: kill it twice at random moments while it works through the first half.
    for _ in 0..2 {
        let run = Pipeline::start(&s, &topic, &redis_prefix, &ch_db, &["--workers", "3"], &[]);
        tokio::time::sleep(Duration::from_millis(700 + rng.below(1500))).await;
        run.kill();
    }
    // The price change is published while the stream runs; then the second half.
    let run = Pipeline::start(&s, &topic, &redis_prefix, &ch_db, &["--workers", "3"], &[]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    insert_price(
        &pool,
        "model-0",
        "",
        book.change_ms,
        book.prices("ten_0", "model-0", book.change_ms),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    send_all(&second);
    produce(&p, &topic, "ten_3", now, b"\xff\xfe not json");
    p.flush(Duration::from_secs(30)).unwrap();
    tokio::time::sleep(Duration::from_millis(rng.below(1000))).await;
    run.kill();

    // Phase 2: a crash right after a ledger commit, before Redis and ClickHouse are written.
    // The last third of the events goes in first, so that the run has something to commit.
    send_all(&third);
    let mut aborting = Pipeline::start(
        &s,
        &topic,
        &redis_prefix,
        &ch_db,
        &["--workers", "3"],
        &[("TOLLGATE_PIPELINE_ABORT_AFTER_COMMIT", "1")],
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = aborting.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the fault-injected run did not abort"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "the fault-injected run aborts");
    drop(aborting);

    // More random kills, then run until caught up.
    for _ in 0..2 {
        let run = Pipeline::start(&s, &topic, &redis_prefix, &ch_db, &["--workers", "3"], &[]);
        tokio::time::sleep(Duration::from_millis(300 + rng.below(2000))).await;
        run.kill();
    }
    let unique = expected.tenants.values().map(|v| v.0).sum::<i64>();
    let run = Pipeline::start(&s, &topic, &redis_prefix, &ch_db, &["--workers", "3"], &[]);
    wait_for_ledger(&pool, unique, Duration::from_secs(180)).await;
    // The balances follow the ledger commit; give the last one a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    run.kill();

    println!(
        "{:?} caught up: ledger has {}",
        t0.elapsed(),
        ledger_requests(&pool).await
    );
    check_all(&s, &pool, &expected, &redis_prefix, &ch_db).await;
    let rejects: i64 = sqlx::query_scalar("SELECT count(*) FROM pipeline_rejects")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rejects, 2, "both malformed messages are kept as rejects");
    let commits: (i64, i64) =
        sqlx::query_as("SELECT count(*), sum(duplicates)::BIGINT FROM pipeline_commits")
            .fetch_one(&pool)
            .await
            .unwrap();
    println!(
        "{} events ({} unique, {} duplicates sent), {} ledger commits, duplicates dropped by the committed runs: {}",
        first.len() + second.len() + third.len(),
        unique,
        first.len() + second.len() + third.len() - unique as usize,
        commits.0,
        commits.1
    );
    clickhouse_database(&s.clickhouse, &ch_db, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_process_cluster_writes_the_same_ledger_as_one_worker() {
    let Some(s) = services("a_two_process_cluster_writes_the_same_ledger_as_one_worker").await
    else {
        return;
    };
    let Some(second_db) = fresh_postgres_database().await else {
        return;
    };
    let id = tollgate_tests::kafka::unique_suffix();
    let topic = format!("llm.completions.cluster_{id}");
    tollgate_tests::kafka::create_topic(&s.kafka, &topic, 6).await;
    let mut rng = Rng::new(42);
    let now = tollgate_schemas::events::unix_ms(SystemTime::now());
    let p = producer(&s.kafka);
    let mut expected = Expected::default();
    let book = Book {
        change_ms: now - 1_800_000,
    };
    for i in 0..8000i64 {
        let e = Synthetic::random(&mut rng, TENANTS, MODELS, now - 3_600_000 + i * 450);
        expected.add(&e, book.cost(&e));
        produce(&p, &topic, &e.tenant_id, e.event_ms, &e.payload());
    }
    p.flush(Duration::from_secs(30)).unwrap();

    let mut ledgers = Vec::new();
    for (db, cluster) in [(s.database_url.clone(), false), (second_db, true)] {
        tollgate_pipeline::sink::postgres::PostgresLedger::connect(&db)
            .await
            .unwrap();
        let pool = sqlx::PgPool::connect(&db).await.unwrap();
        for k in 0..MODELS {
            let model = format!("model-{k}");
            insert_price(&pool, &model, "", 0, book.prices("ten_0", &model, 0)).await;
            if k == 0 {
                insert_price(
                    &pool,
                    &model,
                    "",
                    book.change_ms,
                    book.prices("ten_0", &model, book.change_ms),
                )
                .await;
            }
        }
        insert_price(
            &pool,
            "model-1",
            "ten_1",
            0,
            book.prices("ten_1", "model-1", 0),
        )
        .await;
        let common = |db: &str| {
            vec![
                "--kafka-bootstrap".to_string(),
                s.kafka.clone(),
                "--topic".into(),
                topic.clone(),
                "--database-url".into(),
                db.to_string(),
                "--epoch-ms".into(),
                "100".into(),
                "--exit-when-idle-ms".into(),
                "3000".into(),
                // No recovery scanner over the shared default request topics (see
                // `Pipeline::start`).
                "--no-recovery".into(),
            ]
        };
        let mut children = Vec::new();
        if cluster {
            let addresses = format!("127.0.0.1:{},127.0.0.1:{}", free_port(), free_port());
            for process in 0..2 {
                let mut args = common(&db);
                args.extend([
                    "--workers".into(),
                    "2".into(),
                    "--process".into(),
                    process.to_string(),
                    "--addresses".into(),
                    addresses.clone(),
                ]);
                children.push(
                    Command::new(bin_dir().join("tollgate-pipeline"))
                        .args(&args)
                        .env("RUST_LOG", "warn")
                        .spawn()
                        .unwrap(),
                );
            }
        } else {
            children.push(
                Command::new(bin_dir().join("tollgate-pipeline"))
                    .args(common(&db))
                    .env("RUST_LOG", "warn")
                    .spawn()
                    .unwrap(),
            );
        }
        for mut c in children {
            let status = tokio::task::spawn_blocking(move || c.wait().unwrap())
                .await
                .unwrap();
            assert!(status.success(), "pipeline exits cleanly when idle");
        }
        let rows: Vec<(String, String, i64, i64, i64, i64, Decimal)> = sqlx::query_as(
            "SELECT tenant_id, model, (extract(epoch FROM minute) * 1000)::BIGINT, requests, input_tokens, output_tokens, cost
             FROM usage_minutes ORDER BY 1, 2, 3",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        let total: i64 = rows.iter().map(|r| r.3).sum();
        assert_eq!(total, 8000);
        let by_tenant: BTreeMap<String, (i64, Decimal)> =
            rows.iter().fold(BTreeMap::new(), |mut m, r| {
                let e: &mut (i64, Decimal) = m.entry(r.0.clone()).or_default();
                e.0 += r.3;
                e.1 += r.6;
                m
            });
        assert_eq!(by_tenant, expected.tenants);
        ledgers.push(rows);
    }
    assert_eq!(
        ledgers[0], ledgers[1],
        "cluster ledger equals the single worker's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_agrees_and_then_reports_a_tampered_clickhouse_row() {
    let Some(s) = services("reconcile_agrees_and_then_reports_a_tampered_clickhouse_row").await
    else {
        return;
    };
    let id = tollgate_tests::kafka::unique_suffix();
    let topic = format!("llm.completions.reconcile_{id}");
    let ch_db = format!("tollgate_test_{id}");
    tollgate_tests::kafka::create_topic(&s.kafka, &topic, 3).await;
    clickhouse_database(&s.clickhouse, &ch_db, true).await;
    tollgate_pipeline::sink::postgres::PostgresLedger::connect(&s.database_url)
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&s.database_url).await.unwrap();
    let now = tollgate_schemas::events::unix_ms(SystemTime::now());
    let book = Book {
        change_ms: now - 60_000,
    };
    for k in 0..MODELS {
        let model = format!("model-{k}");
        insert_price(&pool, &model, "", 0, book.prices("ten_0", &model, 0)).await;
    }
    insert_price(
        &pool,
        "model-0",
        "",
        book.change_ms,
        book.prices("ten_0", "model-0", book.change_ms),
    )
    .await;
    let mut rng = Rng::new(9);
    let p = producer(&s.kafka);
    let mut events = Vec::new();
    for i in 0..2000i64 {
        let e = Synthetic::random(&mut rng, 4, MODELS, now - 120_000 + i * 50);
        produce(&p, &topic, &e.tenant_id, e.event_ms, &e.payload());
        if i % 50 == 0 {
            produce(&p, &topic, &e.tenant_id, e.event_ms, &e.payload()); // a duplicate
        }
        events.push(e);
    }
    p.flush(Duration::from_secs(30)).unwrap();
    let mut run = Pipeline::start(
        &s,
        &topic,
        &format!("tollgate_test_{id}:"),
        &ch_db,
        &["--exit-when-idle-ms", "2000"],
        &[],
    );
    let status = tokio::task::spawn_blocking(move || run.child.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success());

    let period = billing_period(now);
    let reconcile = || {
        Command::new(bin_dir().join("tollgate"))
            .args([
                "--database-url",
                &s.database_url,
                "reconcile",
                "--period",
                &period,
                "--kafka-bootstrap",
                &s.kafka,
                "--topic",
                &topic,
                "--clickhouse-url",
                &s.clickhouse,
                "--clickhouse-database",
                &ch_db,
            ])
            .env("RUST_LOG", "error")
            .output()
            .unwrap()
    };
    let ok = reconcile();
    let text = String::from_utf8_lossy(&ok.stdout).to_string();
    println!("{text}");
    assert!(
        ok.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(text.contains(", 0 with differences"), "{text}");

    // Tamper with one ClickHouse rollup row: reconcile must fail and show that row.
    let tamper = format!(
        "INSERT INTO {ch_db}.usage_minutes (tenant_id, model, minute, currency, requests, cost, ttft_buckets, batch_seq) \
         VALUES ('ten_0', 'model-1', toDateTime({}), 'USD', 1, 0.5, [0,0,0,0,0,0,0,0], 1)",
        now / 1000
    );
    let r = reqwest::Client::new()
        .post(&s.clickhouse)
        .body(tamper)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    let bad = reconcile();
    let text = String::from_utf8_lossy(&bad.stdout).to_string();
    println!("{text}");
    assert!(
        !bad.status.success(),
        "a tampered row must fail the reconciliation"
    );
    let row = text
        .lines()
        .find(|l| l.starts_with("ten_0\tmodel-1\t"))
        .unwrap_or_else(|| panic!("no differing row for ten_0/model-1: {text}"));
    let cols: Vec<&str> = row.split('\t').collect();
    let (events_n, events_cost) = cols[2].split_once(" / ").unwrap();
    let (ch_n, ch_cost) = cols[6].split_once(" / ").unwrap();
    assert_eq!(
        ch_n.parse::<i64>().unwrap(),
        events_n.parse::<i64>().unwrap() + 1
    );
    assert_eq!(dec(ch_cost), dec(events_cost) + dec("0.5"));
    assert!(text.contains(", 1 with differences"), "{text}");
    clickhouse_database(&s.clickhouse, &ch_db, false).await;
}

/// Every message of `topic` (all partitions, from the start), as `(topic, event)`.
fn consume_topic(bootstrap: &str, topic: &str) -> Vec<(String, serde_json::Value)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Message;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set(
            "group.id",
            format!("tollgate-test-{}", tollgate_tests::kafka::unique_suffix()),
        )
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(20))
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut remaining = 0;
    for p in md.topics()[0].partitions() {
        let (low, high) = c
            .fetch_watermarks(topic, p.id(), Duration::from_secs(20))
            .unwrap();
        remaining += high - low;
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(low))
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while remaining > 0 {
        assert!(
            Instant::now() < deadline,
            "{remaining} messages of {topic} missing"
        );
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            remaining -= 1;
            out.push((
                topic.to_string(),
                serde_json::from_slice(m.payload().unwrap_or_default()).unwrap(),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_and_postgres_bill_each_client_once_through_gateway_and_pipeline_kills() {
    use tollgate_tests::chaos;
    use tollgate_tests::process::{tollgate_ok, GatewayProcess};

    let test = "kafka_and_postgres_bill_each_client_once_through_gateway_and_pipeline_kills";
    let Some(s) = services(test).await else {
        return;
    };
    let id = tollgate_tests::kafka::unique_suffix();
    let [requests, chunks, completions] =
        ["requests", "chunks", "completions"].map(|t| format!("llm.{t}.chaos_{id}"));
    for t in [&requests, &chunks, &completions] {
        tollgate_tests::kafka::create_topic(&s.kafka, t, 3).await;
    }
    let ch_db = format!("tollgate_test_{id}");
    clickhouse_database(&s.clickhouse, &ch_db, true).await;
    // One PostgreSQL database holds the gateway's tenants, keys and prices and the ledger.
    let db = s.database_url.as_str();
    let tenant = tollgate_ok(&["--database-url", db, "tenants", "create", "chaos"]);
    let key = tollgate_ok(&["--database-url", db, "keys", "create", "--tenant", &tenant]);
    for model in ["mock/fast", "mock/realistic"] {
        tollgate_ok(&[
            "--database-url",
            db,
            "prices",
            "set",
            "--model",
            model,
            "--input",
            "1.234567",
            "--cached-input",
            "0",
            "--output",
            "9.87654321",
            "--effective-from",
            "2020-01-01T00:00:00Z",
        ]);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[events]\ntype = \"kafka\"\nbootstrap_servers = \"{}\"\nrequests_topic = \"{requests}\"\n\
             chunks_topic = \"{chunks}\"\ncompletions_topic = \"{completions}\"\nspool_dir = \"{}\"\n",
            s.kafka,
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let redis_prefix = format!("tollgate_test_{id}:");
    let pipeline = |extra: &[&str]| {
        let mut args = vec![
            "--requests-topic",
            requests.as_str(),
            "--chunks-topic",
            chunks.as_str(),
            "--orphan-timeout-ms",
            "1500",
        ];
        args.extend_from_slice(extra);
        Pipeline::start(&s, &completions, &redis_prefix, &ch_db, &args, &[])
    };
    let start = |round: usize| {
        let log = dir.path().join(format!("gw{round}.log"));
        let (data, config) = (data.clone(), config.clone());
        async move {
            GatewayProcess::start(
                &["--database-url", db, "--data-dir", &data],
                &[("TOLLGATE_CONFIG", config.to_str().unwrap())],
                log,
            )
            .await
        }
    };

    // The pipeline is SIGKILLed too, halfway, and restarted.
    let first = pipeline(&[]);
    let killer = async {
        tokio::time::sleep(Duration::from_millis(3500)).await;
        first.kill();
        pipeline(&[])
    };
    let pauses = chaos::kill_schedule(5);
    let ((received, _gw), second) = tokio::join!(
        chaos::clients_through_kills(start(0).await, &key, 32, &pauses, start),
        killer
    );

    // Wait for the orphan timeout and the pipeline: the ledger stops changing.
    let pool = sqlx::PgPool::connect(db).await.unwrap();
    let totals = || async {
        sqlx::query(
            "SELECT coalesce(sum(requests), 0)::BIGINT, coalesce(sum(input_tokens), 0)::BIGINT,
                    coalesce(sum(output_tokens), 0)::BIGINT, coalesce(sum(cost), 0)::TEXT
             FROM usage_periods WHERE tenant_id = $1",
        )
        .bind(&tenant)
        .fetch_one(&pool)
        .await
        .map(|r| {
            (
                r.get::<i64, _>(0),
                r.get::<i64, _>(1),
                r.get::<i64, _>(2),
                r.get::<String, _>(3),
            )
        })
        .unwrap()
    };
    let mut last = totals().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        tokio::time::sleep(Duration::from_millis(3000)).await;
        let now = totals().await;
        if now == last && now.0 > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the ledger never settled: {now:?}"
        );
        last = now;
    }
    drop(second);

    let logged: Vec<(String, serde_json::Value)> = [&requests, &completions]
        .into_iter()
        .flat_map(|t| consume_topic(&s.kafka, t))
        .collect();
    let (by_request, estimates) = chaos::index_events(logged.iter().map(|(_, e)| e));
    let want = chaos::check(&received, &by_request, &estimates);
    println!("{want:?}");
    let want_cost = (Decimal::from(want.input_tokens) * Decimal::from_str("1.234567").unwrap()
        + Decimal::from(want.output_tokens) * Decimal::from_str("9.87654321").unwrap())
        / Decimal::from(1_000_000);
    assert_eq!(
        (last.0, last.1 as u64, last.2 as u64),
        (want.requests, want.input_tokens, want.output_tokens),
        "the ledger holds exactly what the clients received"
    );
    assert_eq!(Decimal::from_str(&last.3).unwrap(), want_cost);
}
