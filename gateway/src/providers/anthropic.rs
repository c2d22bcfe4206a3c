//! Anthropic's Messages API.

use async_trait::async_trait;
use bytes::Bytes;

use super::http::HttpUpstream;
use super::{Endpoint, Forwarded, Provider, UpstreamResponse};
use crate::api::WireFormat;
use crate::error::GatewayError;

/// Default base URL of Anthropic's API (without the version path).
pub const ANTHROPIC_BASE_URL: &str = "https://api.anthropic.com";
/// `anthropic-version` sent when neither the client nor the config names one.
pub const DEFAULT_VERSION: &str = "2023-06-01";

/// An Anthropic upstream.
#[derive(Debug)]
pub struct AnthropicProvider {
    http: HttpUpstream,
    version: String,
}

impl AnthropicProvider {
    pub fn new(http: HttpUpstream, version: Option<String>) -> Self {
        AnthropicProvider {
            http,
            version: version.unwrap_or_else(|| DEFAULT_VERSION.to_string()),
        }
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    fn format(&self) -> WireFormat {
        WireFormat::Anthropic
    }

    fn label(&self) -> &'static str {
        "anthropic"
    }

    async fn send(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        forwarded: &Forwarded,
    ) -> Result<UpstreamResponse, GatewayError> {
        if endpoint == Endpoint::Embeddings {
            return Err(GatewayError::bad_request(
                "Anthropic deployments do not serve embeddings.",
            ));
        }
        let version = forwarded
            .anthropic_version
            .as_deref()
            .unwrap_or(&self.version);
        let mut headers = vec![
            ("content-type", "application/json"),
            ("anthropic-version", version),
        ];
        if let Some(beta) = &forwarded.anthropic_beta {
            headers.push(("anthropic-beta", beta.as_str()));
        }
        if let Some(key) = self.http.secret.expose() {
            headers.push(("x-api-key", key));
        }
        forwarded.trace_headers(&mut headers);
        self.http.post("/v1/messages", &headers, body).await
    }
}
