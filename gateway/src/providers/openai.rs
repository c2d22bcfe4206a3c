//! OpenAI and OpenAI-compatible servers (vLLM, TGI, Ollama, LM Studio, llama.cpp).
//!
//! The body arrives in OpenAI's dialect and is sent as is: vendor fields such as vLLM's
//! `top_k`, `min_p` or `guided_json` pass through untouched.

use async_trait::async_trait;
use bytes::Bytes;

use super::http::HttpUpstream;
use super::{Endpoint, Forwarded, Provider, UpstreamResponse};
use crate::api::WireFormat;
use crate::error::GatewayError;

/// Default base URL of OpenAI's API.
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// An OpenAI-style upstream.
#[derive(Debug)]
pub struct OpenAiProvider {
    http: HttpUpstream,
    label: &'static str,
}

impl OpenAiProvider {
    /// `label` is `openai`, `openai_compatible` or `vllm`.
    pub fn new(http: HttpUpstream, label: &'static str) -> Self {
        OpenAiProvider { http, label }
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
    fn format(&self) -> WireFormat {
        WireFormat::OpenAi
    }

    fn label(&self) -> &'static str {
        self.label
    }

    async fn send(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        forwarded: &Forwarded,
    ) -> Result<UpstreamResponse, GatewayError> {
        let path = match endpoint {
            Endpoint::Chat => "/chat/completions",
            Endpoint::Embeddings => "/embeddings",
        };
        let auth = self.http.secret.expose().map(|key| format!("Bearer {key}"));
        let mut headers = vec![("content-type", "application/json")];
        if let Some(auth) = &auth {
            headers.push(("authorization", auth.as_str()));
        }
        forwarded.trace_headers(&mut headers);
        self.http.post(path, &headers, body).await
    }
}
