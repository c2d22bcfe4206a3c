//! `tollgate reconcile --period YYYY-MM`: proves that the raw completion events, the ledger,
//! the analytics tables and the invoices agree, per tenant × model.
//!
//! | column | computed from |
//! |---|---|
//! | events | the completion events themselves (Kafka topic or the local log), duplicates (same `event_id`) counted once, a recovered completion (`usage.source = recovered`) only when its request has no real one, priced here with the price book by the rules of `tollgate_schemas::pricing` |
//! | minutes | ledger `usage_minutes` of the period |
//! | lines | ledger `usage_price_lines` whose usage happened in the period (wherever booked) |
//! | ch_facts, ch_minutes | ClickHouse `request_facts` (without the facts of recovered completions a real one replaced) and `usage_minutes` (when `--clickhouse-url` is given) |
//! | invoice | the amounts of the period's invoice lines (adjustments booked into later periods included), compared with each ledger line's cost rounded by the invoice rule |
//!
//! Recovered completions (requests a gateway lost, billed by the pipeline's recovery scanner)
//! are also reported on their own per tenant × model: how many are billed, their tokens, and
//! how many were replaced by a real completion that arrived later.
//!
//! Requests and exact costs must be equal in every column; any difference is printed and the
//! command fails. With `--flink` it compares instead the Flink SQL job's tables (flink-jobs/)
//! with the ledger, per tenant × model × minute and per tenant × period ([`reconcile_flink`]). A price inserted with an `effective_from` in the past after its events were
//! billed shows up here as a difference (the ledger is never restated silently).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use rust_decimal::Decimal;
use sqlx::Row;
use time::OffsetDateTime;
use tollgate_schemas::events::{
    offset_unix_ms, parse_event_time, rfc3339_from_unix_ms, topics, unix_ms, CompletionEvent,
};
use tollgate_schemas::UsageSource;

use crate::invoices::{round_money, LineKind, Period};
use crate::store::{LedgerLocation, MetaStore};

/// Errors of a reconciliation run.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{0}")]
    Invalid(String),
    #[error("ledger: {0}")]
    Database(#[from] sqlx::Error),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("clickhouse: {0}")]
    ClickHouse(String),
    #[error("events: {0}")]
    Events(#[from] crate::events::EventsError),
}

/// Where the completion events are read.
pub enum EventSource {
    Kafka { bootstrap: String, topic: String },
    LocalLog { path: std::path::PathBuf },
}

/// ClickHouse to compare with.
pub struct ClickHouseTarget {
    pub url: String,
    pub database: String,
}

/// Requests and exact cost.
pub type Figure = (i64, Decimal);

/// Per (tenant, model): one figure per column (`None`: the column was not computed).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Row5 {
    pub events: Figure,
    pub minutes: Figure,
    pub lines: Figure,
    pub ch_facts: Option<Figure>,
    pub ch_minutes: Option<Figure>,
    /// (sum of invoice line amounts, sum of the ledger lines' costs rounded by the rule).
    pub invoice: (Decimal, Decimal),
    /// Recovered completions among the events (informational: not compared).
    pub recovered: Recovered,
}

/// Recovered completions (`usage.source = recovered`) of one tenant × model in the period.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    /// Billed: their request has no real completion.
    pub requests: i64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Replaced: the request also has a real completion (arrived before or after), billed
    /// instead.
    pub replaced: i64,
}

impl Row5 {
    /// Whether every computed column agrees.
    pub fn agrees(&self) -> bool {
        let same = |f: &Option<Figure>| f.as_ref().is_none_or(|f| *f == self.events);
        self.minutes == self.events
            && self.lines == self.events
            && same(&self.ch_facts)
            && same(&self.ch_minutes)
            && self.invoice.0 == self.invoice.1
    }
}

/// The result: every (tenant, model) seen anywhere.
pub type Report = BTreeMap<(String, String), Row5>;

/// Runs the comparison for `period`.
pub async fn reconcile(
    store: &dyn MetaStore,
    period: &str,
    events: &EventSource,
    clickhouse: Option<&ClickHouseTarget>,
) -> Result<Report, ReconcileError> {
    let p = Period::parse(period).map_err(|e| ReconcileError::Invalid(e.to_string()))?;
    p.check_started(OffsetDateTime::now_utc())
        .map_err(|e| ReconcileError::Invalid(e.to_string()))?;
    let (start_ms, end_ms) = (offset_unix_ms(p.start()), offset_unix_ms(p.end()));
    let mut report = Report::new();

    // Events, priced here.
    let schedules = crate::store::price_schedules(store.list_prices(None).await?);
    let (billed, recovered) = billed_events(read_events(events).await?, start_ms, end_ms);
    for (k, v) in recovered {
        report.entry(k).or_default().recovered = v;
    }
    for (at, e) in billed {
        // A hit's fields the pipeline could not bill were rejected there: not counted here.
        let Ok(hit) = tollgate_schemas::pricing::cache_hit_terms(
            e.cache_hit,
            e.cache_saved_usage.as_ref(),
            e.cache_price_fraction.as_deref(),
        ) else {
            continue;
        };
        let cost = schedules
            .get(&e.upstream_model)
            .and_then(|s| s.lookup(&e.tenant_id, at))
            .and_then(|row| {
                tollgate_schemas::pricing::completion_cost(
                    row,
                    &e.usage,
                    hit.as_ref().map(|(u, f)| (u, *f)),
                )
            })
            .map(|(cost, _)| cost)
            .unwrap_or_default();
        let r = report.entry((e.tenant_id, e.upstream_model)).or_default();
        r.events.0 += 1;
        r.events.1 += cost;
    }

    // Ledger.
    let (minutes, lines) = ledger(store.ledger_location(), period, start_ms, end_ms).await?;
    for (k, f) in minutes {
        report.entry(k).or_default().minutes = f;
    }
    for (k, (f, rounded)) in lines {
        let r = report.entry(k).or_default();
        r.lines = f;
        r.invoice.1 = rounded;
    }

    // Invoices: the period's own and, for adjustments, every later one up to now.
    let mut q = p;
    let now = OffsetDateTime::now_utc();
    loop {
        let invoices = crate::invoices::load(store, q, None).await?;
        for inv in invoices {
            for line in inv.lines {
                let usage = matches!(line.kind, LineKind::Usage | LineKind::Adjustment);
                if !usage || line.event_period.as_deref() != Some(period) {
                    continue;
                }
                let model = line.model.clone().unwrap_or_default();
                report
                    .entry((inv.tenant_id.clone(), model))
                    .or_default()
                    .invoice
                    .0 += line.amount;
            }
        }
        q = q.next();
        if q.start() > now {
            break;
        }
    }

    if let Some(ch) = clickhouse {
        let facts = clickhouse_sums(
            ch,
            &format!(
                // A recovered completion's fact stays when the real one replaced it in the
                // ledger: leave those out, as the events column does.
                "SELECT tenant_id, model, count(), toString(sum(cost)) FROM {db}.request_facts \
                 WHERE event_ms >= {start_ms} AND event_ms < {end_ms} \
                   AND NOT (outcome = 'gateway_lost' AND request_id IN \
                     (SELECT request_id FROM {db}.request_facts WHERE outcome != 'gateway_lost')) \
                 GROUP BY tenant_id, model",
                db = ch.database
            ),
        )
        .await?;
        let rollups = clickhouse_sums(
            ch,
            &format!(
                "SELECT tenant_id, model, sum(requests), toString(sum(cost)) FROM {}.usage_minutes \
                 WHERE minute >= toDateTime({}) AND minute < toDateTime({}) GROUP BY tenant_id, model",
                ch.database,
                start_ms / 1000,
                end_ms / 1000
            ),
        )
        .await?;
        for r in report.values_mut() {
            r.ch_facts = Some((0, Decimal::ZERO));
            r.ch_minutes = Some((0, Decimal::ZERO));
        }
        for (k, f) in facts {
            report.entry(k).or_default().ch_facts = Some(f);
        }
        for (k, f) in rollups {
            report.entry(k).or_default().ch_minutes = Some(f);
        }
        for r in report.values_mut() {
            r.ch_facts.get_or_insert((0, Decimal::ZERO));
            r.ch_minutes.get_or_insert((0, Decimal::ZERO));
        }
    }
    Ok(report)
}

/// `reconcile --flink`: the ledger's and the Flink job's figures (requests, exact cost) of one
/// row; `None` where that side has no row (counted as zero).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlinkRow {
    pub ledger: Option<Figure>,
    pub flink: Option<Figure>,
}

impl FlinkRow {
    pub fn agrees(&self) -> bool {
        self.ledger.unwrap_or_default() == self.flink.unwrap_or_default()
    }
}

/// The ledger (`usage_minutes`, `usage_periods`) next to the Flink SQL job's tables
/// (`flink_usage_minutes`, `flink_usage_periods`, flink-jobs/sql/postgres.sql) for a period.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlinkReport {
    /// Per (tenant, model, minute start in ms since the epoch, UTC).
    pub minutes: BTreeMap<(String, String, i64), FlinkRow>,
    /// Per (tenant, currency): the period's totals.
    pub periods: BTreeMap<(String, String), FlinkRow>,
}

impl FlinkReport {
    /// Rows (minutes and period totals) whose two sides differ.
    pub fn differences(&self) -> usize {
        let minutes = self.minutes.values().filter(|r| !r.agrees()).count();
        minutes + self.periods.values().filter(|r| !r.agrees()).count()
    }
}

/// Compares the Flink job's tables with the PostgreSQL ledger for `period`, per tenant ×
/// model × minute and per tenant × currency. The period totals compare the ledger's booking
/// period with Flink's event-time month: they differ by design when late events of a closed
/// period were booked into the next one (the minutes never do).
pub async fn reconcile_flink(
    store: &dyn MetaStore,
    period: &str,
) -> Result<FlinkReport, ReconcileError> {
    let p = Period::parse(period).map_err(|e| ReconcileError::Invalid(e.to_string()))?;
    let LedgerLocation::Postgres { url } = store.ledger_location() else {
        return Err(ReconcileError::Invalid(
            "--flink compares PostgreSQL tables: give --database-url".into(),
        ));
    };
    let (start_ms, end_ms) = (offset_unix_ms(p.start()), offset_unix_ms(p.end()));
    let pool = sqlx::PgPool::connect(&url).await?;
    let mut report = FlinkReport::default();
    // The ledger's minute is a TIMESTAMPTZ, Flink's a UTC TIMESTAMP: epoch of both is the
    // same instant.
    for (flink, table, bound) in [
        (
            false,
            "usage_minutes",
            "to_timestamp($1::double precision / 1000)",
        ),
        (
            true,
            "flink_usage_minutes",
            "(to_timestamp($1::double precision / 1000) AT TIME ZONE 'UTC')",
        ),
    ] {
        let upper = bound.replace("$1", "$2");
        let sql = format!(
            "SELECT tenant_id, model, (extract(epoch FROM minute) * 1000)::BIGINT, \
             requests, cost FROM {table} WHERE minute >= {bound} AND minute < {upper}"
        );
        for r in sqlx::query(&sql)
            .bind(start_ms as f64)
            .bind(end_ms as f64)
            .fetch_all(&pool)
            .await?
        {
            let row = report
                .minutes
                .entry((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))
                .or_default();
            let figure = Some((r.try_get(3)?, r.try_get(4)?));
            if flink {
                row.flink = figure;
            } else {
                row.ledger = figure;
            }
        }
    }
    for (flink, table) in [(false, "usage_periods"), (true, "flink_usage_periods")] {
        let sql =
            format!("SELECT tenant_id, currency, requests, cost FROM {table} WHERE period = $1");
        for r in sqlx::query(&sql).bind(period).fetch_all(&pool).await? {
            let row = report
                .periods
                .entry((r.try_get(0)?, r.try_get(1)?))
                .or_default();
            let figure = Some((r.try_get(2)?, r.try_get(3)?));
            if flink {
                row.flink = figure;
            } else {
                row.ledger = figure;
            }
        }
    }
    Ok(report)
}

/// The `--flink` report as text: the differing rows (every row with `all`) and a summary.
pub fn render_flink(report: &FlinkReport, all: bool) -> String {
    let opt = |f: &Option<Figure>| {
        f.as_ref()
            .map(|f| format!("{} / {}", f.0, f.1.normalize()))
            .unwrap_or_else(|| "-".into())
    };
    let status = |r: &FlinkRow| if r.agrees() { "ok" } else { "DIFFERENT" };
    let mut out = String::from("tenant\tmodel\tminute\tledger\tflink\tstatus\n");
    for ((tenant, model, minute_ms), r) in &report.minutes {
        if all || !r.agrees() {
            out.push_str(&format!(
                "{tenant}\t{model}\t{}\t{}\t{}\t{}\n",
                rfc3339_from_unix_ms(*minute_ms),
                opt(&r.ledger),
                opt(&r.flink),
                status(r)
            ));
        }
    }
    out.push_str("\ntenant\tcurrency\tledger (period)\tflink (period)\tstatus\n");
    for ((tenant, currency), r) in &report.periods {
        if all || !r.agrees() {
            out.push_str(&format!(
                "{tenant}\t{currency}\t{}\t{}\t{}\n",
                opt(&r.ledger),
                opt(&r.flink),
                status(r)
            ));
        }
    }
    out.push_str(&format!(
        "{} tenant × model × minute rows, {} tenant × currency period rows, {} with differences\n",
        report.minutes.len(),
        report.periods.len(),
        report.differences()
    ));
    out
}

/// Recovered completions per (tenant, model).
pub type RecoveredByModel = BTreeMap<(String, String), Recovered>;

/// The completion events of the period that the pipeline bills, with their event time, and
/// the recovered completions per tenant × model. Per request, as the pipeline bills them:
/// every distinct real completion (duplicates of an `event_id` once), the recovered one only
/// if there is no real one (whatever the order they came in). Payloads that are not
/// completion events are skipped (the pipeline keeps them as rejects, never billed).
pub fn billed_events(
    payloads: Vec<Vec<u8>>,
    start_ms: i64,
    end_ms: i64,
) -> (Vec<(i64, CompletionEvent)>, RecoveredByModel) {
    type Completions = (Vec<(i64, CompletionEvent)>, Option<(i64, CompletionEvent)>);
    let mut seen = HashSet::new();
    let mut by_request: HashMap<String, Completions> = HashMap::new();
    for payload in payloads {
        let Ok(e) = serde_json::from_slice::<CompletionEvent>(&payload) else {
            continue;
        };
        let Some(at) = parse_event_time(&e.event_time).map(unix_ms) else {
            continue;
        };
        if !seen.insert(e.event_id.clone()) {
            continue;
        }
        let entry = by_request.entry(e.request_id.clone()).or_default();
        if e.usage.source == UsageSource::Recovered {
            entry.1.get_or_insert((at, e));
        } else {
            entry.0.push((at, e));
        }
    }
    let in_period = |at: i64| at >= start_ms && at < end_ms;
    let mut billed = Vec::new();
    let mut recovered = RecoveredByModel::new();
    for (real, lost) in by_request.into_values() {
        if let Some((at, e)) = lost.filter(|(at, _)| in_period(*at)) {
            let r = recovered
                .entry((e.tenant_id.clone(), e.upstream_model.clone()))
                .or_default();
            if real.is_empty() {
                r.requests += 1;
                r.input_tokens += e.usage.input_tokens;
                r.output_tokens += e.usage.output_tokens;
                billed.push((at, e));
            } else {
                r.replaced += 1;
            }
        }
        billed.extend(real.into_iter().filter(|(at, _)| in_period(*at)));
    }
    (billed, recovered)
}

fn dec(s: &str) -> Result<Decimal, ReconcileError> {
    Decimal::from_str(s.trim()).map_err(|e| ReconcileError::Invalid(format!("decimal {s:?}: {e}")))
}

type LedgerSums = (
    BTreeMap<(String, String), Figure>,
    BTreeMap<(String, String), (Figure, Decimal)>,
);

async fn ledger(
    location: LedgerLocation,
    period: &str,
    start_ms: i64,
    end_ms: i64,
) -> Result<LedgerSums, ReconcileError> {
    let mut minutes: BTreeMap<(String, String), Figure> = BTreeMap::new();
    let mut lines: BTreeMap<(String, String), (Figure, Decimal)> = BTreeMap::new();
    let mut add_line = |t: String, m: String, n: i64, c: Decimal| {
        let e = lines.entry((t, m)).or_default();
        e.0 .0 += n;
        e.0 .1 += c;
        e.1 += round_money(c);
    };
    match location {
        LedgerLocation::Postgres { url } => {
            let pool = sqlx::PgPool::connect(&url).await?;
            for r in sqlx::query(
                "SELECT tenant_id, model, sum(requests)::BIGINT, sum(cost) FROM usage_minutes
                 WHERE minute >= to_timestamp($1::double precision / 1000)
                   AND minute < to_timestamp($2::double precision / 1000)
                 GROUP BY tenant_id, model",
            )
            .bind(start_ms as f64)
            .bind(end_ms as f64)
            .fetch_all(&pool)
            .await?
            {
                minutes.insert(
                    (r.try_get(0)?, r.try_get(1)?),
                    (r.try_get(2)?, r.try_get(3)?),
                );
            }
            for r in sqlx::query(
                "SELECT tenant_id, model, requests, cost FROM usage_price_lines
                 WHERE event_period = $1",
            )
            .bind(period)
            .fetch_all(&pool)
            .await?
            {
                add_line(r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?);
            }
        }
        LedgerLocation::Sqlite { data_dir } => {
            let url = format!(
                "sqlite://{}?mode=ro",
                data_dir.join("tollgate.db").display()
            );
            let pool = sqlx::SqlitePool::connect(&url).await?;
            let from = rfc3339_from_unix_ms(start_ms);
            let to = rfc3339_from_unix_ms(end_ms);
            for r in sqlx::query(
                "SELECT tenant_id, model, requests, cost FROM usage_minutes
                 WHERE minute >= ? AND minute < ?",
            )
            .bind(from)
            .bind(to)
            .fetch_all(&pool)
            .await?
            {
                let e = minutes.entry((r.try_get(0)?, r.try_get(1)?)).or_default();
                e.0 += r.try_get::<i64, _>(2)?;
                e.1 += dec(&r.try_get::<String, _>(3)?)?;
            }
            for r in sqlx::query(
                "SELECT tenant_id, model, requests, cost FROM usage_price_lines
                 WHERE event_period = ?",
            )
            .bind(period)
            .fetch_all(&pool)
            .await?
            {
                let cost = dec(&r.try_get::<String, _>(3)?)?;
                add_line(r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, cost);
            }
        }
    }
    Ok((minutes, lines))
}

async fn read_events(source: &EventSource) -> Result<Vec<Vec<u8>>, ReconcileError> {
    match source {
        EventSource::LocalLog { path } => {
            let log = crate::events::local_log::LocalEventLog::open(path).await?;
            let mut out = Vec::new();
            let mut offset = 0u64;
            loop {
                let batch = log.read_topic(topics::COMPLETIONS, offset, 10_000).await?;
                let Some(last) = batch.last() else { break };
                offset = last.offset + 1;
                out.extend(batch.into_iter().map(|r| r.payload.into_bytes()));
            }
            Ok(out)
        }
        EventSource::Kafka { bootstrap, topic } => {
            let (bootstrap, topic) = (bootstrap.clone(), topic.clone());
            tokio::task::spawn_blocking(move || read_kafka(&bootstrap, &topic))
                .await
                .map_err(|e| ReconcileError::Invalid(format!("kafka reader: {e}")))?
        }
    }
}

/// Every message of `topic`, from the beginning to the end it had when reading started.
fn read_kafka(bootstrap: &str, topic: &str) -> Result<Vec<Vec<u8>>, ReconcileError> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
    let timeout = Duration::from_secs(30);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "tollgate-reconcile")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()?;
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut ends = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, *p, timeout)?;
        if high > low {
            ends.insert(*p, high);
            tpl.add_partition_offset(topic, *p, Offset::Offset(low))?;
        }
    }
    consumer.assign(&tpl)?;
    let mut out = Vec::new();
    let mut done: HashSet<i32> = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    while done.len() < ends.len() {
        if std::time::Instant::now() > deadline {
            return Err(ReconcileError::Invalid("timed out reading Kafka".into()));
        }
        let Some(m) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m?;
        let end = ends.get(&m.partition()).copied().unwrap_or(0);
        if m.offset() < end {
            out.push(m.payload().map(<[u8]>::to_vec).unwrap_or_default());
        }
        // Transaction markers take offsets too: done once the next offset reaches the end.
        if m.offset() + 1 >= end {
            done.insert(m.partition());
        }
    }
    Ok(out)
}

async fn clickhouse_sums(
    ch: &ClickHouseTarget,
    query: &str,
) -> Result<BTreeMap<(String, String), Figure>, ReconcileError> {
    let response = reqwest::Client::new()
        .post(&ch.url)
        .body(format!("{query} FORMAT TabSeparated"))
        .send()
        .await
        .map_err(|e| ReconcileError::ClickHouse(e.to_string()))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| ReconcileError::ClickHouse(e.to_string()))?;
    if !status.is_success() {
        return Err(ReconcileError::ClickHouse(text.trim().to_string()));
    }
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        let [tenant, model, n, cost] = cols[..] else {
            return Err(ReconcileError::ClickHouse(format!(
                "unexpected row {line:?}"
            )));
        };
        let n = n
            .parse()
            .map_err(|_| ReconcileError::ClickHouse(format!("unexpected count {n:?}")))?;
        out.insert((tenant.to_string(), model.to_string()), (n, dec(cost)?));
    }
    Ok(out)
}

/// The report as a table: the rows that disagree (all rows with `all`), then a summary line.
pub fn render(report: &Report, all: bool) -> String {
    let fig = |f: &Figure| format!("{} / {}", f.0, f.1.normalize());
    let opt = |f: &Option<Figure>| f.as_ref().map(fig).unwrap_or_else(|| "-".into());
    let mut out = String::from(
        "tenant\tmodel\tevents\tminutes\tlines\tch_facts\tch_minutes\tinvoice (lines rounded)\tstatus\n",
    );
    let mut differing = 0;
    for ((tenant, model), r) in report {
        let ok = r.agrees();
        if !ok {
            differing += 1;
        }
        if ok && !all {
            continue;
        }
        out.push_str(&format!(
            "{tenant}\t{model}\t{}\t{}\t{}\t{}\t{}\t{} ({})\t{}\n",
            fig(&r.events),
            fig(&r.minutes),
            fig(&r.lines),
            opt(&r.ch_facts),
            opt(&r.ch_minutes),
            r.invoice.0,
            r.invoice.1,
            if ok { "ok" } else { "DIFFERENT" }
        ));
    }
    out.push_str(&format!(
        "{} tenant × model rows, {differing} with differences\n",
        report.len()
    ));
    let recovered: Vec<_> = report
        .iter()
        .filter(|(_, r)| r.recovered != Recovered::default())
        .collect();
    if !recovered.is_empty() {
        out.push_str(
            "\nrecovered completions (requests a gateway lost; usage_source = recovered)\n\
             tenant\tmodel\tbilled\tinput_tokens\toutput_tokens\treplaced_by_real\n",
        );
        let mut total = Recovered::default();
        for ((tenant, model), r) in recovered {
            let v = r.recovered;
            out.push_str(&format!(
                "{tenant}\t{model}\t{}\t{}\t{}\t{}\n",
                v.requests, v.input_tokens, v.output_tokens, v.replaced
            ));
            total.requests += v.requests;
            total.input_tokens += v.input_tokens;
            total.output_tokens += v.output_tokens;
            total.replaced += v.replaced;
        }
        out.push_str(&format!(
            "{} recovered completions billed ({} input, {} output tokens), {} replaced by the real one\n",
            total.requests, total.input_tokens, total.output_tokens, total.replaced
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tollgate_schemas::events::{recovered_event_id, CompletionStatus};
    use tollgate_schemas::TokenUsage;

    use super::*;

    fn completion(request: &str, event_id: &str, recovered: bool, output: u64) -> Vec<u8> {
        let t = "2026-05-10T12:00:00.000Z";
        let e = CompletionEvent {
            schema_version: 1,
            event_id: event_id.into(),
            event_time: t.into(),
            request_id: request.into(),
            tenant_id: "ten_1".into(),
            key_id: "key_1".into(),
            route: "chat".into(),
            requested_model: "m".into(),
            model_alias: "m".into(),
            deployment: "d".into(),
            provider: "mock".into(),
            upstream_model: "m".into(),
            stream: true,
            status: if recovered {
                CompletionStatus::GatewayLost
            } else {
                CompletionStatus::Completed
            },
            finish_reason: None,
            error: None,
            usage: TokenUsage {
                input_tokens: 10,
                cached_input_tokens: 0,
                cache_write_input_tokens: 0,
                output_tokens: output,
                source: if recovered {
                    UsageSource::Recovered
                } else {
                    UsageSource::Provider
                },
            },
            chunks: 1,
            ttft_ms: None,
            latency_ms: 1,
            gateway_overhead_us: 1,
            retries: 0,
            fallbacks: 0,
            cache_hit: false,
            cache_saved_usage: None,
            cache_price_fraction: None,
            price_book_version: None,
            received_at: t.into(),
        };
        serde_json::to_vec(&e).unwrap()
    }

    #[test]
    fn a_recovered_completion_counts_only_without_a_real_one() {
        let lost = recovered_event_id("req_lost");
        let replaced = recovered_event_id("req_replaced");
        let raced = recovered_event_id("req_raced");
        let payloads = vec![
            completion("req_lost", &lost, true, 3),
            completion("req_lost", &lost, true, 3),
            completion("req_replaced", &replaced, true, 2),
            completion("req_replaced", "e1", false, 9),
            completion("req_raced", "e2", false, 8),
            completion("req_raced", &raced, true, 1),
            completion("req_plain", "e3", false, 7),
            completion("req_plain", "e3", false, 7),
        ];
        let (start, end) = (1_777_593_600_000, 1_780_272_000_000); // May 2026
        let (billed, recovered) = billed_events(payloads, start, end);
        let mut outputs: Vec<u64> = billed.iter().map(|(_, e)| e.usage.output_tokens).collect();
        outputs.sort_unstable();
        assert_eq!(outputs, vec![3, 7, 8, 9]);
        let r = recovered[&("ten_1".to_string(), "m".to_string())];
        assert_eq!(
            r,
            Recovered {
                requests: 1,
                input_tokens: 10,
                output_tokens: 3,
                replaced: 2,
            }
        );
        // Outside the period: nothing.
        let (billed, recovered) =
            billed_events(vec![completion("req_lost", &lost, true, 3)], end, end + 1);
        assert!(billed.is_empty() && recovered.is_empty());
    }
}
