//! From the relay's records to the versioned JSON events of `tollgate_schemas::events`, and the
//! bounded hand-off channel between the request path and a sink's writer thread.
//!
//! The request path only moves the record into the channel (a chunk record is an `Arc` and a
//! few integers: no allocation); the writer thread gives each event its id and time and
//! serializes it, so that cost is off the request's latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tollgate_schemas::events::{
    format_event_time, new_event_id, unix_ms, ChunkEvent, CompletionEvent, CompletionRouting,
    CompletionStatus, HedgeCancelled, PublishedCompletion, RequestEvent, RouteAttempt,
    SCHEMA_VERSION,
};

use super::durable::{Barrier, Durable, DurableTx};
use super::internal_events::{DropReason, EventMetrics, EventsDropped, LogLimiter};
use super::overflow::Overflow;
use super::Topics;
use crate::audit::AuditRecord;
use crate::relay::{ChunkRecord, CompletionRecord, Outcome, RequestRecord};

/// The three topics, as a compact index (stored in spool records).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    Requests = 0,
    Chunks = 1,
    Completions = 2,
    Audit = 3,
}

impl Topic {
    pub const ALL: [Topic; 4] = [
        Topic::Requests,
        Topic::Chunks,
        Topic::Completions,
        Topic::Audit,
    ];

    pub fn from_index(i: u8) -> Option<Topic> {
        Topic::ALL.get(usize::from(i)).copied()
    }

    /// Bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            Topic::Requests => "requests",
            Topic::Chunks => "chunks",
            Topic::Completions => "completions",
            Topic::Audit => "audit",
        }
    }

    pub fn name(self, topics: &Topics) -> &str {
        match self {
            Topic::Requests => &topics.requests,
            Topic::Chunks => &topics.chunks,
            Topic::Completions => &topics.completions,
            Topic::Audit => &topics.audit,
        }
    }
}

/// A record as handed over by the request path.
#[derive(Debug)]
pub enum Record {
    Request(Box<RequestRecord>),
    Chunk(ChunkRecord),
    Completion(Box<CompletionRecord>),
    /// An audited request's bodies (redacted and capped when serialized).
    Audit(Box<AuditRecord>),
}

/// A record and when it was handed over (for the end-to-end produce latency).
#[derive(Debug)]
pub struct Handed {
    pub at: Instant,
    pub record: Record,
    /// A completion's durability ticket: resolved once the record is durable.
    pub durable: Option<DurableTx>,
    /// The record already serialized (its event id given), when the request path did it.
    pub wire: Option<WireMessage>,
    /// Where the record ends in the local log's completion journal, if it was journaled.
    pub journal: Option<super::spool::Position>,
}

/// One serialized event, ready for Kafka, the spool or the local log.
#[derive(Debug, Clone, PartialEq)]
pub struct WireMessage {
    pub topic: Topic,
    /// The tenant id: the message key.
    pub key: String,
    pub event_id: String,
    /// Event time, ms since the Unix epoch (the Kafka message timestamp).
    pub timestamp_ms: i64,
    /// The event's JSON.
    pub payload: Vec<u8>,
}

impl Record {
    pub fn topic(&self) -> Topic {
        match self {
            Record::Request(_) => Topic::Requests,
            Record::Chunk(_) => Topic::Chunks,
            Record::Completion(_) => Topic::Completions,
            Record::Audit(_) => Topic::Audit,
        }
    }

    /// Gives the event its id and serializes it.
    pub fn to_wire(&self) -> Result<WireMessage, serde_json::Error> {
        let event_id = new_event_id();
        let (key, time, payload) = match self {
            Record::Request(r) => (
                &r.tenant_id,
                r.routed_at,
                serde_json::to_vec(&request_event(r, event_id.clone()))?,
            ),
            Record::Chunk(c) => {
                let at = c.relayed_at();
                (
                    &c.stream.tenant_id,
                    at,
                    serde_json::to_vec(&chunk_event(c, event_id.clone()))?,
                )
            }
            Record::Completion(r) => {
                let event = completion_event(r, event_id.clone());
                // The routing fields ride along only when routing did something worth telling
                // (the common first-try success serializes the plain event, without flatten).
                let payload = match r.route_log.as_deref().filter(|route| route.is_eventful()) {
                    Some(route) => serde_json::to_vec(&PublishedCompletion {
                        event,
                        routing: completion_routing(route),
                    })?,
                    None => serde_json::to_vec(&event)?,
                };
                (&r.tenant_id, r.ended_at, payload)
            }
            Record::Audit(a) => (
                &a.completion.tenant_id,
                a.completion.ended_at,
                serde_json::to_vec(&a.to_event(event_id.clone()))?,
            ),
        };
        Ok(WireMessage {
            topic: self.topic(),
            key: key.clone(),
            event_id,
            timestamp_ms: unix_ms(time),
            payload,
        })
    }
}

fn request_event(r: &RequestRecord, event_id: String) -> RequestEvent {
    RequestEvent {
        schema_version: SCHEMA_VERSION,
        event_id,
        event_time: format_event_time(r.routed_at),
        request_id: r.request_id.clone(),
        tenant_id: r.tenant_id.clone(),
        key_id: r.key_id.clone(),
        route: r.route.to_string(),
        requested_model: r.requested_model.clone(),
        model_alias: r.model_label.clone(),
        deployment: r.deployment.clone(),
        provider: r.provider.to_string(),
        upstream_model: r.upstream_model.clone(),
        stream: r.stream,
        prompt_tokens_estimate: r.prompt_estimate,
        received_at: format_event_time(r.received_at),
    }
}

fn chunk_event(c: &ChunkRecord, event_id: String) -> ChunkEvent {
    ChunkEvent {
        schema_version: SCHEMA_VERSION,
        event_id,
        event_time: format_event_time(c.relayed_at()),
        request_id: c.stream.request_id.clone(),
        tenant_id: c.stream.tenant_id.clone(),
        sequence: c.sequence,
        offset_us: saturating_u64(c.offset.as_micros()),
        bytes: c.bytes,
        tokens: c.tokens,
    }
}

fn completion_event(r: &CompletionRecord, event_id: String) -> CompletionEvent {
    let (status, error) = match &r.outcome {
        Outcome::Completed => (CompletionStatus::Completed, None),
        Outcome::ClientDisconnected => (CompletionStatus::ClientDisconnected, None),
        Outcome::UpstreamError(e) => (CompletionStatus::UpstreamError, Some(e.clone())),
        Outcome::LimitExceeded(e) => (CompletionStatus::LimitExceeded, Some(e.clone())),
    };
    CompletionEvent {
        schema_version: SCHEMA_VERSION,
        event_id,
        event_time: format_event_time(r.ended_at),
        request_id: r.request_id.clone(),
        tenant_id: r.tenant_id.clone(),
        key_id: r.key_id.clone(),
        route: r.route.to_string(),
        requested_model: r.requested_model.clone(),
        model_alias: r.model_label.clone(),
        deployment: r.deployment.clone(),
        provider: r.provider.to_string(),
        upstream_model: r.upstream_model.clone(),
        stream: r.stream,
        status,
        finish_reason: r.finish_reason.clone(),
        error,
        usage: r.usage,
        chunks: r.chunks,
        ttft_ms: r.time_to_first_token.map(|t| saturating_u64(t.as_millis())),
        latency_ms: saturating_u64(r.duration.as_millis()),
        gateway_overhead_us: saturating_u64(r.gateway_overhead.as_micros()),
        retries: r.route_log.as_ref().map_or(0, |route| route.retries()),
        fallbacks: r.route_log.as_ref().map_or(0, |route| route.fallbacks()),
        cache_hit: r.cache_hit.is_some(),
        cache_saved_usage: r.cache_hit.map(|hit| hit.saved),
        cache_price_fraction: r.cache_hit.map(|hit| hit.fraction.to_string()),
        // TODO(issue 6): the price-book version used for the pre-flight estimate.
        price_book_version: None,
        received_at: format_event_time(r.received_at()),
    }
}

fn completion_routing(route: &crate::routing::RouteLog) -> CompletionRouting {
    CompletionRouting {
        route_strategy: Some(route.strategy.to_string()),
        route_reason: route.reason.map(str::to_string),
        attempts: Some(
            route
                .attempts
                .iter()
                .map(|a| RouteAttempt {
                    deployment: a.deployment.name.clone(),
                    provider: a.deployment.provider.label().to_string(),
                    outcome: a.outcome.label(),
                    latency_ms: saturating_u64(a.elapsed.as_millis()),
                })
                .collect(),
        ),
        hedge_cancelled: route.hedge_loser.as_ref().map(|h| HedgeCancelled {
            deployment: h.deployment.name.clone(),
            provider: h.deployment.provider.label().to_string(),
            upstream_model: h.upstream_model.clone(),
            usage: h.usage,
            estimated_cost: h.cost.map(|c| c.normalize().to_string()),
        }),
    }
}

fn saturating_u64(v: u128) -> u64 {
    u64::try_from(v).unwrap_or(u64::MAX)
}

/// Running output-token counts of the streams whose chunks a writer thread serializes: each
/// chunk event carries the output tokens relayed so far, counted like a completion's
/// fallback (the upstream model's tokenizer over the text the client received), so that a
/// stream cut by a crash can be billed for what it delivered. Counted here, off the request
/// path.
#[derive(Default)]
pub struct ChunkTokens {
    running: std::collections::HashMap<String, u64>,
}

impl ChunkTokens {
    /// Streams followed at once; past it (completions lost) the counts start over.
    const MAX_STREAMS: usize = 1_000_000;

    /// Sets a chunk record's running token count; a completion ends its stream's count.
    pub fn stamp(&mut self, record: &mut Record) {
        match record {
            // The completion was recorded first and ended the count.
            Record::Chunk(c) if c.after_completion => {}
            Record::Chunk(c) => {
                let text = crate::relay::event_output_text(c.stream.client_format, &c.data);
                let n = crate::tokens::count_text(&c.stream.upstream_model, &text);
                let total = match self.running.get_mut(&c.stream.request_id) {
                    Some(t) => {
                        *t = t.saturating_add(n);
                        *t
                    }
                    None => {
                        if self.running.len() >= Self::MAX_STREAMS {
                            self.running.clear();
                        }
                        self.running.insert(c.stream.request_id.clone(), n);
                        n
                    }
                };
                c.tokens = Some(total);
            }
            Record::Completion(c) => {
                self.running.remove(&c.request_id);
            }
            Record::Request(_) | Record::Audit(_) => {}
        }
    }

    /// Forgets a stream without counting (its completion is committed with its chunks).
    pub fn forget(&mut self, request_id: &str) {
        self.running.remove(request_id);
    }

    /// Streams being counted.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

/// The request path's end of a bounded hand-off channel, with the overflow spool behind it.
pub struct Handoff {
    tx: Sender<Handed>,
    /// Records lost, by [`DropReason`] (channel closed, no overflow, overflow full or
    /// failing), not yet reported.
    dropped: [AtomicU64; DropReason::COUNT],
    /// Tokens of the completions among them (the usage that will not be billed).
    lost_tokens: AtomicU64,
    /// Records that went to the overflow spool, not yet reported.
    overflowed: AtomicU64,
    barrier: Option<Barrier>,
    overflow: Option<Arc<Overflow>>,
    /// Rung when a writer should look now rather than at its next turn: a completion (a
    /// response may be waiting on it) or a channel half full.
    doorbell: (Sender<()>, Receiver<()>),
    ring_at: usize,
}

impl Handoff {
    /// A channel holding at most `capacity` records; a full one drops (tests).
    pub fn bounded(capacity: usize) -> (Handoff, Receiver<Handed>) {
        Handoff::new(capacity, None, None)
    }

    /// A channel holding at most `capacity` records, giving completions durability tickets
    /// from `barrier`, and sending records to `overflow` when it is full.
    pub fn new(
        capacity: usize,
        barrier: Option<Barrier>,
        overflow: Option<Arc<Overflow>>,
    ) -> (Handoff, Receiver<Handed>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
        (
            Handoff {
                doorbell: crossbeam_channel::bounded(1),
                ring_at: (capacity / 2).max(1),
                tx,
                dropped: Default::default(),
                lost_tokens: AtomicU64::new(0),
                overflowed: AtomicU64::new(0),
                barrier,
                overflow,
            },
            rx,
        )
    }

    /// Hands a record over without waiting on the writer: a full channel sends it to the
    /// overflow spool (or, without one, drops it, counted).
    pub fn send(&self, record: Record) {
        self.hand(Handed {
            at: Instant::now(),
            record,
            durable: None,
            wire: None,
            journal: None,
        });
    }

    /// Hands a completion over; the returned ticket resolves once it is durable.
    pub fn send_completion(&self, record: CompletionRecord) -> Durable {
        let (durable, ticket) = match self.barrier.as_ref().and_then(Barrier::ticket) {
            Some((tx, rx)) => (Some(tx), rx),
            None => (None, Durable::not_required()),
        };
        self.hand(Handed {
            at: Instant::now(),
            record: Record::Completion(Box::new(record)),
            durable,
            wire: None,
            journal: None,
        });
        ticket
    }

    /// A ticket already resolved: the record was made durable on the request path.
    pub fn durable_now(&self) -> Durable {
        match self.barrier.as_ref().and_then(Barrier::ticket) {
            Some((tx, ticket)) => {
                tx.done();
                ticket
            }
            None => Durable::not_required(),
        }
    }

    /// Hands over a record that is already durable elsewhere (serialized as `wire`).
    pub fn send_durable(&self, handed: Handed) {
        self.hand(handed);
    }

    /// Wakes a writer waiting in [`Handoff::wait`] (a completion waits to be written).
    pub fn ring(&self) {
        let _ = self.doorbell.0.try_send(());
    }

    /// Waits (at most `timeout`) for the doorbell: a completion was handed over or the channel
    /// is half full. Returns whether it rang.
    pub fn wait(&self, timeout: Duration) -> bool {
        self.doorbell.1.recv_timeout(timeout).is_ok()
    }

    fn hand(&self, handed: Handed) {
        if self.overflow.as_ref().is_some_and(|o| o.is_active()) {
            return self.spill(handed);
        }
        match self.tx.try_send(handed) {
            Ok(()) => {
                if self.tx.len() >= self.ring_at {
                    self.ring();
                }
            }
            Err(TrySendError::Full(h)) => self.spill(h),
            Err(TrySendError::Disconnected(h)) => self.lose(&h, DropReason::AfterShutdown),
        }
    }

    fn lose(&self, h: &Handed, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
        if let Record::Completion(c) = &h.record {
            let tokens = c.usage.input_tokens.saturating_add(c.usage.output_tokens);
            self.lost_tokens.fetch_add(tokens, Ordering::Relaxed);
        }
    }

    /// The channel is full (or records are already waiting in the overflow): the record goes
    /// to the overflow spool, serialized here.
    fn spill(&self, mut h: Handed) {
        let Some(overflow) = &self.overflow else {
            return self.lose(&h, DropReason::HandoffFull);
        };
        let wire = match h.wire.take() {
            Some(m) => Ok(m),
            None => h.record.to_wire().map_err(|_| DropReason::Serialize),
        };
        let written = wire.and_then(|m| overflow.push(m));
        match written {
            Ok(()) => {
                self.overflowed.fetch_add(1, Ordering::Relaxed);
                if let Some(tx) = h.durable {
                    tx.done();
                }
            }
            Err(reason) => self.lose(&h, reason),
        }
    }

    /// The overflow spool, if this channel has one.
    pub fn overflow(&self) -> Option<&Arc<Overflow>> {
        self.overflow.as_ref()
    }

    /// Records dropped since the last call (all reasons).
    pub fn take_dropped(&self) -> u64 {
        self.dropped
            .iter()
            .map(|d| d.swap(0, Ordering::Relaxed))
            .sum()
    }

    /// Reports (logs and counts) what the request path overflowed and lost since the last
    /// call: a writer thread calls it every loop turn.
    pub fn report(&self, metrics: &EventMetrics, limiter: &mut LogLimiter) {
        let overflowed = self.overflowed.swap(0, Ordering::Relaxed);
        if overflowed > 0 {
            metrics.overflowed.inc_by(overflowed);
        }
        if let Some(o) = &self.overflow {
            metrics.overflow_events.set(o.records() as i64);
        }
        let lost_tokens = self.lost_tokens.swap(0, Ordering::Relaxed);
        if lost_tokens > 0 {
            metrics.lost_tokens.inc_by(lost_tokens);
        }
        for reason in DropReason::ALL {
            EventsDropped {
                count: self.dropped[reason as usize].swap(0, Ordering::Relaxed),
                reason,
            }
            .emit(metrics, limiter);
        }
    }

    /// Records waiting in the channel.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use tollgate_schemas::{TokenUsage, UsageSource};

    use super::*;
    use crate::relay::StreamInfo;

    pub(crate) fn request(tenant: &str, id: &str) -> RequestRecord {
        let now = SystemTime::now();
        RequestRecord {
            request_id: id.to_string(),
            tenant_id: tenant.to_string(),
            key_id: "key_1".into(),
            route: "chat",
            model_label: "oa/*".into(),
            requested_model: "oa/normal".into(),
            deployment: "oa".into(),
            provider: "openai",
            upstream_model: "normal".into(),
            stream: true,
            prompt_estimate: 9,
            received_at: now - Duration::from_millis(2),
            routed_at: now,
        }
    }

    pub(crate) fn chunk(tenant: &str, id: &str, sequence: u64) -> ChunkRecord {
        ChunkRecord {
            stream: Arc::new(StreamInfo {
                request_id: id.to_string(),
                tenant_id: tenant.to_string(),
                received_at: Instant::now(),
                received_wall: SystemTime::now(),
                upstream_model: "gpt-4o".into(),
                client_format: crate::api::WireFormat::OpenAi,
            }),
            sequence,
            offset: Duration::from_micros(1500 + sequence),
            bytes: 120,
            after_completion: false,
            tokens: None,
            data: bytes::Bytes::from_static(
                b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hello world\"}}]}\n\n",
            ),
        }
    }

    pub(crate) fn completion(tenant: &str, id: &str) -> CompletionRecord {
        CompletionRecord {
            request_id: id.to_string(),
            tenant_id: tenant.to_string(),
            key_id: "key_1".into(),
            route: "chat",
            model_label: "oa/*".into(),
            requested_model: "oa/normal".into(),
            deployment: "oa".into(),
            provider: "openai",
            upstream_model: "normal".into(),
            stream: true,
            outcome: Outcome::UpstreamError("boom".into()),
            usage: TokenUsage {
                input_tokens: 9,
                cached_input_tokens: 0,
                cache_write_input_tokens: 0,
                output_tokens: 20,
                source: UsageSource::Counted,
            },
            finish_reason: None,
            chunks: 3,
            time_to_first_token: Some(Duration::from_millis(4)),
            duration: Duration::from_millis(30),
            gateway_overhead: Duration::from_micros(70),
            started_at: SystemTime::now(),
            ended_at: SystemTime::now(),
            route_log: None,
            cache_hit: None,
        }
    }

    #[test]
    fn records_serialize_to_the_schema_types_keyed_by_tenant() {
        let m = Record::Request(Box::new(request("t1", "r1")))
            .to_wire()
            .unwrap();
        assert_eq!((m.topic, m.key.as_str()), (Topic::Requests, "t1"));
        let e: RequestEvent = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(e.event_id, m.event_id);
        assert_eq!(e.prompt_tokens_estimate, 9);
        assert!(e.received_at < e.event_time);

        let m = Record::Chunk(chunk("t1", "r1", 4)).to_wire().unwrap();
        let e: ChunkEvent = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!((e.sequence, e.offset_us, e.bytes), (4, 1504, 120));

        let m = Record::Completion(Box::new(completion("t2", "r1")))
            .to_wire()
            .unwrap();
        assert_eq!(m.key, "t2");
        let e: CompletionEvent = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(e.status, CompletionStatus::UpstreamError);
        assert_eq!(e.error.as_deref(), Some("boom"));
        assert_eq!(
            (e.ttft_ms, e.latency_ms, e.gateway_overhead_us),
            (Some(4), 30, 70)
        );
        assert_eq!(e.usage.source, UsageSource::Counted);
    }

    #[test]
    fn chunk_events_carry_the_output_tokens_relayed_so_far() {
        let mut counter = ChunkTokens::default();
        let mut totals = Vec::new();
        for i in 0..3 {
            let mut r = Record::Chunk(chunk("t", "r1", i));
            counter.stamp(&mut r);
            let m = r.to_wire().unwrap();
            let e: ChunkEvent = serde_json::from_slice(&m.payload).unwrap();
            totals.push(e.tokens.unwrap());
        }
        // "hello world" is two tokens for gpt-4o's tokenizer.
        assert_eq!(totals, [2, 4, 6]);
        assert_eq!(counter.len(), 1);
        counter.stamp(&mut Record::Completion(Box::new(completion("t", "r1"))));
        assert!(counter.is_empty());
        // The burst that waited for the completion to be durable is not counted again.
        let mut late = chunk("t", "r1", 3);
        late.after_completion = true;
        let mut r = Record::Chunk(late);
        counter.stamp(&mut r);
        let m = r.to_wire().unwrap();
        let e: ChunkEvent = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(e.tokens, None);
        assert!(
            counter.is_empty(),
            "no count left behind for a finished stream"
        );
    }

    #[test]
    fn a_full_handoff_drops_and_counts_instead_of_waiting() {
        let (h, rx) = Handoff::bounded(2);
        for i in 0..5 {
            h.send(Record::Chunk(chunk("t", "r", i)));
        }
        assert_eq!(h.len(), 2);
        assert_eq!(h.take_dropped(), 3);
        assert_eq!(h.take_dropped(), 0);
        drop(rx);
        h.send(Record::Chunk(chunk("t", "r", 9)));
        assert_eq!(h.take_dropped(), 1);
    }
}
