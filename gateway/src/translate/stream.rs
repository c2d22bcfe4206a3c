//! Stream adapters across dialects.
//!
//! [`AnthropicToOpenAi`]: an OpenAI client reading an Anthropic stream. `message_start` becomes
//! the role chunk, text deltas content chunks, `tool_use` blocks streamed `tool_calls` (Anthropic
//! block index → OpenAI tool-call index), thinking deltas `reasoning_content`, `message_delta`
//! the finish chunk, `message_stop` the optional usage chunk and `[DONE]`, `error` an OpenAI
//! error chunk.
//!
//! [`OpenAiToAnthropic`]: an Anthropic client reading an OpenAI stream. The first chunk opens
//! `message_start` (its `input_tokens` is the pre-flight estimate, since OpenAI reports usage
//! only at the end); content opens a text block, each new tool call a `tool_use` block with
//! `input_json_delta`s; at `[DONE]` the open block closes and `message_delta` carries the stop
//! reason and the provider's final usage (input included, as Anthropic's newer API does),
//! then `message_stop`.

use bytes::BytesMut;
use serde_json::{json, Value};

use super::{finish_reason_from_anthropic, stop_reason_from_openai, usage};
use crate::api::{anthropic, openai, unix_now};
use crate::relay::passthrough::{
    anthropic_error_json, append_block_delta_text, append_chunk_text, openai_error_json,
};
use crate::relay::{write_data, write_event, SseFrame, StreamAdapter, StreamState};

fn mark(state: &mut StreamState) {
    if state.first_output_at.is_none() {
        state.first_output_at = Some(std::time::Instant::now());
    }
}

/// OpenAI client, Anthropic upstream.
pub struct AnthropicToOpenAi {
    client_wants_usage: bool,
    id: String,
    model: String,
    created: u64,
    merged: anthropic::Usage,
    /// Anthropic block index → OpenAI tool-call index.
    tool_index: Vec<(u32, u32)>,
    state: StreamState,
    text: String,
}

impl AnthropicToOpenAi {
    pub fn new(client_wants_usage: bool, model: &str) -> Self {
        AnthropicToOpenAi {
            client_wants_usage,
            id: String::new(),
            model: model.to_string(),
            created: unix_now(),
            merged: anthropic::Usage::default(),
            tool_index: Vec::new(),
            state: StreamState::default(),
            text: String::new(),
        }
    }

    fn emit(&mut self, out: &mut BytesMut, delta: Value, finish: Option<&str>) {
        let chunk = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model, "choices": [{"index": 0, "delta": delta, "logprobs": null,
            "finish_reason": finish}]});
        mark(&mut self.state);
        write_data(out, chunk.to_string().as_bytes());
    }
}

impl StreamAdapter for AnthropicToOpenAi {
    fn on_frame(&mut self, frame: SseFrame, out: &mut BytesMut) {
        let Some(data) = frame.data else { return };
        let Ok(event) = serde_json::from_slice::<anthropic::StreamEvent>(&data) else {
            // Unknown or future event types are skipped, as Anthropic's SDKs do.
            return;
        };
        match event {
            anthropic::StreamEvent::MessageStart { message } => {
                self.id = format!("chatcmpl-{}", message.id.trim_start_matches("msg_"));
                if !message.model.is_empty() {
                    self.model = message.model;
                }
                usage::merge_anthropic(&mut self.merged, &message.usage);
                self.state.report_usage(usage::from_anthropic(&self.merged));
                self.emit(out, json!({"role": "assistant", "content": ""}), None);
            }
            anthropic::StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                anthropic::ContentBlock::ToolUse { id, name, .. } => {
                    let tool = self.tool_index.len() as u32;
                    self.tool_index.push((index, tool));
                    self.text.push_str(&name);
                    self.state.chunks += 1;
                    self.emit(
                        out,
                        json!({"tool_calls": [{"index": tool, "id": id, "type": "function",
                            "function": {"name": name, "arguments": ""}}]}),
                        None,
                    );
                }
                anthropic::ContentBlock::Text { text, .. } if !text.is_empty() => {
                    self.text.push_str(&text);
                    self.state.chunks += 1;
                    self.emit(out, json!({"content": text}), None);
                }
                _ => {}
            },
            anthropic::StreamEvent::ContentBlockDelta { index, delta } => {
                append_block_delta_text(&delta, &mut self.text);
                let d = match delta {
                    anthropic::BlockDelta::TextDelta { text } => json!({"content": text}),
                    anthropic::BlockDelta::ThinkingDelta { thinking } => {
                        json!({"reasoning_content": thinking})
                    }
                    anthropic::BlockDelta::InputJsonDelta { partial_json } => {
                        let Some(&(_, tool)) = self.tool_index.iter().find(|(b, _)| *b == index)
                        else {
                            return;
                        };
                        json!({"tool_calls": [{"index": tool, "function": {"arguments": partial_json}}]})
                    }
                    _ => return,
                };
                self.state.chunks += 1;
                self.emit(out, d, None);
            }
            anthropic::StreamEvent::ContentBlockStop { .. } | anthropic::StreamEvent::Ping => {}
            anthropic::StreamEvent::MessageDelta { delta, usage: u } => {
                usage::merge_anthropic(&mut self.merged, &u);
                self.state.report_usage(usage::from_anthropic(&self.merged));
                self.state.usage_final = true;
                let finish =
                    finish_reason_from_anthropic(delta.stop_reason.as_deref().unwrap_or(""));
                self.state.finish_reason = Some(finish.to_string());
                self.emit(out, json!({}), Some(finish));
            }
            anthropic::StreamEvent::MessageStop => {
                self.state.terminated = true;
                if self.client_wants_usage {
                    let u = usage::to_openai(&self.state.usage.unwrap_or_default());
                    let chunk = json!({"id": self.id, "object": "chat.completion.chunk",
                        "created": self.created, "model": self.model, "choices": [], "usage": u});
                    write_data(out, chunk.to_string().as_bytes());
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
            }
            anthropic::StreamEvent::Error { error } => {
                mark(&mut self.state);
                let body = json!({"error": {"message": error.message, "type": error.kind,
                    "param": null, "code": null}});
                self.state.upstream_error = Some(error.message);
                write_data(out, body.to_string().as_bytes());
            }
        }
    }

    fn on_end(&mut self, _out: &mut BytesMut) {}

    fn on_error(&mut self, message: &str, out: &mut BytesMut) {
        if self.state.upstream_error.is_some() {
            return;
        }
        self.state.upstream_error = Some(message.to_string());
        write_data(out, openai_error_json(message).as_bytes());
    }

    fn state(&self) -> &StreamState {
        &self.state
    }

    fn output_text(&self) -> String {
        self.text.clone()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum OpenBlock {
    Text,
    /// A tool_use block for this OpenAI tool-call index.
    Tool(u32),
}

/// Anthropic client, OpenAI-style upstream.
pub struct OpenAiToAnthropic {
    model: String,
    prompt_estimate: u64,
    started: bool,
    open: Option<OpenBlock>,
    next_block: u32,
    state: StreamState,
    stop_reason: Option<&'static str>,
    text: String,
}

impl OpenAiToAnthropic {
    pub fn new(model: &str, prompt_estimate: u64) -> Self {
        OpenAiToAnthropic {
            model: model.to_string(),
            prompt_estimate,
            started: false,
            open: None,
            next_block: 0,
            state: StreamState::default(),
            stop_reason: None,
            text: String::new(),
        }
    }

    fn start(&mut self, id: &str, model: &str, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        if !model.is_empty() {
            self.model = model.to_string();
        }
        let id = if id.is_empty() {
            format!("msg_{}", uuid::Uuid::new_v4().simple())
        } else {
            format!("msg_{}", id.trim_start_matches("chatcmpl-"))
        };
        let msg = json!({"type": "message_start", "message": {"id": id, "type": "message",
            "role": "assistant", "model": self.model, "content": [], "stop_reason": null,
            "stop_sequence": null, "usage": {"input_tokens": self.prompt_estimate,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 0}}});
        mark(&mut self.state);
        write_event(out, "message_start", msg.to_string().as_bytes());
        write_event(out, "ping", br#"{"type": "ping"}"#);
    }

    fn close_block(&mut self, out: &mut BytesMut) {
        if self.open.take().is_some() {
            let index = self.next_block - 1;
            write_event(
                out,
                "content_block_stop",
                json!({"type": "content_block_stop", "index": index})
                    .to_string()
                    .as_bytes(),
            );
        }
    }

    fn open_block(&mut self, kind: OpenBlock, block: Value, out: &mut BytesMut) -> u32 {
        self.close_block(out);
        let index = self.next_block;
        self.next_block += 1;
        self.open = Some(kind);
        write_event(
            out,
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block})
                .to_string()
                .as_bytes(),
        );
        index
    }

    fn delta(&mut self, delta: Value, out: &mut BytesMut) {
        let index = self.next_block.saturating_sub(1);
        self.state.chunks += 1;
        write_event(
            out,
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta})
                .to_string()
                .as_bytes(),
        );
    }

    fn finish(&mut self, out: &mut BytesMut) {
        if self.state.terminated {
            return;
        }
        self.state.terminated = true;
        self.start("", "", out);
        self.close_block(out);
        let stop = self.stop_reason.unwrap_or("end_turn");
        self.state.finish_reason = Some(stop.to_string());
        let mut u = json!({"output_tokens": self.state.usage.map_or(0, |u| u.output_tokens)});
        if let Some(total) = self.state.usage {
            u = serde_json::to_value(usage::to_anthropic(&total)).unwrap_or(u);
        }
        write_event(
            out,
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                "usage": u})
            .to_string()
            .as_bytes(),
        );
        write_event(out, "message_stop", br#"{"type":"message_stop"}"#);
    }
}

impl StreamAdapter for OpenAiToAnthropic {
    fn on_frame(&mut self, frame: SseFrame, out: &mut BytesMut) {
        let Some(data) = frame.data else { return };
        let trimmed = data.trim_ascii();
        if trimmed == b"[DONE]" {
            self.finish(out);
            return;
        }
        let Ok(value) = serde_json::from_slice::<Value>(trimmed) else {
            return;
        };
        if let Some(err) = value.get("error") {
            let message = err
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or("upstream error")
                .to_string();
            self.start("", "", out);
            write_event(
                out,
                "error",
                anthropic_error_json("api_error", &message).as_bytes(),
            );
            self.state.upstream_error = Some(message);
            return;
        }
        let Ok(chunk) = serde_json::from_value::<openai::ChatChunk>(value) else {
            return;
        };
        self.start(&chunk.id, &chunk.model, out);
        if let Some(u) = &chunk.usage {
            self.state.report_usage(usage::from_openai(u));
            self.state.usage_final = true;
        }
        append_chunk_text(&chunk, &mut self.text);
        let Some(choice) = chunk.choices.into_iter().next() else {
            return;
        };
        if let Some(content) = choice.delta.content.filter(|c| !c.is_empty()) {
            if self.open != Some(OpenBlock::Text) {
                self.open_block(OpenBlock::Text, json!({"type": "text", "text": ""}), out);
            }
            self.delta(json!({"type": "text_delta", "text": content}), out);
        }
        for call in choice.delta.tool_calls.unwrap_or_default() {
            let function = call.function.unwrap_or_default();
            if self.open != Some(OpenBlock::Tool(call.index)) {
                let id = call
                    .id
                    .unwrap_or_else(|| format!("toolu_{}", uuid::Uuid::new_v4().simple()));
                self.open_block(
                    OpenBlock::Tool(call.index),
                    json!({"type": "tool_use", "id": id, "name": function.name.clone().unwrap_or_default(),
                        "input": {}}),
                    out,
                );
            }
            if let Some(args) = function.arguments.filter(|a| !a.is_empty()) {
                self.delta(
                    json!({"type": "input_json_delta", "partial_json": args}),
                    out,
                );
            }
        }
        if let Some(reason) = choice.finish_reason {
            self.stop_reason = Some(stop_reason_from_openai(&reason));
        }
    }

    fn on_end(&mut self, out: &mut BytesMut) {
        self.finish(out);
    }

    fn on_error(&mut self, message: &str, out: &mut BytesMut) {
        if self.state.upstream_error.is_some() {
            return;
        }
        self.state.upstream_error = Some(message.to_string());
        self.start("", "", out);
        write_event(
            out,
            "error",
            anthropic_error_json("api_error", message).as_bytes(),
        );
    }

    fn state(&self) -> &StreamState {
        &self.state
    }

    fn output_text(&self) -> String {
        self.text.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::SseParser;

    fn run(adapter: &mut dyn StreamAdapter, input: &str) -> Vec<(String, Value)> {
        let mut p = SseParser::new();
        p.push(input.as_bytes());
        let mut out = BytesMut::new();
        while let Some(f) = p.next_frame() {
            adapter.on_frame(f, &mut out);
        }
        if adapter.state().terminated {
            adapter.on_end(&mut out);
        }
        let mut p = SseParser::new();
        p.push(&out);
        let mut frames = Vec::new();
        while let Some(f) = p.next_frame() {
            let data = f.data.clone().unwrap_or_default();
            let v = serde_json::from_slice(&data)
                .unwrap_or(Value::String(String::from_utf8_lossy(&data).to_string()));
            frames.push((f.event_name().to_string(), v));
        }
        frames
    }

    const ANTHROPIC_TOOL_STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":20,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Checking\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_a\",\"name\":\"get_weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\":\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"Paris\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":2,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_b\",\"name\":\"get_time\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":2,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":2}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":33}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
    );

    #[test]
    fn anthropic_tool_stream_becomes_openai_tool_call_deltas() {
        let mut a = AnthropicToOpenAi::new(true, "alias");
        let frames = run(&mut a, ANTHROPIC_TOOL_STREAM);
        let data: Vec<&Value> = frames.iter().map(|(_, v)| v).collect();
        assert_eq!(data[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(data[1]["choices"][0]["delta"]["content"], "Checking");
        let tc = &data[2]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(
            (tc["index"].as_u64(), tc["id"].as_str()),
            (Some(0), Some("toolu_a"))
        );
        assert_eq!(
            data[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":"
        );
        assert_eq!(data[5]["choices"][0]["delta"]["tool_calls"][0]["index"], 1);
        let finish = data
            .iter()
            .find(|d| d["choices"][0]["finish_reason"].is_string())
            .unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
        let usage_chunk = &data[data.len() - 2];
        assert_eq!(usage_chunk["usage"]["prompt_tokens"], 25);
        assert_eq!(usage_chunk["usage"]["completion_tokens"], 33);
        assert_eq!(*data[data.len() - 1], Value::String("[DONE]".into()));
        let u = a.state().usage.unwrap();
        assert_eq!(
            (u.input_tokens, u.cached_input_tokens, u.output_tokens),
            (25, 5, 33)
        );
    }

    #[test]
    fn anthropic_error_event_becomes_openai_error_chunk() {
        let s = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude\",\"content\":[],\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
            "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"
        );
        let mut a = AnthropicToOpenAi::new(false, "alias");
        let frames = run(&mut a, s);
        assert_eq!(frames[1].1["error"]["type"], "overloaded_error");
        assert!(!a.state().terminated);
        assert_eq!(a.state().upstream_error.as_deref(), Some("Overloaded"));
    }

    const OPENAI_TOOL_STREAM: &str = concat!(
        "data: {\"id\":\"chatcmpl-7\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-7\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Sure\"},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-7\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_a\",\"type\":\"function\",\"function\":{\"name\":\"get_weather\",\"arguments\":\"\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-7\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"city\\\":\\\"Paris\\\"}\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-7\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":1,\"id\":\"call_b\",\"type\":\"function\",\"function\":{\"name\":\"get_time\",\"arguments\":\"{}\"}}]},\"finish_reason\":null}]}\n\n",
        "data: {\"id\":\"chatcmpl-7\",\"model\":\"gpt-4o\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
        "data: {\"id\":\"chatcmpl-7\",\"model\":\"gpt-4o\",\"choices\":[],\"usage\":{\"prompt_tokens\":30,\"completion_tokens\":12,\"total_tokens\":42,\"prompt_tokens_details\":{\"cached_tokens\":10}}}\n\n",
        "data: [DONE]\n\n"
    );

    #[test]
    fn openai_tool_stream_becomes_anthropic_blocks() {
        let mut a = OpenAiToAnthropic::new("alias", 28);
        let frames = run(&mut a, OPENAI_TOOL_STREAM);
        let names: Vec<&str> = frames.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(frames[0].1["message"]["id"], "msg_7");
        assert_eq!(frames[0].1["message"]["usage"]["input_tokens"], 28);
        assert_eq!(frames[5].1["content_block"]["id"], "call_a");
        assert_eq!(frames[5].1["index"], 1);
        assert_eq!(frames[6].1["delta"]["partial_json"], "{\"city\":\"Paris\"}");
        assert_eq!(frames[8].1["content_block"]["name"], "get_time");
        let delta = &frames[11].1;
        assert_eq!(delta["delta"]["stop_reason"], "tool_use");
        assert_eq!(delta["usage"]["output_tokens"], 12);
        assert_eq!(delta["usage"]["input_tokens"], 20);
        assert_eq!(delta["usage"]["cache_read_input_tokens"], 10);
        assert!(a.state().terminated);
    }
}
