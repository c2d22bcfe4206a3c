//! The embedded default: [`LocalSink`] appends every event to [`LocalEventLog`], a durable
//! log in SQLite (`<data dir>/events.sqlite`), which the in-process pipeline reads in order.
//!
//! The log is one table; each event gets the next `log_offset` (from 1, never reused, also
//! after old rows are deleted):
//!
//! ```sql
//! event_log(log_offset INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, event_key TEXT,
//!           event_id TEXT, timestamp_ms INTEGER, payload TEXT)
//! ```
//!
//! `payload` is the same JSON as the Kafka message (`tollgate_schemas::events`), `event_key`
//! the tenant id (the Kafka key). Readers: [`LocalEventLog::read`] from an offset, across
//! topics, or [`LocalEventLog::read_topic`].
//!
//! Writing: like the Kafka sink, the request path only hands records to a bounded channel; a
//! writer thread (woken by the first record, never sleeping on a timer while records wait)
//! serializes them and appends everything waiting, up to `batch_max_events`, in one
//! transaction, then resolves the durability tickets of the completions in it (group commit:
//! concurrent streams share one commit). SQLite runs in WAL mode with `synchronous = NORMAL`
//! (default): a committed batch survives a process crash; a power loss may lose the last
//! batches not yet checkpointed; `synchronous = FULL` syncs each commit. A failed write is
//! retried (the batch is kept) while the channel absorbs new events; past its bound they go
//! to the overflow spool (`overflow.rs`), which this writer moves into the log once the
//! channel is empty. Chunk records get their running token count here; chunks committed in
//! the same transaction as their completion are left uncounted (nothing will need them).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, SqlitePool};

use super::durable::{Durable, DurableTx};
use super::internal_events::{
    DropReason, EventMetrics, EventsDropped, EventsPublished, LogLimiter,
};
use super::wire::{ChunkTokens, Handed, Handoff, Record, WireMessage};
use super::{durable_handoff, ms, EventSink, EventsError, LocalConfig, LocalSync, Topics};
use crate::relay::{ChunkRecord, CompletionRecord, RequestRecord};

/// Rows per INSERT statement, largest first (5 bound parameters a row; SQLite allows 32766).
const INSERT_ROWS: [usize; 10] = [512, 256, 128, 64, 32, 16, 8, 4, 2, 1];
const RETRY_WAIT: Duration = Duration::from_millis(200);

/// One event of the local log.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// Position in the log, from 1, increasing in append order.
    pub offset: u64,
    pub topic: String,
    /// The tenant id.
    pub key: String,
    pub event_id: String,
    pub timestamp_ms: i64,
    /// The event's JSON.
    pub payload: String,
}

/// The durable local event log.
#[derive(Clone)]
pub struct LocalEventLog {
    pool: SqlitePool,
    path: PathBuf,
}

impl LocalEventLog {
    /// Where the log lives in a data directory by default.
    pub fn default_path(data_dir: &Path) -> PathBuf {
        data_dir.join("events.sqlite")
    }

    /// Opens (creating if needed) the log at `path`.
    pub async fn open(path: &Path) -> Result<LocalEventLog, EventsError> {
        LocalEventLog::open_with(path, LocalSync::Normal).await
    }

    /// Opens (creating if needed) the log at `path`, syncing commits per `sync`.
    pub async fn open_with(path: &Path, sync: LocalSync) -> Result<LocalEventLog, EventsError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| EventsError::Spool {
                path: dir.display().to_string(),
                source,
            })?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match sync {
                LocalSync::Normal => SqliteSynchronous::Normal,
                LocalSync::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        for statement in tollgate_schemas::events::LOCAL_EVENT_LOG_DDL {
            sqlx::query(statement).execute(&pool).await?;
        }
        Ok(LocalEventLog {
            pool,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `batch` in one transaction, in order.
    pub async fn append(&self, batch: &[WireMessage], topics: &Topics) -> Result<(), EventsError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // Multi-row inserts of power-of-two sizes only: at most a dozen distinct statements,
        // each prepared once and then reused from the connection's statement cache.
        let mut rest = batch;
        while !rest.is_empty() {
            let n = INSERT_ROWS
                .iter()
                .copied()
                .find(|n| *n <= rest.len())
                .unwrap_or(1);
            let (rows, tail) = rest.split_at(n);
            rest = tail;
            let mut q = QueryBuilder::new(
                "INSERT INTO event_log (topic, event_key, event_id, timestamp_ms, payload) ",
            );
            q.push_values(rows, |mut b, m| {
                b.push_bind(m.topic.name(topics))
                    .push_bind(m.key.as_str())
                    .push_bind(m.event_id.as_str())
                    .push_bind(m.timestamp_ms)
                    .push_bind(String::from_utf8_lossy(&m.payload));
            });
            q.build().persistent(true).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Up to `max` events from `offset` on (all topics), in log order.
    pub async fn read(&self, offset: u64, max: usize) -> Result<Vec<LogRecord>, EventsError> {
        let rows = sqlx::query(
            "SELECT log_offset, topic, event_key, event_id, timestamp_ms, payload FROM event_log
             WHERE log_offset >= ? ORDER BY log_offset LIMIT ?",
        )
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(to_record).collect()
    }

    /// Up to `max` events of `topic` from `offset` on, in log order.
    pub async fn read_topic(
        &self,
        topic: &str,
        offset: u64,
        max: usize,
    ) -> Result<Vec<LogRecord>, EventsError> {
        let rows = sqlx::query(
            "SELECT log_offset, topic, event_key, event_id, timestamp_ms, payload FROM event_log
             WHERE topic = ? AND log_offset >= ? ORDER BY log_offset LIMIT ?",
        )
        .bind(topic)
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(to_record).collect()
    }

    /// The offset the next appended event will get.
    pub async fn end_offset(&self) -> Result<u64, EventsError> {
        let row = sqlx::query("SELECT COALESCE(MAX(log_offset), 0) + 1 FROM event_log")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(1))
    }
}

fn to_record(row: &sqlx::sqlite::SqliteRow) -> Result<LogRecord, EventsError> {
    Ok(LogRecord {
        offset: u64::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0),
        topic: row.try_get(1)?,
        key: row.try_get(2)?,
        event_id: row.try_get(3)?,
        timestamp_ms: row.try_get(4)?,
        payload: row.try_get(5)?,
    })
}

/// The event sink of the embedded default.
pub struct LocalSink {
    handoff: Arc<Handoff>,
    control: Sender<()>,
    metrics: EventMetrics,
    log: LocalEventLog,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl LocalSink {
    /// Opens the log and starts the writer thread. Must be called inside a Tokio runtime (the
    /// log is created through sqlx; the writer thread then appends on its own connection).
    pub async fn start(config: &LocalConfig, data_dir: &Path) -> Result<LocalSink, EventsError> {
        let metrics = EventMetrics::new().map_err(|e| EventsError::Setup(e.to_string()))?;
        let path = config
            .path
            .clone()
            .unwrap_or_else(|| LocalEventLog::default_path(data_dir));
        let log = LocalEventLog::open_with(&path, config.synchronous).await?;
        let overflow_dir = config
            .overflow_dir
            .clone()
            .unwrap_or_else(|| path.with_extension("overflow"));
        let (handoff, rx) = durable_handoff(
            config.max_queue_events,
            config.durability,
            config.durable_timeout_ms,
            &overflow_dir,
            config.overflow_max_bytes,
            &metrics,
        )?;
        let handoff = Arc::new(handoff);
        let (control, control_rx) = crossbeam_channel::bounded(1);
        let appender = Appender::open(&path, config.synchronous)?;
        let writer = Writer {
            log: appender,
            topics: config.topics(),
            rx,
            control: control_rx,
            handoff: handoff.clone(),
            metrics: metrics.clone(),
            batch_max: config.batch_max_events.max(1),
            shutdown_timeout: ms(config.shutdown_timeout_ms),
            limiter: LogLimiter::default(),
            drop_limiter: LogLimiter::default(),
            tokens: ChunkTokens::default(),
            batch_delay: ms(config.batch_delay_ms.max(1)),
        };
        let thread = std::thread::Builder::new()
            .name("tollgate-events-local".to_string())
            .spawn(move || writer.run())
            .map_err(|e| EventsError::Setup(format!("cannot start the event log writer: {e}")))?;
        Ok(LocalSink {
            handoff,
            control,
            metrics,
            log,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The log this sink appends to (for readers in the same process).
    pub fn log(&self) -> &LocalEventLog {
        &self.log
    }

    pub fn metrics(&self) -> &EventMetrics {
        &self.metrics
    }
    /// Records handed over and not yet taken by the writer thread.
    pub fn queued_events(&self) -> usize {
        self.handoff.len()
    }
}

impl EventSink for LocalSink {
    fn record_request(&self, record: RequestRecord) {
        self.handoff.send(Record::Request(Box::new(record)));
    }

    fn record_chunk(&self, record: ChunkRecord) {
        self.handoff.send(Record::Chunk(record));
    }

    fn record_completion(&self, record: CompletionRecord) -> Durable {
        self.handoff.send_completion(record)
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let _ = self.control.try_send(());
            let handle = self.thread.lock().take();
            if let Some(h) = handle {
                let _ = tokio::task::spawn_blocking(move || h.join()).await;
            }
        })
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        self.metrics.collectors()
    }

    fn local_log_path(&self) -> Option<&Path> {
        Some(self.log.path())
    }
}

/// The writer thread's own connection to the log: appends run synchronously on that thread
/// (one prepared statement, one transaction per batch), with no hop through an async pool.
struct Appender {
    conn: rusqlite::Connection,
}

impl Appender {
    fn open(path: &Path, sync: LocalSync) -> Result<Appender, EventsError> {
        let setup = |e: rusqlite::Error| {
            EventsError::Setup(format!("local event log {}: {e}", path.display()))
        };
        let conn = rusqlite::Connection::open(path).map_err(setup)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(setup)?;
        // The log was created in WAL mode by `LocalEventLog::open`; `synchronous` is per
        // connection.
        let synchronous = match sync {
            LocalSync::Normal => "NORMAL",
            LocalSync::Full => "FULL",
        };
        conn.pragma_update(None, "synchronous", synchronous)
            .map_err(setup)?;
        Ok(Appender { conn })
    }

    /// Appends `batch` in one transaction (taking the write lock at its start), in order.
    fn append(&mut self, batch: &[WireMessage], topics: &Topics) -> Result<(), rusqlite::Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO event_log (topic, event_key, event_id, timestamp_ms, payload)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for m in batch {
                let payload = String::from_utf8_lossy(&m.payload);
                insert.execute((
                    m.topic.name(topics),
                    m.key.as_str(),
                    m.event_id.as_str(),
                    m.timestamp_ms,
                    payload.as_ref(),
                ))?;
            }
        }
        tx.commit()
    }
}

struct Writer {
    log: Appender,
    topics: Topics,
    rx: Receiver<Handed>,
    control: Receiver<()>,
    handoff: Arc<Handoff>,
    metrics: EventMetrics,
    batch_max: usize,
    shutdown_timeout: Duration,
    limiter: LogLimiter,
    drop_limiter: LogLimiter,
    tokens: ChunkTokens,
    batch_delay: Duration,
}

/// One transaction's worth of events, with the tickets to resolve once it is committed.
#[derive(Default)]
struct Batch {
    messages: Vec<WireMessage>,
    handed_at: Vec<Option<Instant>>,
    tickets: Vec<DurableTx>,
}

impl Writer {
    fn run(mut self) {
        let mut batch = Batch::default();
        let mut deadline: Option<Instant> = None;
        loop {
            if deadline.is_none() {
                match self.control.try_recv() {
                    Err(TryRecvError::Empty) => {}
                    Ok(()) | Err(TryRecvError::Disconnected) => {
                        deadline = Some(Instant::now() + self.shutdown_timeout);
                    }
                }
            }
            if batch.messages.is_empty() {
                self.take(&mut batch, deadline.is_none());
            }
            self.handoff.report(&self.metrics, &mut self.drop_limiter);
            self.metrics.handoff_queue.set(self.handoff.len() as i64);
            if batch.messages.is_empty() {
                if let Some(drained) = self.drain_overflow() {
                    if !drained {
                        std::thread::sleep(RETRY_WAIT);
                    }
                    continue;
                }
                if deadline.is_some() {
                    break;
                }
                continue;
            }
            match self.log.append(&batch.messages, &self.topics) {
                Ok(()) => {
                    // Durable: the responses waiting on these completions may end.
                    for t in batch.tickets.drain(..) {
                        t.done();
                    }
                    for (m, at) in batch.messages.drain(..).zip(batch.handed_at.drain(..)) {
                        EventsPublished {
                            topic: m.topic,
                            count: 1,
                            latency: at.map(|t| t.elapsed()),
                        }
                        .emit(&self.metrics);
                    }
                }
                Err(e) => {
                    if let Some(held_back) = self.limiter.allow() {
                        tracing::error!(target: "tollgate::events", error = %e, earlier_lines_held_back = held_back, "cannot append to the local event log; retrying");
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        EventsDropped {
                            count: batch.messages.len() as u64 + self.rx.len() as u64,
                            reason: DropReason::AfterShutdown,
                        }
                        .emit(&self.metrics, &mut self.drop_limiter);
                        break;
                    }
                    std::thread::sleep(RETRY_WAIT);
                }
            }
        }
        if let Err(e) = self.handoff.overflow().map_or(Ok(()), |o| o.sync()) {
            tracing::error!(target: "tollgate::events", error = %e, "cannot sync the overflow spool");
        }
    }

    /// Takes what the channel holds (up to a batch). With `wait`, first sleeps until a
    /// completion is handed over (a response waits on it: woken at once) or `batch_delay`
    /// passes (requests and chunks wait that long at most): one transaction per completion
    /// at low load, with its request and chunks, and larger ones as load grows.
    fn take(&mut self, batch: &mut Batch, wait: bool) {
        let mut handed: Vec<Handed> = Vec::new();
        if wait && !self.handoff.overflow().is_some_and(|o| o.is_active()) {
            self.handoff.wait(self.batch_delay);
        }
        while handed.len() < self.batch_max {
            match self.rx.try_recv() {
                Ok(h) => handed.push(h),
                Err(_) => break,
            }
        }
        // A completion committed in the same transaction as its chunks makes their running
        // counts moot (the pipeline never has to recover that request): skip counting them.
        let completed: HashSet<&str> = handed
            .iter()
            .filter_map(|h| match &h.record {
                Record::Completion(c) => Some(c.request_id.as_str()),
                _ => None,
            })
            .collect();
        let skip: HashSet<String> = handed
            .iter()
            .filter_map(|h| match &h.record {
                Record::Chunk(c) if completed.contains(c.stream.request_id.as_str()) => {
                    Some(c.stream.request_id.clone())
                }
                _ => None,
            })
            .collect();
        for mut h in handed {
            match &h.record {
                Record::Chunk(c) if skip.contains(&c.stream.request_id) => {}
                Record::Completion(c) if skip.contains(&c.request_id) => {
                    self.tokens.forget(&c.request_id);
                }
                _ => self.tokens.stamp(&mut h.record),
            }
            match h.record.to_wire() {
                Ok(m) => {
                    batch.messages.push(m);
                    batch.handed_at.push(Some(h.at));
                    if let Some(t) = h.durable {
                        batch.tickets.push(t);
                    }
                }
                Err(e) => {
                    tracing::error!(target: "tollgate::events", error = %e, "cannot serialize event");
                    EventsDropped {
                        count: 1,
                        reason: DropReason::Serialize,
                    }
                    .emit(&self.metrics, &mut self.drop_limiter);
                }
            }
        }
    }

    /// Moves records from the overflow spool into the log, oldest first. `None` when the
    /// overflow is empty; otherwise whether the move succeeded.
    fn drain_overflow(&mut self) -> Option<bool> {
        let overflow = self.handoff.overflow()?.clone();
        if !overflow.is_active() {
            return None;
        }
        let drained = match overflow.read(self.batch_max) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(target: "tollgate::events", error = %e, "cannot read the overflow spool");
                return Some(false);
            }
        };
        let appended = self.log.append(&drained.messages, &self.topics);
        let committed = appended
            .map_err(|e| e.to_string())
            .and_then(|()| overflow.commit(&drained).map_err(|e| e.to_string()));
        match committed {
            Ok(()) => {
                for m in &drained.messages {
                    EventsPublished {
                        topic: m.topic,
                        count: 1,
                        latency: None,
                    }
                    .emit(&self.metrics);
                }
                Some(true)
            }
            Err(e) => {
                overflow.retry();
                if let Some(held_back) = self.limiter.allow() {
                    tracing::error!(target: "tollgate::events", error = %e, earlier_lines_held_back = held_back, "cannot move overflowed events into the local event log; retrying");
                }
                Some(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tollgate_schemas::events::{ChunkEvent, CompletionEvent, RequestEvent};

    use super::*;
    use crate::events::wire::tests::{chunk, completion, request};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_are_durable_and_read_back_in_order_from_any_offset() {
        let dir = tempfile::tempdir().unwrap();
        let sink = LocalSink::start(&LocalConfig::default(), dir.path())
            .await
            .unwrap();
        for r in 0..20 {
            let id = format!("req-{r}");
            let tenant = format!("t{}", r % 3);
            sink.record_request(request(&tenant, &id));
            for s in 0..5 {
                sink.record_chunk(chunk(&tenant, &id, s));
            }
            sink.record_completion(completion(&tenant, &id));
        }
        sink.shutdown().await;
        assert_eq!(
            sink.metrics()
                .published
                .with_label_values(&["chunks"])
                .get(),
            100
        );
        drop(sink);

        // Reopened, as the pipeline would.
        let log = LocalEventLog::open(&LocalEventLog::default_path(dir.path()))
            .await
            .unwrap();
        assert_eq!(log.end_offset().await.unwrap(), 141);
        let all = log.read(1, 1000).await.unwrap();
        assert_eq!(all.len(), 140);
        assert!(all.windows(2).all(|w| w[0].offset + 1 == w[1].offset));
        // Per request: request, chunks 0..5, completion.
        let first: Vec<&str> = all[..7].iter().map(|r| r.topic.as_str()).collect();
        assert_eq!(
            first,
            [
                "llm.requests",
                "llm.chunks",
                "llm.chunks",
                "llm.chunks",
                "llm.chunks",
                "llm.chunks",
                "llm.completions"
            ]
        );
        let _: RequestEvent = serde_json::from_str(&all[0].payload).unwrap();
        let c: ChunkEvent = serde_json::from_str(&all[3].payload).unwrap();
        assert_eq!((c.sequence, c.request_id.as_str()), (2, "req-0"));
        let done: CompletionEvent = serde_json::from_str(&all[6].payload).unwrap();
        assert_eq!(done.event_id, all[6].event_id);
        assert_eq!(all[6].key, "t0");

        let from = log.read(100, 5).await.unwrap();
        assert_eq!(from.first().map(|r| r.offset), Some(100));
        assert_eq!(from.len(), 5);
        let completions = log.read_topic("llm.completions", 1, 100).await.unwrap();
        assert_eq!(completions.len(), 20);
        let later = log
            .read_topic("llm.completions", completions[10].offset + 1, 100)
            .await
            .unwrap();
        assert_eq!(later.len(), 9);
    }
}
