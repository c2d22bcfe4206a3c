//! [`Dialects`]: the client's API against the upstream's, and everything that depends on the
//! pair: which stream adapter relays the upstream's events, and how a whole (non-streamed)
//! upstream body becomes the client's, with the usage to bill.

use bytes::Bytes;
use serde_json::Value;
use tollgate_schemas::{TokenUsage, UsageSource};

use super::request::ClientRequest;
use crate::api::{anthropic, openai, WireFormat};
use crate::error::GatewayError;
use crate::relay::passthrough::{AnthropicPassthrough, OpenAiPassthrough};
use crate::relay::rename::{rename_model, Renamed};
use crate::relay::StreamAdapter;
use crate::translate::usage::Implausible;
use crate::translate::{self, stream::AnthropicToOpenAi, stream::OpenAiToAnthropic, usage};

/// A whole response for the client: its body, the usage to bill, and the finish reason.
pub struct Whole {
    pub body: Bytes,
    /// The upstream's report, or why it is not believed.
    pub usage: Result<TokenUsage, Implausible>,
    /// The output text, for counting it: only when the report is not believed.
    pub output_text: String,
    pub finish_reason: Option<String>,
}

/// The request's dialect and the deployment's.
#[derive(Debug, Clone, Copy)]
pub struct Dialects {
    pub client: WireFormat,
    pub upstream: WireFormat,
}

impl Dialects {
    pub fn same(self) -> bool {
        self.client == self.upstream
    }

    /// The adapter that relays a stream to the client; its events name `model` (the model the
    /// client asked for).
    pub fn stream_adapter(
        self,
        request: &ClientRequest,
        model: &str,
        prompt_estimate: u64,
    ) -> Box<dyn StreamAdapter> {
        let inner: Box<dyn StreamAdapter> = match (request, self.upstream) {
            (ClientRequest::OpenAi(_, r), WireFormat::OpenAi) => {
                Box::new(OpenAiPassthrough::new(r.wants_stream_usage()))
            }
            (ClientRequest::OpenAi(_, r), WireFormat::Anthropic) => {
                Box::new(AnthropicToOpenAi::new(r.wants_stream_usage(), model))
            }
            (ClientRequest::Anthropic(..), WireFormat::Anthropic) => {
                Box::new(AnthropicPassthrough::new())
            }
            (ClientRequest::Anthropic(..), WireFormat::OpenAi) => {
                Box::new(OpenAiToAnthropic::new(model, prompt_estimate))
            }
            // Never streamed; were it, its events would pass as they are.
            (ClientRequest::Embeddings(..), _) => Box::new(OpenAiPassthrough::new(false)),
        };
        // The translators take the upstream's name from its events: renamed after them.
        Renamed::wrap(inner, model)
    }

    /// The client's body from a whole upstream body, naming `model`. `prompt_estimate`
    /// stands in for an input count the upstream left out; a usage report over
    /// `max_reported_tokens` or that does not add up is returned as an error, with the
    /// output text to count instead.
    pub fn whole_body(
        self,
        request: &ClientRequest,
        raw: Bytes,
        model: &str,
        prompt_estimate: u64,
        max_reported_tokens: u64,
    ) -> Result<Whole, GatewayError> {
        let mut whole = self.whole_body_unchecked(request, raw, model, prompt_estimate)?;
        whole.usage = whole
            .usage
            .and_then(|u| usage::within(u, max_reported_tokens));
        if whole.usage.is_err() {
            whole.output_text = whole_output_text(self.client, &whole.body);
        }
        Ok(whole)
    }

    fn whole_body_unchecked(
        self,
        request: &ClientRequest,
        raw: Bytes,
        model: &str,
        prompt_estimate: u64,
    ) -> Result<Whole, GatewayError> {
        let invalid = |e: serde_json::Error| {
            GatewayError::UpstreamProtocol(format!("unexpected response body: {e}"))
        };
        let name = serde_json::to_vec(model)
            .map_err(|e| GatewayError::Internal(format!("cannot serialize the model: {e}")))?;
        let renamed = |raw: Bytes| match rename_model(&raw, &name) {
            Some(b) => Bytes::from(b),
            None => raw,
        };
        Ok(match (request, self.upstream) {
            (ClientRequest::OpenAi(..), WireFormat::OpenAi) => {
                let r: openai::ChatResponse = serde_json::from_slice(&raw).map_err(invalid)?;
                Whole {
                    usage: r
                        .usage
                        .as_ref()
                        .map_or(Ok(TokenUsage::default()), usage::from_openai),
                    output_text: String::new(),
                    finish_reason: r.choices.first().and_then(|c| c.finish_reason.clone()),
                    body: renamed(raw),
                }
            }
            (ClientRequest::Anthropic(..), WireFormat::Anthropic) => {
                let r: anthropic::MessagesResponse =
                    serde_json::from_slice(&raw).map_err(invalid)?;
                Whole {
                    usage: usage::from_anthropic(&r.usage),
                    output_text: String::new(),
                    finish_reason: r.stop_reason.clone(),
                    body: renamed(raw),
                }
            }
            (ClientRequest::OpenAi(..), WireFormat::Anthropic) => {
                let r: anthropic::MessagesResponse =
                    serde_json::from_slice(&raw).map_err(invalid)?;
                let mut out = translate::response::anthropic_to_openai(&r);
                out["model"] = Value::from(model);
                Whole {
                    finish_reason: out["choices"][0]["finish_reason"]
                        .as_str()
                        .map(str::to_string),
                    usage: usage::from_anthropic(&r.usage),
                    output_text: String::new(),
                    body: Bytes::from(out.to_string()),
                }
            }
            (ClientRequest::Anthropic(..), WireFormat::OpenAi) => {
                let r: openai::ChatResponse = serde_json::from_slice(&raw).map_err(invalid)?;
                let mut out = translate::response::openai_to_anthropic(&r);
                out["model"] = Value::from(model);
                Whole {
                    finish_reason: out["stop_reason"].as_str().map(str::to_string),
                    usage: r
                        .usage
                        .as_ref()
                        .map_or(Ok(TokenUsage::default()), usage::from_openai),
                    output_text: String::new(),
                    body: Bytes::from(out.to_string()),
                }
            }
            (ClientRequest::Embeddings(..), _) => {
                let r: openai::EmbeddingsResponse =
                    serde_json::from_slice(&raw).map_err(invalid)?;
                // Billed as the upstream counted; counted here when it did not say.
                let usage = match r.usage.and_then(|u| u.prompt_tokens) {
                    Some(n) => TokenUsage {
                        input_tokens: n,
                        ..TokenUsage::default()
                    },
                    None => TokenUsage {
                        input_tokens: prompt_estimate,
                        source: UsageSource::Counted,
                        ..TokenUsage::default()
                    },
                };
                Whole {
                    usage: Ok(usage),
                    output_text: String::new(),
                    finish_reason: None,
                    body: renamed(raw),
                }
            }
        })
    }
}

/// The output text of a whole response as the client receives it (content, refusals, tool
/// names and arguments, thinking), for counting its tokens.
fn whole_output_text(client: WireFormat, body: &[u8]) -> String {
    let mut text = String::new();
    match client {
        WireFormat::OpenAi => {
            let Ok(r) = serde_json::from_slice::<openai::ChatResponse>(body) else {
                return text;
            };
            for c in &r.choices {
                for s in [&c.message.content, &c.message.refusal]
                    .into_iter()
                    .flatten()
                {
                    text.push_str(s);
                }
                for call in c.message.tool_calls.iter().flatten() {
                    text.push_str(&call.function.name);
                    text.push_str(&call.function.arguments);
                }
            }
        }
        WireFormat::Anthropic => {
            let Ok(r) = serde_json::from_slice::<anthropic::MessagesResponse>(body) else {
                return text;
            };
            for block in &r.content {
                match block {
                    anthropic::ContentBlock::Text { text: t, .. } => text.push_str(t),
                    anthropic::ContentBlock::Thinking { thinking, .. } => text.push_str(thinking),
                    anthropic::ContentBlock::ToolUse { name, input, .. } => {
                        text.push_str(name);
                        text.push_str(&input.to_string());
                    }
                    _ => {}
                }
            }
        }
    }
    text
}
