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
use sqlx::{Row, SqlitePool};

use super::durable::{DurabilityPolicy, Durable, DurableTx};
use super::internal_events::{
    DropReason, EventMetrics, EventsDropped, EventsPublished, LogLimiter,
};
use super::overflow::Overflow;
use super::spool::{Lane, Position, Spool, SpoolOptions, SpoolRecord};
use super::wire::{ChunkTokens, Handed, Handoff, Record, WireMessage};
use super::{durable_handoff, ms, EventSink, EventsError, LocalConfig, LocalSync, Topics};
use crate::relay::{ChunkRecord, CompletionRecord, RequestRecord};

const RETRY_WAIT: Duration = Duration::from_millis(200);
/// Segment files of the completion journal (deleted once committed past).
const JOURNAL_SEGMENT_BYTES: u64 = 8 * 1024 * 1024;
/// How often the journal's cursor is written to disk (a restart re-reads at most this much).
const JOURNAL_CURSOR_EVERY: Duration = Duration::from_millis(500);
/// How often the write-ahead log is copied into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

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
    /// Dropped with the sink: the checkpoint thread stops.
    _checkpoints: Sender<()>,
    /// The completion journal (see `record_completion`); `None` when completions wait for
    /// the writer thread instead (`durability = "none"`, or `synchronous = "full"`).
    journal: Option<Arc<Mutex<Spool>>>,
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
        let mut appender = Appender::open(&path, config.synchronous)?;
        let journal = if config.durability == DurabilityPolicy::Completion
            && config.synchronous == LocalSync::Normal
        {
            let dir = path.with_extension("journal");
            let mut spool = Spool::open(
                &dir,
                SpoolOptions {
                    segment_max_bytes: JOURNAL_SEGMENT_BYTES,
                    fsync_interval: JOURNAL_CURSOR_EVERY,
                },
            )
            .map_err(|source| EventsError::Spool {
                path: dir.display().to_string(),
                source,
            })?;
            replay_journal(&mut spool, &mut appender, &config.topics())?;
            Some(Arc::new(Mutex::new(spool)))
        } else {
            None
        };
        let committer = Arc::new(Mutex::new(Committer {
            journal: journal.clone(),
            log: appender,
            topics: config.topics(),
            metrics: metrics.clone(),
            batch_max: config.batch_max_events.max(1),
            tokens: ChunkTokens::default(),
            batch: Batch::default(),
            limiter: LogLimiter::default(),
            drop_limiter: LogLimiter::default(),
        }));
        let writer = Writer {
            committer: committer.clone(),
            rx: rx.clone(),
            control: control_rx,
            handoff: handoff.clone(),
            metrics: metrics.clone(),
            shutdown_timeout: ms(config.shutdown_timeout_ms),
            batch_delay: ms(config.batch_delay_ms.max(1)),
            drop_limiter: LogLimiter::default(),
        };
        let thread = std::thread::Builder::new()
            .name("tollgate-events-local".to_string())
            .spawn(move || writer.run())
            .map_err(|e| EventsError::Setup(format!("cannot start the event log writer: {e}")))?;
        let (checkpoints, stop) = crossbeam_channel::bounded(1);
        let checkpointer = Appender::open(&path, config.synchronous)?;
        std::thread::Builder::new()
            .name("tollgate-events-checkpoint".to_string())
            .spawn(move || checkpointer.checkpoint_until(&stop))
            .map_err(|e| EventsError::Setup(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(LocalSink {
            handoff,
            control,
            metrics,
            log,
            thread: Mutex::new(Some(thread)),
            _checkpoints: checkpoints,
            journal,
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

    fn record_audit(&self, record: crate::audit::AuditRecord) {
        self.handoff.send(Record::Audit(Box::new(record)));
    }

    /// With the completion journal, the request path serializes the completion and appends
    /// it to the journal file (one `write`, no disk sync: durable against a process crash,
    /// like a commit in `synchronous = normal`), then hands it over; the response may end at
    /// once. The writer thread commits it to the log with everything else and then moves
    /// the journal's cursor past it; a restart appends what the journal holds beyond the log.
    /// Without the journal, the writer thread is woken and the response waits for its commit.
    fn record_completion(&self, record: CompletionRecord) -> Durable {
        let Some(journal) = &self.journal else {
            let durable = self.handoff.send_completion(record);
            self.handoff.ring();
            return durable;
        };
        let at = Instant::now();
        let record = Record::Completion(Box::new(record));
        let wire = match record.to_wire() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(target: "tollgate::events", error = %e, "cannot serialize event");
                return Durable::not_required();
            }
        };
        let mut j = journal.lock();
        let written = j
            .append(Lane::New, &SpoolRecord::from_wire(wire.clone()))
            .and_then(|()| j.flush());
        match written {
            Ok(()) => {
                // Handed over under the journal's lock: the channel holds journaled records
                // in journal order, so committing one commits the journal up to it.
                let end = j.end_position();
                self.handoff.send_durable(Handed {
                    at,
                    record,
                    durable: None,
                    wire: Some(wire),
                    journal: Some(end),
                });
                drop(j);
                self.handoff.ring();
                self.handoff.durable_now()
            }
            Err(e) => {
                drop(j);
                tracing::error!(target: "tollgate::events", error = %e, "cannot write the completion journal; the writer thread commits the completion instead");
                let Record::Completion(record) = record else {
                    return Durable::not_required();
                };
                let durable = self.handoff.send_completion(*record);
                self.handoff.ring();
                durable
            }
        }
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

    fn state(&self) -> super::SinkState {
        // No disk spool of its own: the log is the destination; only the overflow counts.
        self.metrics.state(0)
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
        // No checkpoint inside a commit: one copies the log into the database file and syncs
        // it (milliseconds), and a completion's response would wait for it. A thread of its
        // own checkpoints instead (`checkpoint_until`), beside the writer.
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(setup)?;
        Ok(Appender { conn })
    }

    /// Checkpoints the write-ahead log every `CHECKPOINT_EVERY` (passive: never blocks the
    /// writer) until `stop` is dropped.
    fn checkpoint_until(self, stop: &Receiver<()>) {
        let mut limiter = LogLimiter::default();
        while let Err(crossbeam_channel::RecvTimeoutError::Timeout) =
            stop.recv_timeout(CHECKPOINT_EVERY)
        {
            if let Err(e) = self
                .conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            {
                if let Some(held_back) = limiter.allow() {
                    tracing::warn!(target: "tollgate::events", error = %e, earlier_lines_held_back = held_back, "cannot checkpoint the local event log");
                }
            }
        }
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

/// Appends to the log what a previous run journaled and may not have committed: the journal's
/// records beyond its cursor, less those whose event id the log's latest completions already
/// hold. Then forgets them.
fn replay_journal(
    journal: &mut Spool,
    log: &mut Appender,
    topics: &Topics,
) -> Result<(), EventsError> {
    let dir = journal.dir().display().to_string();
    let io = |e: std::io::Error| EventsError::Spool {
        path: dir.clone(),
        source: e,
    };
    let mut records = Vec::new();
    let mut end = journal.read_position();
    while let Some((r, pos)) = journal.read_next().map_err(io)? {
        records.push(crate::events::overflow::to_wire(r));
        end = pos;
    }
    if records.is_empty() {
        return Ok(());
    }
    let sql =
        |e: rusqlite::Error| EventsError::Setup(format!("replaying the completion journal: {e}"));
    let recent: HashSet<String> = {
        let mut q = log
            .conn
            .prepare(
                "SELECT event_id FROM event_log WHERE topic = ?1
                 ORDER BY log_offset DESC LIMIT ?2",
            )
            .map_err(sql)?;
        let limit = i64::try_from(records.len())
            .unwrap_or(i64::MAX)
            .saturating_add(10_000);
        let rows = q
            .query_map((topics.completions.as_str(), limit), |r| {
                r.get::<_, String>(0)
            })
            .map_err(sql)?;
        rows.collect::<Result<_, _>>().map_err(sql)?
    };
    let n = records.len() as u64;
    records.retain(|m| !recent.contains(&m.event_id));
    if !records.is_empty() {
        tracing::warn!(
            target: "tollgate::events",
            completions = records.len(),
            "appending completions a previous run journaled but had not written to the event log"
        );
    }
    log.append(&records, topics).map_err(sql)?;
    journal.commit(end, n).map_err(io)?;
    journal.sync(true).map_err(io)
}

/// Everything that turns handed-over records into a committed transaction: shared by the
/// writer thread and, for a completion at low load, the request path itself (whoever holds
/// the lock commits everything waiting: group commit with the caller as leader).
struct Committer {
    /// The completion journal: moved past each journaled record once it is committed.
    journal: Option<Arc<Mutex<Spool>>>,
    log: Appender,
    topics: Topics,
    metrics: EventMetrics,
    batch_max: usize,
    tokens: ChunkTokens,
    /// Serialized records not yet committed (kept across a failed append, for a retry).
    batch: Batch,
    limiter: LogLimiter,
    drop_limiter: LogLimiter,
}

/// One transaction's worth of events, with the tickets to resolve once it is committed.
#[derive(Default)]
struct Batch {
    messages: Vec<WireMessage>,
    handed_at: Vec<Option<Instant>>,
    tickets: Vec<DurableTx>,
    /// The end of the last journaled record in the batch, and how many it holds.
    journal: Option<(Position, u64)>,
}

impl Committer {
    /// Takes what the channel holds (up to a batch) into the pending batch, serialized.
    fn take(&mut self, rx: &Receiver<Handed>) {
        let mut handed: Vec<Handed> = Vec::new();
        while handed.len() < self.batch_max {
            match rx.try_recv() {
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
            if let Some(end) = h.journal {
                let n = self.batch.journal.map_or(0, |(_, n)| n);
                self.batch.journal = Some((end, n + 1));
            }
            let wire = match h.wire.take() {
                Some(m) => Ok(m),
                None => h.record.to_wire(),
            };
            match wire {
                Ok(m) => {
                    self.batch.messages.push(m);
                    self.batch.handed_at.push(Some(h.at));
                    if let Some(t) = h.durable {
                        self.batch.tickets.push(t);
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

    /// Commits the pending batch; on success the responses waiting on its completions may
    /// end. On failure the batch is kept for the next try (and the error logged).
    fn commit(&mut self) -> bool {
        if self.batch.messages.is_empty() {
            return true;
        }
        match self.log.append(&self.batch.messages, &self.topics) {
            Ok(()) => {
                for t in self.batch.tickets.drain(..) {
                    t.done();
                }
                if let (Some(journal), Some((end, n))) = (&self.journal, self.batch.journal.take())
                {
                    let mut j = journal.lock();
                    if let Err(e) = j.commit(end, n).and_then(|()| j.sync(false)) {
                        if let Some(held_back) = self.limiter.allow() {
                            tracing::error!(target: "tollgate::events", error = %e, earlier_lines_held_back = held_back, "cannot move the completion journal's cursor (a restart may append completions twice; readers drop the copies)");
                        }
                    }
                }
                let batch = &mut self.batch;
                for (m, at) in batch.messages.drain(..).zip(batch.handed_at.drain(..)) {
                    EventsPublished {
                        topic: m.topic,
                        count: 1,
                        latency: at.map(|t| t.elapsed()),
                    }
                    .emit(&self.metrics);
                }
                true
            }
            Err(e) => {
                if let Some(held_back) = self.limiter.allow() {
                    tracing::error!(target: "tollgate::events", error = %e, earlier_lines_held_back = held_back, "cannot append to the local event log; retrying");
                }
                false
            }
        }
    }

    /// Moves records from the overflow spool into the log, oldest first; whether it
    /// succeeded.
    fn drain_overflow(&mut self, overflow: &Overflow) -> bool {
        let drained = match overflow.read(self.batch_max) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(target: "tollgate::events", error = %e, "cannot read the overflow spool");
                return false;
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
                true
            }
            Err(e) => {
                overflow.retry();
                if let Some(held_back) = self.limiter.allow() {
                    tracing::error!(target: "tollgate::events", error = %e, earlier_lines_held_back = held_back, "cannot move overflowed events into the local event log; retrying");
                }
                false
            }
        }
    }
}

struct Writer {
    committer: Arc<Mutex<Committer>>,
    rx: Receiver<Handed>,
    control: Receiver<()>,
    handoff: Arc<Handoff>,
    metrics: EventMetrics,
    shutdown_timeout: Duration,
    batch_delay: Duration,
    drop_limiter: LogLimiter,
}

impl Writer {
    fn run(mut self) {
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
            // Sleep until a completion is handed over (a response waits on it: woken at
            // once) or `batch_delay` passes (requests and chunks wait that long at most):
            // one transaction per completion at low load, larger ones as load grows.
            let overflowing = self.handoff.overflow().is_some_and(|o| o.is_active());
            if deadline.is_none() && !overflowing && self.committer.lock().batch.messages.is_empty()
            {
                self.handoff.wait(self.batch_delay);
            }
            self.handoff.report(&self.metrics, &mut self.drop_limiter);
            self.metrics.handoff_queue.set(self.handoff.len() as i64);
            let mut c = self.committer.lock();
            if c.batch.messages.is_empty() {
                c.take(&self.rx);
            }
            if c.batch.messages.is_empty() {
                if let Some(overflow) = self.handoff.overflow().filter(|o| o.is_active()) {
                    let moved = c.drain_overflow(overflow);
                    drop(c);
                    if !moved {
                        std::thread::sleep(RETRY_WAIT);
                    }
                    continue;
                }
                if deadline.is_some() {
                    break;
                }
                continue;
            }
            if !c.commit() {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    let lost = c.batch.messages.len() as u64 + self.rx.len() as u64;
                    EventsDropped {
                        count: lost,
                        reason: DropReason::AfterShutdown,
                    }
                    .emit(&self.metrics, &mut self.drop_limiter);
                    break;
                }
                drop(c);
                std::thread::sleep(RETRY_WAIT);
            }
        }
        if let Err(e) = self.handoff.overflow().map_or(Ok(()), |o| o.sync()) {
            tracing::error!(target: "tollgate::events", error = %e, "cannot sync the overflow spool");
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
    async fn completions_journaled_but_not_written_are_appended_once_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = LocalEventLog::default_path(dir.path());
        let topics = LocalConfig::default().topics();
        let wire = |id: &str| {
            Record::Completion(Box::new(completion("t", id)))
                .to_wire()
                .unwrap()
        };
        let (a, b, c) = (wire("r1"), wire("r2"), wire("r3"));
        // A run that died after journaling three completions and writing only the first.
        LocalEventLog::open(&path).await.unwrap();
        Appender::open(&path, LocalSync::Normal)
            .unwrap()
            .append(std::slice::from_ref(&a), &topics)
            .unwrap();
        let mut journal = Spool::open(
            &path.with_extension("journal"),
            SpoolOptions {
                segment_max_bytes: JOURNAL_SEGMENT_BYTES,
                fsync_interval: JOURNAL_CURSOR_EVERY,
            },
        )
        .unwrap();
        for m in [&a, &b, &c] {
            journal
                .append(Lane::New, &SpoolRecord::from_wire(m.clone()))
                .unwrap();
        }
        journal.flush().unwrap();
        drop(journal);

        for _ in 0..2 {
            let sink = LocalSink::start(&LocalConfig::default(), dir.path())
                .await
                .unwrap();
            sink.shutdown().await;
        }
        let log = LocalEventLog::open(&path).await.unwrap();
        let ids: Vec<String> = log
            .read_topic("llm.completions", 1, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.event_id)
            .collect();
        assert_eq!(ids, [a.event_id, b.event_id, c.event_id]);
    }

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
