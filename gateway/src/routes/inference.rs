//! The path every chat request takes, whichever dialect the client speaks:
//! authenticate → read body (bounded) → validate → dispatch (the router picks deployments,
//! translates the request to each one's dialect, retries and falls back until a first byte
//! arrives) → relay (stream) or translate (non-stream).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;

use crate::api::{anthropic, openai, RequestBody, WireFormat};
use crate::app::AppState;
use crate::error::{ApiError, GatewayError, InFormat};
use crate::limits::{Estimate, StreamAllowance};
use crate::providers::{BodyStream, Endpoint, Forwarded};
use crate::relay::exchange::Routed;
use crate::relay::passthrough::{AnthropicPassthrough, OpenAiPassthrough};
use crate::relay::{Exchange, Outcome, RelayStream, StreamAdapter};
use crate::routing::{DispatchRequest, Pins, RouteLog, UpstreamBody};
use crate::translate::{self, stream::AnthropicToOpenAi, stream::OpenAiToAnthropic};
use crate::{tokens, translate::usage};

/// A validated client request in its own dialect: the JSON as sent (forwarded to a
/// same-dialect upstream) and its typed view.
pub enum ClientRequest {
    OpenAi(RequestBody, Box<openai::ChatRequest>),
    Anthropic(RequestBody, Box<anthropic::MessagesRequest>),
}

impl ClientRequest {
    fn parse(format: WireFormat, body: Bytes) -> Result<Self, GatewayError> {
        let no_messages =
            || GatewayError::bad_param("`messages` must contain at least one message.", "messages");
        Ok(match format {
            WireFormat::OpenAi => {
                let (raw, r) = RequestBody::parse::<openai::ChatRequest>(body)?;
                if r.messages.is_empty() {
                    return Err(no_messages());
                }
                ClientRequest::OpenAi(raw, Box::new(r))
            }
            WireFormat::Anthropic => {
                let (raw, r) = RequestBody::parse::<anthropic::MessagesRequest>(body)?;
                if r.messages.is_empty() {
                    return Err(no_messages());
                }
                ClientRequest::Anthropic(raw, Box::new(r))
            }
        })
    }

    fn format(&self) -> WireFormat {
        match self {
            ClientRequest::OpenAi(..) => WireFormat::OpenAi,
            ClientRequest::Anthropic(..) => WireFormat::Anthropic,
        }
    }

    fn model(&self) -> &str {
        match self {
            ClientRequest::OpenAi(_, r) => &r.model,
            ClientRequest::Anthropic(_, r) => &r.model,
        }
    }

    fn is_stream(&self) -> bool {
        match self {
            ClientRequest::OpenAi(_, r) => r.is_stream(),
            ClientRequest::Anthropic(_, r) => r.is_stream(),
        }
    }

    /// Output tokens the request may produce (its cap, else `default`, times `n`), and
    /// whether the request itself caps them.
    fn output_estimate(&self, default: u64) -> (u64, bool) {
        match self {
            ClientRequest::OpenAi(_, r) => (
                r.output_cap()
                    .map_or(default, u64::from)
                    .saturating_mul(u64::from(r.n.unwrap_or(1).max(1))),
                r.output_cap().is_some(),
            ),
            ClientRequest::Anthropic(_, r) => (u64::from(r.max_tokens), true),
        }
    }

    fn prompt_estimate(&self) -> u64 {
        match self {
            ClientRequest::OpenAi(_, r) => tokens::count_openai_prompt(r),
            ClientRequest::Anthropic(_, r) => tokens::count_anthropic_prompt(r),
        }
    }

    /// Output tokens to expect (the client's cap, else a typical reply), for cost routing
    /// and token limits.
    fn expected_output(&self) -> u64 {
        const TYPICAL_REPLY_TOKENS: u64 = 256;
        match self {
            ClientRequest::OpenAi(_, r) => r.output_cap().map_or(TYPICAL_REPLY_TOKENS, u64::from),
            ClientRequest::Anthropic(_, r) => u64::from(r.max_tokens),
        }
        .min(64 * 1024)
    }

    /// The body for `upstream` in its dialect, for `model`. A same-dialect body is the
    /// client's JSON as sent, with the model (and, for OpenAI streams, `include_usage`) set in
    /// place; the request keeps it, so a retry or fallback builds it again.
    fn body_for(&mut self, upstream: WireFormat, model: &str) -> Result<Bytes, GatewayError> {
        let model_json = serde_json::to_vec(model)
            .map_err(|e| GatewayError::Internal(format!("cannot serialize the model: {e}")))?;
        let translated = match (&*self, upstream) {
            (ClientRequest::OpenAi(raw, r), WireFormat::OpenAi) => {
                if !r.is_stream() {
                    return Ok(raw.with(&[("model", &model_json)]).into());
                }
                // Always ask for usage; the relay strips it if the client did not.
                let options = stream_options_with_usage(raw.get("stream_options"));
                return Ok(raw
                    .with(&[("model", &model_json), ("stream_options", &options)])
                    .into());
            }
            (ClientRequest::Anthropic(raw, _), WireFormat::Anthropic) => {
                return Ok(raw.with(&[("model", &model_json)]).into());
            }
            (ClientRequest::OpenAi(_, r), WireFormat::Anthropic) => {
                translate::request::openai_to_anthropic(r, model)?
            }
            (ClientRequest::Anthropic(_, r), WireFormat::OpenAi) => {
                translate::request::anthropic_to_openai(r, model)
            }
        };
        serde_json::to_vec(&translated)
            .map(Bytes::from)
            .map_err(|e| GatewayError::Internal(format!("cannot serialize upstream body: {e}")))
    }
}

/// Request bodies from this size on are parsed and their prompt counted on the blocking pool,
/// not on the serving thread, whose other streams would wait meanwhile (a megabyte of prompt
/// is ~200 ms of tokenizing; 16 KiB about 2 ms).
const OFF_THREAD_BYTES: usize = 16 * 1024;

/// A request on its way upstream: its body in each dialect, and its prompt counted once, the
/// first time something needs it.
struct Outbound {
    request: ClientRequest,
    prompt_tokens: Option<u64>,
}

impl Outbound {
    fn prompt_tokens(&mut self) -> u64 {
        let request = &self.request;
        *self
            .prompt_tokens
            .get_or_insert_with(|| request.prompt_estimate())
    }
}

impl UpstreamBody for Outbound {
    fn body_for(&mut self, upstream: WireFormat, model: &str) -> Result<Bytes, GatewayError> {
        self.request.body_for(upstream, model)
    }

    fn prompt_tokens(&mut self) -> u64 {
        Outbound::prompt_tokens(self)
    }
}

/// The client's `stream_options` (its other options kept) with `include_usage` on.
fn stream_options_with_usage(sent: Option<&[u8]>) -> Vec<u8> {
    const USAGE_ONLY: &[u8] = br#"{"include_usage":true}"#;
    let Some(mut options) =
        sent.and_then(|raw| serde_json::from_slice::<serde_json::Map<String, Value>>(raw).ok())
    else {
        return USAGE_ONLY.to_vec();
    };
    options.insert("include_usage".to_string(), Value::Bool(true));
    serde_json::to_vec(&options).unwrap_or_else(|_| USAGE_ONLY.to_vec())
}

/// Reads the request body, refusing more than `limit` bytes with a 413.
pub async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Bytes, GatewayError> {
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > limit {
            return Err(GatewayError::PayloadTooLarge { limit_bytes: limit });
        }
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            GatewayError::PayloadTooLarge { limit_bytes: limit }
        } else {
            GatewayError::bad_request(format!("Could not read the request body: {e}"))
        }
    })
}

/// Reads the body (bounded) and authenticates the caller. The body is read first so that an
/// error answer never leaves unread bytes on a keep-alive connection (which would make the
/// client's next request on it fail); a body over the limit is a 413 that closes the
/// connection.
pub async fn admit(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(crate::auth::Caller, Bytes), GatewayError> {
    let bytes = read_body(headers, body, state.config.server.max_body_bytes).await;
    let caller = state.auth.authenticate(headers).await;
    match (caller, bytes) {
        (_, Err(too_large_or_unreadable)) => Err(too_large_or_unreadable),
        (Err(auth), Ok(_)) => Err(auth),
        (Ok(caller), Ok(bytes)) => Ok((caller, bytes)),
    }
}

/// Collects a non-streaming upstream body, bounded.
pub async fn collect_upstream(mut body: BodyStream, limit: usize) -> Result<Bytes, GatewayError> {
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if buf.len() + chunk.len() > limit {
            return Err(GatewayError::UpstreamProtocol(format!(
                "response body over {limit} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

fn forwarded_headers(headers: &HeaderMap) -> Forwarded {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Forwarded {
        anthropic_version: get("anthropic-version"),
        anthropic_beta: get("anthropic-beta"),
    }
}

/// Serves one chat request (`route` is `chat` or `messages`).
pub async fn serve(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    format: WireFormat,
    route: &'static str,
) -> Result<Response, ApiError> {
    let result = serve_inner(&state, headers, body, format, route).await;
    if let Err(e) = &result {
        state
            .metrics
            .observe_error(route, e.label(), e.status().as_u16());
    }
    result.in_format(format)
}

async fn serve_inner(
    state: &Arc<AppState>,
    headers: HeaderMap,
    body: Body,
    format: WireFormat,
    route: &'static str,
) -> Result<Response, GatewayError> {
    let received_at = Instant::now();
    let _in_flight = state.metrics.in_flight(route);
    let (caller, bytes) = admit(state, &headers, body).await?;
    let (request, prompt_tokens) = if bytes.len() >= OFF_THREAD_BYTES {
        // Parsed and counted on the blocking pool: the serving thread's other streams go on.
        let (request, prompt_tokens) = tokio::task::spawn_blocking(move || {
            let request = ClientRequest::parse(format, bytes)?;
            let prompt_tokens = request.prompt_estimate();
            Ok::<_, GatewayError>((request, prompt_tokens))
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("the request's parsing failed: {e}")))??;
        (request, Some(prompt_tokens))
    } else {
        (ClientRequest::parse(format, bytes)?, None)
    };
    caller.ensure_model_allowed(request.model())?;
    let stream = request.is_stream();
    let requested_model = request.model().to_string();
    // Quotas: the request's worst case (prompt + output cap) is reserved against every limit
    // of its key and tenant before any provider is called; an unknown model is not counted.
    if !state.router.knows(&requested_model) {
        return Err(GatewayError::ModelNotFound(requested_model));
    }
    let expected_output_tokens = request.expected_output();
    let mut outbound = Outbound {
        request,
        prompt_tokens,
    };
    let admission = state
        .limiter
        .admit(&caller, &requested_model, || {
            let (max_output_tokens, output_capped) = outbound
                .request
                .output_estimate(state.config.limits.default_max_output_tokens);
            Estimate {
                prompt_tokens: outbound.prompt_tokens(),
                max_output_tokens,
                output_capped,
                models: state
                    .router
                    .candidate_models(&requested_model)
                    .unwrap_or_default(),
            }
        })
        .await?;
    let (reservation, rate_headers) = admission.map(|a| (a.reservation, a.headers)).unzip();
    let forwarded = forwarded_headers(&headers);
    let dispatch = DispatchRequest {
        model: &requested_model,
        tenant: std::sync::Arc::from(caller.tenant_id.as_str()),
        endpoint: Endpoint::Chat,
        forwarded: &forwarded,
        pins: pins(&headers),
        expected_output_tokens,
        high_priority: high_priority(&headers),
        stream,
    };
    let dispatched = match state.router.dispatch(&dispatch, &mut outbound).await {
        Ok(d) => d,
        Err(failure) => {
            // A request that reached no upstream is recorded against the last deployment
            // tried; one that never got that far (unknown model, bad pin) is not recorded.
            if let Some(target) = &failure.target {
                let routed = Routed {
                    route,
                    client_format: format,
                    target,
                    requested_model: &requested_model,
                    stream,
                    prompt_estimate: outbound.prompt_tokens(),
                    route_log: Some(failure.route),
                    lease: None,
                };
                let exchange = Exchange::begin(state, caller, routed, received_at);
                exchange.record_request();
                exchange.fail(&failure.error);
            }
            return Err(failure.error);
        }
    };
    let route_headers = RouteHeaders::of(&dispatched.route);
    let target = dispatched.target;
    let upstream = dispatched.upstream;
    let deployment = target.deployment.clone();
    let upstream_model = target.upstream_model.clone();
    let upstream_format = deployment.provider.format();
    let provider = deployment.provider.label();
    // A same-dialect stream counts its prompt (for the request record) once its first
    // output has gone to the client: nothing before that needs it.
    let defer_count =
        stream && outbound.request.format() == upstream_format && outbound.prompt_tokens.is_none();
    let routed = Routed {
        route,
        client_format: format,
        target: &target,
        requested_model: &requested_model,
        stream,
        // A deferred count sets the exchange's estimate when it records the request.
        prompt_estimate: if defer_count {
            0
        } else {
            outbound.prompt_tokens()
        },
        route_log: Some(dispatched.route),
        lease: Some(dispatched.lease),
    };
    let exchange = Exchange::begin(state, caller, routed, received_at);
    let routed_at = std::time::SystemTime::now();
    if !defer_count {
        exchange.record_request_at(routed_at);
    }

    // Taken now: a stream's exchange moves into its body.
    let id_headers = [
        ("x-request-id", HeaderValue::from_str(&exchange.request_id)),
        (
            "x-tollgate-deployment",
            HeaderValue::from_str(&exchange.deployment),
        ),
        ("x-tollgate-provider", HeaderValue::from_str(provider)),
        (
            "x-tollgate-route",
            HeaderValue::from_str(&route_headers.trace),
        ),
    ];
    let mut response = if stream {
        let prompt_estimate = exchange.prompt_estimate;
        let adapter: Box<dyn StreamAdapter> = match (&outbound.request, upstream_format) {
            (ClientRequest::OpenAi(_, r), WireFormat::OpenAi) => {
                Box::new(OpenAiPassthrough::new(r.wants_stream_usage()))
            }
            (ClientRequest::OpenAi(_, r), WireFormat::Anthropic) => Box::new(
                AnthropicToOpenAi::new(r.wants_stream_usage(), &upstream_model),
            ),
            (ClientRequest::Anthropic(..), WireFormat::Anthropic) => {
                Box::new(AnthropicPassthrough::new())
            }
            (ClientRequest::Anthropic(..), WireFormat::OpenAi) => {
                Box::new(OpenAiToAnthropic::new(&upstream_model, prompt_estimate))
            }
        };
        // OpenAI-style streams carry about one token per content event, Anthropic's a few.
        let tokens_per_event = match upstream_format {
            WireFormat::OpenAi => 1,
            WireFormat::Anthropic => 2,
        };
        let allowance = reservation.map(|r| {
            StreamAllowance::new(
                Some(r),
                tokens_per_event,
                state.config.limits.stream_increment_tokens,
            )
        });
        let mut body = RelayStream::new(upstream.body, adapter, exchange).with_allowance(allowance);
        if defer_count {
            body = body.with_request_record(routed_at, move || outbound.prompt_tokens());
        }
        let mut r = Response::new(Body::from_stream(body));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        r
    } else {
        let raw = match collect_upstream(upstream.body, state.config.server.max_upstream_body_bytes)
            .await
        {
            Ok(raw) => raw,
            Err(e) => {
                exchange.fail(&e);
                return Err(e);
            }
        };
        let done_at = Instant::now();
        let (body, usage, finish) = match non_stream_body(&outbound.request, upstream_format, raw) {
            Ok(x) => x,
            Err(e) => {
                exchange.fail(&e);
                return Err(e);
            }
        };
        if let Some(r) = reservation {
            r.settle(&usage);
        }
        // The body leaves only once its completion record is durable.
        exchange
            .finish(
                Outcome::Completed,
                usage,
                finish,
                0,
                Some(done_at),
                done_at.elapsed(),
            )
            .await;
        let mut r = Response::new(Body::from(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    };
    let h = response.headers_mut();
    if let Some(rate) = &rate_headers {
        rate.apply(h);
    }
    for (name, value) in id_headers {
        if let Ok(v) = value {
            h.insert(name, v);
        }
    }
    h.insert(
        "x-tollgate-attempts",
        HeaderValue::from(route_headers.attempts),
    );
    Ok(response)
}

/// Request header pinning a deployment by name.
pub const PIN_DEPLOYMENT_HEADER: &str = "x-tollgate-deployment";
/// Request header pinning a provider kind (`openai`, `anthropic`, `vllm`...).
pub const PIN_PROVIDER_HEADER: &str = "x-tollgate-provider";
/// Request header marking a request high priority (`high`): it is hedged.
pub const PRIORITY_HEADER: &str = "x-tollgate-priority";

fn pins(headers: &HeaderMap) -> Pins<'_> {
    let get = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    Pins {
        deployment: get(PIN_DEPLOYMENT_HEADER),
        provider: get(PIN_PROVIDER_HEADER),
    }
}

fn high_priority(headers: &HeaderMap) -> bool {
    headers
        .get(PRIORITY_HEADER)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"high"))
}

/// The route response headers, taken from the log before it moves into the exchange.
struct RouteHeaders {
    trace: String,
    attempts: usize,
}

impl RouteHeaders {
    fn of(route: &RouteLog) -> RouteHeaders {
        RouteHeaders {
            trace: route.trace(),
            attempts: route.attempts_sent(),
        }
    }
}

/// The client's body, the usage to bill, and the finish reason of a non-streaming response.
fn non_stream_body(
    request: &ClientRequest,
    upstream: WireFormat,
    raw: Bytes,
) -> Result<(Bytes, tollgate_schemas::TokenUsage, Option<String>), GatewayError> {
    let invalid = |e: serde_json::Error| {
        GatewayError::UpstreamProtocol(format!("unexpected response body: {e}"))
    };
    match (request, upstream) {
        (ClientRequest::OpenAi(..), WireFormat::OpenAi) => {
            let r: openai::ChatResponse = serde_json::from_slice(&raw).map_err(invalid)?;
            let u = r.usage.as_ref().map(usage::from_openai).unwrap_or_default();
            Ok((
                raw,
                u,
                r.choices.first().and_then(|c| c.finish_reason.clone()),
            ))
        }
        (ClientRequest::Anthropic(..), WireFormat::Anthropic) => {
            let r: anthropic::MessagesResponse = serde_json::from_slice(&raw).map_err(invalid)?;
            Ok((raw, usage::from_anthropic(&r.usage), r.stop_reason.clone()))
        }
        (ClientRequest::OpenAi(..), WireFormat::Anthropic) => {
            let r: anthropic::MessagesResponse = serde_json::from_slice(&raw).map_err(invalid)?;
            let out = translate::response::anthropic_to_openai(&r);
            let finish = out["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_string);
            Ok((
                Bytes::from(out.to_string()),
                usage::from_anthropic(&r.usage),
                finish,
            ))
        }
        (ClientRequest::Anthropic(..), WireFormat::OpenAi) => {
            let r: openai::ChatResponse = serde_json::from_slice(&raw).map_err(invalid)?;
            let out = translate::response::openai_to_anthropic(&r);
            let finish = out["stop_reason"].as_str().map(str::to_string);
            let u = r.usage.as_ref().map(usage::from_openai).unwrap_or_default();
            Ok((Bytes::from(out.to_string()), u, finish))
        }
    }
}
