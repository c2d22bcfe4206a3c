//! Protocol-faithful mock upstreams: one HTTP server that answers like the OpenAI API
//! (`POST /v1/chat/completions`, `POST /v1/embeddings`, `GET /v1/models`) and like the
//! Anthropic Messages API (`POST /v1/messages`), byte for byte where it matters, warts
//! included. The gateway's end-to-end tests and benchmarks point deployments at it.
//!
//! The `model` of a request picks a [`Scenario`] (normal replies, cached usage, tool calls,
//! split SSE frames, errors before and during the stream, hangs, slow and dropped streams).
//! Every request is recorded ([`MockUpstream::requests`]); every stream the client abandoned
//! is recorded with the instant the mock noticed ([`MockUpstream::cancelled_streams`]).
//!
//! | file | owns |
//! | --- | --- |
//! | `server.rs` | accept loop (TCP_NODELAY), routing, recording, response helpers |
//! | `openai.rs` | OpenAI wire format: chunks, usage, errors, embeddings, models |
//! | `anthropic.rs` | Anthropic wire format: events, usage, errors |
//! | `sse.rs` | SSE framing, pacing, the `split-frames` mangling, the hostile streams |
//! | `body.rs` | the scripted response body and cancellation detection |
//! | `scenario.rs` | model name → behaviour |
//! | `faults.rs` | injected faults per server: latency, error statuses, 429s, resets, hangs, drops |
//! | `text.rs` | reply text, tool arguments, token counting rules |
//! | `ids.rs` | realistic ids and timestamps |

mod anthropic;
mod body;
pub mod faults;
mod ids;
mod openai;
mod scenario;
mod server;
mod sse;
mod text;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use anthropic::SPLIT_EXTRA_INPUT_TOKENS;
pub use faults::{Fault, Faults, RateLimitHeaders};
pub use openai::EMBEDDING_DIMENSIONS;
pub use scenario::Scenario;
pub use sse::SPLIT_PIECE_DELAY;
pub use text::{
    embedding_tokens_for, prompt_tokens_for, reply_piece, reply_text, tool_output_tokens,
    TOOL_CALL_ARGUMENTS,
};

/// Minimum pause between chunks in the `slow` scenario.
pub const SLOW_MIN_CHUNK_DELAY: Duration = Duration::from_millis(50);

/// Number of content chunks sent before the failure in `error-midstream`, `drop-midstream`
/// and `stall-midstream`.
pub const CHUNKS_BEFORE_FAILURE: usize = 3;

/// Bytes of the unterminated data line the `huge-line` scenario sends (past the gateway's
/// default 8 MiB bound on one event).
pub const HUGE_LINE_BYTES: usize = 9 * 1024 * 1024;

/// Pause between the keep-alive comments of the `keepalive-only` scenario.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(50);

/// Bytes of output (all `x`) the `giant-no-space` scenario streams.
pub const GIANT_REPLY_BYTES: usize = 5_000_000;

/// The `prompt_tokens` the `huge-usage` scenario reports.
pub const HUGE_PROMPT_TOKENS: u64 = u64::MAX;

/// An API key containing this marker is rejected with the provider's 401
/// (OpenAI `invalid_api_key`, Anthropic `authentication_error`).
pub const INVALID_KEY_MARKER: &str = "invalid";

/// Timing and size of generated replies, for every request the server answers.
#[derive(Clone, Debug)]
pub struct MockOptions {
    /// Content chunks in a text reply (before any `max_tokens` truncation). Default 20.
    pub chunks: usize,
    /// Pause before each content chunk after the first. Default 0.
    pub chunk_delay: Duration,
    /// Pause before the first byte of the response body. Default 0.
    pub first_chunk_delay: Duration,
}

impl Default for MockOptions {
    fn default() -> MockOptions {
        MockOptions {
            chunks: 20,
            chunk_delay: Duration::ZERO,
            first_chunk_delay: Duration::ZERO,
        }
    }
}

/// Whether the server keeps the requests it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recording {
    /// Keep every request for [`MockUpstream::requests`] (what tests want).
    All,
    /// Only count them: a benchmark sends millions and memory must stay flat.
    CountOnly,
}

/// A request the mock received.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// Request path, without the query string (e.g. `/v1/chat/completions`).
    pub path: String,
    /// Every header, name lower-cased, value as (lossy) UTF-8, in the order received.
    pub headers: Vec<(String, String)>,
    /// The parsed JSON body; `Value::Null` when the body was empty or not JSON.
    pub body: serde_json::Value,
    /// When the mock had read the whole request.
    pub received_at: Instant,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A response the client abandoned before it was complete.
#[derive(Clone, Debug)]
pub struct CancelledStream {
    /// Request path (`/v1/chat/completions` or `/v1/messages`).
    pub path: String,
    /// The request's `model`.
    pub model: String,
    /// Content chunks (text deltas, tool-argument fragments) handed to the connection
    /// before the client went away.
    pub chunks_sent: usize,
    /// When the mock noticed the client was gone (write failure or EOF on the connection).
    pub noticed_at: Instant,
}

/// State shared by the server's connections and the [`MockUpstream`] handle.
pub(crate) struct Shared {
    pub(crate) opts: MockOptions,
    recording: Recording,
    requests: Mutex<Vec<RecordedRequest>>,
    request_count: AtomicUsize,
    pub(crate) cancelled: Mutex<Vec<CancelledStream>>,
    pub(crate) prerendered: openai::Prerendered,
    pub(crate) anthropic_prerendered: anthropic::Prerendered,
    faults: Mutex<Faults>,
    /// Chat requests seen by the fault injector (spreads ratio faults).
    faultable: AtomicU64,
}

impl Shared {
    fn new(opts: MockOptions, recording: Recording) -> Shared {
        Shared {
            recording,
            prerendered: openai::Prerendered::new(opts.chunks),
            anthropic_prerendered: anthropic::Prerendered::new(opts.chunks),
            opts,
            requests: Mutex::new(Vec::new()),
            request_count: AtomicUsize::new(0),
            cancelled: Mutex::new(Vec::new()),
            faults: Mutex::new(Faults::default()),
            faultable: AtomicU64::new(0),
        }
    }

    /// The latency, fault and success headers for the next chat request.
    pub(crate) fn next_fault(&self) -> (Duration, Option<Fault>, Option<RateLimitHeaders>) {
        let n = self.faultable.fetch_add(1, Ordering::Relaxed);
        let mut f = self.faults.lock();
        let fault = f.take(n);
        (f.latency, fault, f.rate_limit_headers)
    }

    pub(crate) fn record(&self, request: impl FnOnce() -> RecordedRequest) {
        self.request_count.fetch_add(1, Ordering::Relaxed);
        if self.recording == Recording::All {
            self.requests.lock().push(request());
        }
    }
}

/// A running mock upstream server. Dropping it stops the server and every open connection.
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl MockUpstream {
    /// Starts on `127.0.0.1:0` in the current tokio runtime; returns once listening.
    pub async fn start(opts: MockOptions) -> std::io::Result<MockUpstream> {
        MockUpstream::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), opts, Recording::All).await
    }

    /// Starts on `addr` in the current tokio runtime; returns once listening.
    pub async fn start_on(
        addr: SocketAddr,
        opts: MockOptions,
        recording: Recording,
    ) -> std::io::Result<MockUpstream> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(opts, recording));
        let task = tokio::spawn(server::accept_loop(listener, Arc::clone(&shared)));
        Ok(MockUpstream { addr, shared, task })
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash, no `/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received, in order (empty with [`Recording::CountOnly`]).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().clone()
    }

    /// How many requests were received.
    pub fn request_count(&self) -> usize {
        self.shared.request_count.load(Ordering::Relaxed)
    }

    /// Responses whose client went away before they finished, in the order noticed.
    pub fn cancelled_streams(&self) -> Vec<CancelledStream> {
        self.shared.cancelled.lock().clone()
    }

    /// Replaces the fault settings (from the next request on).
    pub fn set_faults(&self, faults: Faults) {
        *self.shared.faults.lock() = faults;
    }

    /// Queues a one-shot fault for the next request that has none queued before it.
    pub fn push_fault(&self, fault: Fault) {
        self.shared.faults.lock().next.push_back(fault);
    }

    /// The options the server was started with.
    pub fn options(&self) -> &MockOptions {
        &self.shared.opts
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every connection task.
        self.task.abort();
    }
}
