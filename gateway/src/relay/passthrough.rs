//! Same-dialect stream adapters: the client speaks the upstream's dialect, so frames are
//! forwarded byte for byte and only what billing needs is looked at.
//!
//! OpenAI: a frame is parsed only when it carries a `usage` object (once per stream). The
//! gateway always asks for `include_usage`; when the client did not, the usage-only chunk is
//! dropped, and a usage object riding on a chunk that also has choices is removed from it.
//! (`"usage":null` on ordinary chunks is left in place: it costs a re-serialization per chunk
//! to remove and every SDK accepts it.)
//!
//! Anthropic: only `message_start`, `message_delta` and `error` are parsed (two or three per
//! stream); everything else is forwarded as is.

use bytes::{Bytes, BytesMut};

use super::{write_data, write_event, SseFrame, StreamAdapter, StreamState};
use crate::api::{anthropic, openai};
use crate::translate::usage;

/// Whether `data` has a top-level-looking `"usage": {` (an object, not `null`).
fn has_usage_object(data: &[u8]) -> bool {
    let mut rest = data;
    static USAGE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
    while let Some(i) = USAGE.find(rest) {
        let after = &rest[i + 7..];
        let mut j = 0;
        while j < after.len() && after[j].is_ascii_whitespace() {
            j += 1;
        }
        if after.get(j) == Some(&b':') {
            j += 1;
            while j < after.len() && after[j].is_ascii_whitespace() {
                j += 1;
            }
            if after.get(j) == Some(&b'{') {
                return true;
            }
        }
        rest = after;
    }
    false
}

/// The members of an OpenAI chunk that decide what happens to a usage chunk.
#[derive(serde::Deserialize)]
struct UsageChunk<'a> {
    #[serde(default, borrow)]
    usage: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    choices: Option<&'a serde_json::value::RawValue>,
}

/// Whether raw JSON is an array with at least one element.
fn is_non_empty_array(raw: &str) -> bool {
    raw.strip_prefix('[')
        .is_some_and(|rest| !rest.trim_start().starts_with(']'))
}

/// OpenAI client, OpenAI-style upstream.
pub struct OpenAiPassthrough {
    client_wants_usage: bool,
    state: StreamState,
    /// Data of relayed chunks, kept (as cheap `Bytes` handles) only for counting tokens if the
    /// upstream never reports usage, or for the audit trail (`keep_all`).
    relayed: Vec<Bytes>,
    /// Keep every chunk's data even once the upstream's final usage makes counting moot.
    keep_all: bool,
}

impl OpenAiPassthrough {
    pub fn new(client_wants_usage: bool) -> Self {
        OpenAiPassthrough {
            client_wants_usage,
            state: StreamState::default(),
            relayed: Vec::new(),
            keep_all: false,
        }
    }

    fn mark_output(&mut self) {
        if self.state.first_output_at.is_none() {
            self.state.first_output_at = Some(std::time::Instant::now());
        }
    }
}

impl StreamAdapter for OpenAiPassthrough {
    fn on_frame(&mut self, frame: SseFrame, out: &mut BytesMut) {
        let Some(data) = frame.data.clone() else {
            // Comment or keep-alive: forward, it keeps the client's connection warm.
            out.extend_from_slice(&frame.raw);
            return;
        };
        let trimmed = data.trim_ascii();
        if trimmed == b"[DONE]" {
            self.state.terminated = true;
            out.extend_from_slice(&frame.raw);
            return;
        }
        if trimmed.starts_with(b"{\"error\"") || trimmed.starts_with(b"{ \"error\"") {
            let message = serde_json::from_slice::<serde_json::Value>(trimmed)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                })
                .unwrap_or_else(|| "upstream error".to_string());
            self.state.upstream_error = Some(message);
            self.mark_output();
            out.extend_from_slice(&frame.raw);
            return;
        }
        if has_usage_object(trimmed) {
            // Read as raw members: the usage is parsed, the rest only looked at.
            if let Ok(chunk) = serde_json::from_slice::<UsageChunk<'_>>(trimmed) {
                if let Some(u) = chunk
                    .usage
                    .and_then(|u| serde_json::from_str::<openai::Usage>(u.get()).ok())
                {
                    self.state.report_usage(usage::from_openai(&u));
                    self.state.usage_final = true;
                    if !self.keep_all {
                        self.relayed.clear();
                    }
                }
                let has_choices = chunk.choices.is_some_and(|c| is_non_empty_array(c.get()));
                if has_choices {
                    self.note_finish(trimmed);
                    self.state.chunks += 1;
                }
                if !self.client_wants_usage {
                    if !has_choices {
                        return;
                    }
                    // Usage riding on a chunk with choices: remove it (rare, so the chunk
                    // is rebuilt as a value).
                    if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(trimmed) {
                        if let Some(obj) = v.as_object_mut() {
                            obj.remove("usage");
                        }
                        self.mark_output();
                        write_data(out, v.to_string().as_bytes());
                        return;
                    }
                }
            }
            self.mark_output();
            out.extend_from_slice(&frame.raw);
            return;
        }
        self.note_finish(trimmed);
        self.state.chunks += 1;
        self.mark_output();
        if !self.state.usage_final || self.keep_all {
            self.relayed.push(data);
        }
        out.extend_from_slice(&frame.raw);
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

    fn keep_output_text(&mut self) {
        self.keep_all = true;
    }

    fn output_text(&self) -> String {
        let mut text = String::new();
        for data in &self.relayed {
            if let Ok(chunk) = serde_json::from_slice::<openai::ChatChunk>(data) {
                append_chunk_text(&chunk, &mut text);
            }
        }
        text
    }
}

impl OpenAiPassthrough {
    /// Reads `"finish_reason":"..."` without parsing the chunk.
    fn note_finish(&mut self, data: &[u8]) {
        const KEY: &[u8] = b"\"finish_reason\":\"";
        static FINISH: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(KEY));
        if let Some(i) = FINISH.find(data) {
            let rest = &data[i + KEY.len()..];
            if let Some(end) = memchr::memchr(b'"', rest) {
                self.state.finish_reason =
                    std::str::from_utf8(&rest[..end]).ok().map(str::to_string);
            }
        }
    }
}

/// Appends the text a chunk carries (content, refusal, reasoning, tool names and arguments).
pub fn append_chunk_text(chunk: &openai::ChatChunk, text: &mut String) {
    for c in &chunk.choices {
        for s in [
            &c.delta.content,
            &c.delta.refusal,
            &c.delta.reasoning_content,
        ]
        .into_iter()
        .flatten()
        {
            text.push_str(s);
        }
        for call in c.delta.tool_calls.iter().flatten() {
            if let Some(f) = &call.function {
                for s in [&f.name, &f.arguments].into_iter().flatten() {
                    text.push_str(s);
                }
            }
        }
    }
}

/// OpenAI's mid-stream error object.
pub fn openai_error_json(message: &str) -> String {
    serde_json::json!({"error": {"message": message, "type": "server_error", "param": null, "code": "upstream_error"}})
        .to_string()
}

/// Anthropic's mid-stream error event payload.
pub fn anthropic_error_json(kind: &str, message: &str) -> String {
    serde_json::json!({"type": "error", "error": {"type": kind, "message": message}}).to_string()
}

/// Anthropic client, Anthropic upstream.
pub struct AnthropicPassthrough {
    state: StreamState,
    merged: anthropic::Usage,
    relayed: Vec<Bytes>,
}

impl Default for AnthropicPassthrough {
    fn default() -> Self {
        Self::new()
    }
}

impl AnthropicPassthrough {
    pub fn new() -> Self {
        AnthropicPassthrough {
            state: StreamState::default(),
            merged: anthropic::Usage::default(),
            relayed: Vec::new(),
        }
    }

    fn merge_usage(&mut self, u: &anthropic::Usage, is_final: bool) {
        usage::merge_anthropic(&mut self.merged, u);
        self.state.report_usage(usage::from_anthropic(&self.merged));
        self.state.usage_final = is_final;
    }
}

impl StreamAdapter for AnthropicPassthrough {
    fn on_frame(&mut self, frame: SseFrame, out: &mut BytesMut) {
        let Some(data) = frame.data.clone() else {
            out.extend_from_slice(&frame.raw);
            return;
        };
        if self.state.first_output_at.is_none() {
            self.state.first_output_at = Some(std::time::Instant::now());
        }
        let name = frame.event_name();
        match name {
            "content_block_delta" => {
                self.state.chunks += 1;
                self.relayed.push(data);
            }
            "message_start" | "message_delta" | "error" | "" => {
                match serde_json::from_slice::<anthropic::StreamEvent>(&data) {
                    Ok(anthropic::StreamEvent::MessageStart { message }) => {
                        self.merge_usage(&message.usage, false);
                    }
                    Ok(anthropic::StreamEvent::MessageDelta { delta, usage }) => {
                        self.merge_usage(&usage, true);
                        self.state.finish_reason = delta.stop_reason;
                    }
                    Ok(anthropic::StreamEvent::Error { error }) => {
                        self.state.upstream_error = Some(error.message);
                    }
                    Ok(anthropic::StreamEvent::MessageStop) => self.state.terminated = true,
                    Ok(anthropic::StreamEvent::ContentBlockDelta { .. }) => {
                        self.state.chunks += 1;
                        self.relayed.push(data);
                    }
                    _ => {}
                }
            }
            "message_stop" => self.state.terminated = true,
            _ => {}
        }
        out.extend_from_slice(&frame.raw);
    }

    fn on_end(&mut self, _out: &mut BytesMut) {}

    fn on_error(&mut self, message: &str, out: &mut BytesMut) {
        if self.state.upstream_error.is_some() {
            return;
        }
        self.state.upstream_error = Some(message.to_string());
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
        let mut text = String::new();
        for data in &self.relayed {
            if let Ok(anthropic::StreamEvent::ContentBlockDelta { delta, .. }) =
                serde_json::from_slice::<anthropic::StreamEvent>(data)
            {
                append_block_delta_text(&delta, &mut text);
            }
        }
        text
    }
}

/// Appends the text an Anthropic block delta carries.
pub fn append_block_delta_text(delta: &anthropic::BlockDelta, text: &mut String) {
    match delta {
        anthropic::BlockDelta::TextDelta { text: t } => text.push_str(t),
        anthropic::BlockDelta::InputJsonDelta { partial_json } => text.push_str(partial_json),
        anthropic::BlockDelta::ThinkingDelta { thinking } => text.push_str(thinking),
        anthropic::BlockDelta::SignatureDelta { .. }
        | anthropic::BlockDelta::CitationsDelta { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::SseParser;

    fn run(adapter: &mut dyn StreamAdapter, input: &[u8]) -> String {
        let mut p = SseParser::new();
        p.push(input);
        let mut out = BytesMut::new();
        while let Some(f) = p.next_frame() {
            adapter.on_frame(f, &mut out);
        }
        adapter.on_end(&mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    const OPENAI_STREAM: &str = concat!(
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n",
        "data: [DONE]\n\n"
    );

    #[test]
    fn usage_chunk_is_stripped_when_not_asked_for_and_still_billed() {
        let mut a = OpenAiPassthrough::new(false);
        let out = run(&mut a, OPENAI_STREAM.as_bytes());
        assert!(!out.contains("prompt_tokens"), "{out}");
        assert!(out.ends_with("data: [DONE]\n\n"));
        let u = a.state().usage.unwrap();
        assert_eq!(
            (u.input_tokens, u.cached_input_tokens, u.output_tokens),
            (9, 4, 1)
        );
        assert!(a.state().usage_final && a.state().terminated);
        assert_eq!(a.state().finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn usage_chunk_is_forwarded_untouched_when_asked_for() {
        let mut a = OpenAiPassthrough::new(true);
        let out = run(&mut a, OPENAI_STREAM.as_bytes());
        assert_eq!(out, OPENAI_STREAM);
    }

    #[test]
    fn usage_on_a_chunk_with_choices_is_read_and_removed() {
        let s = concat!(
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2,\"total_tokens\":7}}\n\n",
            "data: [DONE]\n\n"
        );
        let mut a = OpenAiPassthrough::new(false);
        let out = run(&mut a, s.as_bytes());
        assert!(
            out.contains("\"Hi\"") && !out.contains("prompt_tokens"),
            "{out}"
        );
        assert_eq!(a.state().usage.unwrap().output_tokens, 2);
    }

    #[test]
    fn choices_are_told_apart_without_parsing_them() {
        assert!(is_non_empty_array("[{}]") && is_non_empty_array("[ 1 ]"));
        for empty in ["[]", "[ \n ]", "null", "{}", "\"[x]\""] {
            assert!(!is_non_empty_array(empty), "{empty}");
        }
    }

    #[test]
    fn content_mentioning_usage_is_not_mistaken_for_usage() {
        assert!(!has_usage_object(
            br#"{"choices":[{"delta":{"content":"\"usage\": {"}}]}"#
        ));
        assert!(!has_usage_object(br#"{"usage":null}"#));
        assert!(has_usage_object(br#"{"usage" : {"prompt_tokens":1}}"#));
    }

    #[test]
    fn anthropic_usage_split_takes_message_delta_figures() {
        let s = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"m\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":5,\"output_tokens\":1}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"input_tokens\":12,\"cache_read_input_tokens\":6,\"output_tokens\":7}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
        );
        let mut a = AnthropicPassthrough::new();
        let out = run(&mut a, s.as_bytes());
        assert_eq!(out, s);
        let u = a.state().usage.unwrap();
        assert_eq!(u.input_tokens, 18);
        assert_eq!(u.cached_input_tokens, 6);
        assert_eq!(u.output_tokens, 7);
        assert!(a.state().terminated);
        assert_eq!(a.output_text(), "Hello");
    }
}
