//! [`KafkaSink`]: events to Kafka through rdkafka, with a disk spool for when Kafka is down.
//!
//! The request path hands records to a bounded channel ([`Handoff`]) and returns. One thread
//! (`tollgate-events-kafka`) owns everything else: it serializes events, gives them to an
//! idempotent librdkafka producer (`acks=all`, batches of `linger_ms`, lz4, a bounded queue and
//! no local message timeout, so librdkafka retries a message until the broker answers), serves
//! delivery reports, and runs the spool. Owning it all on one thread is what keeps every
//! tenant's events in order without locks.
//!
//! Modes:
//! - **direct**: events go straight to the producer.
//! - **spooling**, entered when the producer's queue is full, when Kafka looks down (librdkafka
//!   reports a broker connection lost or refused, or no delivery report came for
//!   `delivery_stall_ms` while messages were waiting), or at start when a previous run left
//!   events in the spool: every new event is appended to the spool (lane `New`). When Kafka
//!   looks down, everything the producer holds (queued or in flight) is purged and appended,
//!   in send order, to lane `Undelivered`, which replays first (these events are older than
//!   anything spooled since); so a process crash during an outage loses at most the last few
//!   milliseconds of events (not yet taken from the channel, or not yet written out), and an
//!   in-flight event the broker did write is published twice with the same `event_id`. Replay starts once every event sent before spooling has been
//!   reported (delivered or purged), with a single event until one is acknowledged (the broker
//!   is back), then up to `replay_max_in_flight_events` at a time. When the reader has sent
//!   everything spooled, new events go direct again, queued behind the replayed ones.
//!
//! Spooled events are deleted only once Kafka acknowledged them: after a crash, replay resumes
//! at the first unacknowledged one, so an event may be published twice (same `event_id`) but
//! never lost. Per partition, first occurrences keep publish order.
//!
//! `shutdown` delivers what it can within `shutdown_timeout_ms`, the spool included (while
//! spooling, it first probes with one event, and gives up as soon as Kafka looks down again
//! or `delivery_stall_ms` passes without an answer), purges the rest from the producer into
//! the spool, and syncs it.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{
    BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig,
};
use rdkafka::ClientContext;

use super::durable::{Durable, DurableTx};
use super::internal_events::{
    DeliveryFailed, DropReason, EventMetrics, EventsDeadLettered, EventsDropped, EventsPublished,
    EventsReplayed, EventsSpooled, LogLimiter, SpoolCorrupted, SpoolDrained, SpoolReason,
    SpoolingStarted,
};
use super::spool::{Lane, Position, Spool, SpoolOptions, SpoolRecord};
use super::wire::{ChunkTokens, Handed, Handoff, Record, Topic};
use super::{durable_handoff, ms, EventSink, EventsError, KafkaConfig, SinkState, Topics};
use crate::relay::{ChunkRecord, CompletionRecord, RequestRecord};

/// Most records taken from the hand-off channel per loop turn (then delivery reports are served).
const TURN_EVENTS: usize = 4096;
/// How long an idle loop turn waits for a record before serving delivery reports.
const IDLE_POLL: Duration = Duration::from_millis(2);
/// The same while messages await acknowledgement.
const ACK_POLL: Duration = Duration::from_micros(500);
/// After Kafka looked down, how long before a first replay attempt.
const REPLAY_BACKOFF: Duration = Duration::from_millis(500);

/// The Kafka event sink. See the module documentation.
pub struct KafkaSink {
    handoff: Arc<Handoff>,
    control: Sender<()>,
    metrics: EventMetrics,
    /// The disk spool's bound (for [`EventSink::state`]).
    spool_max_bytes: u64,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl KafkaSink {
    /// Opens the spool, creates the producer and starts the producer thread. Connecting to
    /// Kafka happens in the background: an unreachable broker is not a start-up error (events
    /// spool until it answers).
    pub fn start(config: &KafkaConfig, data_dir: &Path) -> Result<KafkaSink, EventsError> {
        let metrics = EventMetrics::new().map_err(|e| EventsError::Setup(e.to_string()))?;
        let spool_dir = config
            .spool_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("spool").join("events"));
        let spool = Spool::open(
            &spool_dir,
            SpoolOptions {
                segment_max_bytes: config.spool_segment_bytes,
                fsync_interval: ms(config.spool_fsync_interval_ms),
            },
        )
        .map_err(|source| EventsError::Spool {
            path: spool_dir.display().to_string(),
            source,
        })?;
        let client_config = client_config(config);
        let shared = Arc::new(Shared::default());
        let producer = create_producer(&client_config, &shared)?;
        let overflow_dir = config.overflow_dir.clone().unwrap_or_else(|| {
            let mut name = spool_dir.file_name().unwrap_or_default().to_os_string();
            name.push("-overflow");
            spool_dir.with_file_name(name)
        });
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
        let mut dispatcher = Dispatcher {
            producer,
            client_config,
            shared,
            topics: config.topics(),
            rx,
            control: control_rx,
            handoff: handoff.clone(),
            spool,
            metrics: metrics.clone(),
            mode: Mode::Direct,
            spooling_since: Instant::now(),
            replayed_in_episode: 0,
            outstanding_direct: 0,
            next_seq: 0,
            last_progress: Instant::now(),
            stall_after: ms(config.delivery_stall_ms.max(1)),
            replay: ReplayWindow::default(),
            replay_max: config.replay_max_in_flight_events.max(1),
            replay_trusted: true,
            down_signals: 0,
            replay_resume_at: Instant::now(),
            rewind_pending: false,
            spool_max_bytes: config.spool_max_bytes,
            shutdown_timeout: ms(config.shutdown_timeout_ms),
            spooled: [0; SPOOL_REASONS.len()],
            limits: Limiters::default(),
            tokens: ChunkTokens::default(),
            spooled_tickets: Vec::new(),
        };
        dispatcher.report_corruptions();
        if dispatcher.spool.records() > 0 {
            let n = dispatcher.spool.records();
            dispatcher.start_spooling(
                SpoolReason::PreviousRun,
                format!("{n} events left in the spool by a previous run"),
            );
        }
        dispatcher.update_gauges();
        let thread = std::thread::Builder::new()
            .name("tollgate-events-kafka".to_string())
            .spawn(move || dispatcher.run())
            .map_err(|e| EventsError::Setup(format!("cannot start the producer thread: {e}")))?;
        Ok(KafkaSink {
            handoff,
            control,
            metrics,
            spool_max_bytes: config.spool_max_bytes,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// The sink's metrics (also exposed through [`EventSink::collectors`]).
    pub fn metrics(&self) -> &EventMetrics {
        &self.metrics
    }
    /// Records handed over and not yet taken by the writer thread.
    pub fn queued_events(&self) -> usize {
        self.handoff.len()
    }
}

impl EventSink for KafkaSink {
    fn record_request(&self, record: RequestRecord) {
        self.handoff.send(Record::Request(Box::new(record)));
    }

    fn record_chunk(&self, record: ChunkRecord) {
        self.handoff.send(Record::Chunk(record));
    }

    fn record_audit(&self, record: crate::audit::AuditRecord) {
        self.handoff.send(Record::Audit(Box::new(record)));
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

    fn state(&self) -> SinkState {
        self.metrics.state(self.spool_max_bytes)
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        self.metrics.collectors()
    }
}

impl Drop for KafkaSink {
    fn drop(&mut self) {
        // Without an explicit shutdown the thread still flushes and spools (the channels
        // close); wait for it so nothing is cut off mid-write.
        let _ = self.control.try_send(());
        if let Some(h) = self.thread.lock().take() {
            let _ = h.join();
        }
    }
}

fn client_config(c: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &c.bootstrap_servers)
        .set("client.id", &c.client_id)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", c.linger_ms.to_string())
        .set("compression.codec", c.compression.as_str())
        .set(
            "queue.buffering.max.messages",
            c.max_producer_queue_events.to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            c.max_producer_queue_kbytes.max(1).to_string(),
        )
        // No local timeout: librdkafka keeps retrying; the spool bounds memory instead.
        .set("message.timeout.ms", "0")
        // The Java client's key hashing, so other producers agree on a tenant's partition.
        .set("partitioner", "murmur2_random")
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000");
    for (k, v) in &c.properties {
        cc.set(k, v);
    }
    cc
}

fn create_producer(
    config: &ClientConfig,
    shared: &Arc<Shared>,
) -> Result<BaseProducer<Ctx>, EventsError> {
    config
        .create_with_context(Ctx {
            shared: shared.clone(),
        })
        .map_err(|e| EventsError::Setup(format!("Kafka producer: {e}")))
}

/// Where a produced message came from.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Origin {
    Direct,
    Replay(u64),
}

/// The delivery opaque of each message.
#[derive(Debug)]
struct Pending {
    origin: Origin,
    /// Dispatch order (purged messages come back out of order and are sorted by it).
    seq: u64,
    handed_at: Option<Instant>,
    topic: Topic,
    /// A completion's durability ticket: resolved on acknowledgement (or once spooled).
    durable: Option<DurableTx>,
}

struct Failure {
    code: Option<RDKafkaErrorCode>,
    error: String,
    record: SpoolRecord,
}

struct Delivery {
    pending: Box<Pending>,
    result: Result<(), Failure>,
}

/// State the producer's callbacks share with the producer thread (they run inside `poll`, on
/// that same thread).
#[derive(Default)]
struct Shared {
    deliveries: Mutex<Vec<Delivery>>,
    brokers_down: AtomicBool,
    fatal: AtomicBool,
    callbacks: AtomicU64,
    last_error: Mutex<Option<String>>,
}

struct Ctx {
    shared: Arc<Shared>,
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::warn!(target: "tollgate::kafka", facility = fac, "{message}");
            }
            RDKafkaLogLevel::Warning | RDKafkaLogLevel::Notice => {
                tracing::info!(target: "tollgate::kafka", facility = fac, "{message}");
            }
            RDKafkaLogLevel::Info | RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "tollgate::kafka", facility = fac, "{message}");
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.shared.callbacks.fetch_add(1, Ordering::Relaxed);
        match error.rdkafka_error_code() {
            // A lost or refused connection: messages for that broker wait in memory until
            // it is back, so treat it as down (a healthy cluster costs a short detour
            // through the spool at worst).
            Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure) => {
                self.shared.brokers_down.store(true, Ordering::Relaxed);
            }
            Some(RDKafkaErrorCode::Fatal) => self.shared.fatal.store(true, Ordering::Relaxed),
            _ => {}
        }
        *self.shared.last_error.lock() = Some(format!("{error}: {reason}"));
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<Pending>) {
        self.shared.callbacks.fetch_add(1, Ordering::Relaxed);
        let result = match result {
            Ok(_) => Ok(()),
            Err((e, m)) => Err(Failure {
                code: e.rdkafka_error_code(),
                error: e.to_string(),
                record: SpoolRecord {
                    topic: pending.topic,
                    timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                    key: m.key().map(<[u8]>::to_vec).unwrap_or_default(),
                    payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                },
            }),
        };
        self.shared
            .deliveries
            .lock()
            .push(Delivery { pending, result });
    }
}

/// A failure worth retrying later (from the spool) rather than keeping as a dead letter.
/// librdkafka itself retries every retriable broker error, so what reaches us is either
/// taken back (purged), a lost connection, or permanent.
fn is_transient(code: Option<RDKafkaErrorCode>) -> bool {
    matches!(
        code,
        Some(
            RDKafkaErrorCode::PurgeQueue
                | RDKafkaErrorCode::PurgeInflight
                | RDKafkaErrorCode::MessageTimedOut
                | RDKafkaErrorCode::AllBrokersDown
                | RDKafkaErrorCode::BrokerTransportFailure
                | RDKafkaErrorCode::QueueFull
                | RDKafkaErrorCode::Fatal
        )
    )
}

/// Bounded label for a delivery error.
fn error_kind(code: Option<RDKafkaErrorCode>) -> &'static str {
    match code {
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => "purged",
        Some(RDKafkaErrorCode::MessageTimedOut) => "timed_out",
        Some(RDKafkaErrorCode::AllBrokersDown | RDKafkaErrorCode::BrokerTransportFailure) => {
            "transport"
        }
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => "message_too_large",
        Some(RDKafkaErrorCode::UnknownTopic | RDKafkaErrorCode::UnknownTopicOrPartition) => {
            "unknown_topic"
        }
        Some(
            RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed,
        ) => "authorization",
        Some(RDKafkaErrorCode::Fatal) => "fatal",
        _ => "other",
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Direct,
    Spooling,
}

/// Replayed records sent and not yet acknowledged, in send order.
#[derive(Default)]
struct ReplayWindow {
    next_ticket: u64,
    /// (ticket, position just after the record, acknowledged)
    entries: VecDeque<(u64, Position, bool)>,
}

impl ReplayWindow {
    fn push(&mut self, end: Position) -> u64 {
        let t = self.next_ticket;
        self.next_ticket += 1;
        self.entries.push_back((t, end, false));
        t
    }

    fn pop_back(&mut self) {
        self.entries.pop_back();
    }

    /// Marks `ticket` acknowledged; false if it is not (or no longer) in the window.
    fn ack(&mut self, ticket: u64) -> bool {
        let Some(&(front, _, _)) = self.entries.front() else {
            return false;
        };
        let Some(i) = ticket.checked_sub(front) else {
            return false;
        };
        match self.entries.get_mut(i as usize) {
            Some(e) if e.0 == ticket && !e.2 => {
                e.2 = true;
                true
            }
            _ => false,
        }
    }

    /// The position up to which every record is acknowledged, and how many records that
    /// covers since the last call.
    fn take_committed(&mut self) -> Option<(Position, u64)> {
        let mut last = None;
        let mut n = 0;
        while let Some(&(_, end, true)) = self.entries.front() {
            self.entries.pop_front();
            last = Some(end);
            n += 1;
        }
        last.map(|p| (p, n))
    }

    fn clear(&mut self) {
        self.entries.clear();
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[derive(Default)]
struct Limiters {
    dropped: LogLimiter,
    delivery: LogLimiter,
    dead_letter: LogLimiter,
    spool_error: LogLimiter,
    client_error: LogLimiter,
}

const SPOOL_REASONS: [SpoolReason; 7] = [
    SpoolReason::Overflow,
    SpoolReason::QueueFull,
    SpoolReason::BrokersDown,
    SpoolReason::ProduceError,
    SpoolReason::Undelivered,
    SpoolReason::BehindSpool,
    SpoolReason::PreviousRun,
];

/// The producer thread's state.
struct Dispatcher {
    producer: BaseProducer<Ctx>,
    client_config: ClientConfig,
    shared: Arc<Shared>,
    topics: Topics,
    rx: Receiver<Handed>,
    control: Receiver<()>,
    handoff: Arc<Handoff>,
    spool: Spool,
    metrics: EventMetrics,
    mode: Mode,
    spooling_since: Instant,
    replayed_in_episode: u64,
    /// Messages sent straight to the producer whose delivery is not yet reported.
    outstanding_direct: u64,
    /// Dispatch sequence number of the next message sent straight to the producer.
    next_seq: u64,
    /// Last delivery report, or when `outstanding_direct` last rose from 0.
    last_progress: Instant,
    /// No delivery report for this long while messages are outstanding: Kafka is down.
    stall_after: Duration,
    replay: ReplayWindow,
    replay_max: usize,
    /// Whether a broker has acknowledged something since Kafka last looked down.
    replay_trusted: bool,
    /// Times Kafka looked down (a shutdown stops probing once it looks down again).
    down_signals: u64,
    replay_resume_at: Instant,
    rewind_pending: bool,
    spool_max_bytes: u64,
    shutdown_timeout: Duration,
    /// Events spooled this turn, by reason (index in `SPOOL_REASONS`).
    spooled: [u64; SPOOL_REASONS.len()],
    limits: Limiters,
    /// Running output-token counts of the streams being relayed.
    tokens: ChunkTokens,
    /// Tickets of completions appended to the spool, resolved once it is written out.
    spooled_tickets: Vec<DurableTx>,
}

impl Dispatcher {
    fn run(mut self) {
        // Until a shutdown request (or the sink is dropped).
        while let Err(TryRecvError::Empty) = self.control.try_recv() {
            let mut took = 0;
            while took < TURN_EVENTS {
                match self.rx.try_recv() {
                    Ok(h) => {
                        self.dispatch(h);
                        took += 1;
                    }
                    Err(_) => break,
                }
            }
            if took == 0 {
                // Wait for a record rather than sleep blindly (a completion is dispatched
                // the moment it arrives); while messages await acknowledgement, come back
                // soon for their delivery reports (responses wait on completions' acks).
                let wait = if self.outstanding_direct > 0 {
                    ACK_POLL
                } else {
                    IDLE_POLL
                };
                if let Ok(h) = self.rx.recv_timeout(wait) {
                    self.dispatch(h);
                }
            }
            self.serve(Duration::ZERO);
            self.drain_overflow();
            self.replay_step();
            self.housekeeping();
        }
        self.shutdown();
    }

    /// Serializes one handed-over record and sends or spools it.
    fn dispatch(&mut self, mut h: Handed) {
        self.tokens.stamp(&mut h.record);
        let durable = h.durable.take();
        let msg = match h.record.to_wire() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(target: "tollgate::events", error = %e, "cannot serialize event");
                EventsDropped {
                    count: 1,
                    reason: DropReason::Serialize,
                }
                .emit(&self.metrics, &mut self.limits.dropped);
                return;
            }
        };
        if self.mode == Mode::Spooling {
            self.spool_record(
                Lane::New,
                &SpoolRecord::from_wire(msg),
                SpoolReason::BehindSpool,
            );
            self.spooled_tickets.extend(durable);
            return;
        }
        let pending = Box::new(Pending {
            origin: Origin::Direct,
            seq: self.next_seq,
            handed_at: Some(h.at),
            topic: msg.topic,
            durable,
        });
        self.next_seq += 1;
        let record = BaseRecord::with_opaque_to(msg.topic.name(&self.topics), pending)
            .key(msg.key.as_bytes())
            .payload(&msg.payload)
            .timestamp(msg.timestamp_ms);
        match self.producer.send(record) {
            Ok(()) => {
                if self.outstanding_direct == 0 {
                    self.last_progress = Instant::now();
                }
                self.outstanding_direct += 1;
            }
            Err((e, record)) => {
                let durable = record.delivery_opaque.durable;
                let reason = match e.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::QueueFull) => SpoolReason::QueueFull,
                    _ => SpoolReason::ProduceError,
                };
                self.start_spooling(reason, e.to_string());
                self.spool_record(Lane::New, &SpoolRecord::from_wire(msg.clone()), reason);
                self.spooled_tickets.extend(durable);
            }
        }
    }

    fn spool_record(&mut self, lane: Lane, record: &SpoolRecord, reason: SpoolReason) {
        let size = 19 + record.key.len() + record.payload.len();
        if self.spool.bytes() + size as u64 > self.spool_max_bytes {
            EventsDropped {
                count: 1,
                reason: DropReason::SpoolFull,
            }
            .emit(&self.metrics, &mut self.limits.dropped);
            return;
        }
        match self.spool.append(lane, record) {
            Ok(()) => {
                if let Some(i) = SPOOL_REASONS.iter().position(|r| *r == reason) {
                    self.spooled[i] += 1;
                }
            }
            Err(e) => {
                if self.limits.spool_error.allow().is_some() {
                    tracing::error!(target: "tollgate::events", error = %e, "cannot write the event spool");
                }
                EventsDropped {
                    count: 1,
                    reason: DropReason::SpoolWrite,
                }
                .emit(&self.metrics, &mut self.limits.dropped);
            }
        }
    }

    fn start_spooling(&mut self, reason: SpoolReason, detail: String) {
        if self.mode == Mode::Spooling {
            return;
        }
        self.mode = Mode::Spooling;
        self.spooling_since = Instant::now();
        self.replayed_in_episode = 0;
        if let Err(e) = self.spool.begin_episode() {
            tracing::error!(target: "tollgate::events", error = %e, "cannot write the event spool");
        }
        SpoolingStarted { reason, detail }.emit(&self.metrics);
    }

    /// Serves the producer's callbacks (after sleeping `wait`), then acts on them.
    fn serve(&mut self, wait: Duration) {
        // Sleep rather than poll with a timeout: rdkafka's poll rounds the time left down to
        // whole milliseconds and spins through the last one.
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        self.drain_callbacks();
        self.handle_deliveries();
        if self.shared.brokers_down.swap(false, Ordering::Relaxed) {
            self.on_brokers_down("a Kafka broker connection failed");
        } else if self.outstanding_direct > 0 && self.last_progress.elapsed() > self.stall_after {
            self.last_progress = Instant::now();
            self.on_brokers_down("no delivery report from Kafka in time");
        }
        if self.shared.fatal.swap(false, Ordering::Relaxed) {
            self.on_fatal();
        }
        if let Some(e) = self.shared.last_error.lock().take() {
            if let Some(held_back) = self.limits.client_error.allow() {
                tracing::warn!(target: "tollgate::kafka", error = %e, earlier_lines_held_back = held_back, "Kafka client error");
            }
        }
    }

    /// Serves every callback already queued: one poll serves one event (which may carry many
    /// delivery reports), so poll until one brings nothing.
    fn drain_callbacks(&mut self) {
        let mut seen = self.shared.callbacks.load(Ordering::Relaxed);
        for _ in 0..100_000 {
            self.producer.poll(Duration::ZERO);
            let now = self.shared.callbacks.load(Ordering::Relaxed);
            if now == seen {
                break;
            }
            seen = now;
        }
    }

    fn handle_deliveries(&mut self) {
        let deliveries = std::mem::take(&mut *self.shared.deliveries.lock());
        if deliveries.is_empty() {
            return;
        }
        self.last_progress = Instant::now();
        let mut replayed = 0;
        let mut undelivered = Vec::new();
        for mut d in deliveries {
            let durable = d.pending.durable.take();
            match (d.pending.origin, d.result) {
                (Origin::Direct, Ok(())) => {
                    if let Some(t) = durable {
                        t.done();
                    }
                    self.outstanding_direct = self.outstanding_direct.saturating_sub(1);
                    EventsPublished {
                        topic: d.pending.topic,
                        count: 1,
                        latency: d.pending.handed_at.map(|t| t.elapsed()),
                    }
                    .emit(&self.metrics);
                }
                (Origin::Replay(ticket), Ok(())) => {
                    self.replay_trusted = true;
                    if self.replay.ack(ticket) {
                        replayed += 1;
                        EventsPublished {
                            topic: d.pending.topic,
                            count: 1,
                            latency: None,
                        }
                        .emit(&self.metrics);
                    }
                }
                (origin, Err(f)) => match self.on_failure(origin, f) {
                    Some(back) => undelivered.push((d.pending.seq, back, durable)),
                    // Dead-lettered: on disk, and never to be billed from Kafka.
                    None => {
                        if let Some(t) = durable {
                            t.done();
                        }
                    }
                },
            }
        }
        if !undelivered.is_empty() {
            // librdkafka reports purged messages newest first per partition (its queue before
            // its batches): put them back in the order they were sent.
            undelivered.sort_unstable_by_key(|(seq, _, _)| *seq);
            let detail = format!("{} sent events came back undelivered", undelivered.len());
            self.start_spooling(SpoolReason::Undelivered, detail);
            for (_, record, durable) in undelivered {
                self.spool_record(Lane::Undelivered, &record, SpoolReason::Undelivered);
                self.spooled_tickets.extend(durable);
            }
        }
        self.replayed_in_episode += replayed;
        EventsReplayed { count: replayed }.emit(&self.metrics);
        if let Some((pos, n)) = self.replay.take_committed() {
            if let Err(e) = self.spool.commit(pos, n) {
                tracing::error!(target: "tollgate::events", error = %e, "cannot update the spool cursor");
            }
        }
    }

    /// Acts on a failed delivery; returns a direct message to spool (in lane `Undelivered`).
    fn on_failure(&mut self, origin: Origin, f: Failure) -> Option<SpoolRecord> {
        let kind = error_kind(f.code);
        let purged = kind == "purged";
        if !purged {
            DeliveryFailed {
                count: 1,
                kind,
                error: &f.error,
            }
            .emit(&self.metrics, &mut self.limits.delivery);
        }
        let transient = is_transient(f.code);
        match origin {
            Origin::Direct => {
                self.outstanding_direct = self.outstanding_direct.saturating_sub(1);
                if transient {
                    return Some(f.record);
                }
                self.dead_letter(&f);
            }
            Origin::Replay(ticket) => {
                if transient {
                    // Still in the spool: read it again.
                    self.rewind_pending = true;
                } else {
                    self.dead_letter(&f);
                    self.replay.ack(ticket);
                }
            }
        }
        None
    }

    fn dead_letter(&mut self, f: &Failure) {
        match self.spool.dead_letter(&f.record) {
            Ok(path) => EventsDeadLettered {
                count: 1,
                error: &f.error,
                file: &path,
            }
            .emit(&self.metrics, &mut self.limits.dead_letter),
            Err(e) => {
                tracing::error!(target: "tollgate::events", error = %e, "cannot write the dead-letter file");
                EventsDropped {
                    count: 1,
                    reason: DropReason::SpoolWrite,
                }
                .emit(&self.metrics, &mut self.limits.dropped);
            }
        }
    }

    /// Kafka is unreachable: spool new events, and take back everything the producer holds,
    /// queued or in flight, so that it is on disk in send order (an in-flight message the
    /// broker did write is published twice, with the same event id).
    fn on_brokers_down(&mut self, why: &str) {
        self.down_signals += 1;
        self.replay_trusted = false;
        self.replay_resume_at = Instant::now() + REPLAY_BACKOFF;
        self.start_spooling(SpoolReason::BrokersDown, why.to_string());
        // The purge is synchronous: every purged message's report is queued when it returns,
        // so one batch holds them all and they are spooled in order.
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        self.rewind_pending = true;
        self.drain_callbacks();
        self.handle_deliveries();
    }

    /// The producer hit a fatal error (e.g. fenced): take everything back and start a new one.
    fn on_fatal(&mut self) {
        let detail = self
            .producer
            .client()
            .fatal_error()
            .map(|(code, reason)| format!("{code:?}: {reason}"))
            .unwrap_or_else(|| "fatal producer error".to_string());
        tracing::error!(target: "tollgate::kafka", error = %detail, "Kafka producer failed; replacing it");
        self.start_spooling(SpoolReason::ProduceError, detail);
        self.take_everything_back(Duration::from_secs(2));
        match create_producer(&self.client_config, &self.shared) {
            Ok(p) => self.producer = p,
            Err(e) => {
                tracing::error!(target: "tollgate::kafka", error = %e, "cannot create a new Kafka producer");
            }
        }
        self.replay_trusted = false;
        self.replay_resume_at = Instant::now() + REPLAY_BACKOFF;
    }

    /// Purges queued and in-flight messages; direct ones come back into the spool.
    fn take_everything_back(&mut self, wait: Duration) {
        if self.outstanding_direct > 0 && self.mode == Mode::Direct {
            self.start_spooling(
                SpoolReason::Undelivered,
                "undelivered events taken back from the producer".to_string(),
            );
        }
        self.producer
            .purge(PurgeConfig::default().queue().inflight());
        let deadline = Instant::now() + wait;
        loop {
            self.drain_callbacks();
            self.handle_deliveries();
            if self.producer.in_flight_count() == 0 || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.rewind_pending = true;
    }

    fn replay_step(&mut self) {
        if self.rewind_pending {
            self.rewind_pending = false;
            self.spool.rewind();
            self.replay.clear();
        }
        if self.mode != Mode::Spooling
            || self.outstanding_direct > 0
            || Instant::now() < self.replay_resume_at
        {
            return;
        }
        // Nothing more can come back undelivered in this episode: its lane 0 is complete.
        if let Err(e) = self.spool.seal(Lane::Undelivered) {
            tracing::error!(target: "tollgate::events", error = %e, "cannot write the event spool");
        }
        let window = if self.replay_trusted {
            self.replay_max
        } else {
            1
        };
        while self.replay.len() < window {
            let before = self.spool.read_position();
            match self.spool.read_next() {
                Ok(Some((rec, end))) => {
                    let ticket = self.replay.push(end);
                    let pending = Box::new(Pending {
                        origin: Origin::Replay(ticket),
                        seq: 0,
                        handed_at: None,
                        topic: rec.topic,
                        durable: None,
                    });
                    let record = BaseRecord::with_opaque_to(rec.topic.name(&self.topics), pending)
                        .key(&rec.key[..])
                        .payload(&rec.payload[..])
                        .timestamp(rec.timestamp_ms);
                    if self.producer.send(record).is_err() {
                        self.replay.pop_back();
                        self.spool.unread(before);
                        break;
                    }
                }
                Ok(None) => {
                    if self.replay_trusted {
                        // Everything spooled is sent: new events may go straight to the
                        // producer again, queued behind the replayed ones.
                        self.mode = Mode::Direct;
                        if let Err(e) = self.spool.seal(Lane::New) {
                            tracing::error!(target: "tollgate::events", error = %e, "cannot write the event spool");
                        }
                        SpoolDrained {
                            replayed: self.replayed_in_episode,
                            spooled_for: self.spooling_since.elapsed(),
                        }
                        .emit(&self.metrics);
                    }
                    break;
                }
                Err(e) => {
                    if self.limits.spool_error.allow().is_some() {
                        tracing::error!(target: "tollgate::events", error = %e, "cannot read the event spool");
                    }
                    break;
                }
            }
        }
    }

    fn housekeeping(&mut self) {
        for (i, n) in self.spooled.iter_mut().enumerate() {
            if *n > 0 {
                EventsSpooled {
                    count: *n,
                    reason: SPOOL_REASONS[i],
                }
                .emit(&self.metrics);
                *n = 0;
            }
        }
        self.handoff.report(&self.metrics, &mut self.limits.dropped);
        let result = self.spool.flush().and_then(|()| self.spool.sync(false));
        // Written to the file: a process crash no longer loses these completions. (A record
        // the spool refused was counted as dropped: its ticket ends as lost.)
        if result.is_ok() {
            for t in self.spooled_tickets.drain(..) {
                t.done();
            }
        } else {
            self.spooled_tickets.clear();
        }
        if self.mode == Mode::Direct && self.replay.len() == 0 {
            if let Err(e) = self.spool.compact_if_empty() {
                tracing::error!(target: "tollgate::events", error = %e, "cannot compact the event spool");
            }
        }
        if let Err(e) = result {
            if self.limits.spool_error.allow().is_some() {
                tracing::error!(target: "tollgate::events", error = %e, "cannot write the event spool");
            }
        }
        self.report_corruptions();
        self.update_gauges();
    }

    /// Moves records the request path overflowed into the spool (they queue behind
    /// everything sent before them), written out before the overflow forgets them.
    fn drain_overflow(&mut self) {
        let Some(overflow) = self.handoff.overflow().cloned() else {
            return;
        };
        if !overflow.is_active() {
            return;
        }
        let drained = match overflow.read(TURN_EVENTS) {
            Ok(d) => d,
            Err(e) => {
                if self.limits.spool_error.allow().is_some() {
                    tracing::error!(target: "tollgate::events", error = %e, "cannot read the overflow spool");
                }
                return;
            }
        };
        if !drained.messages.is_empty() {
            self.start_spooling(
                SpoolReason::Overflow,
                "the hand-off channel overflowed".to_string(),
            );
            for m in &drained.messages {
                self.spool_record(
                    Lane::New,
                    &SpoolRecord::from_wire(m.clone()),
                    SpoolReason::Overflow,
                );
            }
        }
        let result = self.spool.flush().and_then(|()| overflow.commit(&drained));
        if let Err(e) = result {
            overflow.retry();
            if self.limits.spool_error.allow().is_some() {
                tracing::error!(target: "tollgate::events", error = %e, "cannot move overflowed events into the spool");
            }
        }
    }

    fn report_corruptions(&mut self) {
        for c in self.spool.take_corruptions() {
            SpoolCorrupted {
                segment: &c.segment,
                offset: c.offset,
                skipped_bytes: c.skipped_bytes,
            }
            .emit(&self.metrics);
        }
    }

    fn update_gauges(&self) {
        let m = &self.metrics;
        m.handoff_queue.set(self.handoff.len() as i64);
        m.producer_queue
            .set(i64::from(self.producer.in_flight_count()));
        m.spool_bytes.set(self.spool.bytes() as i64);
        m.spool_events.set(self.spool.records() as i64);
        m.spool_active.set(i64::from(self.mode == Mode::Spooling));
    }

    fn delivered_everything(&self) -> bool {
        self.mode == Mode::Direct
            && self.producer.in_flight_count() == 0
            && self.replay.len() == 0
            && self.spool.records() == 0
    }

    fn shutdown(&mut self) {
        let started = Instant::now();
        let deadline = started + self.shutdown_timeout;
        while let Ok(h) = self.rx.try_recv() {
            self.dispatch(h);
        }
        self.drain_overflow();
        // Deliver what can be delivered, unless the brokers are known to be down. Spooling
        // with no broker heard from since the outage: replay probes with one event; stop
        // once Kafka looks down again (a lost connection, or no answer for
        // `delivery_stall_ms`), since the rest would only wait for the deadline.
        let down_signals = self.down_signals;
        let probe_until = started + self.stall_after;
        while !self.delivered_everything() && Instant::now() < deadline {
            if self.mode == Mode::Spooling
                && !self.replay_trusted
                && (self.down_signals != down_signals || Instant::now() >= probe_until)
            {
                break;
            }
            self.serve(Duration::from_millis(10));
            self.replay_step();
            self.housekeeping();
        }
        if self.producer.in_flight_count() > 0 {
            self.take_everything_back(Duration::from_secs(2));
        }
        let lost = self.producer.in_flight_count();
        self.housekeeping();
        if let Err(e) = self.spool.sync(true) {
            tracing::error!(target: "tollgate::events", error = %e, "cannot sync the event spool");
        }
        self.update_gauges();
        tracing::info!(
            target: "tollgate::events",
            spooled_events = self.spool.records(),
            spool = %self.spool.dir().display(),
            unaccounted = lost,
            took_ms = started.elapsed().as_millis() as u64,
            "Kafka event sink stopped"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::collections::{HashMap, HashSet};

    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::mocking::MockCluster;
    use rdkafka::{Offset, TopicPartitionList};
    use tollgate_schemas::events::ChunkEvent;

    use super::*;
    use crate::events::wire::tests::chunk;

    const PARTITIONS: i32 = 3;

    fn config(bootstrap: &str, dir: &Path) -> KafkaConfig {
        KafkaConfig {
            bootstrap_servers: bootstrap.to_string(),
            spool_dir: Some(dir.join("spool")),
            linger_ms: 1,
            spool_fsync_interval_ms: 0,
            shutdown_timeout_ms: 5_000,
            ..KafkaConfig::default()
        }
    }

    fn cluster() -> MockCluster<'static, rdkafka::producer::DefaultProducerContext> {
        let c = MockCluster::new(1).unwrap();
        for t in ["llm.requests", "llm.chunks", "llm.completions"] {
            c.create_topic(t, PARTITIONS, 1).unwrap();
        }
        c
    }

    /// Every chunk event on the mock cluster: (tenant, request, sequence, event id), in
    /// partition order.
    fn consume_chunks(bootstrap: &str, expect: usize) -> Vec<(String, String, u64, String)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "test")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset("llm.chunks", p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while out.len() < expect && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                let e: ChunkEvent = serde_json::from_slice(m.payload().unwrap()).unwrap();
                out.push((e.tenant_id, e.request_id, e.sequence, e.event_id));
            }
        }
        // Anything beyond (duplicates) arrives soon after.
        let quiet = Instant::now() + Duration::from_millis(500);
        while Instant::now() < quiet {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
                let e: ChunkEvent = serde_json::from_slice(m.payload().unwrap()).unwrap();
                out.push((e.tenant_id, e.request_id, e.sequence, e.event_id));
            }
        }
        out
    }

    /// Each (tenant, request) stream is complete and in order counting first occurrences.
    fn assert_complete_and_ordered(got: &[(String, String, u64, String)], per_request: u64) {
        let mut seen = HashSet::new();
        let mut next: HashMap<(String, String), u64> = HashMap::new();
        for (tenant, req, seq, id) in got {
            if !seen.insert(id.clone()) {
                continue;
            }
            let n = next.entry((tenant.clone(), req.clone())).or_default();
            assert_eq!(*seq, *n, "out of order in {tenant}/{req}");
            *n += 1;
        }
        assert!(next.values().all(|n| *n == per_request), "{next:?}");
    }

    fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + timeout;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send_requests(sink: &KafkaSink, from: u64, to: u64, chunks: u64) {
        for r in from..to {
            let tenant = format!("tenant-{}", r % 5);
            let req = format!("req-{r}");
            for s in 0..chunks {
                sink.record_chunk(chunk(&tenant, &req, s));
            }
        }
    }

    #[test]
    fn events_reach_kafka_in_order() {
        let c = cluster();
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sink =
            KafkaSink::start(&config(&c.bootstrap_servers(), dir.path()), dir.path()).unwrap();
        send_requests(&sink, 0, 50, 10);
        rt.block_on(sink.shutdown());
        assert_eq!(
            sink.metrics()
                .published
                .with_label_values(&["chunks"])
                .get(),
            500
        );
        assert_eq!(
            sink.metrics()
                .spooled
                .with_label_values(&["queue_full"])
                .get(),
            0
        );
        let got = consume_chunks(&c.bootstrap_servers(), 500);
        assert_eq!(got.len(), 500);
        assert_complete_and_ordered(&got, 10);
    }

    #[test]
    fn a_broker_outage_spools_then_replays_everything_in_order() {
        let c = cluster();
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let sink =
            KafkaSink::start(&config(&c.bootstrap_servers(), dir.path()), dir.path()).unwrap();
        let m = sink.metrics().clone();
        send_requests(&sink, 0, 20, 10);
        wait_for("first deliveries", Duration::from_secs(10), || {
            m.published.with_label_values(&["chunks"]).get() == 200
        });

        c.broker_down(1).unwrap();
        // Events sent after the outage make librdkafka notice it.
        let mut probes = 0;
        wait_for("spooling", Duration::from_secs(10), || {
            sink.record_chunk(chunk("probe", &format!("probe-{probes}"), 0));
            probes += 1;
            m.spool_active.get() == 1
        });
        send_requests(&sink, 20, 60, 10);
        wait_for("spooled events", Duration::from_secs(10), || {
            m.spool_events.get() >= 400
        });
        c.broker_up(1).unwrap();
        wait_for("replay", Duration::from_secs(30), || {
            m.spool_active.get() == 0 && m.spool_events.get() == 0
        });
        send_requests(&sink, 60, 70, 10);
        rt.block_on(sink.shutdown());

        assert_eq!(
            m.published.with_label_values(&["chunks"]).get(),
            700 + probes
        );
        let got = consume_chunks(&c.bootstrap_servers(), 700 + probes as usize);
        let unique: HashSet<_> = got.iter().map(|g| g.3.clone()).collect();
        assert_eq!(unique.len() as u64, 700 + probes);
        let real: Vec<_> = got.into_iter().filter(|g| g.0 != "probe").collect();
        assert_complete_and_ordered(&real, 10);
        assert!(m.replayed.get() >= 400, "{}", m.replayed.get());
        assert_eq!(m.dropped.with_label_values(&["handoff_full"]).get(), 0);
    }

    #[test]
    fn events_spooled_at_shutdown_are_replayed_by_the_next_run() {
        let c = cluster();
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        c.broker_down(1).unwrap();
        let mut cfg = config(&c.bootstrap_servers(), dir.path());
        cfg.shutdown_timeout_ms = 500;
        let sink = KafkaSink::start(&cfg, dir.path()).unwrap();
        send_requests(&sink, 0, 30, 5);
        rt.block_on(sink.shutdown());
        let m = sink.metrics().clone();
        drop(sink);
        assert_eq!(m.published.with_label_values(&["chunks"]).get(), 0);
        assert_eq!(m.spool_events.get(), 150, "all spooled at shutdown");

        c.broker_up(1).unwrap();
        let sink = KafkaSink::start(&cfg, dir.path()).unwrap();
        let m = sink.metrics().clone();
        wait_for("replay", Duration::from_secs(30), || {
            m.replayed.get() == 150
        });
        send_requests(&sink, 30, 40, 5);
        rt.block_on(sink.shutdown());
        let got = consume_chunks(&c.bootstrap_servers(), 200);
        assert_complete_and_ordered(&got, 5);
    }

    #[test]
    fn a_shutdown_just_after_kafka_returns_delivers_the_spool() {
        let c = cluster();
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        c.broker_down(1).unwrap();
        let mut cfg = config(&c.bootstrap_servers(), dir.path());
        cfg.shutdown_timeout_ms = 30_000;
        let sink = KafkaSink::start(&cfg, dir.path()).unwrap();
        let m = sink.metrics().clone();
        send_requests(&sink, 0, 30, 5);
        wait_for("spooling", Duration::from_secs(30), || {
            m.spool_events.get() > 0
        });
        // Back, but nothing has told the sink yet: the shutdown must find out by itself.
        c.broker_up(1).unwrap();
        rt.block_on(sink.shutdown());
        drop(sink);
        assert_eq!(m.spool_events.get(), 0, "nothing left in the spool");
        let got = consume_chunks(&c.bootstrap_servers(), 150);
        assert_complete_and_ordered(&got, 5);
    }

    #[test]
    fn replay_window_commits_only_a_contiguous_acknowledged_prefix() {
        let pos = |o| Position {
            segment: crate::events::spool::SegmentId {
                episode: 1,
                lane: Lane::New,
                seq: 0,
            },
            offset: o,
        };
        let mut w = ReplayWindow::default();
        let a = w.push(pos(10));
        let b = w.push(pos(20));
        let c = w.push(pos(30));
        assert!(w.ack(b));
        assert_eq!(w.take_committed(), None);
        assert!(w.ack(a));
        assert_eq!(w.take_committed(), Some((pos(20), 2)));
        w.clear();
        assert!(!w.ack(c), "stale acknowledgements are ignored");
        let d = w.push(pos(40));
        assert!(d > c);
        assert!(!w.ack(a));
    }
}
