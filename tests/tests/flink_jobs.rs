//! The Flink SQL jobs (`flink-jobs/`) against the timely pipeline, on real Kafka and
//! PostgreSQL with a local Flink mini-cluster started by `flink-jobs/run`:
//!
//! - `flink_and_the_pipeline_agree_on_the_same_events`: one topic of generated completions
//!   (several tenants and models, a tenant override, a price change and a new override in the
//!   middle of the event time, an unpriced model, cache reads and writes, duplicates, late and
//!   out-of-order events, a malformed message) goes through `tollgate-pipeline` and through the
//!   Flink job; per tenant × model × minute and per tenant × period the two agree with each
//!   other and with totals computed here, to the last decimal place.
//! - `flink_killed_mid_stream_resumes_from_its_checkpoint`: the Flink job's process group is
//!   SIGKILLed while it consumes the second half of the events and started again; it must say
//!   that it restored a checkpoint, and the totals must still be exact (no event lost or
//!   counted twice).
//!
//! Needs `scripts/services.sh up postgres kafka` with `TOLLGATE_DATABASE_URL` and
//! `TOLLGATE_KAFKA_BOOTSTRAP` (the test command sets them), and what `flink-jobs/run setup`
//! installs (Java 17, the `apache-flink` PyPI package, the connector jars; scripts/test.sh
//! runs it first). Without the services the tests print SKIPPED (under CI they fail).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
)] // test code: failing loudly and printing the numbers is the point

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use rust_decimal::Decimal;
use sqlx::Row;
use tollgate_pipeline::fact::billing_period;
use tollgate_pipeline::testkit::{Rng, Synthetic};
use tollgate_tests::process::{bin_dir, fresh_postgres_database};

const TENANTS: u64 = 4;
/// model-0..model-2 have prices; model-3 has none (billed as unpriced, cost 0).
const MODELS: u64 = 4;
const EVENTS: usize = 1_500;

/// One Flink mini-cluster at a time: the tests of this file run one after the other.
static FLINK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Services {
    database_url: String,
    kafka: String,
}

async fn services(test: &str) -> Option<Services> {
    let Some(kafka) = std::env::var("TOLLGATE_KAFKA_BOOTSTRAP")
        .ok()
        .filter(|v| !v.trim().is_empty())
    else {
        tollgate_tests::service_missing(
            test,
            "TOLLGATE_KAFKA_BOOTSTRAP is not set (scripts/services.sh up kafka)",
        );
        return None;
    };
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
    })
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Prices per million tokens, written here without the pipeline's code: model-k costs
/// input 1.1·(k+1), cached input a quarter of that, output 4.4·(k+1); from `change_ms` on
/// model-0 costs 3 times as much. ten_1 has its own price for model-1 all along
/// (0.000001 / 0 / 0.000003: tiny, for the 18 decimal places); ten_2 gets its own price for
/// model-2 only from `change_ms` on (before it, the list price applies).
struct Book {
    change_ms: i64,
}

type Prices = (Decimal, Decimal, Decimal);

impl Book {
    fn prices(&self, tenant: &str, model: &str, at_ms: i64) -> Option<Prices> {
        let k: i64 = model.trim_start_matches("model-").parse().unwrap();
        if k >= 3 {
            return None;
        }
        if tenant == "ten_1" && k == 1 {
            return Some((dec("0.000001"), Decimal::ZERO, dec("0.000003")));
        }
        if tenant == "ten_2" && k == 2 && at_ms >= self.change_ms {
            return Some((dec("0.5"), dec("0.125000000001"), dec("2.000000000007")));
        }
        let mut input = dec("1.1") * Decimal::from(k + 1);
        if k == 0 && at_ms >= self.change_ms {
            input *= Decimal::from(3);
        }
        Some((input, input / Decimal::from(4), input * Decimal::from(4)))
    }

    /// What `s` costs: its usage, and for a cache hit its fraction of the original answer's
    /// usage.
    fn cost(&self, s: &Synthetic) -> Decimal {
        let Some((i, c, o)) = self.prices(&s.tenant_id, &s.model, s.event_ms) else {
            return Decimal::ZERO;
        };
        let of = |u: &tollgate_schemas::TokenUsage| {
            let uncached = u.input_tokens - u.cached_input_tokens - u.cache_write_input_tokens;
            (Decimal::from(uncached) * i
                + Decimal::from(u.cached_input_tokens) * c
                + Decimal::from(u.cache_write_input_tokens) * i
                + Decimal::from(u.output_tokens) * o)
                / Decimal::from(1_000_000)
        };
        // A hit's charge is rounded to the ledger's 18 decimal places, half away from zero.
        let hit = s.cache.as_ref().map_or(Decimal::ZERO, |(saved, fraction)| {
            (of(saved) * dec(fraction))
                .round_dp_with_strategy(18, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
        });
        of(&s.usage) + hit
    }

    async fn publish(&self, pool: &sqlx::PgPool) {
        let insert = |model: String, tenant: &'static str, from_ms: i64, p: Prices| async move {
            sqlx::query(
                "INSERT INTO prices (model, tenant_id, effective_from, input_per_mtok, \
                 cached_input_per_mtok, output_per_mtok, currency) \
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
        };
        for k in 0..3 {
            let model = format!("model-{k}");
            insert(
                model.clone(),
                "",
                0,
                self.prices("ten_0", &model, 0).unwrap(),
            )
            .await;
        }
        let m0 = "model-0".to_string();
        let changed = self.prices("ten_0", &m0, self.change_ms).unwrap();
        insert(m0, "", self.change_ms, changed).await;
        let m1 = "model-1".to_string();
        insert(
            m1.clone(),
            "ten_1",
            0,
            self.prices("ten_1", &m1, 0).unwrap(),
        )
        .await;
        let m2 = "model-2".to_string();
        let own = self.prices("ten_2", &m2, self.change_ms).unwrap();
        insert(m2, "ten_2", self.change_ms, own).await;
    }
}

/// Requests, input, cached input, cache-write input, output tokens, exact cost.
type Figures = (i64, i64, i64, i64, i64, Decimal);

#[derive(Default, Debug, PartialEq)]
struct Totals {
    /// (tenant, model, minute start in ms)
    minutes: BTreeMap<(String, String, i64), Figures>,
    /// (tenant, period, currency)
    periods: BTreeMap<(String, String, String), Figures>,
}

fn add(f: &mut Figures, s: &Synthetic, cost: Decimal) {
    f.0 += 1;
    f.1 += s.usage.input_tokens as i64;
    f.2 += s.usage.cached_input_tokens as i64;
    f.3 += s.usage.cache_write_input_tokens as i64;
    f.4 += s.usage.output_tokens as i64;
    f.5 += cost;
}

impl Totals {
    fn add(&mut self, s: &Synthetic, cost: Decimal) {
        let minute = s.event_ms.div_euclid(60_000) * 60_000;
        add(
            self.minutes
                .entry((s.tenant_id.clone(), s.model.clone(), minute))
                .or_default(),
            s,
            cost,
        );
        add(
            self.periods
                .entry((
                    s.tenant_id.clone(),
                    billing_period(s.event_ms),
                    "USD".into(),
                ))
                .or_default(),
            s,
            cost,
        );
    }

    fn requests(&self) -> i64 {
        self.periods.values().map(|f| f.0).sum()
    }

    /// The figures of two tables of the same shape: the pipeline's ledger (`prefix` "") or
    /// the Flink job's (`prefix` "flink_").
    async fn read(pool: &sqlx::PgPool, prefix: &str) -> Totals {
        let figures = |r: &sqlx::postgres::PgRow, at: usize| -> Figures {
            (
                r.get(at),
                r.get(at + 1),
                r.get(at + 2),
                r.get(at + 3),
                r.get(at + 4),
                r.get::<Decimal, _>(at + 5).normalize(),
            )
        };
        let mut t = Totals::default();
        let tokens = "requests, input_tokens, cached_input_tokens, cache_write_input_tokens, \
                      output_tokens, cost";
        for r in sqlx::query(&format!(
            "SELECT tenant_id, model, (extract(epoch FROM minute) * 1000)::BIGINT, {tokens} \
             FROM {prefix}usage_minutes"
        ))
        .fetch_all(pool)
        .await
        .unwrap()
        {
            t.minutes
                .insert((r.get(0), r.get(1), r.get(2)), figures(&r, 3));
        }
        for r in sqlx::query(&format!(
            "SELECT tenant_id, period, currency, {tokens} FROM {prefix}usage_periods"
        ))
        .fetch_all(pool)
        .await
        .unwrap()
        {
            t.periods
                .insert((r.get(0), r.get(1), r.get(2)), figures(&r, 3));
        }
        t
    }

    fn normalized(mut self) -> Totals {
        for f in self.minutes.values_mut().chain(self.periods.values_mut()) {
            f.5 = f.5.normalize();
        }
        self
    }
}

/// The events of a run, in the order they are produced, and the totals they must give.
struct Scenario {
    book: Book,
    events: Vec<Synthetic>,
    expected: Totals,
}

/// Completions over two hours of event time with the price change in the middle: 1 in 8
/// late by up to 20 minutes (possibly across the price change), 1 in 30 sent twice (the copy
/// a little later), cache reads everywhere and cache writes on 1 in 4, 1 in 10 a response
/// cache hit billed at a fraction (0, a quarter, a third to six places, or all) of its
/// original answer's price.
fn scenario(seed: u64) -> Scenario {
    let mut rng = Rng::new(seed);
    let now = tollgate_schemas::events::unix_ms(SystemTime::now());
    let start = now - 3 * 3_600_000;
    let book = Book {
        change_ms: start + 3_600_000,
    };
    let mut expected = Totals::default();
    let mut events: Vec<Synthetic> = Vec::new();
    let mut copies: Vec<(usize, Synthetic)> = Vec::new();
    for i in 0..EVENTS {
        let mut at = start + i as i64 * 2 * 3_600_000 / EVENTS as i64;
        if rng.below(8) == 0 {
            at -= rng.below(20 * 60_000) as i64;
        }
        let mut s = Synthetic::random(&mut rng, TENANTS, MODELS, at);
        if rng.below(4) == 0 {
            let room = s.usage.input_tokens - s.usage.cached_input_tokens;
            s.usage.cache_write_input_tokens = rng.below(room + 1);
        }
        if rng.below(10) == 0 {
            s = s.cache_hit(["0", "0.25", "0.333333", "1"][rng.below(4) as usize]);
        }
        expected.add(&s, book.cost(&s));
        if rng.below(30) == 0 {
            copies.push((i + 1 + rng.below(200) as usize, s.clone()));
        }
        events.push(s);
    }
    // Each copy goes in a little later than its original.
    copies.sort_by_key(|(at, _)| std::cmp::Reverse(*at));
    for (at, s) in copies {
        events.insert(at.min(events.len()), s);
    }
    Scenario {
        book,
        events,
        expected: expected.normalized(),
    }
}

/// Produces `events` (keyed by tenant, like the gateway) and waits until Kafka has them all.
fn produce(bootstrap: &str, topic: &str, events: &[Synthetic], malformed: bool) {
    produce_paced(bootstrap, topic, events, malformed, false);
}

/// [`produce`]; `paced`: 10 events, then a 40 ms pause, and so on.
fn produce_paced(bootstrap: &str, topic: &str, events: &[Synthetic], malformed: bool, paced: bool) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let send = |key: &str, ts: i64, payload: &[u8]| {
        let mut record = BaseRecord::to(topic)
            .key(key)
            .payload(payload)
            .timestamp(ts);
        loop {
            match p.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    p.poll(Duration::from_millis(10));
                }
            }
        }
        p.poll(Duration::ZERO);
    };
    for (i, e) in events.iter().enumerate() {
        send(&e.tenant_id, e.event_ms, &e.payload());
        if malformed && i == events.len() / 3 {
            send("ten_0", e.event_ms, b"{\"not\": \"a completion\"");
        }
        if paced && i % 10 == 9 {
            p.flush(Duration::from_secs(30)).unwrap();
            std::thread::sleep(Duration::from_millis(40));
        }
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// `flink-jobs/run` in a process group of its own (it runs a JVM beside its Python process),
/// so that a kill takes the whole mini-cluster down like a crash of its machine would.
struct Flink {
    child: Child,
    log: PathBuf,
}

impl Flink {
    fn start(s: &Services, topic: &str, checkpoints: &Path, bounded: bool, log: PathBuf) -> Flink {
        let run = Path::new(env!("CARGO_MANIFEST_DIR")).join("../flink-jobs/run");
        let mut cmd = Command::new(run);
        cmd.args(["--kafka-bootstrap", &s.kafka, "--topic", topic])
            .args(["--database-url", &s.database_url])
            .args(["--group-id", &format!("tollgate-test-{topic}")])
            .arg("--checkpoint-dir")
            .arg(checkpoints)
            .args(["--checkpoint-interval-ms", "1000", "--parallelism", "2"]);
        if bounded {
            cmd.arg("--bounded");
        }
        let out = std::fs::File::create(&log).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0);
        Flink {
            child: cmd.spawn().expect("flink-jobs/run starts"),
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a bounded run to finish (10 minutes at most: a hang must not block CI).
    async fn finish(mut self) {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "flink-jobs/run failed ({status}):\n{}",
                    tail(&self.log_text())
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "flink-jobs/run still running after 10 minutes:\n{}",
                tail(&self.log_text())
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILL to the whole process group: the Python driver and the mini-cluster's JVM.
    fn kill(mut self) {
        let pgid = self.child.id();
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Flink {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.child.id())])
                .status();
            let _ = self.child.wait();
        }
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

struct Pipeline(Child);

impl Drop for Pipeline {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_pipeline(s: &Services, topic: &str) -> Pipeline {
    Pipeline(
        Command::new(bin_dir().join("tollgate-pipeline"))
            .args([
                "--no-recovery",
                "--kafka-bootstrap",
                &s.kafka,
                "--topic",
                topic,
            ])
            .args(["--database-url", &s.database_url, "--epoch-ms", "100"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("tollgate-pipeline starts (cargo build --workspace --bins)"),
    )
}

async fn requests_in(pool: &sqlx::PgPool, table: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>(&format!("SELECT sum(requests)::BIGINT FROM {table}"))
        .fetch_one(pool)
        .await
        .unwrap_or(None)
        .unwrap_or(0)
}

/// Waits until `table` counts `want` requests (5 minutes at most). With `flink`, fails as
/// soon as that job has stopped, with its log.
async fn wait_for_requests(
    pool: &sqlx::PgPool,
    table: &str,
    want: i64,
    mut flink: Option<&mut Flink>,
) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let have = requests_in(pool, table).await;
        if have == want {
            return;
        }
        let log = || {
            flink
                .as_ref()
                .map(|f| tail(&f.log_text()))
                .unwrap_or_default()
        };
        assert!(
            have <= want,
            "{table} counts {have} requests, more than {want}"
        );
        assert!(
            Instant::now() < deadline,
            "{table} has {have} of {want} requests after 5 minutes\n{}",
            log()
        );
        if let Some(f) = flink.as_mut() {
            if let Some(status) = f.child.try_wait().unwrap() {
                panic!(
                    "flink-jobs/run stopped ({status}):\n{}",
                    tail(&f.log_text())
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn prepare(s: &Services, topic: &str, scenario: &Scenario) -> sqlx::PgPool {
    tollgate_tests::kafka::create_topic(&s.kafka, topic, 3).await;
    // The pipeline's migrations create the price book (and the ledger).
    tollgate_pipeline::sink::postgres::PostgresLedger::connect(&s.database_url)
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&s.database_url).await.unwrap();
    scenario.book.publish(&pool).await;
    pool
}

fn assert_same(what: &str, have: &Totals, want: &Totals) {
    for (name, h, w) in [
        ("minutes", &have.minutes.len(), &want.minutes.len()),
        ("periods", &have.periods.len(), &want.periods.len()),
    ] {
        assert_eq!(h, w, "{what}: number of {name} rows");
    }
    for (k, w) in &want.minutes {
        assert_eq!(have.minutes.get(k), Some(w), "{what}: minute {k:?}");
    }
    for (k, w) in &want.periods {
        assert_eq!(have.periods.get(k), Some(w), "{what}: period {k:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flink_and_the_pipeline_agree_on_the_same_events() {
    let test = "flink_and_the_pipeline_agree_on_the_same_events";
    let Some(s) = services(test).await else {
        return;
    };
    let _one_at_a_time = FLINK.lock().await;
    let id = tollgate_tests::kafka::unique_suffix();
    let topic = format!("llm.completions.flink_{id}");
    let scenario = scenario(tollgate_tests::seed("TOLLGATE_FLINK_SEED"));
    let pool = prepare(&s, &topic, &scenario).await;
    produce(&s.kafka, &topic, &scenario.events, true);
    let want = &scenario.expected;

    let t0 = Instant::now();
    let pipeline = start_pipeline(&s, &topic);
    wait_for_requests(&pool, "usage_periods", want.requests(), None).await;
    drop(pipeline);
    println!("pipeline caught up in {:?}", t0.elapsed());

    let dir = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    Flink::start(
        &s,
        &topic,
        &dir.path().join("checkpoints"),
        true,
        dir.path().join("flink.log"),
    )
    .finish()
    .await;
    println!("flink bounded run took {:?}", t0.elapsed());

    let ledger = Totals::read(&pool, "").await;
    let flink = Totals::read(&pool, "flink_").await;
    assert_same("pipeline ledger vs expected", &ledger, want);
    assert_same("flink vs pipeline ledger", &flink, &ledger);
    assert_eq!(flink, ledger);
    // The model without a price is there, at cost 0, on both sides.
    assert!(flink.minutes.keys().any(|(_, m, _)| m == "model-3"));
    let unpriced = |table: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT sum(unpriced)::BIGINT FROM {table}"))
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let flink_unpriced = unpriced("flink_usage_minutes").await;
    assert!(flink_unpriced > 0);
    assert_eq!(
        flink_unpriced,
        unpriced("usage_minutes").await,
        "unpriced completions"
    );

    // `tollgate reconcile --flink` agrees for every period of the events, then shows a row
    // tampered with by one unit of the 18th decimal place and fails.
    let periods: std::collections::BTreeSet<&String> = want.periods.keys().map(|k| &k.1).collect();
    for period in &periods {
        let (ok, text) = reconcile_flink(&s, period);
        assert!(ok, "reconcile --flink {period}:\n{text}");
        assert!(text.contains(", 0 with differences"), "{text}");
    }
    let (tenant, model, minute) = flink.minutes.keys().next().unwrap().clone();
    sqlx::query(
        "UPDATE flink_usage_minutes SET cost = cost + 0.000000000000000001 \
         WHERE tenant_id = $1 AND model = $2 AND (extract(epoch FROM minute) * 1000)::BIGINT = $3",
    )
    .bind(&tenant)
    .bind(&model)
    .bind(minute)
    .execute(&pool)
    .await
    .unwrap();
    let (ok, text) = reconcile_flink(&s, &billing_period(minute));
    assert!(
        !ok,
        "a tampered Flink row must fail the reconciliation:\n{text}"
    );
    let at = tollgate_schemas::events::rfc3339_from_unix_ms(minute);
    let row = text
        .lines()
        .find(|l| l.starts_with(&format!("{tenant}\t{model}\t{at}\t")))
        .unwrap_or_else(|| panic!("no differing row for {tenant} {model} {at}:\n{text}"));
    assert!(row.ends_with("\tDIFFERENT"), "{row}");
    assert!(text.contains(", 1 with differences"), "{text}");
}

/// `tollgate reconcile --flink --period P`: (succeeded, standard output).
fn reconcile_flink(s: &Services, period: &str) -> (bool, String) {
    let out = Command::new(bin_dir().join("tollgate"))
        .args(["--database-url", &s.database_url, "reconcile", "--flink"])
        .args(["--period", period])
        .env("RUST_LOG", "error")
        .output()
        .expect("tollgate runs (cargo build --workspace --bins)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    (
        out.status.success(),
        format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flink_killed_mid_stream_resumes_from_its_checkpoint() {
    let test = "flink_killed_mid_stream_resumes_from_its_checkpoint";
    let Some(s) = services(test).await else {
        return;
    };
    let _one_at_a_time = FLINK.lock().await;
    let id = tollgate_tests::kafka::unique_suffix();
    let topic = format!("llm.completions.flinkkill_{id}");
    let scenario = scenario(tollgate_tests::seed("TOLLGATE_FLINK_SEED"));
    let pool = prepare(&s, &topic, &scenario).await;
    let (first, second) = scenario.events.split_at(scenario.events.len() / 2);
    produce(&s.kafka, &topic, first, false);

    // A streaming run: it reads the first half, checkpoints, and is killed while the second
    // half is arriving.
    let dir = tempfile::tempdir().unwrap();
    let checkpoints = dir.path().join("checkpoints");
    let mut flink = Flink::start(&s, &topic, &checkpoints, false, dir.path().join("run1.log"));
    let first_unique: std::collections::HashSet<&str> =
        first.iter().map(|e| e.event_id.as_str()).collect();
    let n = first_unique.len() as i64;
    wait_for_requests(&pool, "flink_usage_periods", n, Some(&mut flink)).await;
    wait_for_checkpoint(&checkpoints, 1, &flink).await;
    // The second half trickles in (10 events every 40 ms) while the job runs; it is killed
    // once some of it is written (rows newer than the last checkpoint, which the restarted
    // job must overwrite, not add to).
    let producer = {
        let (kafka, topic, second) = (s.kafka.clone(), topic.clone(), second.to_vec());
        std::thread::spawn(move || produce_paced(&kafka, &topic, &second, false, true))
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let seen = loop {
        let seen = requests_in(&pool, "flink_usage_periods").await;
        if seen > n {
            break seen;
        }
        assert!(
            Instant::now() < deadline,
            "none of the second half written:\n{}",
            tail(&flink.log_text())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    flink.kill();
    producer.join().unwrap();
    println!(
        "killed with {seen} of {} requests written",
        scenario.expected.requests()
    );

    // The restarted job runs on (a restored Kafka source keeps the unbounded end of the first
    // run). Its end is found without timing: one marker completion per partition after all
    // the events; once the three are counted, every event before them was read, and the
    // next checkpoint that starts after that has flushed both sinks.
    let flink = Flink::start(&s, &topic, &checkpoints, false, dir.path().join("run2.log"));
    produce_end_markers(&s.kafka, &topic, 3);
    wait_for_end_markers(&pool, 3).await;
    let done = newest_checkpoint(&checkpoints);
    wait_for_checkpoint(&checkpoints, done + 2, &flink).await;
    let text = flink.log_text();
    assert!(
        text.contains("restoring from checkpoint"),
        "the second run did not restore a checkpoint:\n{}",
        tail(&text)
    );
    drop(flink);
    let mut flink = Totals::read(&pool, "flink_").await;
    flink.minutes.retain(|(t, _, _), _| t != END_TENANT);
    flink.periods.retain(|(t, _, _), _| t != END_TENANT);
    assert_same("flink after a kill vs expected", &flink, &scenario.expected);
}

/// The tenant of the end markers (not part of the totals).
const END_TENANT: &str = "ten_end";

fn produce_end_markers(bootstrap: &str, topic: &str, partitions: i32) {
    let p: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let mut rng = Rng::new(7);
    let now = tollgate_schemas::events::unix_ms(SystemTime::now());
    for partition in 0..partitions {
        let mut marker = Synthetic::random(&mut rng, 1, 1, now);
        marker.tenant_id = END_TENANT.into();
        let payload = marker.payload();
        p.send(
            BaseRecord::to(topic)
                .key(END_TENANT)
                .payload(&payload)
                .partition(partition),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

async fn wait_for_end_markers(pool: &sqlx::PgPool, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let have: i64 = sqlx::query_scalar(
            "SELECT COALESCE(sum(requests), 0)::BIGINT FROM flink_usage_periods WHERE tenant_id = $1",
        )
        .bind(END_TENANT)
        .fetch_one(pool)
        .await
        .unwrap();
        if have == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{have} of {want} end markers counted after 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The highest number of a complete checkpoint (chk-N with its _metadata) under `dir`, 0 if
/// none.
fn newest_checkpoint(dir: &Path) -> u64 {
    let Ok(jobs) = std::fs::read_dir(dir) else {
        return 0;
    };
    jobs.flatten()
        .filter_map(|job| std::fs::read_dir(job.path()).ok())
        .flat_map(|entries| entries.flatten())
        .filter(|e| e.path().join("_metadata").exists())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("chk-")
                .and_then(|n| n.parse().ok())
        })
        .max()
        .unwrap_or(0)
}

/// Waits (2 minutes at most) until a checkpoint numbered `n` or higher is complete.
async fn wait_for_checkpoint(dir: &Path, n: u64, flink: &Flink) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while newest_checkpoint(dir) < n {
        assert!(
            Instant::now() < deadline,
            "no checkpoint {n} completed:\n{}",
            tail(&flink.log_text())
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
