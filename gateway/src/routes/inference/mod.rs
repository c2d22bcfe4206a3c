//! The one path of every inference request — chat completions, messages and embeddings, in
//! either dialect — as named steps:
//!
//! ```text
//! authenticate ─▶ parse ─▶ admit ─▶ cache? ─▶ route ─▶ respond
//!  (key from the   (the     (model    (an exact   (the router: deployments,   (relay a stream, or
//!   headers, then   API's    allowed,  hit is      retries, fallbacks until   translate a whole body;
//!   body: bounded   JSON)    limits)   replayed)   a first byte arrives)      the completion record)
//!   in size, time)
//! ```
//!
//! Every response, error or not, carries `x-request-id` (the `request_id` layer) and
//! `x-tollgate-route` (`deployment:outcome` per attempt, `none` when the request was refused
//! before routing). A request that reached the router leaves one request record and exactly
//! one completion record, whichever way it ends (see `respond.rs`), and one access-log line
//! (`crate::access_log`). Errors reach the tenant in its API's shape; what went wrong
//! upstream stays in the log and the completion record, the tenant reads which model failed
//! and the request id ([`GatewayError::for_tenant`]).

mod dialects;
mod request;
mod respond;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use tracing::Instrument;

pub use request::Api;
use request::{ClientRequest, Outbound};

use super::request_id::RequestId;
use crate::access_log::AccessLine;
use crate::app::AppState;
use crate::auth::Caller;
use crate::cache::{CachePlan, ResponseCache};
use crate::error::GatewayError;
use crate::limits::{Admission, Estimate};
use crate::providers::{BodyStream, Forwarded};
use crate::relay::exchange::Routed;
use crate::relay::Exchange;
use crate::routing::{DispatchRequest, Dispatched, Pins};
use crate::telemetry;

/// Request bodies from this size on are parsed and their prompt counted on the blocking pool,
/// not on the serving thread, whose other streams would wait meanwhile (a megabyte of prompt
/// is ~200 ms of tokenizing; 16 KiB about 2 ms).
const OFF_THREAD_BYTES: usize = 16 * 1024;

/// Response header: `deployment:outcome` per attempt.
pub const ROUTE_HEADER: &str = "x-tollgate-route";
/// Request header pinning a deployment by name.
pub const PIN_DEPLOYMENT_HEADER: &str = "x-tollgate-deployment";
/// Request header pinning a provider kind (`openai`, `anthropic`, `vllm`...).
pub const PIN_PROVIDER_HEADER: &str = "x-tollgate-provider";
/// Request header marking a request high priority (`high`): it is hedged.
pub const PRIORITY_HEADER: &str = "x-tollgate-priority";

/// What the path knows of a request so far: what its error response and its log line say.
struct Progress {
    api: Api,
    request_id: RequestId,
    received_at: Instant,
    caller: Option<Caller>,
    model: Option<String>,
    /// `x-tollgate-route`, once the router has tried something.
    route_trace: Option<String>,
    /// The request's completion record (and so its access-log line) is written.
    recorded: bool,
    /// What the response cache did (`x-tollgate-cache`); `None` when it is off.
    cache: Option<crate::cache::Outcome>,
    /// The request was refused with (part of) its body unread: its connection cannot carry
    /// another request.
    body_unread: bool,
}

/// Serves one inference request of `api`.
pub async fn serve(state: Arc<AppState>, request: axum::extract::Request, api: Api) -> Response {
    // The request is taken whole: a `HeaderMap` extractor would copy the headers.
    let (parts, body) = request.into_parts();
    let mut progress = Progress {
        api,
        request_id: RequestId::of(&parts.extensions),
        received_at: Instant::now(),
        caller: None,
        model: None,
        route_trace: None,
        recorded: false,
        cache: None,
        body_unread: false,
    };
    let span = telemetry::request_span(api, &progress.request_id.0, &parts.headers);
    let _in_flight = state.metrics.in_flight(api.route());
    let response = match run(&state, &mut progress, parts.headers, body)
        .instrument(span.clone())
        .await
    {
        Ok(response) => response,
        Err(e) => error_response(&state, &progress, e),
    };
    telemetry::record_request(
        &span,
        progress.caller.as_ref().map(|c| c.tenant_id.as_str()),
        progress.model.as_deref(),
        response.status().as_u16(),
        progress.route_trace.as_deref(),
    );
    response
}

async fn run(
    state: &Arc<AppState>,
    progress: &mut Progress,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let (caller, bytes) = authenticate(state, progress, &headers, body)
        .instrument(telemetry::span!("authenticate"))
        .await?;
    progress.caller = Some(caller.clone());
    let mut outbound = parse(progress.api, bytes)
        .instrument(telemetry::span!("parse"))
        .await?;
    progress.model = Some(outbound.request.model().to_string());
    let admission = admit(state, &caller, &mut outbound)
        .instrument(telemetry::span!("admit"))
        .await?;
    if let Some(privacy) = &state.privacy {
        let alias = state.router.pii_policy(outbound.request.model());
        outbound.privacy = privacy.for_request(&caller.tenant_id, &caller.tenant_name, alias);
    }
    let cache = cache_step(state, progress, &caller, &headers, &outbound);
    if let Some((cache, plan)) = &cache {
        if let Some(entry) = cache.lookup(plan).await {
            progress.cache = Some(crate::cache::Outcome::Hit);
            progress.route_trace = Some("cache:hit".to_string());
            progress.recorded = true;
            let bill_hits = plan.bill_hits;
            return respond::cached(
                state, progress, caller, &outbound, entry, bill_hits, admission,
            )
            .await;
        }
    }
    let dispatched = route(state, progress, &caller, &headers, &mut outbound)
        .instrument(telemetry::span!("route"))
        .await?;
    progress.route_trace = Some(dispatched.route.trace());
    progress.recorded = true;
    respond::respond(
        state, progress, caller, outbound, dispatched, admission, cache,
    )
    .await
}

/// The response cache's part, when it is on: what it does for this request (`None`: it
/// stays out, and `progress` says why).
fn cache_step(
    state: &AppState,
    progress: &mut Progress,
    caller: &Caller,
    headers: &HeaderMap,
    outbound: &Outbound,
) -> Option<(Arc<ResponseCache>, CachePlan)> {
    let cache = state.cache.as_ref()?;
    let request = &outbound.request;
    let planned = cache.plan(
        headers,
        &caller.tenant_id,
        progress.api.route(),
        request.model(),
        state.router.cache_settings(request.model()),
        request.raw().as_bytes(),
    );
    match planned {
        Ok(plan) => {
            progress.cache = Some(if plan.read {
                crate::cache::Outcome::Miss
            } else {
                crate::cache::Outcome::Refresh
            });
            Some((cache.clone(), plan))
        }
        Err(outcome) => {
            progress.cache = Some(outcome);
            None
        }
    }
}

/// Authenticates the caller from the headers, then reads the body (bounded in size and, by
/// the server, in time: `server.body_read_timeout_ms`). A request without a valid key is
/// refused before any of its body is read, so that an unknown client cannot make the gateway
/// hold its bytes or wait for them; the refusal closes the connection when a body was coming
/// (its unread bytes would otherwise be taken for the next request). A body over the limit is
/// a 413, and one that does not arrive in time a 408, both closing the connection.
async fn authenticate(
    state: &AppState,
    progress: &mut Progress,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Caller, Bytes), GatewayError> {
    let caller = match state.auth.authenticate(headers).await {
        Ok(caller) => caller,
        Err(refused) => {
            progress.body_unread = !axum::body::HttpBody::is_end_stream(&body);
            return Err(refused);
        }
    };
    let bytes = read_body(headers, body, state.config.server.max_body_bytes).await?;
    Ok((caller, bytes))
}

/// Validates the body as `api`'s request; a large one is parsed, and its prompt counted, on
/// the blocking pool.
async fn parse(api: Api, bytes: Bytes) -> Result<Outbound, GatewayError> {
    if bytes.len() < OFF_THREAD_BYTES {
        return Ok(Outbound {
            request: ClientRequest::parse(api, bytes)?,
            prompt_tokens: None,
            privacy: None,
        });
    }
    // Parsed and counted on the blocking pool: the serving thread's other streams go on.
    tokio::task::spawn_blocking(move || {
        let request = ClientRequest::parse(api, bytes)?;
        let prompt_tokens = request.prompt_estimate();
        Ok::<_, GatewayError>(Outbound {
            request,
            prompt_tokens: Some(prompt_tokens),
            privacy: None,
        })
    })
    .await
    .map_err(|e| GatewayError::Internal(format!("the request's parsing failed: {e}")))?
}

/// The key may use the model, the model exists, and the request's worst case (prompt +
/// output cap) is reserved against every limit of its key and tenant before any provider is
/// called (an unknown model is not counted).
async fn admit(
    state: &AppState,
    caller: &Caller,
    outbound: &mut Outbound,
) -> Result<Option<Admission>, GatewayError> {
    let model = outbound.request.model().to_string();
    caller.ensure_model_allowed(&model)?;
    if !state.router.knows(&model) {
        return Err(GatewayError::ModelNotFound(model));
    }
    state
        .limiter
        .admit(caller, &model, || {
            let (max_output_tokens, output_capped) = outbound
                .request
                .output_estimate(state.config.limits.default_max_output_tokens);
            Estimate {
                prompt_tokens: outbound.prompt_tokens(),
                max_output_tokens,
                output_capped,
                models: state.router.candidate_models(&model).unwrap_or_default(),
            }
        })
        .await
}

/// Dispatches the request (see `crate::routing`). A request no deployment served is
/// recorded against the last deployment tried, request and completion; one that never got
/// that far (a pin that matches nothing) is not recorded.
async fn route<'s>(
    state: &'s AppState,
    progress: &mut Progress,
    caller: &Caller,
    headers: &HeaderMap,
    outbound: &mut Outbound,
) -> Result<Dispatched<'s>, GatewayError> {
    let model = outbound.request.model().to_string();
    let forwarded = forwarded_headers(headers);
    let dispatch = DispatchRequest {
        model: &model,
        tenant: Arc::from(caller.tenant_id.as_str()),
        endpoint: progress.api.endpoint(),
        forwarded: &forwarded,
        pins: pins(headers),
        expected_output_tokens: outbound.request.expected_output(),
        high_priority: high_priority(headers),
        stream: outbound.request.is_stream(),
    };
    match state.router.dispatch(&dispatch, outbound).await {
        Ok(d) => Ok(d),
        Err(failure) => {
            progress.route_trace = Some(failure.route.trace());
            if let Some(target) = &failure.target {
                let routed = Routed {
                    route: progress.api.route(),
                    client_format: progress.api.format(),
                    target,
                    requested_model: &model,
                    stream: dispatch.stream,
                    prompt_estimate: outbound.prompt_tokens(),
                    route_log: Some(failure.route),
                    lease: None,
                };
                let exchange = Exchange::begin(
                    state,
                    &progress.request_id.0,
                    caller.clone(),
                    routed,
                    progress.received_at,
                )
                .audited(state, outbound.request.raw());
                exchange.record_request();
                // Nothing was sent: no need to wait for the record to be durable.
                drop(exchange.fail(&failure.error));
                progress.recorded = true;
            }
            Err(failure.error)
        }
    }
}

/// The error response: in the client's API shape, clean of upstream details, with the
/// request id and the route; logged (once) and counted.
fn error_response(state: &AppState, progress: &Progress, error: GatewayError) -> Response {
    let api = progress.api;
    state
        .metrics
        .observe_error(api.route(), error.label(), error.status().as_u16());
    let model = progress.model.as_deref();
    if !progress.recorded {
        let detail = error.to_string();
        AccessLine {
            request_id: &progress.request_id.0,
            route: api.route(),
            tenant: progress.caller.as_ref().map(|c| c.tenant_id.as_str()),
            key_id: progress.caller.as_ref().map(|c| c.key_id.as_str()),
            model,
            status: error.status().as_u16(),
            outcome: error.label(),
            duration: progress.received_at.elapsed(),
            route_trace: progress.route_trace.as_deref(),
            error: Some(&detail),
            ..AccessLine::default()
        }
        .write(state.config.server.access_log);
    }
    let public = error.for_tenant(model.unwrap_or("?"), &progress.request_id.0);
    let mut response = public.into_response_for(api.format());
    let trace = progress
        .route_trace
        .as_deref()
        .filter(|t| !t.is_empty())
        .unwrap_or("none");
    if let Ok(v) = HeaderValue::from_str(trace) {
        response.headers_mut().insert(ROUTE_HEADER, v);
    }
    if progress.body_unread {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Reads the request body, refusing more than `limit` bytes with a 413, and a body that did
/// not arrive within the server's `body_read_timeout_ms` with a 408.
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
        if let Some(timeout) = crate::server::requests::BodyReadTimeout::find(&e) {
            return GatewayError::RequestTimeout {
                limit_ms: timeout.limit_ms,
            };
        }
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            GatewayError::PayloadTooLarge { limit_bytes: limit }
        } else {
            GatewayError::bad_request(format!("Could not read the request body: {e}"))
        }
    })
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
        ..Forwarded::default()
    }
}

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

/// The fuzz tests' entry point (`crate::fuzz_targets`): parses `body` as `api`'s request (0:
/// chat completions, 1: messages, 2: embeddings) and, when it parses, computes everything
/// the path computes from it before routing.
pub(crate) fn fuzz_request(api: u8, body: Bytes) -> Result<(), GatewayError> {
    let api = match api % 3 {
        0 => Api::ChatCompletions,
        1 => Api::Messages,
        _ => Api::Embeddings,
    };
    let request = ClientRequest::parse(api, body)?;
    let _ = request.prompt_estimate();
    let _ = request.output_estimate(256);
    let _ = request.expected_output();
    let _ = request.is_stream();
    let _ = crate::cache::cache_key("t", api.route(), request.model(), request.raw().as_bytes());
    for upstream in [
        crate::api::WireFormat::OpenAi,
        crate::api::WireFormat::Anthropic,
    ] {
        let _ = request.body_for(upstream, "upstream-model");
    }
    Ok(())
}

/// The fuzz tests' stream adapters: every pair of dialects, each renaming the model.
pub(crate) fn fuzz_adapters() -> Vec<Box<dyn crate::relay::StreamAdapter>> {
    use crate::relay::passthrough::{AnthropicPassthrough, OpenAiPassthrough};
    use crate::relay::rename::Renamed;
    use crate::translate::stream::{AnthropicToOpenAi, OpenAiToAnthropic};
    vec![
        Renamed::wrap(Box::new(OpenAiPassthrough::new(true)), "alias"),
        Box::new(OpenAiPassthrough::new(false)),
        Renamed::wrap(Box::new(AnthropicPassthrough::new()), "alias"),
        Box::new(AnthropicToOpenAi::new(true, "alias")),
        Box::new(OpenAiToAnthropic::new("alias", 7)),
    ]
}
