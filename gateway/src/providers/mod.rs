//! The provider seam: one trait, one file per provider.
//!
//! | file | provider |
//! |---|---|
//! | `openai.rs` | OpenAI and every OpenAI-compatible server (vLLM, TGI, Ollama, LM Studio) |
//! | `anthropic.rs` | Anthropic Messages |
//! | `mock.rs` | the built-in simulated provider behind the `mock/...` models |
//! | `http.rs` | what the HTTP providers share: transport, upstream error mapping, redaction |
//! | `http1.rs` | the lean HTTP/1.1 client for plain `http://` upstreams (pooled, no background task) |
//!
//! A provider receives a body already in its own dialect (the relay translates) and returns
//! the raw response body as a byte stream; a non-2xx answer is turned into a
//! [`GatewayError::Upstream`] here, before any byte reaches the client.

pub mod anthropic;
pub mod http;
pub mod http1;
pub mod mock;
pub mod openai;
pub mod redact;

use std::pin::Pin;

use async_trait::async_trait;
use axum::http::HeaderMap;
use bytes::Bytes;
use futures_util::Stream;

use crate::api::WireFormat;
use crate::error::GatewayError;

/// A response body as it arrives from upstream.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, GatewayError>> + Send>>;

/// Which upstream operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// OpenAI `/chat/completions` or Anthropic `/v1/messages`, by the provider's dialect.
    Chat,
    /// OpenAI `/embeddings`.
    Embeddings,
}

/// A successful (2xx) upstream response.
pub struct UpstreamResponse {
    pub headers: HeaderMap,
    pub body: BodyStream,
}

/// Request headers from the client that a provider may forward (e.g. `anthropic-beta`), and
/// the W3C trace context of the attempt (set per attempt when tracing is on).
#[derive(Debug, Default, Clone)]
pub struct Forwarded {
    pub anthropic_version: Option<String>,
    pub anthropic_beta: Option<String>,
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Forwarded {
    /// Appends the trace context headers, if any, to an upstream request's `headers`.
    pub fn trace_headers<'a>(&'a self, headers: &mut Vec<(&'static str, &'a str)>) {
        if let Some(v) = &self.traceparent {
            headers.push(("traceparent", v));
        }
        if let Some(v) = &self.tracestate {
            headers.push(("tracestate", v));
        }
    }
}

/// One kind of upstream.
#[async_trait]
pub trait Provider: Send + Sync {
    /// The dialect its chat endpoint speaks.
    fn format(&self) -> WireFormat;
    /// Bounded label for metrics and response headers.
    fn label(&self) -> &'static str;
    /// Sends `body` (already in this provider's dialect).
    async fn send(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        forwarded: &Forwarded,
    ) -> Result<UpstreamResponse, GatewayError>;
}
