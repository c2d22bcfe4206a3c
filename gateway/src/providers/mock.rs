//! The built-in simulated provider behind the `mock/...` models.
//!
//! It speaks OpenAI's dialect in-process (no socket), so it runs through exactly the same relay
//! as a real upstream, and Anthropic-dialect clients get it translated like any OpenAI-style
//! deployment. Replies stream in `chunks` pieces (one token each), paced by the configured
//! delays, capped by the request's `max_tokens`. Usage is honest: prompt tokens are counted
//! with the same tiktoken rules as the pre-flight estimate, output tokens by tokenizing the
//! text actually generated.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream;
use serde_json::{json, Value};

use super::{BodyStream, Endpoint, Forwarded, Provider, UpstreamResponse};
use crate::api::{openai, typed_from_value, unix_now, WireFormat};
use crate::error::GatewayError;
use crate::tokens;

const WORDS: &[&str] = &[
    " The", " gateway", " streams", " every", " token", " to", " the", " client", " as", " soon",
    " as", " it", " arrives", ",", " and", " bills", " it", " exactly", " once", ".",
];

/// How a mock deployment replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MockStyle {
    /// Generated text of `chunks` tokens.
    Lorem,
    /// The last user message back, word by word.
    Echo,
}

/// A simulated deployment.
#[derive(Debug, Clone)]
pub struct MockProvider {
    pub style: MockStyle,
    pub chunks: usize,
    pub chunk_delay: Duration,
    pub first_chunk_delay: Duration,
}

/// A generated reply: pieces and the finish reason.
struct Reply {
    pieces: Vec<String>,
    tool_call: Option<(String, String)>,
    finish_reason: &'static str,
}

impl MockProvider {
    fn reply(&self, req: &openai::ChatRequest) -> Reply {
        let cap = req.output_cap().map(|c| c as usize);
        if let Some(name) = forced_tool(req) {
            let last = last_user_text(req);
            let args = json!({ "input": last }).to_string();
            return Reply {
                pieces: Vec::new(),
                tool_call: Some((name, args)),
                finish_reason: "tool_calls",
            };
        }
        let mut pieces: Vec<String> = match self.style {
            MockStyle::Lorem => (0..self.chunks)
                .map(|i| WORDS[i % WORDS.len()].to_string())
                .collect(),
            MockStyle::Echo => {
                let text = last_user_text(req);
                let mut out = Vec::new();
                for (i, w) in text.split_whitespace().enumerate() {
                    out.push(if i == 0 {
                        w.to_string()
                    } else {
                        format!(" {w}")
                    });
                }
                out
            }
        };
        let mut finish_reason = "stop";
        if let Some(cap) = cap {
            if pieces.len() > cap {
                pieces.truncate(cap);
                finish_reason = "length";
            }
        }
        Reply {
            pieces,
            tool_call: None,
            finish_reason,
        }
    }
}

fn forced_tool(req: &openai::ChatRequest) -> Option<String> {
    let tools = req.tools.as_ref()?;
    match req.tool_choice.as_ref()? {
        openai::ToolChoice::Named(n) => Some(n.function.name.clone()),
        openai::ToolChoice::Mode(m) if m == "required" => {
            tools.first().map(|t| t.function.name.clone())
        }
        openai::ToolChoice::Mode(_) => None,
    }
}

fn last_user_text(req: &openai::ChatRequest) -> String {
    req.messages
        .iter()
        .rev()
        .find_map(|m| match m {
            openai::ChatMessage::User { content, .. } => Some(content.text()),
            _ => None,
        })
        .unwrap_or_default()
}

fn usage_json(prompt: u64, completion: u64) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt.saturating_add(completion),
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    })
}

fn sse(value: &Value) -> Bytes {
    Bytes::from(format!("data: {value}\n\n"))
}

#[async_trait]
impl Provider for MockProvider {
    fn format(&self) -> WireFormat {
        WireFormat::OpenAi
    }

    fn label(&self) -> &'static str {
        "mock"
    }

    async fn send(
        &self,
        endpoint: Endpoint,
        body: Bytes,
        _forwarded: &Forwarded,
    ) -> Result<UpstreamResponse, GatewayError> {
        // Parsing and counting a large body takes the blocking pool, not a serving thread.
        let this = self.clone();
        let prepared = tokens::off_thread(body.len(), move || this.prepare(endpoint, &body))
            .await
            .ok_or_else(|| GatewayError::Internal("the mock reply was not prepared".into()))??;
        let Prepared {
            req,
            prompt_tokens,
            reply,
            text,
            completion_tokens,
        } = match prepared {
            Ready::Embeddings(response) => return Ok(response),
            Ready::Chat(p) => *p,
        };
        let id = format!("chatcmpl-mock{}", uuid::Uuid::new_v4().simple());
        let call_id = format!("call_mock{}", uuid::Uuid::new_v4().simple());
        let created = unix_now();
        let model = req.model.clone();
        let headers = axum::http::HeaderMap::new();

        if !req.is_stream() {
            let mut message = json!({"role": "assistant", "content": null, "refusal": null});
            if let Some((name, args)) = &reply.tool_call {
                message["tool_calls"] = json!([{"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": args}}]);
            } else {
                message["content"] = json!(text);
            }
            let body = json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": null,
                    "finish_reason": reply.finish_reason}],
                "usage": usage_json(prompt_tokens, completion_tokens),
                "system_fingerprint": "fp_tollgate_mock"
            });
            tokio::time::sleep(self.first_chunk_delay).await;
            let once: BodyStream =
                Box::pin(stream::once(
                    async move { Ok(Bytes::from(body.to_string())) },
                ));
            return Ok(UpstreamResponse {
                headers,
                body: once,
            });
        }

        let include_usage = req.wants_stream_usage();
        let usage_field = if include_usage {
            Some(Value::Null)
        } else {
            None
        };
        let chunk = |delta: Value, finish: Option<&str>| {
            let mut c = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": "fp_tollgate_mock",
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
            if let Some(u) = &usage_field {
                c["usage"] = u.clone();
            }
            sse(&c)
        };
        let mut frames: Vec<Bytes> = Vec::with_capacity(reply.pieces.len() + 4);
        frames.push(chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            None,
        ));
        if let Some((name, args)) = &reply.tool_call {
            frames.push(chunk(
                json!({"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]}),
                None,
            ));
            // Arguments arrive in fragments, as real providers send them.
            let bytes: Vec<char> = args.chars().collect();
            for part in bytes.chunks(8) {
                let s: String = part.iter().collect();
                frames.push(chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": s}}]}),
                    None,
                ));
            }
        }
        for piece in &reply.pieces {
            frames.push(chunk(json!({"content": piece}), None));
        }
        frames.push(chunk(json!({}), Some(reply.finish_reason)));
        if include_usage {
            frames.push(sse(
                &json!({"id": id, "object": "chat.completion.chunk", "created": created,
                "model": model, "system_fingerprint": "fp_tollgate_mock", "choices": [],
                "usage": usage_json(prompt_tokens, completion_tokens)}),
            ));
        }
        frames.push(Bytes::from_static(b"data: [DONE]\n\n"));

        let first_delay = self.first_chunk_delay;
        let delay = self.chunk_delay;
        let body: BodyStream = Box::pin(stream::unfold(
            (frames.into_iter(), true),
            move |(mut it, first)| async move {
                let next = it.next()?;
                let pause = if first { first_delay } else { delay };
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                Some((Ok(next), (it, false)))
            },
        ));
        Ok(UpstreamResponse { headers, body })
    }
}

/// A chat request parsed, counted and answered (before pacing).
struct Prepared {
    req: openai::ChatRequest,
    prompt_tokens: u64,
    reply: Reply,
    text: String,
    completion_tokens: u64,
}

enum Ready {
    Chat(Box<Prepared>),
    Embeddings(UpstreamResponse),
}

impl MockProvider {
    /// Parses `body` and counts what the reply will report (the costly part).
    fn prepare(&self, endpoint: Endpoint, body: &[u8]) -> Result<Ready, GatewayError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| GatewayError::bad_request(format!("invalid JSON: {e}")))?;
        if endpoint == Endpoint::Embeddings {
            return embeddings(&value).map(Ready::Embeddings);
        }
        let req: openai::ChatRequest = typed_from_value(&value)?;
        let prompt_tokens = tokens::count_openai_prompt(&req);
        let reply = self.reply(&req);
        let text: String = reply.pieces.concat();
        let mut completion_tokens = tokens::count_text(&req.model, &text);
        if let Some((name, args)) = &reply.tool_call {
            completion_tokens = completion_tokens
                .saturating_add(tokens::count_text(&req.model, name))
                .saturating_add(tokens::count_text(&req.model, args));
        }
        Ok(Ready::Chat(Box::new(Prepared {
            req,
            prompt_tokens,
            reply,
            text,
            completion_tokens,
        })))
    }
}

/// Deterministic 8-dimensional embeddings, one per input.
fn embeddings(value: &Value) -> Result<UpstreamResponse, GatewayError> {
    let req: openai::EmbeddingsRequest = typed_from_value(value)?;
    let inputs: Vec<String> = match &req.input {
        openai::EmbeddingsInput::One(s) => vec![s.clone()],
        openai::EmbeddingsInput::Many(v) => v.clone(),
        openai::EmbeddingsInput::Tokens(t) => vec![format!("{t:?}")],
        openai::EmbeddingsInput::TokenBatches(b) => b.iter().map(|t| format!("{t:?}")).collect(),
    };
    let mut prompt_tokens = 0;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            prompt_tokens = tokens::count_text(&req.model, text).saturating_add(prompt_tokens);
            let h = crc32fast::hash(text.as_bytes());
            let v: Vec<f64> = (0..8)
                .map(|k| f64::from((h.rotate_left(k * 4) & 0xff) as u8) / 255.0 - 0.5)
                .collect();
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    let body = json!({"object": "list", "data": data, "model": req.model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}});
    Ok(UpstreamResponse {
        headers: axum::http::HeaderMap::new(),
        body: Box::pin(stream::once(
            async move { Ok(Bytes::from(body.to_string())) },
        )),
    })
}
