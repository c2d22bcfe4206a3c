//! Step 5, respond: the routed request's exchange (request record, completion record), and
//! its response — a relayed stream, or a whole body in the client's dialect — with the
//! route's headers.
//!
//! Exactly one completion record per request record, on every exit: a stream's body records
//! it when it ends or is dropped (`RelayStream`); a whole response records it before its body
//! leaves, and [`Unfinished`] records it if the client goes away (the handler is dropped)
//! while the upstream body is still being read.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use tollgate_schemas::{TokenUsage, UsageSource};
use tracing::Instrument;

use super::dialects::{Dialects, Whole};
use super::request::Outbound;
use super::{collect_upstream, Progress, ROUTE_HEADER};
use crate::api::WireFormat;
use crate::app::AppState;
use crate::audit::AuditResponse;
use crate::auth::Caller;
use crate::cache::{CacheFill, CachePlan, Entry, ResponseCache, CACHE_HEADER};
use crate::edge::USAGE_TOKENS_HEADER;
use crate::error::GatewayError;
use crate::limits::{Admission, StreamAllowance};
use crate::relay::exchange::CachedAnswer;
use crate::relay::exchange::Routed;
use crate::relay::usage_trailer::{UsageSlot, UsageTrailer};
use crate::relay::{Exchange, Outcome, RelayStream};
use crate::routing::Dispatched;
use crate::telemetry::{self, InSpan};

/// Response header: the model the deployment was asked for.
pub const UPSTREAM_MODEL_HEADER: &str = "x-tollgate-upstream-model";

pub(super) async fn respond(
    state: &Arc<AppState>,
    progress: &Progress,
    caller: Caller,
    mut outbound: Outbound,
    dispatched: Dispatched<'_>,
    admission: Option<Admission>,
    cache: Option<(Arc<ResponseCache>, CachePlan)>,
) -> Result<Response, GatewayError> {
    let (reservation, rate_headers) = admission.map(|a| (a.reservation, a.headers)).unzip();
    let Dispatched {
        target,
        upstream,
        route,
        lease,
    } = dispatched;
    let dialects = Dialects {
        client: progress.api.format(),
        upstream: target.deployment.provider.format(),
    };
    let stream = outbound.request.is_stream();
    // Placeholders to restore: what masking replaced, when the deployment that answers was
    // masked for.
    let restorer = outbound
        .privacy
        .as_ref()
        .filter(|p| !p.exempt(&target.deployment))
        .and_then(|p| p.restorer());
    let requested_model = outbound.request.model().to_string();
    // A same-dialect stream counts its prompt (for the request record) once its first
    // output has gone to the client: nothing before that needs it.
    let defer_count = stream && dialects.same() && outbound.prompt_tokens.is_none();
    let attempts = route.attempts_sent();
    let routed = Routed {
        route: progress.api.route(),
        client_format: dialects.client,
        target: &target,
        requested_model: &requested_model,
        stream,
        // A deferred count sets the exchange's estimate when it records the request.
        prompt_estimate: if defer_count {
            0
        } else {
            outbound.prompt_tokens()
        },
        route_log: Some(route),
        lease: Some(lease),
    };
    let exchange = Exchange::begin(
        state,
        &progress.request_id.0,
        caller,
        routed,
        progress.received_at,
    )
    .audited(state, outbound.request.raw());
    let routed_at = SystemTime::now();
    if !defer_count {
        exchange.record_request_at(routed_at);
    }
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            headers.insert(name, v);
        }
    };
    set("x-tollgate-deployment", &exchange.deployment);
    set("x-tollgate-provider", exchange.provider);
    set(UPSTREAM_MODEL_HEADER, &exchange.upstream_model);
    set(
        ROUTE_HEADER,
        progress.route_trace.as_deref().unwrap_or("none"),
    );
    headers.insert("x-tollgate-attempts", HeaderValue::from(attempts));
    if let Some(rate) = &rate_headers {
        rate.apply(&mut headers);
    }
    if let Some(outcome) = progress.cache {
        headers.insert(CACHE_HEADER, HeaderValue::from_static(outcome.label()));
    }
    // Where the answer came from, for a cache entry made of it.
    let origin = Entry {
        stream,
        model_label: exchange.model_label.clone(),
        deployment: exchange.deployment.clone(),
        upstream_model: exchange.upstream_model.clone(),
        ..Entry::default()
    };

    // From the first byte to the last (a whole body: read, translated, recorded).
    let relay_span = telemetry::span!("relay", stream);
    let mut response = if stream {
        let adapter = dialects.stream_adapter(
            &outbound.request,
            &requested_model,
            exchange.prompt_estimate,
        );
        let adapter = match restorer {
            Some(r) => crate::privacy::Restoring::wrap(adapter, r, dialects.client),
            None => adapter,
        };
        // OpenAI-style streams carry about one token per content event, Anthropic's a few.
        let tokens_per_event = match dialects.upstream {
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
        let fill = cache.map(|(cache, plan)| CacheFill::new(cache, plan, origin));
        let usage_slot = UsageSlot::default();
        let mut body = RelayStream::new(upstream.body, adapter, exchange)
            .with_usage_slot(usage_slot.clone())
            .with_allowance(allowance)
            .with_cache_fill(fill)
            .with_max_event_bytes(state.config.server.max_upstream_event_bytes)
            .with_idle_timeout(target.deployment.stream_idle_timeout);
        if defer_count {
            body = body.with_request_record(routed_at, move || outbound.prompt_tokens());
        }
        // The tokens follow the last byte as a trailer, for Envoy's rate limit at stream end.
        let mut r = if relay_span.is_disabled() {
            Response::new(Body::new(UsageTrailer::new(body, usage_slot)))
        } else {
            let request_span = tracing::Span::current();
            Response::new(Body::new(UsageTrailer::new(
                InSpan::new(body, request_span, relay_span),
                usage_slot,
            )))
        };
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream; charset=utf-8"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        h.insert("x-accel-buffering", HeaderValue::from_static("no"));
        h.insert(
            header::TRAILER,
            HeaderValue::from_static(USAGE_TOKENS_HEADER),
        );
        r
    } else {
        let prompt_estimate = outbound.prompt_tokens();
        let mut unfinished = Unfinished(Some((exchange, prompt_estimate)));
        let whole = async {
            let raw = collect_upstream(upstream.body, state.config.server.max_upstream_body_bytes)
                .await?;
            dialects
                .whole_body(
                    &outbound.request,
                    raw,
                    &requested_model,
                    prompt_estimate,
                    state.config.server.max_reported_tokens,
                )
                .and_then(|mut whole| {
                    if let Some(r) = &restorer {
                        if let Some(body) = r.restore_body(&whole.body)? {
                            whole.body = body;
                        }
                    }
                    Ok(whole)
                })
        }
        .instrument(relay_span.clone())
        .await;
        let Some((exchange, _)) = unfinished.0.take() else {
            return Err(GatewayError::Internal("the exchange was lost".to_string()));
        };
        let Whole {
            body,
            usage,
            output_text,
            finish_reason,
        } = match whole {
            Ok(w) => w,
            Err(e) => {
                drop(exchange.fail(&e));
                return Err(e);
            }
        };
        let usage = exchange.vet_usage(usage, || output_text);
        let audited_body = body.clone();
        let done_at = Instant::now();
        if let Some(r) = reservation {
            r.settle(&usage);
        }
        // The body leaves only once its completion record is durable.
        exchange
            .finish(
                Outcome::Completed,
                usage,
                finish_reason.clone(),
                0,
                Some(done_at),
                done_at.elapsed(),
                || AuditResponse::Body(audited_body),
            )
            .await;
        if let Some((cache, plan)) = cache {
            let entry = Entry {
                body: body.clone(),
                usage,
                finish_reason,
                ..origin
            };
            cache.store(&plan, entry);
        }
        let mut r = Response::new(Body::from(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r.headers_mut().insert(
            USAGE_TOKENS_HEADER,
            HeaderValue::from(usage.input_tokens + usage.output_tokens),
        );
        r
    };
    response.headers_mut().extend(headers);
    Ok(response)
}

/// A whole response's exchange while its upstream body is read: if the client goes away
/// meanwhile (the handler is dropped), the request is recorded as cut, billed for its prompt
/// (the provider had it) and no output (none was delivered).
struct Unfinished(Option<(Exchange, u64)>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some((exchange, prompt_estimate)) = self.0.take() {
            let usage = TokenUsage {
                input_tokens: prompt_estimate,
                source: UsageSource::Counted,
                ..TokenUsage::default()
            };
            drop(exchange.finish(
                Outcome::ClientDisconnected,
                usage,
                None,
                0,
                None,
                Duration::ZERO,
                || AuditResponse::None,
            ));
        }
    }
}

/// A request answered from the cache: replayed as the original client received it (a
/// stream's events sent at once), recorded like any request with `cache_hit` and billed as
/// `bill_hits` (the alias's, else `[cache] bill_hits`) says.
pub(super) async fn cached(
    state: &Arc<AppState>,
    progress: &Progress,
    caller: Caller,
    outbound: &Outbound,
    entry: Entry,
    bill_hits: crate::cache::BillHits,
    admission: Option<Admission>,
) -> Result<Response, GatewayError> {
    let (reservation, rate_headers) = admission.map(|a| (a.reservation, a.headers)).unzip();
    let fraction = bill_hits.fraction();
    // Token quotas count a hit the tenant pays for (at any fraction) like the answer it
    // replays; a free hit counts nothing. The ledger bills it from the completion event.
    let quota_usage = if fraction.is_zero() {
        TokenUsage::default()
    } else {
        entry.usage
    };
    let requested_model = outbound.request.model();
    let exchange = Exchange::cached(
        state,
        &progress.request_id.0,
        caller,
        CachedAnswer {
            route: progress.api.route(),
            client_format: progress.api.format(),
            requested_model,
            entry: &entry,
            fraction,
        },
        progress.received_at,
    )
    .audited(state, outbound.request.raw());
    exchange.record_request();
    if let Some(r) = reservation {
        r.settle(&quota_usage);
    }
    if let Some(cache) = &state.cache {
        cache.saved(&entry.model_label, &entry.usage);
    }
    // The answer leaves once its completion record is durable, as any other.
    exchange
        .finish(
            Outcome::Completed,
            TokenUsage::default(),
            entry.finish_reason.clone(),
            entry.chunks,
            Some(Instant::now()),
            Duration::ZERO,
            || AuditResponse::Body(entry.body.clone()),
        )
        .await;
    let mut r = Response::new(Body::from(entry.body));
    let h = r.headers_mut();
    let content_type = if entry.stream {
        "text/event-stream; charset=utf-8"
    } else {
        "application/json"
    };
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_HEADER, HeaderValue::from_static("hit"));
    h.insert(ROUTE_HEADER, HeaderValue::from_static("cache:hit"));
    h.insert("x-tollgate-provider", HeaderValue::from_static("cache"));
    h.insert("x-tollgate-attempts", HeaderValue::from(0));
    h.insert(
        USAGE_TOKENS_HEADER,
        HeaderValue::from(quota_usage.input_tokens + quota_usage.output_tokens),
    );
    if let Ok(v) = HeaderValue::from_str(&entry.upstream_model) {
        h.insert(UPSTREAM_MODEL_HEADER, v);
    }
    if let Some(rate) = &rate_headers {
        rate.apply(h);
    }
    Ok(r)
}
