//! The billing dataflow and the loop that drives it, one per worker.
//!
//! ```text
//! source records ──parse──▶ completions ──Dedup (by request)──▶ unique ──PriceAndSum──▶ sums
//!      │        (real and recovered)   same event id: drop          (+ retractions)     ▲
//!      │                               recovered after real: drop                       │
//!      │                               real after recovered: retract it, bill real      │
//!      │                               price rows ──reduce by model──▶ schedules (broadcast)
//!      │
//!      ├─ rejects ───────────────────────────────────────────────────────────────┐
//!      └─ positions (per partition, per epoch) ──────────────────────────────────┤
//! sums: per epoch and worker, Σ per tenant×model×minute, per tenant×billing      │
//!       period and per invoice line (Totals), one record per key ────────────────┤
//! priced facts (only with analytics) ────────────────────────────────────────────┤
//!                                                                                ▼
//!                                     LedgerCommit on worker 0, once per closed epoch(s)
//! ```
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | building the dataflow, the worker loop (epochs, back-pressure), the commit |
//! | `dedup.rs` | `Dedup`: first copy of each event id wins; a real completion replaces a recovered one of its request (retraction); ids and requests remembered for the horizon |
//! | `pricing.rs` | `PriceAndSum`: the price book per epoch, each completion priced and summed (a retraction subtracted) |
//! | `aggregate.rs` | an epoch's sums and their roll-up into the ledger's three aggregates |
//!
//! Time is an epoch number: each worker reads for `epoch_ms`, then reports how far it read
//! in every partition and advances to the next epoch (numbered from the wall clock, so the
//! workers of all processes agree roughly, and always above the last committed sequence
//! number). The commit operator waits until every worker has closed an epoch, then writes
//! everything of the closed epochs, positions included, in one ledger transaction.

pub mod aggregate;
pub mod dedup;
pub mod pricing;

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use differential_dataflow::input::InputSession;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::core::{Concat, OkErr, Probe};
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::{Broadcast, Map};
use timely::dataflow::{InputHandle, ProbeHandle};
use timely::worker::Worker;
use tollgate_schemas::pricing::{PriceRow, PriceSchedule};

use crate::config::{AnalyticsSpec, BalanceSpec, LedgerSpec, PipelineConfig, SourceSpec};
use crate::fact::{
    Completion, LineKey, MinuteKey, PeriodKey, PricedFact, Reject, SourceRecord, Totals,
};
use crate::sink::committer::Committer;
use crate::sink::{Analytics, BalanceStore, Ledger, LedgerBatch, Position, SinkError};
use crate::source::{Source, SourceError};

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("source: {0}")]
    Source(#[from] SourceError),
    #[error("sink: {0}")]
    Sink(#[from] SinkError),
    #[error("{0}")]
    Setup(String),
}

/// What a worker did, reported when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerReport {
    pub index: usize,
    /// Records read (replayed ones included).
    pub records: u64,
    /// Ledger commits made (worker 0 only).
    pub commits: u64,
    /// Completions committed (worker 0 only).
    pub events_committed: u64,
    /// Time from the first poll to the last commit (opening the ledger and the source, and
    /// building the dataflow, excluded).
    pub running: Duration,
}

/// Everything the commit operator receives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub enum SinkItem {
    Minute(MinuteKey, Totals),
    Period(PeriodKey, Totals),
    Line(LineKey, Totals),
    Position(Position),
    Reject(Reject),
    Duplicates(u64),
    Fact(PricedFact),
}

fn now_ms() -> i64 {
    tollgate_schemas::events::unix_ms(SystemTime::now())
}

fn runtime() -> Result<tokio::runtime::Runtime, PipelineError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PipelineError::Setup(format!("runtime: {e}")))
}

fn open_committer(config: &PipelineConfig, index: usize) -> Result<Committer, PipelineError> {
    let rt = runtime()?;
    let ledger: Option<Arc<dyn Ledger>> = match &config.ledger {
        LedgerSpec::Postgres { url } => Some(Arc::new(
            rt.block_on(crate::sink::postgres::PostgresLedger::connect(url))?,
        )),
        LedgerSpec::Sqlite { data_dir } => Some(Arc::new(
            rt.block_on(crate::sink::sqlite::SqliteLedger::open(data_dir))?,
        )),
        LedgerSpec::Discard => None,
    };
    // Only worker 0 writes balances and analytics.
    let balances: Option<Arc<dyn BalanceStore>> = match (&config.balances, index) {
        (BalanceSpec::Redis { url, prefix }, 0) => Some(Arc::new(
            rt.block_on(crate::sink::redis::RedisBalances::connect(url, prefix))?,
        )),
        (BalanceSpec::Memory(m), 0) => Some(Arc::new(m.clone())),
        _ => None,
    };
    let analytics: Option<Arc<dyn Analytics>> = match (&config.analytics, index) {
        (AnalyticsSpec::ClickHouse { url, database }, 0) => Some(Arc::new(
            crate::sink::clickhouse::ClickHouseAnalytics::new(url, database),
        )),
        _ => None,
    };
    Ok(Committer::new(
        rt,
        ledger,
        balances,
        analytics,
        config.options.abort_after_commit,
        config.options.metrics.clone(),
    ))
}

fn source_name(spec: &SourceSpec) -> String {
    match spec {
        SourceSpec::Kafka { topic, .. } => format!("kafka:{topic}"),
        SourceSpec::LocalLog { .. } => {
            format!("local:{}", tollgate_schemas::events::topics::COMPLETIONS)
        }
        SourceSpec::Memory(_) => "memory".to_string(),
    }
}

fn open_source(
    config: &PipelineConfig,
    index: usize,
    peers: usize,
    positions: &[Position],
) -> Result<Box<dyn Source>, PipelineError> {
    let horizon = config.options.dedup_horizon_ms;
    Ok(match &config.source {
        SourceSpec::Kafka {
            bootstrap,
            topic,
            group,
        } => Box::new(crate::source::kafka::KafkaSource::open(
            bootstrap, topic, group, index, peers, positions, horizon,
        )?),
        SourceSpec::LocalLog { path } => Box::new(crate::source::local_log::LocalLogSource::open(
            path, index, positions, horizon,
        )?),
        SourceSpec::Memory(records) => Box::new(crate::source::memory::MemorySource::new(
            records, index, peers, positions, horizon,
        )),
    })
}

/// Closed epochs waiting to be committed, merged into one batch.
#[derive(Default)]
struct Pending {
    minutes: HashMap<MinuteKey, Totals>,
    periods: HashMap<PeriodKey, Totals>,
    lines: HashMap<LineKey, Totals>,
    positions: BTreeMap<u32, Position>,
    rejects: Vec<Reject>,
    facts: Vec<PricedFact>,
    duplicates: u64,
}

impl Pending {
    fn add(&mut self, item: SinkItem) {
        match item {
            SinkItem::Minute(k, t) => self.minutes.entry(k).or_default().add(&t),
            SinkItem::Period(k, t) => self.periods.entry(k).or_default().add(&t),
            SinkItem::Line(k, t) => self.lines.entry(k).or_default().add(&t),
            SinkItem::Position(p) => {
                let e = self
                    .positions
                    .entry(p.partition)
                    .or_insert_with(|| p.clone());
                if p.next_offset > e.next_offset {
                    e.next_offset = p.next_offset;
                }
                e.max_event_ms = e.max_event_ms.max(p.max_event_ms);
            }
            SinkItem::Reject(r) => self.rejects.push(r),
            SinkItem::Duplicates(n) => self.duplicates += n,
            SinkItem::Fact(f) => self.facts.push(f),
        }
    }

    fn into_batch(self, seq: u64, source: &str) -> LedgerBatch {
        use differential_dataflow::difference::IsZero;
        let events = self
            .periods
            .values()
            .map(|t| u64::try_from(t.requests).unwrap_or(0))
            .sum();
        let mut minutes: Vec<_> = self
            .minutes
            .into_iter()
            .filter(|(_, t)| !t.is_zero())
            .collect();
        minutes.sort();
        let mut periods: Vec<_> = self
            .periods
            .into_iter()
            .filter(|(_, t)| !t.is_zero())
            .collect();
        periods.sort();
        let mut lines: Vec<_> = self
            .lines
            .into_iter()
            .filter(|(_, t)| !t.is_zero())
            .collect();
        lines.sort();
        LedgerBatch {
            seq,
            source: source.to_string(),
            minutes,
            periods,
            lines,
            positions: self.positions.into_values().collect(),
            rejects: self.rejects,
            facts: self.facts,
            events,
            duplicates: self.duplicates,
        }
    }
}

/// Shared between the commit operator and the worker loop (same thread).
struct CommitState {
    committer: Option<Committer>,
    error: Option<SinkError>,
    commits: u64,
    events: u64,
}

/// Builds the dataflow on `worker` and drives it until the source is exhausted, the stop flag
/// is set, or the idle limit passes.
pub fn run_worker(
    worker: &mut Worker,
    config: &PipelineConfig,
) -> Result<WorkerReport, PipelineError> {
    let index = worker.index();
    let peers = worker.peers();
    let options = config.options.clone();
    let source_id = source_name(&config.source);

    let mut committer = open_committer(config, index)?;
    let positions = committer.positions(&source_id)?;
    let last_seq = committer.last_seq()?;
    if index == 0 {
        committer.recover();
    }
    // Every worker must build the same dataflow: decided from the config, not per worker.
    let with_facts = !matches!(config.analytics, AnalyticsSpec::None);
    let mut source = open_source(config, index, peers, &positions)?;
    let state = Rc::new(RefCell::new(CommitState {
        committer: Some(committer),
        error: None,
        commits: 0,
        events: 0,
    }));

    let mut records_in: InputHandle<u64, CapacityContainerBuilder<Vec<SourceRecord>>> =
        InputHandle::new();
    let mut positions_in: InputHandle<u64, CapacityContainerBuilder<Vec<Position>>> =
        InputHandle::new();
    let mut prices_in: InputSession<u64, PriceRow, isize> = InputSession::new();
    let probe = ProbeHandle::new();

    let sink_state = Rc::clone(&state);
    let sink_source = source_id.clone();
    worker.dataflow::<u64, _, _>(|scope| {
        let (facts, rejects) = records_in.to_stream(scope).ok_err(move |r: SourceRecord| {
            match Completion::parse(&r, with_facts) {
                Ok(c) => Ok((c, r.replay_only)),
                Err(reason) => Err(Reject {
                    partition: r.partition,
                    offset: r.offset,
                    reason,
                    payload: String::from_utf8_lossy(&r.payload).into_owned(),
                }),
            }
        });
        let (unique, duplicates) =
            dedup::dedup(facts, options.dedup_horizon_ms).ok_err(|d: dedup::Deduped| d);

        let schedules = prices_in
            .to_collection(scope)
            .map(|p| (p.model.clone(), p))
            .reduce_named("PriceSchedules", |_model, rows, out| {
                let live = rows
                    .iter()
                    .filter(|(_, d)| *d > 0)
                    .map(|(r, _)| (*r).clone());
                out.push((PriceSchedule::new(live), 1isize));
            });
        // Priced and summed per epoch on the worker that deduplicated them: one record per
        // aggregate key and epoch leaves (plus, with analytics, each priced fact).
        let priced = pricing::price_and_sum(unique, schedules.inner.broadcast(), with_facts);
        let items = priced
            .concat(positions_in.to_stream(scope).map(SinkItem::Position))
            .concat(rejects.map(SinkItem::Reject))
            .concat(duplicates.map(SinkItem::Duplicates));

        let mut pending: BTreeMap<u64, Vec<SinkItem>> = BTreeMap::new();
        items.probe_with(&probe).sink(
            Exchange::new(|_: &SinkItem| 0),
            "LedgerCommit",
            move |(input, frontier)| {
                input.for_each(|cap, data| {
                    if let Some(t) = cap.least() {
                        pending.entry(*t).or_default().append(data);
                    }
                });
                let mut closed = Pending::default();
                let mut seq = None;
                while let Some((&time, _)) = pending.first_key_value() {
                    if frontier.less_equal(&time) {
                        break;
                    }
                    if let Some((_, items)) = pending.pop_first() {
                        items.into_iter().for_each(|i| closed.add(i));
                        seq = Some(time);
                    }
                }
                let Some(seq) = seq else {
                    return;
                };
                let mut st = sink_state.borrow_mut();
                if st.error.is_some() {
                    return;
                }
                let batch = closed.into_batch(seq, &sink_source);
                let Some(c) = st.committer.as_mut() else {
                    return;
                };
                match c.commit(&batch) {
                    Ok(report) => {
                        st.commits += 1;
                        st.events += report.events;
                    }
                    Err(e) => st.error = Some(e),
                }
            },
        );
    });

    // Epochs start above the last commit and follow the wall clock.
    // The price book in force at start enters at time 0, before any record of any worker.
    let mut book: Vec<PriceRow> = Vec::new();
    if index == 0 {
        let fresh = match &state.borrow().committer {
            Some(c) => c.prices()?,
            None => Vec::new(),
        };
        refresh_prices(&mut prices_in, &mut book, fresh);
    }

    let epoch_ms = options.epoch_ms.max(1);
    let wall_epoch = || u64::try_from(now_ms()).unwrap_or(0) / epoch_ms;
    let mut epoch = (last_seq + 1).max(wall_epoch());
    records_in.advance_to(epoch);
    positions_in.advance_to(epoch);
    prices_in.advance_to(epoch);
    // An unflushed session still holds time 0, and so would every frontier downstream.
    prices_in.flush();

    let mut next_price_refresh = Instant::now() + Duration::from_millis(options.price_refresh_ms);
    let mut epoch_started = Instant::now();
    let mut last_record = Instant::now();
    // A worker reads a handful of partitions: a B-tree beats hashing every record's partition.
    let mut moved: BTreeMap<u32, Position> = BTreeMap::new();
    let mut buffer: Vec<SourceRecord> = Vec::new();
    let mut report = WorkerReport {
        index,
        ..WorkerReport::default()
    };
    let running = Instant::now();

    loop {
        if let Some(e) = state.borrow_mut().error.take() {
            return Err(e.into());
        }
        if index == 0 && Instant::now() >= next_price_refresh {
            let fresh = match &state.borrow().committer {
                Some(c) => c.prices()?,
                None => Vec::new(),
            };
            refresh_prices(&mut prices_in, &mut book, fresh);
            next_price_refresh = Instant::now() + Duration::from_millis(options.price_refresh_ms);
        }

        // Read before polling: once set, this poll sees every record appended before the flag
        // was (the gateway flushes its event log, then sets it), and the loop keeps reading
        // until a poll comes back empty, so a graceful stop commits all of it.
        let stopping = options
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Acquire));
        if stopping {
            source.wake();
        }
        let remaining = Duration::from_millis(epoch_ms).saturating_sub(epoch_started.elapsed());
        buffer.clear();
        source.poll(
            options.max_poll_records,
            remaining.min(Duration::from_millis(2)),
            &mut buffer,
        )?;
        let polled = buffer.len();
        if polled > 0 {
            last_record = Instant::now();
        }
        report.records += buffer.len() as u64;
        if let Some(m) = &options.metrics {
            let replay = buffer.iter().filter(|r| r.replay_only).count() as u64;
            m.read(polled as u64 - replay, replay);
        }
        for record in buffer.drain(..) {
            if !record.replay_only {
                let p = moved.entry(record.partition).or_insert(Position {
                    partition: record.partition,
                    next_offset: record.offset + 1,
                    max_event_ms: record.timestamp_ms,
                });
                p.next_offset = p.next_offset.max(record.offset + 1);
                p.max_event_ms = p.max_event_ms.max(record.timestamp_ms);
            }
            records_in.send(record);
        }

        let stop = (stopping && polled == 0)
            || source.exhausted()
            || options
                .exit_when_idle_ms
                .is_some_and(|ms| last_record.elapsed() >= Duration::from_millis(ms));

        if stop || epoch_started.elapsed() >= Duration::from_millis(epoch_ms) {
            for (_, p) in std::mem::take(&mut moved) {
                positions_in.send(p);
            }
            if stop {
                break;
            }
            epoch = (epoch + 1).max(wall_epoch());
            records_in.advance_to(epoch);
            positions_in.advance_to(epoch);
            prices_in.advance_to(epoch);
            prices_in.flush();
            epoch_started = Instant::now();
        }

        // Back-pressure: do not read further ahead of the ledger than allowed.
        let floor = epoch.saturating_sub(options.max_epochs_in_flight);
        while probe.less_than(&floor) && state.borrow().error.is_none() {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        worker.step();
        if let Some(m) = &options.metrics {
            // The probe's frontier is the oldest epoch not yet committed (empty: all are).
            let oldest = probe.with_frontier(|f| f.first().copied()).unwrap_or(epoch);
            m.epochs_in_flight(index, epoch.saturating_sub(oldest));
        }
    }

    drop(records_in);
    drop(positions_in);
    prices_in.close();
    while !probe.done() && state.borrow().error.is_none() {
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
    // Let the commit operator see the final (empty) frontier.
    for _ in 0..8 {
        worker.step();
    }
    let mut st = state.borrow_mut();
    if let Some(e) = st.error.take() {
        return Err(e.into());
    }
    report.commits = st.commits;
    report.events_committed = st.events;
    report.running = running.elapsed();
    Ok(report)
}

/// Feeds the differences between the current book and `fresh` into the price collection.
fn refresh_prices(
    input: &mut InputSession<u64, PriceRow, isize>,
    book: &mut Vec<PriceRow>,
    mut fresh: Vec<PriceRow>,
) {
    fresh.sort();
    if *book == fresh {
        return;
    }
    for old in book.iter() {
        if fresh.binary_search(old).is_err() {
            input.update(old.clone(), -1);
        }
    }
    for new in &fresh {
        if book.binary_search(new).is_err() {
            input.update(new.clone(), 1);
        }
    }
    *book = fresh;
}
