//! Step 1, parse: the client's request in its own API ([`ClientRequest`]), what it asks of
//! the limits and the router (model, stream, token estimates), and its body for any upstream
//! dialect ([`Outbound`], the router's [`UpstreamBody`]).

use bytes::Bytes;
use serde_json::Value;

use crate::api::{anthropic, openai, RequestBody, WireFormat};
use crate::error::GatewayError;
use crate::providers::Endpoint;
use crate::routing::{Deployment, UpstreamBody};
use crate::{tokens, translate};

/// The inference APIs, as the client calls them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/messages`.
    Messages,
    /// `POST /v1/embeddings`.
    Embeddings,
}

impl Api {
    /// The wire format of the client's requests, responses and errors.
    pub fn format(self) -> WireFormat {
        match self {
            Api::ChatCompletions | Api::Embeddings => WireFormat::OpenAi,
            Api::Messages => WireFormat::Anthropic,
        }
    }

    /// The route label of metrics and events (bounded).
    pub fn route(self) -> &'static str {
        match self {
            Api::ChatCompletions => "chat",
            Api::Messages => "messages",
            Api::Embeddings => "embeddings",
        }
    }

    /// The upstream endpoint the request goes to.
    pub fn endpoint(self) -> Endpoint {
        match self {
            Api::ChatCompletions | Api::Messages => Endpoint::Chat,
            Api::Embeddings => Endpoint::Embeddings,
        }
    }
}

/// A validated client request in its own API: the JSON as sent (forwarded to a same-dialect
/// upstream) and its typed view.
pub enum ClientRequest {
    OpenAi(RequestBody, Box<openai::ChatRequest>),
    Anthropic(RequestBody, Box<anthropic::MessagesRequest>),
    Embeddings(RequestBody, Box<openai::EmbeddingsRequest>),
}

impl ClientRequest {
    pub fn parse(api: Api, body: Bytes) -> Result<Self, GatewayError> {
        let no_messages =
            || GatewayError::bad_param("`messages` must contain at least one message.", "messages");
        Ok(match api {
            Api::ChatCompletions => {
                let (raw, r) = RequestBody::parse::<openai::ChatRequest>(body)?;
                if r.messages.is_empty() {
                    return Err(no_messages());
                }
                ClientRequest::OpenAi(raw, Box::new(r))
            }
            Api::Messages => {
                let (raw, r) = RequestBody::parse::<anthropic::MessagesRequest>(body)?;
                if r.messages.is_empty() {
                    return Err(no_messages());
                }
                ClientRequest::Anthropic(raw, Box::new(r))
            }
            Api::Embeddings => {
                let (raw, r) = RequestBody::parse::<openai::EmbeddingsRequest>(body)?;
                if r.input.is_empty() {
                    return Err(GatewayError::bad_param(
                        "`input` must not be empty.",
                        "input",
                    ));
                }
                ClientRequest::Embeddings(raw, Box::new(r))
            }
        })
    }

    /// The body as the client sent it.
    pub fn raw(&self) -> &RequestBody {
        match self {
            ClientRequest::OpenAi(raw, _)
            | ClientRequest::Anthropic(raw, _)
            | ClientRequest::Embeddings(raw, _) => raw,
        }
    }

    pub fn model(&self) -> &str {
        match self {
            ClientRequest::OpenAi(_, r) => &r.model,
            ClientRequest::Anthropic(_, r) => &r.model,
            ClientRequest::Embeddings(_, r) => &r.model,
        }
    }

    pub fn is_stream(&self) -> bool {
        match self {
            ClientRequest::OpenAi(_, r) => r.is_stream(),
            ClientRequest::Anthropic(_, r) => r.is_stream(),
            ClientRequest::Embeddings(..) => false,
        }
    }

    /// Output tokens the request may produce (its cap, else `default`, times `n`), and
    /// whether the request itself caps them.
    pub fn output_estimate(&self, default: u64) -> (u64, bool) {
        match self {
            ClientRequest::OpenAi(_, r) => (
                r.output_cap()
                    .map_or(default, u64::from)
                    .saturating_mul(u64::from(r.n.unwrap_or(1).max(1))),
                r.output_cap().is_some(),
            ),
            ClientRequest::Anthropic(_, r) => (u64::from(r.max_tokens), true),
            // An embedding has no output.
            ClientRequest::Embeddings(..) => (0, true),
        }
    }

    /// The prompt's tokens (the pre-flight estimate): messages, or an embedding's input.
    pub fn prompt_estimate(&self) -> u64 {
        match self {
            ClientRequest::OpenAi(_, r) => tokens::estimate_openai_prompt(r),
            ClientRequest::Anthropic(_, r) => tokens::estimate_anthropic_prompt(r),
            ClientRequest::Embeddings(_, r) => embeddings_input_tokens(&r.input, &r.model),
        }
    }

    /// Output tokens to expect (the client's cap, else a typical reply), for cost routing
    /// and token limits.
    pub fn expected_output(&self) -> u64 {
        const TYPICAL_REPLY_TOKENS: u64 = 256;
        match self {
            ClientRequest::OpenAi(_, r) => r.output_cap().map_or(TYPICAL_REPLY_TOKENS, u64::from),
            ClientRequest::Anthropic(_, r) => u64::from(r.max_tokens),
            ClientRequest::Embeddings(..) => 0,
        }
        .min(64 * 1024)
    }

    /// The body for `upstream` in its dialect, for `model`. A same-dialect body is the
    /// client's JSON as sent, with the model (and, for OpenAI streams, `include_usage`) set in
    /// place; the request keeps it, so a retry or fallback builds it again.
    pub fn body_for(&self, upstream: WireFormat, model: &str) -> Result<Bytes, GatewayError> {
        let model_json = serde_json::to_vec(model)
            .map_err(|e| GatewayError::Internal(format!("cannot serialize the model: {e}")))?;
        let translated = match (self, upstream) {
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
            (ClientRequest::Anthropic(raw, _), WireFormat::Anthropic)
            | (ClientRequest::Embeddings(raw, _), WireFormat::OpenAi) => {
                return Ok(raw.with(&[("model", &model_json)]).into());
            }
            (ClientRequest::OpenAi(_, r), WireFormat::Anthropic) => {
                translate::request::openai_to_anthropic(r, model)?
            }
            (ClientRequest::Anthropic(_, r), WireFormat::OpenAi) => {
                translate::request::anthropic_to_openai(r, model)
            }
            // The router sends embeddings only to deployments that serve them.
            (ClientRequest::Embeddings(..), WireFormat::Anthropic) => {
                return Err(GatewayError::Internal(
                    "embeddings cannot be sent to an Anthropic-style deployment".to_string(),
                ))
            }
        };
        serde_json::to_vec(&translated)
            .map(Bytes::from)
            .map_err(|e| GatewayError::Internal(format!("cannot serialize upstream body: {e}")))
    }
}

/// Tokens of an embeddings input (token arrays count as given).
fn embeddings_input_tokens(input: &openai::EmbeddingsInput, model: &str) -> u64 {
    match input {
        openai::EmbeddingsInput::One(s) => tokens::TextCounter::estimate(model).count(s),
        openai::EmbeddingsInput::Many(v) => {
            let c = tokens::TextCounter::estimate(model);
            v.iter().map(|s| c.count(s)).sum()
        }
        openai::EmbeddingsInput::Tokens(t) => t.len() as u64,
        openai::EmbeddingsInput::TokenBatches(b) => b.iter().map(|t| t.len() as u64).sum(),
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

/// A request on its way upstream: its body in each dialect, and its prompt counted once, the
/// first time something needs it.
pub struct Outbound {
    pub request: ClientRequest,
    pub prompt_tokens: Option<u64>,
    /// The request's PII policy, when it is not `off`: applied to the body of every
    /// deployment that is not exempt.
    pub privacy: Option<crate::privacy::RequestPrivacy>,
}

impl Outbound {
    pub fn prompt_tokens(&mut self) -> u64 {
        let request = &self.request;
        *self
            .prompt_tokens
            .get_or_insert_with(|| request.prompt_estimate())
    }
}

impl UpstreamBody for Outbound {
    fn body_for(&mut self, to: &Deployment, model: &str) -> Result<Bytes, GatewayError> {
        let body = self.request.body_for(to.provider.format(), model)?;
        match &mut self.privacy {
            Some(privacy) if !privacy.exempt(to) => privacy.apply(body),
            _ => Ok(body),
        }
    }

    fn prompt_tokens(&mut self) -> u64 {
        Outbound::prompt_tokens(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(api: Api, body: &str) -> Result<ClientRequest, GatewayError> {
        ClientRequest::parse(api, Bytes::from(body.to_string()))
    }

    #[test]
    fn each_api_parses_its_own_body_and_refuses_empty_ones() {
        let chat = parse(
            Api::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#,
        )
        .unwrap();
        assert!(chat.is_stream());
        assert_eq!(chat.model(), "m");
        let e = parse(Api::ChatCompletions, r#"{"model":"m","messages":[]}"#).err();
        assert!(
            matches!(e, Some(GatewayError::BadRequest { param: Some(p), .. }) if p == "messages")
        );
        let e = parse(Api::Embeddings, r#"{"model":"m","input":[]}"#).err();
        assert!(matches!(e, Some(GatewayError::BadRequest { param: Some(p), .. }) if p == "input"));
        let emb = parse(Api::Embeddings, r#"{"model":"m","input":["a b c","d"]}"#).unwrap();
        assert!(!emb.is_stream());
        assert_eq!(emb.output_estimate(100), (0, true));
        assert!(emb.prompt_estimate() >= 2);
    }

    #[test]
    fn embeddings_keep_the_clients_json_with_the_model_replaced() {
        let emb = parse(
            Api::Embeddings,
            r#"{"model":"alias","input":"x","dimensions":8,"encoding_format":"float"}"#,
        )
        .unwrap();
        let body: Value =
            serde_json::from_slice(&emb.body_for(WireFormat::OpenAi, "text-embed-3").unwrap())
                .unwrap();
        assert_eq!(body["model"], "text-embed-3");
        assert_eq!(body["dimensions"], 8);
        assert!(emb.body_for(WireFormat::Anthropic, "x").is_err());
    }

    #[test]
    fn an_openai_stream_always_asks_for_usage_and_keeps_other_options() {
        let chat = parse(
            Api::ChatCompletions,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"x":1}}"#,
        )
        .unwrap();
        let body: Value =
            serde_json::from_slice(&chat.body_for(WireFormat::OpenAi, "up").unwrap()).unwrap();
        assert_eq!(body["stream_options"]["include_usage"], true);
        assert_eq!(body["stream_options"]["x"], 1);
        assert_eq!(body["model"], "up");
    }
}
