//! The event-sink seam: where each request's request, chunk and completion records go.
//!
//! The relay reports a request once it is routed, every SSE data event it relays to the client,
//! and the completion however the request ended. A sink must never block or slow the request
//! path: the durable sinks only hand the record to a bounded channel and return; a background
//! thread serializes ([`wire`]) and writes. If that channel is full the record goes to the
//! overflow spool ([`overflow`]): memory stays bounded and nothing is dropped unless the disk
//! is full. The one wait: a response's terminal event waits for its completion record to be
//! durable ([`durable`]).
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`EventSink`], [`EventsConfig`], [`from_config`], [`LogSink`], [`MemorySink`] |
//! | `wire.rs` | records → versioned JSON events (`tollgate_schemas::events`), the hand-off channel, chunk token counts |
//! | `durable.rs` | the durability barrier: policy, tickets, the bounded wait and its metrics |
//! | `overflow.rs` | the overflow spool behind a full hand-off channel |
//! | `kafka.rs` | [`KafkaSink`]: rdkafka producer, spools to disk when Kafka is down or slow |
//! | `spool.rs` | the durable on-disk spool: segments, checksummed records, replay cursor |
//! | `local_log.rs` | [`LocalSink`] and [`LocalEventLog`]: the embedded default, a SQLite event log |
//! | `internal_events.rs` | drops, spooling, replays, delivery errors: each one event that logs and counts |
//!
//! Nothing above this seam knows which sink it has.

pub mod durable;
pub mod internal_events;
pub mod kafka;
pub mod local_log;
pub mod overflow;
pub mod spool;
pub mod wire;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use serde::Deserialize;

pub use durable::{DurabilityPolicy, Durable, DurableOutcome};
pub use kafka::KafkaSink;
pub use local_log::{LocalEventLog, LocalSink, LogRecord};

use crate::audit::AuditRecord;
use crate::relay::{ChunkRecord, CompletionRecord, RequestRecord};
use internal_events::EventMetrics;

/// Which event sink the gateway uses (`[events]` in the config). Without the section the
/// embedded default, `local`, is used.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum EventsConfig {
    /// The durable local event log (SQLite in the data directory): no external service.
    Local(LocalConfig),
    /// Apache Kafka, with a disk spool for when it is unreachable.
    Kafka(KafkaConfig),
    /// One log line per completion (nothing durable; development only).
    Log,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig::Local(LocalConfig::default())
    }
}

/// Topic names (`[events]` keys `requests_topic`, `chunks_topic`, `completions_topic`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Topics {
    pub requests: String,
    pub chunks: String,
    pub completions: String,
    pub audit: String,
}

impl Default for Topics {
    fn default() -> Self {
        use tollgate_schemas::events::topics;
        Topics {
            requests: topics::REQUESTS.to_string(),
            chunks: topics::CHUNKS.to_string(),
            completions: topics::COMPLETIONS.to_string(),
            audit: topics::AUDIT.to_string(),
        }
    }
}

/// `type = "local"`: the embedded event log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// SQLite file of the log; default `<data dir>/events.sqlite`.
    pub path: Option<PathBuf>,
    /// Records the hand-off channel holds before new ones are dropped (and counted).
    pub max_queue_events: usize,
    /// Most records written in one transaction.
    pub batch_max_events: usize,
    /// Longest a request or chunk record waits to be written (a completion is written at
    /// once, with everything before it).
    pub batch_delay_ms: u64,
    /// How long `shutdown` waits for the queue to be written.
    pub shutdown_timeout_ms: u64,
    /// Whether a response's terminal event waits for its completion record to be committed.
    pub durability: DurabilityPolicy,
    /// Longest such wait; past it the response ends anyway (counted and logged).
    pub durable_timeout_ms: u64,
    /// `full`: every commit is fsynced (survives a power loss; costs a disk sync, shared by
    /// the batch); `normal`: committed to SQLite's write-ahead log (survives a process crash).
    pub synchronous: LocalSync,
    /// Where records go when the hand-off channel is full; default `<log path>.overflow`.
    pub overflow_dir: Option<PathBuf>,
    /// Largest overflow spool; past it records are lost (counted, logged).
    pub overflow_max_bytes: u64,
    pub requests_topic: String,
    pub chunks_topic: String,
    pub completions_topic: String,
    /// Audit events of `[audit]` tenants.
    pub audit_topic: String,
}

/// How the local event log syncs its commits (SQLite's `synchronous`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LocalSync {
    #[default]
    Normal,
    Full,
}

impl Default for LocalConfig {
    fn default() -> Self {
        let t = Topics::default();
        LocalConfig {
            path: None,
            max_queue_events: 100_000,
            batch_max_events: 2_000,
            batch_delay_ms: 5,
            shutdown_timeout_ms: 10_000,
            durability: DurabilityPolicy::Completion,
            durable_timeout_ms: 2_000,
            synchronous: LocalSync::Normal,
            overflow_dir: None,
            overflow_max_bytes: 1024 * 1024 * 1024,
            requests_topic: t.requests,
            chunks_topic: t.chunks,
            completions_topic: t.completions,
            audit_topic: t.audit,
        }
    }
}

impl LocalConfig {
    pub fn topics(&self) -> Topics {
        Topics {
            requests: self.requests_topic.clone(),
            chunks: self.chunks_topic.clone(),
            completions: self.completions_topic.clone(),
            audit: self.audit_topic.clone(),
        }
    }
}

/// Compression of Kafka message batches (codecs built into librdkafka without extra libraries).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    None,
    Lz4,
    Snappy,
}

impl Compression {
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
            Compression::Snappy => "snappy",
        }
    }
}

/// `type = "kafka"`: the production sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    pub client_id: String,
    pub requests_topic: String,
    pub chunks_topic: String,
    pub completions_topic: String,
    /// Audit events of `[audit]` tenants.
    pub audit_topic: String,
    /// How long the producer waits to fill a batch.
    pub linger_ms: u64,
    pub compression: Compression,
    /// Records the hand-off channel (relay → producer thread) holds before new ones are
    /// dropped (and counted).
    pub max_queue_events: usize,
    /// Messages librdkafka may hold in memory (`queue.buffering.max.messages`); past it, new
    /// events go to the spool.
    pub max_producer_queue_events: usize,
    /// Bytes librdkafka may hold in memory, in KiB (`queue.buffering.max.kbytes`).
    pub max_producer_queue_kbytes: usize,
    /// Spool directory; default `<data dir>/spool/events`.
    pub spool_dir: Option<PathBuf>,
    /// Largest spool on disk; past it, new events are dropped (and counted).
    pub spool_max_bytes: u64,
    /// Size at which a spool segment file is closed and a new one started.
    pub spool_segment_bytes: u64,
    /// How often written spool data is fsynced (a process crash loses nothing written; a power
    /// loss at most this much).
    pub spool_fsync_interval_ms: u64,
    /// Spooled events replayed to Kafka at once (sent, not yet acknowledged).
    pub replay_max_in_flight_events: usize,
    /// No delivery report for this long while events wait: Kafka is treated as down (new
    /// events spool, waiting ones are moved to the spool).
    pub delivery_stall_ms: u64,
    /// How long `shutdown` tries to deliver what is queued before spooling the rest.
    pub shutdown_timeout_ms: u64,
    /// Whether a response's terminal event waits for its completion record to be
    /// acknowledged by Kafka (or spooled).
    pub durability: DurabilityPolicy,
    /// Longest such wait; past it the response ends anyway (counted and logged).
    pub durable_timeout_ms: u64,
    /// Where records go when the hand-off channel is full; default `<spool dir>-overflow`.
    pub overflow_dir: Option<PathBuf>,
    /// Largest overflow spool; past it records are lost (counted, logged).
    pub overflow_max_bytes: u64,
    /// Extra librdkafka properties (e.g. `security.protocol`), applied last.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        let t = Topics::default();
        KafkaConfig {
            bootstrap_servers: "127.0.0.1:9092".to_string(),
            client_id: "tollgate-gateway".to_string(),
            requests_topic: t.requests,
            chunks_topic: t.chunks,
            completions_topic: t.completions,
            audit_topic: t.audit,
            linger_ms: 5,
            compression: Compression::Lz4,
            max_queue_events: 100_000,
            max_producer_queue_events: 100_000,
            max_producer_queue_kbytes: 64 * 1024,
            spool_dir: None,
            spool_max_bytes: 4 * 1024 * 1024 * 1024,
            spool_segment_bytes: 64 * 1024 * 1024,
            spool_fsync_interval_ms: 200,
            replay_max_in_flight_events: 20_000,
            delivery_stall_ms: 5_000,
            shutdown_timeout_ms: 10_000,
            durability: DurabilityPolicy::Completion,
            durable_timeout_ms: 5_000,
            overflow_dir: None,
            overflow_max_bytes: 1024 * 1024 * 1024,
            properties: Default::default(),
        }
    }
}

impl KafkaConfig {
    pub fn topics(&self) -> Topics {
        Topics {
            requests: self.requests_topic.clone(),
            chunks: self.chunks_topic.clone(),
            completions: self.completions_topic.clone(),
            audit: self.audit_topic.clone(),
        }
    }
}

/// Builds the configured sink. `data_dir` holds any local state (spool, embedded log).
pub async fn from_config(
    config: &EventsConfig,
    data_dir: &Path,
) -> Result<Arc<dyn EventSink>, EventsError> {
    Ok(match config {
        EventsConfig::Local(c) => Arc::new(LocalSink::start(c, data_dir).await?),
        EventsConfig::Kafka(c) => Arc::new(KafkaSink::start(c, data_dir)?),
        EventsConfig::Log => Arc::new(LogSink),
    })
}

/// The hand-off channel of a durable sink: completions get durability tickets per `policy`,
/// and a full channel spills into the overflow spool in `overflow_dir`.
pub(crate) fn durable_handoff(
    capacity: usize,
    policy: DurabilityPolicy,
    durable_timeout_ms: u64,
    overflow_dir: &Path,
    overflow_max_bytes: u64,
    metrics: &EventMetrics,
) -> Result<(wire::Handoff, crossbeam_channel::Receiver<wire::Handed>), EventsError> {
    let overflow =
        overflow::Overflow::open(overflow_dir, overflow_max_bytes).map_err(|source| {
            EventsError::Spool {
                path: overflow_dir.display().to_string(),
                source,
            }
        })?;
    let barrier = durable::Barrier {
        policy,
        timeout: ms(durable_timeout_ms.max(1)),
        metrics: metrics.durability.clone(),
    };
    Ok(wire::Handoff::new(
        capacity,
        Some(barrier),
        Some(Arc::new(overflow)),
    ))
}

/// Failures setting up or running an event sink.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("event sink setup failed: {0}")]
    Setup(String),
    #[error("event spool I/O failed at {path}: {source}")]
    Spool {
        path: String,
        source: std::io::Error,
    },
    #[error("local event log failed: {0}")]
    LocalLog(#[from] sqlx::Error),
}

/// What `/readyz` reports about the event sink, worst first in severity order
/// (`NotDurable` makes the gateway unready; the others are served, and reported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SinkState {
    /// Records go where they should: Kafka acknowledges them, or the local log commits them.
    Ok,
    /// The hand-off queue was full and records go to the overflow spool on disk: the writer
    /// is behind (a slow disk or a stalled producer). Still durable.
    Overflowing,
    /// Kafka does not acknowledge (down, or unreachable): new records go to the disk spool and
    /// are replayed in order when it answers. Still durable.
    Spooling,
    /// The disk spool is (nearly) full: new records are about to be, or are being, lost.
    NotDurable,
}

impl SinkState {
    /// The state's name in `/readyz`.
    pub fn label(self) -> &'static str {
        match self {
            SinkState::Ok => "ok",
            SinkState::Overflowing => "overflowing",
            SinkState::Spooling => "spooling",
            SinkState::NotDurable => "not_durable",
        }
    }
}

/// Receives every request, chunk and completion record. Each method is called on the request
/// path and must return at once: hand the record over, never wait on I/O.
pub trait EventSink: Send + Sync {
    /// A request was accepted and routed (once per request, before the upstream call).
    fn record_request(&self, record: RequestRecord);
    /// One SSE data event was relayed to the client.
    fn record_chunk(&self, record: ChunkRecord);
    /// The request ended (exactly once per request, after its chunks). The ticket resolves
    /// once the record is durable (at once for sinks that keep nothing durable).
    fn record_completion(&self, record: CompletionRecord) -> Durable;
    /// An audited request ended (`[audit]`): its bodies, redacted and capped by the writer.
    /// Never waited for: no durability barrier. Sinks that keep nothing drop it.
    fn record_audit(&self, _record: AuditRecord) {}
    /// Writes out what is still queued (Kafka: delivers it, or spools it if Kafka does not
    /// answer in time). Call once when the server has stopped; records after it are dropped.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Whether records currently reach their destination, for `/readyz` (read from the
    /// sink's gauges: cheap, never waits).
    fn state(&self) -> SinkState {
        SinkState::Ok
    }
    /// This sink's Prometheus collectors, for the gateway's registry.
    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        Vec::new()
    }
    /// The local event log this sink appends to, if it is one: the embedded billing pipeline
    /// reads its completions from there.
    fn local_log_path(&self) -> Option<&Path> {
        None
    }
}

/// Logs each completion at info level (target `tollgate::completion`) and each request at
/// debug level; chunks are not logged.
pub struct LogSink;

impl EventSink for LogSink {
    fn record_request(&self, r: RequestRecord) {
        tracing::debug!(
            target: "tollgate::request",
            request_id = %r.request_id,
            tenant_id = %r.tenant_id,
            route = r.route,
            model = %r.requested_model,
            deployment = %r.deployment,
            provider = r.provider,
            prompt_estimate = r.prompt_estimate,
            "request"
        );
    }

    fn record_chunk(&self, _record: ChunkRecord) {}

    fn record_completion(&self, r: CompletionRecord) -> Durable {
        tracing::info!(
            target: "tollgate::completion",
            request_id = %r.request_id,
            tenant_id = %r.tenant_id,
            route = r.route,
            model = %r.requested_model,
            deployment = %r.deployment,
            provider = r.provider,
            outcome = r.outcome.label(),
            input_tokens = r.usage.input_tokens,
            cached_input_tokens = r.usage.cached_input_tokens,
            output_tokens = r.usage.output_tokens,
            usage_source = ?r.usage.source,
            chunks = r.chunks,
            duration_ms = r.duration.as_secs_f64() * 1e3,
            "completion"
        );
        Durable::not_required()
    }
}

/// Keeps every record in memory (tests).
#[derive(Default)]
pub struct MemorySink {
    requests: Mutex<Vec<RequestRecord>>,
    chunks: Mutex<Vec<ChunkRecord>>,
    records: Mutex<Vec<CompletionRecord>>,
    audits: Mutex<Vec<AuditRecord>>,
}

impl MemorySink {
    /// Completion records so far.
    pub fn records(&self) -> Vec<CompletionRecord> {
        self.records.lock().clone()
    }

    /// Request records so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.requests.lock().clone()
    }

    /// Chunk records so far.
    pub fn chunks(&self) -> Vec<ChunkRecord> {
        self.chunks.lock().clone()
    }

    /// Audit events so far (as their writer would serialize them).
    pub fn audits(&self) -> Vec<tollgate_schemas::events::AuditEvent> {
        self.audits
            .lock()
            .iter()
            .map(|a| a.to_event(tollgate_schemas::events::new_event_id()))
            .collect()
    }
}

impl EventSink for MemorySink {
    fn record_request(&self, record: RequestRecord) {
        self.requests.lock().push(record);
    }

    fn record_chunk(&self, record: ChunkRecord) {
        self.chunks.lock().push(record);
    }

    fn record_completion(&self, record: CompletionRecord) -> Durable {
        self.records.lock().push(record);
        Durable::not_required()
    }

    fn record_audit(&self, record: AuditRecord) {
        self.audits.lock().push(record);
    }
}

/// `Duration` from a config value in milliseconds.
pub(crate) fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    #[derive(Deserialize)]
    struct Wrapper {
        #[serde(default)]
        events: EventsConfig,
    }

    fn parse(s: &str) -> Result<EventsConfig, toml::de::Error> {
        toml::from_str::<Wrapper>(s).map(|w| w.events)
    }

    #[test]
    fn the_embedded_local_log_is_the_default() {
        assert!(matches!(parse("").unwrap(), EventsConfig::Local(_)));
        assert!(matches!(
            parse("[events]\ntype = \"local\"").unwrap(),
            EventsConfig::Local(_)
        ));
        assert!(matches!(
            parse("[events]\ntype = \"log\"").unwrap(),
            EventsConfig::Log
        ));
    }

    #[test]
    fn kafka_config_takes_topics_and_limits_and_rejects_typos() {
        let c = parse(
            "[events]\ntype = \"kafka\"\nbootstrap_servers = \"10.0.0.1:9092\"\nchunks_topic = \"c\"\nlinger_ms = 20\ncompression = \"snappy\"\nmax_queue_events = 10\n",
        )
        .unwrap();
        let EventsConfig::Kafka(k) = c else {
            panic!("not kafka")
        };
        assert_eq!(k.bootstrap_servers, "10.0.0.1:9092");
        assert_eq!(k.topics().chunks, "c");
        assert_eq!(k.topics().requests, "llm.requests");
        assert_eq!((k.linger_ms, k.max_queue_events), (20, 10));
        assert_eq!(k.compression, Compression::Snappy);

        let err = parse("[events]\ntype = \"kafka\"\nlinger = 5\n").unwrap_err();
        assert!(err.to_string().contains("linger"), "{err}");
        let err = parse("[events]\ntype = \"kafak\"\n").unwrap_err();
        assert!(err.to_string().contains("kafak"), "{err}");
    }
}
