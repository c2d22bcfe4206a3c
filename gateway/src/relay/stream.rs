//! [`RelayStream`]: the streaming response body.
//!
//! It pulls upstream bytes, splits them into SSE frames, lets the adapter write the client's
//! bytes, and yields them once per upstream read (no per-frame allocation of its own). One
//! exception, for time to first token: under light load (no more open streams than cores) the
//! stream's first output is yielded on its own, and the rest of the burst it came in follows
//! after a yield to the runtime, once the server has written it. When the client
//! disconnects, the server drops this body: the upstream body is dropped with it, which closes
//! the upstream connection (the cancellation), and `Drop` records the completion with what
//! was generated so far.
//!
//! The durability barrier: once the stream's terminal event (`[DONE]`, `message_stop`, an
//! error event) is written, the completion is recorded and the bytes still to go out wait
//! until the sink says the record is durable (`crate::events::durable`); meanwhile the
//! upstream body is read to its end so that its connection can be reused. Everything before
//! the terminal event's burst goes out as it arrives.
//!
//! Chunk records are made when their bytes are handed to the server, never before: the
//! chunks of a burst held behind the barrier are recorded after the completion is durable
//! (marked [`ChunkRecord::after_completion`]), so a crash while they wait can never bill a
//! recovered stream for output the client did not get. The completion counts them (they
//! are on their way), unless the client has gone.
//!
//! A same-dialect stream also carries its request record ([`RelayStream::with_request_record`]):
//! the prompt estimate it needs is counted after the first output has gone out, and the
//! record reaches the sink before any of the stream's chunk records.
//!
//! Every SSE data event the client receives (terminators included, comments not) is reported
//! to the event sink as a [`ChunkRecord`]: the events are found by scanning the bytes the
//! adapter just wrote for blank lines, which costs a `memchr` over bytes already in cache and
//! no parsing; the record shares the stream's ids through one `Arc`, so it allocates nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;

use super::usage_trailer::UsageSlot;
use super::{ChunkRecord, Exchange, Outcome, SseParser, StreamAdapter, StreamInfo};
use crate::cache::CacheFill;
use crate::events::Durable;
use crate::limits::StreamAllowance;
use crate::providers::BodyStream;

/// Most bytes gathered from already-ready upstream reads before they are written out.
const COALESCE_LIMIT_BYTES: usize = 64 * 1024;

/// Streams being relayed by this process (the load signal for [`RelayStream::first_alone`]).
static OPEN_STREAMS: AtomicUsize = AtomicUsize::new(0);

/// Streams at or under which the first output of a burst is written on its own.
fn light_load_streams() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The body of a streaming response.
pub struct RelayStream {
    upstream: BodyStream,
    parser: SseParser,
    adapter: Box<dyn StreamAdapter>,
    out: BytesMut,
    exchange: Exchange,
    /// Set once the completion is recorded.
    done: bool,
    /// When the first upstream bytes arrived, until the first client bytes leave.
    first_upstream_at: Option<Instant>,
    post_processing: Duration,
    /// Ids shared by this stream's chunk records.
    stream_info: Arc<StreamInfo>,
    /// Sequence number of the next chunk record.
    next_chunk: u64,
    /// The request's reservation against its limits: grown as the stream runs, settled at
    /// the end; a hard limit that refuses more cuts the stream.
    allowance: Option<StreamAllowance>,
    /// The first output went out on its own; the rest of its burst is relayed on the next
    /// poll, after the server has written it.
    first_sent: FirstOutput,
    /// Complete frames were left in the parser when the first output went out alone.
    frames_held: bool,
    /// The request record, held until the first output has gone out: when it was routed, and
    /// how to count its prompt.
    request_record: Option<(SystemTime, PromptCount)>,
    /// Chunk records (offset, event) relayed before the request record was: they follow it.
    held_chunks: Vec<(Duration, Bytes)>,
    /// The completion's durability ticket: the last bytes wait for it.
    barrier: Option<Durable>,
    /// The client's bytes gathered for the response cache, and, once the stream completed
    /// normally, what to store them with (stored when the last byte has gone out).
    cache_fill: Option<CacheFill>,
    cache_ready: Option<(tollgate_schemas::TokenUsage, Option<String>, u64)>,
    /// The upstream's terminal event was seen before its body ended: read the rest (for
    /// connection reuse) while the last bytes wait.
    drain_upstream: bool,
    /// Where the finished stream leaves its tokens (the trailer of `usage_trailer.rs`).
    usage_slot: Option<UsageSlot>,
    /// The bound on the time between upstream data events, if any.
    idle: Option<IdleTimer>,
}

/// Fires when no upstream data event has arrived for `after`.
struct IdleTimer {
    after: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
}

/// Counts a request's prompt tokens (the pre-flight estimate, taken late).
type PromptCount = Box<dyn FnOnce() -> u64 + Send>;

/// Where the stream is with its first output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstOutput {
    Pending,
    /// Handed to the server; the next poll yields once so that the server writes it before
    /// the rest of the burst is processed.
    Handed,
    Done,
}

impl RelayStream {
    pub fn new(
        upstream: BodyStream,
        mut adapter: Box<dyn StreamAdapter>,
        exchange: Exchange,
    ) -> Self {
        if exchange.audit.is_some() {
            adapter.keep_output_text();
        }
        OPEN_STREAMS.fetch_add(1, Ordering::Relaxed);
        RelayStream {
            stream_info: exchange.stream_info(),
            next_chunk: 0,
            upstream,
            parser: SseParser::new(),
            adapter,
            out: BytesMut::with_capacity(4096),
            exchange,
            done: false,
            first_upstream_at: None,
            post_processing: Duration::ZERO,
            allowance: None,
            first_sent: FirstOutput::Pending,
            frames_held: false,
            request_record: None,
            held_chunks: Vec::new(),
            barrier: None,
            cache_fill: None,
            cache_ready: None,
            drain_upstream: false,
            usage_slot: None,
            idle: None,
        }
    }

    /// Leaves the tokens the request settles (input plus output) in `slot` when it finishes.
    pub fn with_usage_slot(mut self, slot: UsageSlot) -> Self {
        self.usage_slot = Some(slot);
        self
    }

    /// Gathers what the client receives for the response cache (stored if the stream
    /// completes normally).
    pub fn with_cache_fill(mut self, fill: Option<CacheFill>) -> Self {
        self.cache_fill = fill;
        self
    }

    /// Bounds one upstream event (`server.max_upstream_event_bytes`): a longer one ends the
    /// stream with an error event, recorded as an upstream error.
    pub fn with_max_event_bytes(mut self, max: usize) -> Self {
        self.parser = SseParser::with_max_event_bytes(max);
        self
    }

    /// Bounds the time between two upstream data events (the deployment's
    /// `idle_timeout_ms`; keep-alive comments are not data): when it passes, the stream ends
    /// with an error event, recorded as an upstream error. `None`: no bound.
    pub fn with_idle_timeout(mut self, idle: Option<Duration>) -> Self {
        self.idle = idle.map(|after| IdleTimer {
            after,
            timer: Box::pin(tokio::time::sleep(after)),
        });
        self
    }

    /// Ends the stream on an upstream fault the relay found itself (an event too long, no
    /// data for too long): the client gets an error event in its dialect, the completion
    /// records an upstream error (billed for what was delivered), and the upstream
    /// connection is closed rather than read on.
    fn fail_upstream(&mut self, message: String) {
        tracing::warn!(
            request_id = %self.exchange.request_id,
            deployment = %self.exchange.deployment,
            "{message}"
        );
        self.adapter.on_error(&message, &mut self.out);
        self.finish(Outcome::UpstreamError(message));
        self.frames_held = false;
        self.drain_upstream = false;
        self.upstream = Box::pin(futures_util::stream::empty());
    }

    /// Holds `allowance` against the request's limits while the stream runs.
    pub fn with_allowance(mut self, allowance: Option<StreamAllowance>) -> Self {
        self.allowance = allowance;
        self
    }

    /// Holds the request record back until the first output has been handed to the server
    /// (or the stream ends): `count` gives its prompt estimate then, off the path to the
    /// first token.
    pub fn with_request_record(
        mut self,
        routed_at: SystemTime,
        count: impl FnOnce() -> u64 + Send + 'static,
    ) -> Self {
        self.request_record = Some((routed_at, Box::new(count)));
        self
    }

    fn record_request(&mut self) {
        let Some((routed_at, count)) = self.request_record.take() else {
            return;
        };
        self.exchange.prompt_estimate = count();
        self.exchange.record_request_at(routed_at);
        let (sink, info, next) = (&self.exchange.sink, &self.stream_info, &mut self.next_chunk);
        for (offset, event) in self.held_chunks.drain(..) {
            sink.record_chunk(chunk_record(info, next, offset, event));
        }
    }

    /// Ends the stream with an error event when a hard limit refused more tokens.
    fn enforce_limits(&mut self, cx: &mut Context<'_>) {
        let events = self.adapter.state().chunks;
        let Some(check) = self.allowance.as_mut().and_then(|a| a.check(events, cx)) else {
            return;
        };
        let message = format!(
            "The response was stopped: the {} limit ({}) of {} was reached.",
            check.kind.label().replace('_', " "),
            check.limit,
            match check.scope {
                crate::limits::Scope::Key => "this API key",
                crate::limits::Scope::Tenant => "your organization",
                crate::limits::Scope::TenantModel => "your organization on this model",
            }
        );
        self.adapter.on_error(&message, &mut self.out);
        self.finish(Outcome::LimitExceeded(message));
    }

    fn finish(&mut self, outcome: Outcome) {
        if self.done {
            return;
        }
        self.done = true;
        self.record_request();
        let state = self.adapter.state().clone();
        let outcome = match (outcome, &state.upstream_error) {
            (Outcome::Completed, Some(e)) => Outcome::UpstreamError(e.clone()),
            (o, _) => o,
        };
        let adapter = &self.adapter;
        let usage = self.exchange.settle_usage(&state, || adapter.output_text());
        if let Some(allowance) = self.allowance.as_mut() {
            allowance.settle(&usage);
        }
        if let Some(slot) = &self.usage_slot {
            slot.set(usage.input_tokens + usage.output_tokens);
        }
        let client_gone = outcome == Outcome::ClientDisconnected;
        // The chunks still to go out are recorded as they leave, after the completion; it
        // counts them unless nobody is left to receive them.
        let chunks = if client_gone {
            self.next_chunk
        } else {
            self.next_chunk + count_data_events(&self.out)
        };
        if outcome == Outcome::Completed {
            self.cache_ready = Some((usage, state.finish_reason.clone(), chunks));
        } else {
            // Interrupted, failed or cut: never cached.
            self.cache_fill = None;
        }
        let durable = self.exchange.finish(
            outcome,
            usage,
            state.finish_reason.clone(),
            chunks,
            state.first_output_at,
            self.post_processing,
            || crate::audit::AuditResponse::Text(adapter.output_text()),
        );
        // Nobody is left to receive the terminal event when the client went away.
        if !client_gone && !durable.is_ready() {
            self.barrier = Some(durable);
        }
    }

    /// The upstream's terminal event was relayed: the stream is complete, whether or not
    /// the upstream body has ended yet.
    fn complete(&mut self) {
        self.adapter.on_end(&mut self.out);
        self.finish(Outcome::Completed);
        self.frames_held = false;
        self.drain_upstream = true;
    }

    /// Reads (and discards) what the upstream has after its terminal event, without waiting.
    fn drain(&mut self, cx: &mut Context<'_>) {
        while self.drain_upstream {
            match self.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(_))) => {}
                Poll::Ready(Some(Err(_)) | None) => self.drain_upstream = false,
                Poll::Pending => break,
            }
        }
    }

    /// Reports each SSE data event in `bytes`, which are being handed to the server.
    fn record_chunks(&mut self, bytes: &Bytes) {
        let offset = self.stream_info.received_at.elapsed();
        if self.request_record.is_some() {
            // The request record goes first; these wait for it.
            let held = &mut self.held_chunks;
            for_each_data_event(bytes, |event| held.push((offset, bytes.slice(event))));
            return;
        }
        let after_completion = self.done;
        let (sink, info, next) = (&self.exchange.sink, &self.stream_info, &mut self.next_chunk);
        for_each_data_event(bytes, |event| {
            let record = chunk_record(info, next, offset, bytes.slice(event));
            sink.record_chunk(ChunkRecord {
                after_completion,
                ..record
            });
        });
    }

    /// Relays the complete frames the parser holds. Under light load the first output of
    /// the stream stops the loop so that it reaches the client without waiting for the rest
    /// of its burst (time to first token); returns whether it did.
    fn relay_frames(&mut self) -> bool {
        let first_alone = self.first_sent == FirstOutput::Pending
            && OPEN_STREAMS.load(Ordering::Relaxed) <= light_load_streams();
        let mut stopped = false;
        let mut data_seen = false;
        while let Some(frame) = self.parser.next_frame() {
            data_seen |= frame.data.is_some();
            self.adapter.on_frame(frame, &mut self.out);
            if first_alone && self.adapter.state().first_output_at.is_some() {
                stopped = !self.out.is_empty();
                break;
            }
        }
        if self.adapter.state().first_output_at.is_some() && self.first_sent == FirstOutput::Pending
        {
            self.first_sent = if stopped {
                FirstOutput::Handed
            } else {
                FirstOutput::Done
            };
        }
        self.frames_held = stopped;
        if data_seen {
            if let Some(idle) = self.idle.as_mut() {
                let deadline = tokio::time::Instant::now() + idle.after;
                idle.timer.as_mut().reset(deadline);
            }
        }
        stopped
    }

    /// The upstream fault found while relaying, if any: an event past the bound, or no data
    /// event for the idle timeout (its timer is polled here, so `cx` is woken when it fires).
    fn upstream_fault(&mut self, cx: &mut Context<'_>) -> Option<String> {
        if self.parser.overflowed() {
            return Some(format!(
                "the upstream sent an event over {} bytes (server.max_upstream_event_bytes); \
                 the stream was cut",
                self.parser.max_event_bytes()
            ));
        }
        let idle = self.idle.as_mut()?;
        idle.timer.as_mut().poll(cx).is_ready().then(|| {
            format!(
                "no data from the upstream for {} ms (idle_timeout_ms); the stream was cut",
                idle.after.as_millis()
            )
        })
    }

    fn take_out(&mut self) -> Option<Bytes> {
        self.take_out_to(self.out.len())
    }

    fn take_out_to(&mut self, at: usize) -> Option<Bytes> {
        if at == 0 {
            return None;
        }
        if let Some(t) = self.first_upstream_at.take() {
            self.post_processing = t.elapsed();
        }
        let bytes = self.out.split_to(at).freeze();
        self.record_chunks(&bytes);
        if let Some(fill) = self.cache_fill.as_mut() {
            fill.push(&bytes);
        }
        Some(bytes)
    }

    /// The stream has ended: a completed one is offered to the cache.
    fn store_in_cache(&mut self) {
        if let (Some(fill), Some((usage, finish, chunks))) =
            (self.cache_fill.take(), self.cache_ready.take())
        {
            fill.complete(usage, finish, chunks);
        }
    }
}

impl Stream for RelayStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.first_sent {
            FirstOutput::Pending | FirstOutput::Done => {}
            FirstOutput::Handed => {
                // Let the server write the first output now; the rest of its burst (still in
                // the parser) follows on the next poll. Yielding through tokio (not waking
                // this task by hand) brings the task back once the serving thread has written
                // the output and polled its sockets.
                this.first_sent = FirstOutput::Done;
                let yielded = std::pin::pin!(tokio::task::yield_now()).poll(cx);
                debug_assert!(yielded.is_pending());
                return Poll::Pending;
            }
        }
        if this.first_sent == FirstOutput::Done {
            this.record_request();
        }
        if std::mem::take(&mut this.frames_held) {
            this.relay_frames();
        }
        loop {
            if !this.done && this.adapter.state().terminated {
                this.complete();
            }
            if this.done {
                if this.barrier.is_some() {
                    this.drain(cx);
                    // The terminal bytes wait until the completion record is durable.
                    if let Some(barrier) = this.barrier.as_mut() {
                        if Pin::new(barrier).poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                    }
                    this.barrier = None;
                }
                this.drain(cx);
                let last = this.take_out();
                if last.is_none() {
                    this.store_in_cache();
                }
                return Poll::Ready(last.map(Ok));
            }
            match this.upstream.as_mut().poll_next(cx) {
                // Nothing more is ready upstream: send what this poll gathered.
                Poll::Pending => {
                    if let Some(fault) = this.upstream_fault(cx) {
                        this.fail_upstream(fault);
                        continue;
                    }
                    return match this.take_out() {
                        Some(b) => Poll::Ready(Some(Ok(b))),
                        None => Poll::Pending,
                    };
                }
                Poll::Ready(Some(Ok(bytes))) => {
                    if this.first_upstream_at.is_none() && this.post_processing.is_zero() {
                        this.first_upstream_at = Some(Instant::now());
                    }
                    this.parser.push(&bytes);
                    if this.relay_frames() && !this.adapter.state().terminated {
                        return Poll::Ready(this.take_out().map(Ok));
                    }
                    if this.parser.overflowed() && !this.adapter.state().terminated {
                        if let Some(fault) = this.upstream_fault(cx) {
                            this.fail_upstream(fault);
                            continue;
                        }
                    }
                    if this.adapter.state().terminated {
                        continue;
                    }
                    if this.allowance.is_some() {
                        this.enforce_limits(cx);
                        if this.done {
                            continue;
                        }
                    }
                    // Keep reading while the upstream has more ready (a burst of chunks
                    // becomes one write to the client instead of one per chunk); a real
                    // model's chunks arrive apart and still go out one by one, at once.
                    if this.out.len() >= COALESCE_LIMIT_BYTES {
                        if let Some(b) = this.take_out() {
                            return Poll::Ready(Some(Ok(b)));
                        }
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    let message = e.to_string();
                    this.adapter.on_error(&message, &mut this.out);
                    this.finish(Outcome::UpstreamError(message));
                }
                Poll::Ready(None) => {
                    if let Some(frame) = this.parser.finish() {
                        this.adapter.on_frame(frame, &mut this.out);
                    }
                    if this.adapter.state().terminated {
                        this.adapter.on_end(&mut this.out);
                        this.finish(Outcome::Completed);
                    } else {
                        let message = "upstream closed the stream before it was complete";
                        this.adapter.on_error(message, &mut this.out);
                        this.finish(Outcome::UpstreamError(message.to_string()));
                    }
                }
            }
        }
    }
}

impl Drop for RelayStream {
    fn drop(&mut self) {
        OPEN_STREAMS.fetch_sub(1, Ordering::Relaxed);
        self.finish(Outcome::ClientDisconnected);
    }
}

/// The stream's next chunk record.
fn chunk_record(
    stream: &Arc<StreamInfo>,
    next: &mut u64,
    offset: Duration,
    event: Bytes,
) -> ChunkRecord {
    let record = ChunkRecord {
        stream: stream.clone(),
        sequence: *next,
        offset,
        bytes: event.len() as u64,
        tokens: None,
        after_completion: false,
        data: event,
    };
    *next += 1;
    record
}

/// SSE events with a `data` field in `buf` (see [`for_each_data_event`]).
fn count_data_events(buf: &[u8]) -> u64 {
    let mut n = 0;
    for_each_data_event(buf, |_| n += 1);
    n
}

/// Calls `f(event)` for each SSE event in `buf` that carries a `data` field, with the
/// event's byte range (its blank line included). `buf` holds whole events as written for the
/// client; lines may end in LF, CRLF or CR (a same-dialect relay forwards the upstream's own
/// line endings). A last event without its blank line still counts.
fn for_each_data_event(buf: &[u8], mut f: impl FnMut(std::ops::Range<usize>)) {
    let is_data =
        |line: &[u8]| line.starts_with(b"data") && matches!(line.get(4), None | Some(b':'));
    let (mut event_start, mut line_start, mut has_data) = (0, 0, false);
    while let Some(off) = memchr::memchr2(b'\n', b'\r', &buf[line_start..]) {
        let end = line_start + off;
        let mut next = end + 1;
        if buf[end] == b'\r' && buf.get(next) == Some(&b'\n') {
            next += 1;
        }
        let line = &buf[line_start..end];
        if line.is_empty() {
            if has_data {
                f(event_start..next);
            }
            event_start = next;
            has_data = false;
        } else if is_data(line) {
            has_data = true;
        }
        line_start = next;
    }
    if (has_data || is_data(&buf[line_start..])) && event_start < buf.len() {
        f(event_start..buf.len());
    }
}

#[cfg(test)]
mod tests {
    use super::for_each_data_event;

    fn lengths(buf: &[u8]) -> Vec<u64> {
        let mut v = Vec::new();
        for_each_data_event(buf, |e| v.push(e.len() as u64));
        assert_eq!(super::count_data_events(buf), v.len() as u64);
        v
    }

    #[test]
    fn data_events_are_found_whatever_the_line_endings() {
        assert_eq!(lengths(b"data: {}\n\n"), vec![10]);
        assert_eq!(lengths(b"data: a\n\ndata: [DONE]\n\n"), vec![9, 14]);
        assert_eq!(lengths(b"event: ping\r\ndata: {}\r\n\r\n"), vec![25]);
        assert_eq!(lengths(b"data: a\r\rdata: b\r\r"), vec![9, 9]);
        assert_eq!(lengths(b"data: a\ndata: b\n\n"), vec![17]);
        assert_eq!(lengths(b"data\n\n"), vec![6]);
    }

    #[test]
    fn comments_and_other_fields_are_not_chunks() {
        assert_eq!(lengths(b": keep-alive\n\n"), Vec::<u64>::new());
        assert_eq!(lengths(b": ping\n\ndata: x\n\n"), vec![9]);
        assert_eq!(lengths(b"database: x\n\n"), Vec::<u64>::new());
        assert_eq!(lengths(b""), Vec::<u64>::new());
    }

    #[test]
    fn a_last_event_without_its_blank_line_counts() {
        assert_eq!(lengths(b"data: a\n\ndata: b"), vec![9, 7]);
        assert_eq!(lengths(b"data: a\n\ndata: b\n"), vec![9, 8]);
    }
}

#[cfg(test)]
mod relay_tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use std::sync::atomic::AtomicBool;
    use std::task::Waker;

    use futures_util::StreamExt;
    use parking_lot::Mutex;

    use super::*;
    use crate::api::WireFormat;
    use crate::auth::Caller;
    use crate::events::EventSink;
    use crate::relay::passthrough::OpenAiPassthrough;
    use crate::relay::{CompletionRecord, RequestRecord};

    /// The load signal (`OPEN_STREAMS`) is process-wide: tests that depend on it run one
    /// at a time.
    static LOAD: Mutex<()> = Mutex::new(());

    /// Remembers the order records arrive in.
    #[derive(Default)]
    struct Ordered(Mutex<Vec<String>>);

    impl EventSink for Ordered {
        fn record_request(&self, r: RequestRecord) {
            self.0.lock().push(format!("request {}", r.prompt_estimate));
        }
        fn record_chunk(&self, r: ChunkRecord) {
            self.0.lock().push(format!("chunk {}", r.sequence));
        }
        fn record_completion(&self, _: CompletionRecord) -> crate::events::Durable {
            self.0.lock().push("completion".to_string());
            crate::events::Durable::not_required()
        }
    }

    const BURST: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    );

    /// Keeps each completion's durability ticket for the test to resolve.
    struct Tickets {
        barrier: crate::events::durable::Barrier,
        pending: Mutex<Vec<crate::events::durable::DurableTx>>,
        chunks: Mutex<Vec<(u64, bool)>>,
    }

    impl EventSink for Tickets {
        fn record_request(&self, _: RequestRecord) {}
        fn record_chunk(&self, r: ChunkRecord) {
            self.chunks.lock().push((r.sequence, r.after_completion));
        }
        fn record_completion(&self, c: CompletionRecord) -> crate::events::Durable {
            assert_eq!(c.chunks, 4, "the held chunks are counted");
            let (tx, durable) = self.barrier.ticket().unwrap();
            self.pending.lock().push(tx);
            durable
        }
    }

    #[tokio::test]
    async fn the_terminal_event_waits_until_the_completion_is_durable() {
        let _load = LOAD.lock();
        let sink = Arc::new(Tickets {
            barrier: crate::events::durable::Barrier {
                policy: crate::events::DurabilityPolicy::Completion,
                timeout: Duration::from_secs(60),
                metrics: crate::events::durable::DurabilityMetrics::new().unwrap(),
            },
            pending: Mutex::default(),
            chunks: Mutex::default(),
        });
        // Under load (more streams than cores), so the whole burst is one write.
        let busy: Vec<_> = (0..light_load_streams())
            .map(|_| relay(Arc::default(), Arc::default()))
            .collect();
        let mut s = relay(Arc::default(), Arc::default());
        s.exchange.sink = sink.clone();
        // The burst ends in `[DONE]`: the completion is recorded, and nothing of the last
        // write leaves until the sink says it is durable.
        assert_eq!(poll(&mut s), Poll::Pending);
        assert_eq!(poll(&mut s), Poll::Pending);
        // Its chunks are not recorded while they wait: a crash now must not bill them.
        assert!(sink.chunks.lock().is_empty());
        let ticket = sink.pending.lock().pop().unwrap();
        ticket.done();
        assert_eq!(poll(&mut s), Poll::Ready(Some(BURST.to_string())));
        assert_eq!(
            *sink.chunks.lock(),
            [(0, true), (1, true), (2, true), (3, true)]
        );
        assert_eq!(poll(&mut s), Poll::Ready(None));
        drop((s, busy));
        assert!(sink.pending.lock().is_empty(), "one completion per stream");
    }

    fn relay(sink: Arc<Ordered>, counted: Arc<AtomicBool>) -> RelayStream {
        let now = Instant::now();
        let exchange = Exchange {
            request_id: "req_1".into(),
            caller: Caller::for_tests("t", "k"),
            route: "chat",
            client_format: WireFormat::OpenAi,
            model_label: "m".into(),
            requested_model: "m".into(),
            deployment: "d".into(),
            provider: "openai",
            upstream_model: "m".into(),
            stream: true,
            prompt_estimate: 0,
            received_at: now,
            upstream_sent_at: now,
            started_at: SystemTime::now(),
            metrics: Arc::new(crate::metrics::Metrics::new().unwrap()),
            sink,
            route_log: None,
            lease: None,
            access_log: crate::access_log::AccessLog::Off,
            cache_hit: None,
            max_reported_tokens: 10_000_000,
            audit: None,
        };
        let upstream: BodyStream = Box::pin(futures_util::stream::iter([Ok(Bytes::from_static(
            BURST.as_bytes(),
        ))]));
        RelayStream::new(upstream, Box::new(OpenAiPassthrough::new(false)), exchange)
            .with_request_record(SystemTime::now(), move || {
                counted.store(true, Ordering::SeqCst);
                42
            })
    }

    fn poll(s: &mut RelayStream) -> Poll<Option<String>> {
        let mut cx = Context::from_waker(Waker::noop());
        s.poll_next_unpin(&mut cx)
            .map(|o| o.map(|r| String::from_utf8(r.unwrap().to_vec()).unwrap()))
    }

    #[test]
    fn a_bursts_first_output_goes_out_alone_and_its_records_stay_in_order() {
        let _load = LOAD.lock();
        let (sink, counted) = (
            Arc::new(Ordered::default()),
            Arc::new(AtomicBool::new(false)),
        );
        let mut s = relay(sink.clone(), counted.clone());
        let first = BURST.split_inclusive("\n\n").next().unwrap();
        assert_eq!(poll(&mut s), Poll::Ready(Some(first.to_string())));
        // The prompt is counted, and the request recorded, only after the first output.
        assert!(!counted.load(Ordering::SeqCst));
        assert!(sink.0.lock().is_empty());
        assert_eq!(
            poll(&mut s),
            Poll::Pending,
            "yields so the server writes it"
        );
        assert_eq!(
            poll(&mut s),
            Poll::Ready(Some(BURST[first.len()..].to_string()))
        );
        assert!(counted.load(Ordering::SeqCst));
        assert_eq!(poll(&mut s), Poll::Ready(None));
        drop(s);
        let order = sink.0.lock().clone();
        assert_eq!(
            order,
            [
                "request 42",
                "chunk 0",
                // The rest of the burst ends the stream: it leaves (and is recorded) once the
                // completion is recorded.
                "completion",
                "chunk 1",
                "chunk 2",
                "chunk 3",
            ]
        );

        // Under load (more streams than cores) a burst stays one write.
        let busy: Vec<_> = (0..light_load_streams())
            .map(|_| relay(Arc::default(), Arc::default()))
            .collect();
        let sink = Arc::new(Ordered::default());
        let mut s = relay(sink.clone(), Arc::default());
        assert_eq!(poll(&mut s), Poll::Ready(Some(BURST.to_string())));
        assert_eq!(poll(&mut s), Poll::Ready(None));
        drop((s, busy));
        assert_eq!(
            sink.0.lock().first().map(String::as_str),
            Some("request 42")
        );
    }
}
