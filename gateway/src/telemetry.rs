//! OpenTelemetry traces (`[tracing]`, off by default): one trace per inference request, so
//! that an operator sees the gateway's own latency beside the provider's.
//!
//! ```text
//! POST /v1/chat/completions   (server; request_id, api, tenant, model, status, route)
//! ├── authenticate            (body read, API key)
//! ├── parse                   (the API's JSON)
//! ├── admit                   (model allowed, quotas and rate limits)
//! ├── route                   (the router, until a first byte)
//! │   └── attempt             (one per deployment tried; deployment, provider, outcome)
//! │       └── upstream.first_byte   (client; the provider's time to first byte)
//! └── relay                   (the stream until its end, or the whole body)
//! ```
//!
//! The request span continues the client's trace when the request carries a W3C
//! `traceparent`; each upstream request carries the `traceparent` of its
//! `upstream.first_byte` span (and the client's `tracestate`).
//!
//! Turned on by `[tracing] otlp_endpoint` or, failing that, the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (`OTEL_SDK_DISABLED=true`
//! turns it off). Spans go out in batches as OTLP/HTTP protobuf from a thread of their own,
//! through a one-thread runtime of their own, and are flushed at shutdown
//! ([`Telemetry::shutdown`]). Off, no trace layer is installed and the spans below are
//! disabled at their call sites (their target, [`TARGET`], is off for the log lines).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use axum::http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use serde::Deserialize;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::Layer;

use crate::config::ConfigError;
use crate::error::GatewayError;
use crate::providers::{Forwarded, UpstreamResponse};
use crate::routes::inference::Api;

/// The target of every span exported as a trace (never shown in the log lines).
pub const TARGET: &str = tollgate_pipeline::logging::TRACE_TARGET;

/// The OTLP path of traces under an endpoint.
const TRACES_PATH: &str = "/v1/traces";

/// Largest export response body read (a collector answers a few bytes).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A span exported as a trace: `span!("name", field = value, ...)`, or
/// `span!(parent: &p, "name", ...)`; disabled (no cost past a cached check) when tracing is
/// off.
macro_rules! span {
    ($($args:tt)*) => {
        ::tracing::info_span!(target: $crate::telemetry::TARGET, $($args)*)
    };
}
pub(crate) use span;

/// `[tracing]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The OTLP/HTTP endpoint, e.g. `http://127.0.0.1:4318`: traces are POSTed to
    /// `{otlp_endpoint}/v1/traces` (protobuf). Unset: `OTEL_EXPORTER_OTLP_ENDPOINT` /
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` if set, else no tracing.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the spans. Unset: `OTEL_SERVICE_NAME`, else `tollgate`.
    pub service_name: Option<String>,
    /// Share of new traces kept (0 to 1). A request continuing a client's trace follows the
    /// client's sampling decision instead.
    pub sample_ratio: f64,
    /// How long one export may take.
    pub export_timeout_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            service_name: None,
            sample_ratio: 1.0,
            export_timeout_ms: 10_000,
        }
    }
}

impl TracingConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(ConfigError::Invalid(format!(
                "tracing.sample_ratio is {}; it must be between 0 and 1",
                self.sample_ratio
            )));
        }
        if let Some(endpoint) = self.endpoint() {
            let ok = (endpoint.starts_with("http://") || endpoint.starts_with("https://"))
                && endpoint.parse::<axum::http::Uri>().is_ok();
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "tracing.otlp_endpoint is `{endpoint}`; it must be an http:// or https:// URL"
                )));
            }
        }
        Ok(())
    }

    fn endpoint(&self) -> Option<&str> {
        self.otlp_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
    }

    /// The URL traces are POSTed to: the configured endpoint + `/v1/traces` (unless it ends
    /// so already); `None` leaves it to the `OTEL_EXPORTER_OTLP_*` variables.
    fn traces_url(&self) -> Option<String> {
        self.endpoint().map(|e| {
            let e = e.trim_end_matches('/');
            if e.ends_with(TRACES_PATH) {
                e.to_string()
            } else {
                format!("{e}{TRACES_PATH}")
            }
        })
    }

    /// Whether traces are exported, by this table and the process's environment.
    pub fn enabled(&self, env: impl Fn(&str) -> Option<String>) -> bool {
        let set = |name: &str| env(name).is_some_and(|v| !v.trim().is_empty());
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return false;
        }
        self.endpoint().is_some()
            || set("OTEL_EXPORTER_OTLP_ENDPOINT")
            || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    }
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("cannot start the trace exporter's runtime: {0}")]
    Runtime(#[from] std::io::Error),
    #[error("cannot build the trace exporter's HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot build the OTLP trace exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The running exporter; [`Telemetry::shutdown`] flushes what is left.
pub struct Telemetry {
    provider: SdkTracerProvider,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

impl Telemetry {
    /// Starts the exporter if `config` (or the environment) turns tracing on, and returns
    /// the layer that feeds it. Call outside any tokio runtime (it starts its own).
    pub fn start(
        config: &TracingConfig,
    ) -> Result<Option<(Telemetry, tollgate_pipeline::logging::TraceLayer)>, TelemetryError> {
        if !config.enabled(|name| std::env::var(name).ok()) {
            return Ok(None);
        }
        let timeout = Duration::from_millis(config.export_timeout_ms.max(1));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otel-export")
            .enable_all()
            .build()?;
        let client = ExportClient {
            client: reqwest::Client::builder().timeout(timeout).build()?,
            runtime: runtime.handle().clone(),
        };
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(timeout);
        if let Some(url) = config.traces_url() {
            exporter = exporter.with_endpoint(url);
        }
        let exporter = exporter.build()?;
        let service_name = config
            .service_name
            .clone()
            .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok())
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| "tollgate".to_string());
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(Resource::builder().with_service_name(service_name).build())
            .build();
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("tollgate"))
            .with_location(false)
            .with_threads(false)
            .with_filter(Targets::new().with_target(TARGET, LevelFilter::TRACE))
            .boxed();
        Ok(Some((Telemetry { provider, runtime }, layer)))
    }

    /// Exports the spans still queued and stops the exporter. Call outside any tokio runtime,
    /// once the requests are done (a span still open is not exported).
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!("the trace exporter did not shut down cleanly: {e}");
        }
        self.runtime.shutdown_background();
    }
}

/// The exporter's HTTP client: the workspace's reqwest, run on the exporter's own runtime
/// (the batch processor exports from a plain thread, which has no runtime).
#[derive(Debug)]
struct ExportClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for ExportClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let sent = self.runtime.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let mut response = client.execute(request).await?;
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err::<_, HttpError>(
                        format!("export response over {MAX_RESPONSE_BYTES} bytes").into(),
                    );
                }
                body.extend_from_slice(&chunk);
            }
            let mut out = Response::new(Bytes::from(body));
            *out.status_mut() = response.status();
            *out.headers_mut() = std::mem::take(response.headers_mut());
            Ok(out)
        });
        sent.await?
    }
}

/// The root span of an inference request of `api`, continuing the client's trace when
/// `headers` carry a `traceparent`. The tenant, model, status and route are recorded once
/// known ([`record_request`]).
pub fn request_span(api: Api, request_id: &str, headers: &HeaderMap) -> tracing::Span {
    let path = match api {
        Api::ChatCompletions => "POST /v1/chat/completions",
        Api::Messages => "POST /v1/messages",
        Api::Embeddings => "POST /v1/embeddings",
    };
    let span = span!(
        "request",
        otel.name = path,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        http.route = path.trim_start_matches("POST "),
        http.response.status_code = tracing::field::Empty,
        request_id = request_id,
        api = api.route(),
        tenant = tracing::field::Empty,
        model = tracing::field::Empty,
        route = tracing::field::Empty,
    );
    if !span.is_disabled() && headers.contains_key("traceparent") {
        let parent =
            TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
        // Fails only without the trace layer, where nothing is exported anyway.
        let _ = span.set_parent(parent);
    }
    span
}

/// What a request span learns by its end.
pub fn record_request(
    span: &tracing::Span,
    tenant: Option<&str>,
    model: Option<&str>,
    status: u16,
    route: Option<&str>,
) {
    if span.is_disabled() {
        return;
    }
    if let Some(tenant) = tenant {
        span.record("tenant", tenant);
    }
    if let Some(model) = model {
        span.record("model", model);
    }
    if let Some(route) = route {
        span.record("route", route);
    }
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "ERROR");
    }
}

/// The span of one routing attempt; its child `upstream.first_byte` is the upstream request.
pub fn attempt_span(
    deployment: &str,
    provider: &'static str,
    upstream_model: &str,
) -> tracing::Span {
    span!(
        "attempt",
        deployment,
        provider,
        upstream_model,
        outcome = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    )
}

/// How an attempt ended: `ok`, or the error's label (and the upstream's status).
pub fn record_attempt(span: &tracing::Span, result: &Result<UpstreamResponse, GatewayError>) {
    if span.is_disabled() {
        return;
    }
    match result {
        Ok(_) => {
            span.record("outcome", "ok");
        }
        Err(e) => {
            span.record("outcome", e.label());
            span.record("otel.status_code", "ERROR");
            if let GatewayError::Upstream { status, .. } = e {
                span.record("http.response.status_code", *status);
            }
        }
    }
}

/// `forwarded` with the W3C trace context of `span` (the upstream request's client span) for
/// the upstream; `forwarded` itself when tracing is off.
pub fn forwarded_in<'f>(forwarded: &'f Forwarded, span: &tracing::Span) -> Cow<'f, Forwarded> {
    if span.is_disabled() {
        return Cow::Borrowed(forwarded);
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    let mut with = forwarded.clone();
    with.traceparent = carrier.remove("traceparent");
    with.tracestate = carrier.remove("tracestate");
    Cow::Owned(with)
}

/// A stream that runs in `span` (the relay) and its parent `request` span, and closes them
/// when it ends: a span's end is the last time it was left, so the request span, entered
/// only here once the handler has returned, ends with the relay's last byte.
pub struct InSpan<S> {
    inner: S,
    spans: Option<(tracing::Span, tracing::Span)>,
}

impl<S> InSpan<S> {
    pub fn new(inner: S, request: tracing::Span, span: tracing::Span) -> Self {
        InSpan {
            inner,
            spans: Some((request, span)),
        }
    }
}

impl<S: futures_util::Stream + Unpin> futures_util::Stream for InSpan<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let this = &mut *self;
        let entered = this.spans.as_ref().map(|(request, span)| {
            let request = request.enter();
            (span.enter(), request)
        });
        let next = std::pin::Pin::new(&mut this.inner).poll_next(cx);
        // Left in reverse: the relay, then the request (a tuple drops front to back).
        drop(entered);
        if matches!(next, std::task::Poll::Ready(None)) {
            this.spans = None;
        }
        next
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn off_unless_an_endpoint_is_configured_or_in_the_environment() {
        let off = TracingConfig::default();
        assert!(!off.enabled(env(&[])));
        assert!(!off.enabled(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])));
        assert!(off.enabled(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])));
        assert!(off.enabled(env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c/v1/traces"
        )])));
        let on = TracingConfig {
            otlp_endpoint: Some("http://127.0.0.1:4318".to_string()),
            ..TracingConfig::default()
        };
        assert!(on.enabled(env(&[])));
        assert!(!on.enabled(env(&[("OTEL_SDK_DISABLED", "true")])));
    }

    #[test]
    fn the_endpoint_is_a_base_url_and_bad_values_are_refused() {
        let at = |e: &str| TracingConfig {
            otlp_endpoint: Some(e.to_string()),
            ..TracingConfig::default()
        };
        assert_eq!(
            at("http://127.0.0.1:4318").traces_url().unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            at("http://c:4318/base/").traces_url().unwrap(),
            "http://c:4318/base/v1/traces"
        );
        assert_eq!(
            at("http://c:4318/v1/traces").traces_url().unwrap(),
            "http://c:4318/v1/traces"
        );
        assert!(at("127.0.0.1:4318").validate().is_err());
        assert!(at("http://c:4318").validate().is_ok());
        let ratio = TracingConfig {
            sample_ratio: 1.5,
            ..TracingConfig::default()
        };
        assert!(ratio.validate().is_err());
    }

    #[test]
    fn without_a_trace_layer_spans_are_disabled_and_nothing_is_forwarded() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let span = request_span(Api::ChatCompletions, "req-1", &headers);
        assert!(span.is_disabled());
        let forwarded = Forwarded::default();
        assert!(matches!(forwarded_in(&forwarded, &span), Cow::Borrowed(_)));
    }
}
