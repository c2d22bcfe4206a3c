//! One request's context from routing to its end, and the records it produces for the event
//! sink: a [`RequestRecord`] once routed, a [`ChunkRecord`] per SSE data event relayed (built by
//! the relay stream) and a [`CompletionRecord`] at the end.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tollgate_schemas::{TokenUsage, UsageSource};

use super::StreamState;
use crate::access_log::{AccessLine, AccessLog};
use crate::api::WireFormat;
use crate::audit::{AuditCapture, AuditRecord, AuditResponse};
use crate::auth::Caller;
use crate::events::durable::Durable;
use crate::events::EventSink;
use crate::metrics::Metrics;
use crate::routing::{Lease, RouteLog};
use crate::tokens;
use crate::translate::usage::{self, Implausible};

/// How a request ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The upstream finished and the client received everything.
    Completed,
    /// The client went away first; the upstream call was cancelled.
    ClientDisconnected,
    /// The upstream failed (before or during the response).
    UpstreamError(String),
    /// A hard limit of the caller refused more tokens: the gateway cut the stream off.
    LimitExceeded(String),
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::ClientDisconnected => "client_disconnected",
            Outcome::UpstreamError(_) => "upstream_error",
            Outcome::LimitExceeded(_) => "limit_exceeded",
        }
    }
}

/// Context of one routed request, carried into the response body.
#[derive(Clone)]
pub struct Exchange {
    pub request_id: String,
    pub caller: Caller,
    /// `chat` or `messages` (bounded).
    pub route: &'static str,
    pub client_format: WireFormat,
    /// The alias pattern that matched (bounded: `openai/*`, never the free suffix).
    pub model_label: String,
    pub requested_model: String,
    pub deployment: String,
    pub provider: &'static str,
    pub upstream_model: String,
    pub stream: bool,
    /// Pre-flight prompt estimate (tiktoken).
    pub prompt_estimate: u64,
    pub received_at: Instant,
    /// When the upstream call was issued (gateway pre-processing ends here).
    pub upstream_sent_at: Instant,
    pub started_at: SystemTime,
    pub metrics: Arc<Metrics>,
    pub sink: Arc<dyn EventSink>,
    /// How the router got to the deployment (attempts, reasons); `None` for routes that pick
    /// directly.
    pub route_log: Option<Arc<RouteLog>>,
    /// The deployment's lease: in flight until the last clone of the exchange is gone, settled
    /// at the end.
    pub lease: Option<Arc<Lease>>,
    /// The level of the request's access-log line.
    pub access_log: AccessLog,
    /// Answered from the response cache.
    pub cache_hit: Option<CacheHit>,
    /// `server.max_reported_tokens`: an upstream report above it is not billed.
    pub max_reported_tokens: u64,
    /// The request body of an audited tenant's request (`[audit]`); `None`: not audited.
    pub audit: Option<Arc<AuditCapture>>,
}

/// A request answered from the response cache.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheHit {
    /// The original answer's usage: what the hit would have cost.
    pub saved: TokenUsage,
    /// The fraction of that cost the tenant is billed (`[cache] bill_hits`).
    pub fraction: rust_decimal::Decimal,
}

/// A request accepted and routed (before the upstream call).
#[derive(Debug, Clone)]
pub struct RequestRecord {
    pub request_id: String,
    pub tenant_id: String,
    pub key_id: String,
    pub route: &'static str,
    pub model_label: String,
    pub requested_model: String,
    pub deployment: String,
    pub provider: &'static str,
    pub upstream_model: String,
    pub stream: bool,
    pub prompt_estimate: u64,
    /// Wall-clock time the gateway received the request.
    pub received_at: SystemTime,
    /// Wall-clock time it was routed (the event time).
    pub routed_at: SystemTime,
}

/// What every chunk of one stream shares; built once per stream so that a chunk record costs
/// no allocation.
#[derive(Debug)]
pub struct StreamInfo {
    pub request_id: String,
    pub tenant_id: String,
    /// When the gateway received the request (chunk offsets count from here).
    pub received_at: Instant,
    /// The same moment on the wall clock.
    pub received_wall: SystemTime,
    /// The model name sent upstream (its tokenizer counts the chunks' tokens).
    pub upstream_model: String,
    /// The dialect the client receives the chunks in.
    pub client_format: WireFormat,
}

/// One SSE data event relayed to the client.
#[derive(Debug, Clone)]
pub struct ChunkRecord {
    pub stream: Arc<StreamInfo>,
    /// Position in the client's stream, from 0.
    pub sequence: u64,
    /// Time from the request's arrival to this chunk leaving the gateway.
    pub offset: Duration,
    /// Bytes of the SSE event as the client receives it.
    pub bytes: u64,
    /// Output tokens relayed so far, this chunk included (counted by the sink's writer
    /// thread, off the request path; `None` until then).
    pub tokens: Option<u64>,
    /// Recorded after the stream's completion (the burst held behind the durability
    /// barrier): the completion bills the stream, so its tokens are not counted.
    pub after_completion: bool,
    /// The SSE event as the client receives it (for counting its tokens).
    pub data: bytes::Bytes,
}

impl ChunkRecord {
    /// Wall-clock time the chunk was relayed.
    pub fn relayed_at(&self) -> SystemTime {
        self.stream.received_wall + self.offset
    }
}

/// The outcome of one request: what is billed and measured.
#[derive(Debug, Clone)]
pub struct CompletionRecord {
    pub request_id: String,
    pub tenant_id: String,
    pub key_id: String,
    pub route: &'static str,
    pub model_label: String,
    pub requested_model: String,
    pub deployment: String,
    pub provider: &'static str,
    pub upstream_model: String,
    pub stream: bool,
    pub outcome: Outcome,
    pub usage: TokenUsage,
    pub finish_reason: Option<String>,
    /// SSE data events relayed to the client (one chunk record each); 0 when not streamed.
    pub chunks: u64,
    pub time_to_first_token: Option<Duration>,
    pub duration: Duration,
    /// Time the gateway itself spent: before the upstream call, and turning the first upstream
    /// bytes into the first client bytes.
    pub gateway_overhead: Duration,
    pub started_at: SystemTime,
    /// Wall-clock time the request ended (the event time).
    pub ended_at: SystemTime,
    /// How the request was routed (retries, fallbacks, attempts, hedge loser).
    pub route_log: Option<Arc<RouteLog>>,
    /// Answered from the response cache (`None`: not a cache hit).
    pub cache_hit: Option<CacheHit>,
}

impl CompletionRecord {
    /// Wall-clock time the gateway received the request.
    pub fn received_at(&self) -> SystemTime {
        self.ended_at
            .checked_sub(self.duration)
            .unwrap_or(self.ended_at)
    }
}

/// A request answered from the cache, for [`Exchange::cached`].
pub struct CachedAnswer<'a> {
    pub route: &'static str,
    pub client_format: WireFormat,
    pub requested_model: &'a str,
    pub entry: &'a crate::cache::Entry,
    /// The fraction of the original answer's price the tenant is billed.
    pub fraction: rust_decimal::Decimal,
}

/// What a request was routed to, for [`Exchange::begin`].
pub struct Routed<'a> {
    pub route: &'static str,
    pub client_format: WireFormat,
    pub target: &'a crate::routing::Target<'a>,
    pub requested_model: &'a str,
    pub stream: bool,
    pub prompt_estimate: u64,
    /// The router's log and lease when it dispatched the request.
    pub route_log: Option<RouteLog>,
    pub lease: Option<Lease>,
}

impl Exchange {
    /// Starts the exchange of a routed request (`request_id` is the one its response
    /// carries); the upstream call is taken to start now.
    pub fn begin(
        state: &crate::app::AppState,
        request_id: &str,
        caller: Caller,
        routed: Routed<'_>,
        received_at: Instant,
    ) -> Exchange {
        let target = routed.target;
        let now = Instant::now();
        let upstream_sent_at = routed
            .route_log
            .as_ref()
            .and_then(|r| r.first_sent_at)
            .unwrap_or(now);
        Exchange {
            request_id: request_id.to_string(),
            caller,
            route: routed.route,
            client_format: routed.client_format,
            model_label: target.alias.name.clone(),
            requested_model: routed.requested_model.to_string(),
            deployment: target.deployment.name.clone(),
            provider: target.deployment.provider.label(),
            upstream_model: target.upstream_model.clone(),
            stream: routed.stream,
            prompt_estimate: routed.prompt_estimate,
            received_at,
            upstream_sent_at,
            started_at: SystemTime::now(),
            metrics: state.metrics.clone(),
            sink: state.sink.clone(),
            route_log: routed.route_log.map(Arc::new),
            lease: routed.lease.map(Arc::new),
            access_log: state.config.server.access_log,
            max_reported_tokens: state.config.server.max_reported_tokens,
            cache_hit: None,
            audit: None,
        }
    }

    /// Keeps the client's request body (`raw`, shared, not copied) for the audit trail when
    /// the caller's tenant is audited.
    pub fn audited(
        mut self,
        state: &crate::app::AppState,
        raw: &crate::api::body::RequestBody,
    ) -> Exchange {
        self.audit = state.audit.capture(&self.caller, raw.bytes());
        self
    }

    /// The exchange of a request answered from the cache with `entry` (no deployment was
    /// called: it names the one the original answer came from, provider `cache`).
    pub fn cached(
        state: &crate::app::AppState,
        request_id: &str,
        caller: Caller,
        hit: CachedAnswer<'_>,
        received_at: Instant,
    ) -> Exchange {
        let now = Instant::now();
        Exchange {
            request_id: request_id.to_string(),
            caller,
            route: hit.route,
            client_format: hit.client_format,
            model_label: hit.entry.model_label.clone(),
            requested_model: hit.requested_model.to_string(),
            deployment: hit.entry.deployment.clone(),
            provider: "cache",
            upstream_model: hit.entry.upstream_model.clone(),
            stream: hit.entry.stream,
            prompt_estimate: hit.entry.usage.input_tokens,
            received_at,
            upstream_sent_at: now,
            started_at: SystemTime::now(),
            metrics: state.metrics.clone(),
            sink: state.sink.clone(),
            route_log: None,
            lease: None,
            access_log: state.config.server.access_log,
            max_reported_tokens: state.config.server.max_reported_tokens,
            cache_hit: Some(CacheHit {
                saved: hit.entry.usage,
                fraction: hit.fraction,
            }),
            audit: None,
        }
    }

    /// Records a failure before any response was sent (the client gets `error`), with the
    /// usage known to be spent (none, or the prompt of a request the client gave up on).
    pub fn fail(&self, error: &crate::error::GatewayError) -> Durable {
        self.end(
            Outcome::UpstreamError(error.to_string()),
            TokenUsage::default(),
            None,
            0,
            None,
            Duration::ZERO,
            error.status().as_u16(),
            || AuditResponse::None,
        )
    }

    /// Wall-clock time the request arrived (derived from the monotonic clock's `received_at`).
    pub fn received_wall(&self) -> SystemTime {
        let now = SystemTime::now();
        now.checked_sub(self.received_at.elapsed()).unwrap_or(now)
    }

    /// What every chunk record of this request's stream shares.
    pub fn stream_info(&self) -> Arc<StreamInfo> {
        Arc::new(StreamInfo {
            request_id: self.request_id.clone(),
            tenant_id: self.caller.tenant_id.clone(),
            received_at: self.received_at,
            received_wall: self.received_wall(),
            upstream_model: self.upstream_model.clone(),
            client_format: self.client_format,
        })
    }

    /// Hands the request event to the sink: call once, right after routing.
    pub fn record_request(&self) {
        self.record_request_at(SystemTime::now());
    }

    /// Hands the request event, routed at `routed_at`, to the sink (once per request).
    pub fn record_request_at(&self, routed_at: SystemTime) {
        self.sink.record_request(RequestRecord {
            request_id: self.request_id.clone(),
            tenant_id: self.caller.tenant_id.clone(),
            key_id: self.caller.key_id.clone(),
            route: self.route,
            model_label: self.model_label.clone(),
            requested_model: self.requested_model.clone(),
            deployment: self.deployment.clone(),
            provider: self.provider,
            upstream_model: self.upstream_model.clone(),
            stream: self.stream,
            prompt_estimate: self.prompt_estimate,
            received_at: routed_at
                .checked_sub(self.received_at.elapsed())
                .unwrap_or(routed_at),
            routed_at,
        });
    }

    /// Usage to bill: the provider's final figures when it sent them, otherwise what it sent
    /// completed by counting (prompt estimate, tokens of the text relayed so far). A report
    /// that does not add up or is over `max_reported_tokens` is not used at all: the
    /// gateway's own count is billed (see [`Exchange::vet_usage`]).
    pub fn settle_usage(
        &self,
        state: &StreamState,
        output_text: impl FnOnce() -> String,
    ) -> TokenUsage {
        let checked = match state.usage_rejected {
            Some(why) => Err(why),
            None => state.usage.map_or(Ok(None), |u| {
                usage::within(u, self.max_reported_tokens).map(Some)
            }),
        };
        match (checked, state.usage_final) {
            (Err(why), _) => {
                self.reject_usage(why);
                self.counted_usage(None, output_text)
            }
            (Ok(Some(u)), true) => u,
            (Ok(partial), _) => self.counted_usage(partial, output_text),
        }
    }

    /// Usage to bill from a whole response's report (`reported`): believed when it adds up
    /// and is within `max_reported_tokens`, else the gateway's count (prompt estimate,
    /// tokens of `output_text`), marked counted.
    pub fn vet_usage(
        &self,
        reported: Result<TokenUsage, Implausible>,
        output_text: impl FnOnce() -> String,
    ) -> TokenUsage {
        match reported.and_then(|u| usage::within(u, self.max_reported_tokens)) {
            Ok(u) => u,
            Err(why) => {
                self.reject_usage(why);
                self.counted_usage(None, output_text)
            }
        }
    }

    /// What the upstream reported (`partial`), completed by counting: the prompt estimate
    /// for a missing input count, tokens of the output text for the output.
    fn counted_usage(
        &self,
        partial: Option<TokenUsage>,
        output_text: impl FnOnce() -> String,
    ) -> TokenUsage {
        let counted_output = tokens::count_text(&self.upstream_model, &output_text());
        let base = partial.unwrap_or_default();
        TokenUsage {
            input_tokens: if base.input_tokens > 0 {
                base.input_tokens
            } else {
                self.prompt_estimate
            },
            output_tokens: base.output_tokens.max(counted_output),
            source: UsageSource::Counted,
            ..base
        }
    }

    /// Counts (and, rate-limited, logs) an upstream usage report that is not billed.
    fn reject_usage(&self, why: Implausible) {
        self.metrics.usage_rejected(
            self.provider,
            why.label(),
            &self.deployment,
            &self.request_id,
        );
    }

    /// Records the completion: metrics and the event sink. Called exactly once per request.
    /// The returned ticket resolves once the record is durable: the response's terminal
    /// bytes wait for it (see `crate::events::durable`). `response` (what the client
    /// received) is called only for an audited request.
    #[must_use = "the response's terminal event must wait for the completion to be durable"]
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &self,
        outcome: Outcome,
        usage: TokenUsage,
        finish_reason: Option<String>,
        chunks: u64,
        first_output_at: Option<Instant>,
        post_processing: Duration,
        response: impl FnOnce() -> AuditResponse,
    ) -> Durable {
        let status = match outcome {
            // Nobody received an answer.
            Outcome::ClientDisconnected => 499,
            _ => 200,
        };
        self.end(
            outcome,
            usage,
            finish_reason,
            chunks,
            first_output_at,
            post_processing,
            status,
            response,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn end(
        &self,
        outcome: Outcome,
        usage: TokenUsage,
        finish_reason: Option<String>,
        chunks: u64,
        first_output_at: Option<Instant>,
        post_processing: Duration,
        status: u16,
        response: impl FnOnce() -> AuditResponse,
    ) -> Durable {
        let trace = self.route_log.as_ref().map(|r| r.trace());
        AccessLine {
            request_id: &self.request_id,
            route: self.route,
            tenant: Some(&self.caller.tenant_id),
            key_id: Some(&self.caller.key_id),
            model: Some(&self.requested_model),
            deployment: Some(&self.deployment),
            status,
            outcome: outcome.label(),
            ttft: first_output_at.map(|t| t.duration_since(self.received_at)),
            duration: self.received_at.elapsed(),
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
            route_trace: trace.as_deref(),
            error: match &outcome {
                Outcome::UpstreamError(e) | Outcome::LimitExceeded(e) => Some(e),
                _ => None,
            },
        }
        .write(self.access_log);
        if let Some(lease) = &self.lease {
            let failed_midstream = matches!(outcome, Outcome::UpstreamError(_)) && chunks > 0;
            lease.settle(&usage, failed_midstream);
        }
        let now = Instant::now();
        let record = CompletionRecord {
            request_id: self.request_id.clone(),
            tenant_id: self.caller.tenant_id.clone(),
            key_id: self.caller.key_id.clone(),
            route: self.route,
            model_label: self.model_label.clone(),
            requested_model: self.requested_model.clone(),
            deployment: self.deployment.clone(),
            provider: self.provider,
            upstream_model: self.upstream_model.clone(),
            stream: self.stream,
            outcome,
            usage,
            finish_reason,
            chunks,
            time_to_first_token: first_output_at.map(|t| t.duration_since(self.received_at)),
            duration: now.duration_since(self.received_at),
            gateway_overhead: self.upstream_sent_at.duration_since(self.received_at)
                + post_processing,
            started_at: self.started_at,
            ended_at: SystemTime::now(),
            route_log: self.route_log.clone(),
            cache_hit: self.cache_hit,
        };
        self.metrics.observe_completion(&record);
        if let Some(capture) = &self.audit {
            // Handed over, not waited for: redacted, capped and serialized by the writer.
            self.sink.record_audit(AuditRecord {
                completion: record.clone(),
                capture: capture.clone(),
                response: response(),
            });
        }
        self.sink.record_completion(record)
    }
}
