//! Recovers the completions of requests whose gateway died mid-request, so that no usage is
//! lost.
//!
//! A stream cut by a gateway crash never gets its `llm.completions` event. The [`Scanner`]
//! reads `llm.requests`, `llm.chunks` and `llm.completions` and keeps every open request
//! (request seen, no completion yet) with its prompt estimate and the output tokens of its
//! last chunk. Once a request has been silent for `orphan_timeout_ms` (its newest event time
//! against the scanner's wall clock; well above the longest stream), the scanner publishes a
//! recovered completion to `llm.completions`: an ordinary completion event with
//! `status = gateway_lost`, `usage.source = recovered`, input tokens = the request's
//! `prompt_tokens_estimate`, output tokens = the highest chunk `tokens` (0 without chunks),
//! and an event id derived from the request id
//! ([`tollgate_schemas::events::recovered_event_id`]), so that publishing it twice (two
//! scanners, a restart) is dropped by the pipeline's event-id dedup. The request closes when
//! the scanner reads that completion back (a completion that does not come back within
//! another timeout is published again).
//!
//! The billing dataflow bills a recovered completion like any other, and if the real
//! completion arrives after all (a stream longer than the timeout, a completion held in a
//! gateway's spool), the real one replaces it exactly once ([`crate::dataflow::dedup`]).
//!
//! Restart: the scanner keeps no state of its own. It re-reads the three topics from
//! `orphan_timeout_ms + lookback_margin_ms` before the newest event of the log (the local
//! log) or before now (Kafka), and publishes only for requests that still have no completion
//! in that window. Memory is bounded by `max_open_requests`; the oldest requests beyond it are
//! evicted and counted ([`RecoveryEvent::Evicted`]).
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the [`EventLog`] seam, the [`Scanner`] (what is open, what is due) and [`run`] |
//! | `local_log.rs` | the gateway's local SQLite event log: read by offset, append |
//! | `kafka.rs` | Kafka: all partitions of the three topics from a time, idempotent producer |

pub mod kafka;
pub mod local_log;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tollgate_schemas::events::{
    format_event_time, parse_event_time, recovered_event_id, topics, unix_ms, CompletionEvent,
    CompletionStatus, RequestEvent, SCHEMA_VERSION,
};
use tollgate_schemas::{TokenUsage, UsageSource};

use crate::fact::request_key;

/// Errors of the recovery scanner's reads and publishes.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("local event log: {0}")]
    Sqlite(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
}

/// The three topics the scanner reads (and the completions topic it writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub requests: String,
    pub chunks: String,
    pub completions: String,
}

impl Default for Topics {
    fn default() -> Topics {
        Topics {
            requests: topics::REQUESTS.to_string(),
            chunks: topics::CHUNKS.to_string(),
            completions: topics::COMPLETIONS.to_string(),
        }
    }
}

/// How the scanner runs.
#[derive(Debug, Clone)]
pub struct RecoveryOptions {
    /// A request silent this long (its newest event time against the wall clock) is
    /// recovered. Must be well above the longest stream: 5 minutes by default.
    pub orphan_timeout_ms: i64,
    /// Read back this much further than the timeout after a restart, so that requests open
    /// at the restart (their request event up to a stream's length older) are seen whole.
    pub lookback_margin_ms: i64,
    /// Open requests kept at most; beyond, the oldest are evicted (and counted).
    pub max_open_requests: usize,
    /// Events read per poll.
    pub max_poll_events: usize,
    /// Longest wait for new events per poll.
    pub poll_wait_ms: u64,
    pub topics: Topics,
}

impl Default for RecoveryOptions {
    fn default() -> RecoveryOptions {
        RecoveryOptions {
            orphan_timeout_ms: 300_000,
            lookback_margin_ms: 900_000,
            max_open_requests: 100_000,
            max_poll_events: 4096,
            poll_wait_ms: 250,
            topics: Topics::default(),
        }
    }
}

/// Which topic an event was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic {
    Requests,
    Chunks,
    Completions,
}

/// One event read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    pub topic: Topic,
    /// The message timestamp (the event time), ms since the Unix epoch.
    pub timestamp_ms: i64,
    pub payload: Vec<u8>,
}

/// Where the scanner reads the three topics and publishes recovered completions: the local
/// event log or Kafka.
pub trait EventLog {
    /// The newest event time in the log, where it is cheap to know (the local log); the
    /// restart look-back is measured back from it (or from now, if earlier or unknown), so a
    /// gateway down for longer than the timeout still finds the streams it cut.
    fn newest_ms(&mut self) -> Result<Option<i64>, RecoveryError> {
        Ok(None)
    }
    /// Starts reading all three topics at their first events at or after `since_ms`.
    fn seek(&mut self, since_ms: i64) -> Result<(), RecoveryError>;
    /// Appends up to `max` events to `out`, waiting at most `wait` for the first.
    fn poll(
        &mut self,
        max: usize,
        wait: Duration,
        out: &mut Vec<LogEvent>,
    ) -> Result<(), RecoveryError>;
    /// Publishes `completion` to the completions topic (keyed by tenant, durably: acks=all or
    /// a committed SQLite transaction) with the message timestamp `timestamp_ms`.
    fn publish(
        &mut self,
        completion: &CompletionEvent,
        timestamp_ms: i64,
    ) -> Result<(), RecoveryError>;
}

/// Counters of everything the scanner did, shared with whoever exports them.
#[derive(Debug, Default)]
pub struct RecoveryCounters {
    /// Recovered completions published (re-publishes included).
    pub published: AtomicU64,
    /// Open requests evicted by the memory bound (never recovered by this scanner).
    pub evicted: AtomicU64,
    /// Requests seen only by their chunks (request event before the look-back window, or
    /// lost): nothing to build a completion from.
    pub unrecoverable: AtomicU64,
    /// Publishes that failed (retried at the next check).
    pub publish_failures: AtomicU64,
}

/// What the scanner does that matters to billing: each logs and counts in one place.
pub enum RecoveryEvent<'a> {
    Published {
        request_id: &'a str,
        output_tokens: u64,
        again: bool,
    },
    Evicted {
        count: u64,
        open: usize,
    },
    Unrecoverable {
        count: u64,
    },
    PublishFailed {
        error: &'a RecoveryError,
    },
}

impl RecoveryEvent<'_> {
    pub fn emit(&self, counters: &RecoveryCounters) {
        match self {
            RecoveryEvent::Published {
                request_id,
                output_tokens,
                again,
            } => {
                counters.published.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    request_id,
                    output_tokens,
                    again,
                    "recovered the completion of a request its gateway lost"
                );
            }
            RecoveryEvent::Evicted { count, open } => {
                counters.evicted.fetch_add(*count, Ordering::Relaxed);
                tracing::warn!(
                    count,
                    open,
                    "recovery scanner at its open-request bound: oldest requests evicted, \
                     they will not be recovered if their gateway lost them"
                );
            }
            RecoveryEvent::Unrecoverable { count } => {
                counters.unrecoverable.fetch_add(*count, Ordering::Relaxed);
                tracing::warn!(
                    count,
                    "requests seen only by their chunks timed out: not recovered"
                );
            }
            RecoveryEvent::PublishFailed { error } => {
                counters.publish_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%error, "publishing a recovered completion failed; retrying");
            }
        }
    }
}

/// An open request.
#[derive(Debug, Clone)]
struct Open {
    request: Option<Box<RequestEvent>>,
    /// Output tokens of its latest chunk (the highest count seen).
    output_tokens: u64,
    chunks: u64,
    /// Newest event time of the request and its chunks.
    last_ms: i64,
    /// When (wall clock) its recovered completion was published, until it is read back.
    published_ms: Option<i64>,
}

/// The fields of a chunk or completion event the scanner reads.
#[derive(Deserialize)]
struct Partial<'a> {
    #[serde(borrow)]
    request_id: std::borrow::Cow<'a, str>,
    #[serde(default)]
    tokens: Option<u64>,
}

/// Open requests and closed ones, fed with events; says which are due for recovery.
pub struct Scanner {
    options: RecoveryOptions,
    counters: Arc<RecoveryCounters>,
    open: HashMap<u128, Open>,
    /// Requests whose completion was read (by close time), so that a request or chunk event
    /// read after it (Kafka topics are read side by side) does not open it again.
    closed: HashMap<u128, i64>,
}

impl Scanner {
    pub fn new(options: RecoveryOptions, counters: Arc<RecoveryCounters>) -> Scanner {
        Scanner {
            options,
            counters,
            open: HashMap::new(),
            closed: HashMap::new(),
        }
    }

    /// Open requests (tests, logs).
    pub fn open_requests(&self) -> usize {
        self.open.len()
    }

    /// Takes one event into account. Events that do not parse are skipped (the billing
    /// pipeline keeps bad completions as rejects; a bad request or chunk has nothing to
    /// recover from).
    pub fn observe(&mut self, event: &LogEvent) {
        match event.topic {
            Topic::Requests => {
                let Ok(r) = serde_json::from_slice::<RequestEvent>(&event.payload) else {
                    return;
                };
                let key = request_key(&r.request_id);
                if self.closed.contains_key(&key) {
                    return;
                }
                let open = self.entry(key, event.timestamp_ms);
                open.request = Some(Box::new(r));
            }
            Topic::Chunks => {
                let Ok(c) = serde_json::from_slice::<Partial<'_>>(&event.payload) else {
                    return;
                };
                let key = request_key(&c.request_id);
                if self.closed.contains_key(&key) {
                    return;
                }
                let open = self.entry(key, event.timestamp_ms);
                open.chunks += 1;
                open.output_tokens = open.output_tokens.max(c.tokens.unwrap_or(0));
            }
            Topic::Completions => {
                let Ok(c) = serde_json::from_slice::<Partial<'_>>(&event.payload) else {
                    return;
                };
                let key = request_key(&c.request_id);
                self.open.remove(&key);
                self.closed.insert(key, event.timestamp_ms);
            }
        }
    }

    fn entry(&mut self, key: u128, ms: i64) -> &mut Open {
        if !self.open.contains_key(&key) && self.open.len() >= self.options.max_open_requests {
            self.evict();
        }
        let open = self.open.entry(key).or_insert(Open {
            request: None,
            output_tokens: 0,
            chunks: 0,
            last_ms: ms,
            published_ms: None,
        });
        open.last_ms = open.last_ms.max(ms);
        open
    }

    /// Drops the oldest tenth of the open requests (at least one), in one sweep.
    fn evict(&mut self) {
        let mut ages: Vec<(i64, u128)> = self.open.iter().map(|(k, o)| (o.last_ms, *k)).collect();
        let n = (ages.len() / 10).max(1).min(ages.len());
        if n == 0 {
            return;
        }
        ages.select_nth_unstable(n - 1);
        for (_, key) in &ages[..n] {
            self.open.remove(key);
        }
        RecoveryEvent::Evicted {
            count: n as u64,
            open: self.open.len(),
        }
        .emit(&self.counters);
    }

    /// The recovered completions due at wall-clock time `now_ms` (each with its message
    /// timestamp); marks them published. Also forgets closed requests older than the
    /// look-back window and drops requests seen only by chunks that timed out.
    pub fn due(&mut self, now_ms: i64) -> Vec<(CompletionEvent, i64)> {
        let timeout = self.options.orphan_timeout_ms;
        let mut out = Vec::new();
        let mut unrecoverable = 0u64;
        self.open.retain(|_, open| {
            let silent = now_ms.saturating_sub(open.last_ms) >= timeout;
            let Some(request) = &open.request else {
                if silent {
                    unrecoverable += 1;
                }
                return !silent;
            };
            let due = match open.published_ms {
                None => silent,
                // Not read back within another timeout: publish again (same event id).
                Some(at) => now_ms.saturating_sub(at) >= timeout,
            };
            if due {
                out.push((
                    recovered_completion(request, open),
                    open.last_ms,
                    open.published_ms.is_some(),
                ));
                open.published_ms = Some(now_ms);
            }
            true
        });
        if unrecoverable > 0 {
            RecoveryEvent::Unrecoverable {
                count: unrecoverable,
            }
            .emit(&self.counters);
        }
        let forget_before = now_ms
            .saturating_sub(timeout)
            .saturating_sub(self.options.lookback_margin_ms);
        self.closed.retain(|_, ms| *ms >= forget_before);
        if self.closed.len() > self.options.max_open_requests.saturating_mul(4) {
            // Only an optimisation (a completion recovered for a closed request is dropped
            // by the pipeline's dedup): keep the newest.
            let mut times: Vec<i64> = self.closed.values().copied().collect();
            let keep = self.options.max_open_requests.saturating_mul(4);
            let cut_at = times.len() - keep;
            let (_, cut, _) = times.select_nth_unstable(cut_at);
            let cut = *cut;
            self.closed.retain(|_, ms| *ms >= cut);
        }
        out.into_iter()
            .map(|(c, ms, again)| {
                RecoveryEvent::Published {
                    request_id: &c.request_id,
                    output_tokens: c.usage.output_tokens,
                    again,
                }
                .emit(&self.counters);
                (c, ms)
            })
            .collect()
    }
}

/// The completion of an open request, as recovered.
fn recovered_completion(r: &RequestEvent, open: &Open) -> CompletionEvent {
    let cut = UNIX_EPOCH + Duration::from_millis(u64::try_from(open.last_ms).unwrap_or(0));
    let received_ms = parse_event_time(&r.received_at).map_or(open.last_ms, unix_ms);
    CompletionEvent {
        schema_version: SCHEMA_VERSION,
        event_id: recovered_event_id(&r.request_id),
        event_time: format_event_time(cut),
        request_id: r.request_id.clone(),
        tenant_id: r.tenant_id.clone(),
        key_id: r.key_id.clone(),
        route: r.route.clone(),
        requested_model: r.requested_model.clone(),
        model_alias: r.model_alias.clone(),
        deployment: r.deployment.clone(),
        provider: r.provider.clone(),
        upstream_model: r.upstream_model.clone(),
        stream: r.stream,
        status: CompletionStatus::GatewayLost,
        finish_reason: None,
        error: Some(
            "the gateway stopped before recording how this request ended; billed from its \
             request and chunk events"
                .to_string(),
        ),
        usage: TokenUsage {
            input_tokens: r.prompt_tokens_estimate,
            cached_input_tokens: 0,
            cache_write_input_tokens: 0,
            output_tokens: open.output_tokens,
            source: UsageSource::Recovered,
        },
        chunks: open.chunks,
        ttft_ms: None,
        latency_ms: u64::try_from(open.last_ms.saturating_sub(received_ms)).unwrap_or(0),
        gateway_overhead_us: 0,
        retries: 0,
        fallbacks: 0,
        cache_hit: false,
        cache_saved_usage: None,
        cache_price_fraction: None,
        price_book_version: None,
        received_at: r.received_at.clone(),
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn wall_ms() -> i64 {
    unix_ms(SystemTime::now())
}

/// Runs the scanner over `log` until `stop` is set: rebuilds its state from the look-back
/// window, then follows the log, publishing what is due whenever it has caught up (a poll
/// that returns less than a full batch: a request whose completion is still unread in a
/// backlog must not look orphaned).
pub fn run(
    log: &mut dyn EventLog,
    options: &RecoveryOptions,
    counters: Arc<RecoveryCounters>,
    stop: &AtomicBool,
    clock: &dyn Fn() -> i64,
) -> Result<(), RecoveryError> {
    let now = clock();
    let anchor = log.newest_ms()?.map_or(now, |n| n.min(now));
    let since = anchor
        .saturating_sub(options.orphan_timeout_ms)
        .saturating_sub(options.lookback_margin_ms);
    log.seek(since)?;
    tracing::info!(
        since = %format_event_time(UNIX_EPOCH + Duration::from_millis(u64::try_from(since).unwrap_or(0))),
        orphan_timeout_ms = options.orphan_timeout_ms,
        "recovery scanner started"
    );
    let mut scanner = Scanner::new(options.clone(), counters.clone());
    let mut buffer = Vec::new();
    let max = options.max_poll_events.max(1);
    while !stop.load(Ordering::Acquire) {
        buffer.clear();
        log.poll(
            max,
            Duration::from_millis(options.poll_wait_ms),
            &mut buffer,
        )?;
        for event in &buffer {
            scanner.observe(event);
        }
        if buffer.len() < max {
            publish_due(log, &mut scanner, clock(), &counters);
        }
    }
    Ok(())
}

/// Publishes what is due; a failed publish is unmarked, to be retried at the next check.
fn publish_due(
    log: &mut dyn EventLog,
    scanner: &mut Scanner,
    now_ms: i64,
    counters: &RecoveryCounters,
) {
    for (completion, timestamp_ms) in scanner.due(now_ms) {
        if let Err(error) = log.publish(&completion, timestamp_ms) {
            RecoveryEvent::PublishFailed { error: &error }.emit(counters);
            if let Some(open) = scanner.open.get_mut(&request_key(&completion.request_id)) {
                open.published_ms = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use tollgate_schemas::events::{ChunkEvent, PublishedCompletion};

    const T0: i64 = 1_780_000_000_000;
    const TIMEOUT: i64 = 300_000;

    fn at(ms: i64) -> String {
        format_event_time(UNIX_EPOCH + Duration::from_millis(ms as u64))
    }

    fn request(id: &str, ms: i64) -> LogEvent {
        let r = RequestEvent {
            schema_version: SCHEMA_VERSION,
            event_id: tollgate_schemas::events::new_event_id(),
            event_time: at(ms),
            request_id: id.into(),
            tenant_id: "ten_1".into(),
            key_id: "key_1".into(),
            route: "chat".into(),
            requested_model: "mock/m".into(),
            model_alias: "mock/*".into(),
            deployment: "mock".into(),
            provider: "mock".into(),
            upstream_model: "m".into(),
            stream: true,
            prompt_tokens_estimate: 42,
            received_at: at(ms),
        };
        LogEvent {
            topic: Topic::Requests,
            timestamp_ms: ms,
            payload: serde_json::to_vec(&r).unwrap(),
        }
    }

    fn chunk(id: &str, seq: u64, tokens: Option<u64>, ms: i64) -> LogEvent {
        let c = ChunkEvent {
            schema_version: SCHEMA_VERSION,
            event_id: tollgate_schemas::events::new_event_id(),
            event_time: at(ms),
            request_id: id.into(),
            tenant_id: "ten_1".into(),
            sequence: seq,
            offset_us: 0,
            bytes: 10,
            tokens,
        };
        LogEvent {
            topic: Topic::Chunks,
            timestamp_ms: ms,
            payload: serde_json::to_vec(&c).unwrap(),
        }
    }

    fn completion_of(c: &CompletionEvent, ms: i64) -> LogEvent {
        LogEvent {
            topic: Topic::Completions,
            timestamp_ms: ms,
            payload: serde_json::to_vec(c).unwrap(),
        }
    }

    /// A real completion of `id` (the recovered one with gateway fields).
    fn real(id: &str, ms: i64) -> LogEvent {
        let mut s = scanner();
        s.observe(&request(id, ms));
        let (mut c, _) = s.due(ms + TIMEOUT).pop().unwrap();
        c.event_id = tollgate_schemas::events::new_event_id();
        c.status = CompletionStatus::Completed;
        c.usage.source = UsageSource::Provider;
        completion_of(&c, ms)
    }

    fn scanner() -> Scanner {
        Scanner::new(
            RecoveryOptions::default(),
            Arc::new(RecoveryCounters::default()),
        )
    }

    #[test]
    fn a_request_silent_past_the_timeout_is_recovered_from_its_last_chunk() {
        let mut s = scanner();
        s.observe(&request("req_a", T0));
        s.observe(&chunk("req_a", 0, Some(3), T0 + 100));
        s.observe(&chunk("req_a", 1, None, T0 + 150));
        s.observe(&chunk("req_a", 2, Some(9), T0 + 200));
        assert!(s.due(T0 + 200 + TIMEOUT - 1).is_empty(), "not yet");
        let due = s.due(T0 + 200 + TIMEOUT);
        assert_eq!(due.len(), 1);
        let (c, ts) = &due[0];
        assert_eq!(*ts, T0 + 200);
        assert_eq!(c.request_id, "req_a");
        assert_eq!(c.event_id, recovered_event_id("req_a"));
        assert_eq!(c.status, CompletionStatus::GatewayLost);
        assert_eq!(c.usage.source, UsageSource::Recovered);
        assert_eq!((c.usage.input_tokens, c.usage.output_tokens), (42, 9));
        assert_eq!(c.chunks, 3);
        assert_eq!(c.latency_ms, 200);
        assert_eq!(c.event_time, at(T0 + 200));
        // It validates against the published schema's Rust type.
        let back: PublishedCompletion =
            serde_json::from_slice(&serde_json::to_vec(c).unwrap()).unwrap();
        assert_eq!(&back.event, c);
        // Published once; read back, the request closes.
        assert!(s.due(T0 + 200 + TIMEOUT + 1000).is_empty());
        s.observe(&completion_of(c, T0 + 200));
        assert_eq!(s.open_requests(), 0);
        // A request without chunks is billed its prompt.
        s.observe(&request("req_b", T0));
        let (c, _) = s.due(T0 + TIMEOUT).pop().unwrap();
        assert_eq!((c.usage.input_tokens, c.usage.output_tokens), (42, 0));
    }

    #[test]
    fn a_completion_closes_the_request_and_late_events_do_not_reopen_it() {
        let mut s = scanner();
        s.observe(&request("req_a", T0));
        s.observe(&chunk("req_a", 0, Some(3), T0 + 100));
        s.observe(&real("req_a", T0 + 200));
        assert_eq!(s.open_requests(), 0);
        // Kafka reads topics side by side: a chunk read after the completion.
        s.observe(&chunk("req_a", 1, Some(4), T0 + 150));
        assert!(s.due(T0 + 10 * TIMEOUT).is_empty());
        // Completion first, then the request.
        s.observe(&real("req_c", T0));
        s.observe(&request("req_c", T0));
        assert!(s.due(T0 + 2 * TIMEOUT).is_empty());
    }

    #[test]
    fn an_unacknowledged_recovery_is_published_again_with_the_same_id() {
        let mut s = scanner();
        s.observe(&request("req_a", T0));
        let first = s.due(T0 + TIMEOUT);
        assert_eq!(first.len(), 1);
        assert!(s.due(T0 + 2 * TIMEOUT - 1).is_empty());
        let again = s.due(T0 + 2 * TIMEOUT);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].0.event_id, first[0].0.event_id);
    }

    #[test]
    fn memory_is_bounded_and_evictions_are_counted() {
        let counters = Arc::new(RecoveryCounters::default());
        let mut s = Scanner::new(
            RecoveryOptions {
                max_open_requests: 10,
                ..RecoveryOptions::default()
            },
            counters.clone(),
        );
        for i in 0..25 {
            s.observe(&request(&format!("req_{i}"), T0 + i));
        }
        assert!(s.open_requests() <= 10);
        assert_eq!(counters.evicted.load(Ordering::Relaxed), 15);
        // The newest survive.
        let due: Vec<String> = s
            .due(T0 + 100 + TIMEOUT)
            .into_iter()
            .map(|(c, _)| c.request_id)
            .collect();
        assert!(due.contains(&"req_24".to_string()), "{due:?}");
        // Chunks without their request cannot be recovered: dropped and counted.
        s.observe(&chunk("req_x", 5, Some(7), T0));
        s.due(T0 + 10 * TIMEOUT);
        assert_eq!(counters.unrecoverable.load(Ordering::Relaxed), 1);
    }

    /// An in-memory log: one ordered list of events, read by position; publishes append.
    #[derive(Default, Clone)]
    pub(crate) struct MemoryLog {
        pub events: Arc<parking_lot::Mutex<Vec<LogEvent>>>,
        next: usize,
    }

    impl EventLog for MemoryLog {
        fn newest_ms(&mut self) -> Result<Option<i64>, RecoveryError> {
            Ok(self.events.lock().iter().map(|e| e.timestamp_ms).max())
        }
        fn seek(&mut self, since_ms: i64) -> Result<(), RecoveryError> {
            let events = self.events.lock();
            self.next = events
                .iter()
                .position(|e| e.timestamp_ms >= since_ms)
                .unwrap_or(events.len());
            Ok(())
        }
        fn poll(
            &mut self,
            max: usize,
            _wait: Duration,
            out: &mut Vec<LogEvent>,
        ) -> Result<(), RecoveryError> {
            let events = self.events.lock();
            let end = (self.next + max).min(events.len());
            out.extend(events[self.next..end].iter().cloned());
            self.next = end;
            Ok(())
        }
        fn publish(
            &mut self,
            completion: &CompletionEvent,
            timestamp_ms: i64,
        ) -> Result<(), RecoveryError> {
            self.events
                .lock()
                .push(completion_of(completion, timestamp_ms));
            Ok(())
        }
    }

    fn recovered_in(log: &MemoryLog) -> Vec<CompletionEvent> {
        log.events
            .lock()
            .iter()
            .filter(|e| e.topic == Topic::Completions)
            .map(|e| serde_json::from_slice::<CompletionEvent>(&e.payload).unwrap())
            .filter(|c| c.usage.source == UsageSource::Recovered)
            .collect()
    }

    /// Runs the scanner over `log` until it has polled the log dry twice at `now`.
    fn run_once(log: &MemoryLog, now: i64) {
        let stop = AtomicBool::new(false);
        let polls = std::cell::Cell::new(0);
        let clock = || {
            polls.set(polls.get() + 1);
            if polls.get() > 3 {
                stop.store(true, Ordering::Release);
            }
            now
        };
        let mut reader = log.clone();
        run(
            &mut reader,
            &RecoveryOptions {
                max_poll_events: 2,
                ..RecoveryOptions::default()
            },
            Arc::new(RecoveryCounters::default()),
            &stop,
            &clock,
        )
        .unwrap();
    }

    #[test]
    fn a_restart_rebuilds_from_the_log_and_publishes_only_what_has_no_completion() {
        let log = MemoryLog::default();
        {
            let mut events = log.events.lock();
            // Long before the window: never looked at again.
            events.push(request("req_old", T0 - 3_600_000));
            events.push(request("req_a", T0));
            events.push(chunk("req_a", 0, Some(5), T0 + 10));
            events.push(request("req_b", T0 + 20));
            events.push(real("req_b", T0 + 30));
            events.push(request("req_c", T0 + 40));
            events.push(chunk("req_c", 0, Some(2), T0 + 50));
        }
        // The scanner runs before anything is due: nothing published.
        run_once(&log, T0 + 60);
        assert!(recovered_in(&log).is_empty());
        // A restart after the timeout: req_a and req_c are recovered (req_b completed;
        // req_old lies before the look-back window).
        run_once(&log, T0 + 50 + TIMEOUT);
        let mut ids: Vec<String> = recovered_in(&log)
            .into_iter()
            .map(|c| c.request_id)
            .collect();
        ids.sort();
        assert_eq!(ids, vec!["req_a", "req_c"]);
        // Another restart reads them back: nothing is published twice.
        run_once(&log, T0 + 60 + TIMEOUT);
        assert_eq!(recovered_in(&log).len(), 2);
        // The gateway down for an hour: the look-back is measured from the log's newest
        // event, so a request cut just before is still found.
        log.events.lock().push(request("req_d", T0 + 100));
        run_once(&log, T0 + 3_600_000);
        let ids: Vec<String> = recovered_in(&log)
            .into_iter()
            .map(|c| c.request_id)
            .collect();
        assert_eq!(ids.len(), 3, "{ids:?}");
        assert!(ids.contains(&"req_d".to_string()));
    }
}
