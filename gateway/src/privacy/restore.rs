//! Placeholders back to values in what the client receives: a whole response's strings
//! (tool-call arguments, JSON inside a JSON string, with the value escaped for it), and the
//! [`Restoring`] stream adapter, which rewrites the text deltas of the client's dialect and
//! holds back the longest suffix of a delta that could begin a placeholder until the next
//! delta of the same content (or any other event, or the end) decides it.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use crate::api::WireFormat;
use crate::error::GatewayError;
use crate::relay::{write_data, write_event, SseFrame, SseParser, StreamAdapter, StreamState};

/// Longest placeholder: `[` + a label of up to 6 letters + `_` + 8 hex digits + `]`.
const MAX_PLACEHOLDER: usize = 17;

/// Placeholder → value, for one request.
pub struct Restorer {
    map: HashMap<String, String>,
}

impl Restorer {
    pub fn new(map: HashMap<String, String>) -> Restorer {
        Restorer { map }
    }

    /// `text` with every known placeholder replaced by its value (escaped as inside a JSON
    /// string when `json_escaped`); `None` when it has none.
    pub fn restore_text(&self, text: &str, json_escaped: bool) -> Option<String> {
        let bytes = text.as_bytes();
        let mut out: Option<String> = None;
        let mut copied = 0;
        let mut at = 0;
        while let Some(i) = memchr::memchr(b'[', &bytes[at..]) {
            let start = at + i;
            at = start + 1;
            let window = &bytes[start..bytes.len().min(start + MAX_PLACEHOLDER)];
            let Some(close) = memchr::memchr(b']', window) else {
                continue;
            };
            let candidate = &text[start..start + close + 1];
            let Some(value) = self.map.get(candidate) else {
                continue;
            };
            let buf = out.get_or_insert_with(|| String::with_capacity(text.len() + 32));
            buf.push_str(&text[copied..start]);
            if json_escaped {
                let quoted = serde_json::to_string(value).unwrap_or_default();
                buf.push_str(quoted.get(1..quoted.len().saturating_sub(1)).unwrap_or(""));
            } else {
                buf.push_str(value);
            }
            copied = start + close + 1;
            at = copied;
        }
        let mut buf = out?;
        buf.push_str(&text[copied..]);
        Some(buf)
    }

    /// A whole response body in either dialect with its placeholders restored (`None`: it
    /// has none). A body that cannot be read, or tool-call arguments that restoring would
    /// leave invalid, fail closed.
    pub fn restore_body(&self, body: &[u8]) -> Result<Option<Bytes>, GatewayError> {
        if memchr::memchr(b'[', body).is_none() {
            return Ok(None);
        }
        let mut value: Value = serde_json::from_slice(body).map_err(|_| unrestorable())?;
        if !self.restore_value(&mut value, false)? {
            return Ok(None);
        }
        serde_json::to_vec(&value)
            .map(|v| Some(Bytes::from(v)))
            .map_err(|_| unrestorable())
    }

    fn restore_value(&self, value: &mut Value, arguments: bool) -> Result<bool, GatewayError> {
        Ok(match value {
            Value::String(s) => match self.restore_text(s, arguments) {
                Some(restored) => {
                    // Arguments are JSON in a string: still JSON once restored, or refused.
                    if arguments
                        && serde_json::from_str::<Value>(s).is_ok()
                        && serde_json::from_str::<Value>(&restored).is_err()
                    {
                        return Err(unrestorable());
                    }
                    *s = restored;
                    true
                }
                None => false,
            },
            Value::Array(items) => {
                let mut changed = false;
                for v in items {
                    changed |= self.restore_value(v, false)?;
                }
                changed
            }
            Value::Object(members) => {
                let mut changed = false;
                for (k, v) in members.iter_mut() {
                    changed |= self.restore_value(v, k == "arguments")?;
                }
                changed
            }
            _ => false,
        })
    }
}

/// The error of a response whose placeholders cannot be restored safely.
fn unrestorable() -> GatewayError {
    GatewayError::UpstreamProtocol(
        "the response could not be checked for masked personal data (PII masking), so it was not relayed".to_string(),
    )
}

/// The length of the longest suffix of `text` that could begin a placeholder (`[`, then up
/// to 6 upper-case letters, `_`, up to 8 lower-case hex digits, no `]` yet).
pub fn held_suffix(text: &str) -> usize {
    let bytes = text.as_bytes();
    let from = bytes.len().saturating_sub(MAX_PLACEHOLDER - 1);
    let Some(i) = memchr::memrchr(b'[', &bytes[from..]) else {
        return 0;
    };
    let suffix = &bytes[from + i + 1..];
    let letters = suffix.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if letters > 6 {
        return 0;
    }
    let rest = &suffix[letters..];
    let ok = match rest.split_first() {
        None => true,
        Some((b'_', hex)) => {
            letters > 0
                && hex.len() <= 8
                && hex
                    .iter()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        }
        Some(_) => false,
    };
    if ok {
        suffix.len() + 1
    } else {
        0
    }
}

/// A text field of a streamed delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Field {
    Content,
    Refusal,
    Reasoning,
    /// A tool call's arguments (OpenAI), by tool call index.
    Arguments(u64),
    /// Anthropic's `text_delta`, `input_json_delta`, `thinking_delta`.
    Text,
    PartialJson,
    Thinking,
}

impl Field {
    fn json_escaped(self) -> bool {
        matches!(self, Field::Arguments(_) | Field::PartialJson)
    }
}

/// Text held back for one (choice or block index, field).
struct Held {
    index: u64,
    field: Field,
    text: String,
}

/// A stream adapter whose output has the request's placeholders restored.
pub struct Restoring {
    inner: Box<dyn StreamAdapter>,
    restorer: Arc<Restorer>,
    format: WireFormat,
    held: Vec<Held>,
    /// The last OpenAI chunk's members other than `choices` (the frame of a flushed delta).
    last_chunk: serde_json::Map<String, Value>,
}

impl Restoring {
    pub fn wrap(
        inner: Box<dyn StreamAdapter>,
        restorer: Arc<Restorer>,
        format: WireFormat,
    ) -> Box<dyn StreamAdapter> {
        Box::new(Restoring {
            inner,
            restorer,
            format,
            held: Vec::new(),
            last_chunk: serde_json::Map::new(),
        })
    }

    /// Rewrites the events the inner adapter appended from `from` on.
    fn rewrite_from(&mut self, out: &mut BytesMut, from: usize) {
        if out.len() == from {
            return;
        }
        let written = out.split_off(from);
        let mut parser = SseParser::new();
        parser.push(&written);
        while let Some(frame) = parser.next_frame() {
            self.rewrite(frame, out);
        }
        if let Some(frame) = parser.finish() {
            self.rewrite(frame, out);
        }
    }

    fn rewrite(&mut self, frame: SseFrame, out: &mut BytesMut) {
        let parsed = frame
            .data
            .as_ref()
            .and_then(|d| serde_json::from_slice::<Value>(d).ok());
        let Some(mut event) = parsed else {
            if frame.data.is_some() {
                self.flush(out);
            }
            out.extend_from_slice(&frame.raw);
            return;
        };
        if !self.restore_deltas(&mut event) {
            self.flush(out);
            out.extend_from_slice(&frame.raw);
            return;
        }
        let json = event.to_string();
        match &frame.event {
            Some(name) => write_event(out, &String::from_utf8_lossy(name), json.as_bytes()),
            None => write_data(out, json.as_bytes()),
        }
    }

    /// Restores the text deltas of `event`; `false` when it has none.
    fn restore_deltas(&mut self, event: &mut Value) -> bool {
        let mut any = false;
        match self.format {
            WireFormat::OpenAi => {
                let Some(obj) = event.as_object_mut() else {
                    return false;
                };
                let Some(Value::Array(choices)) = obj.get_mut("choices") else {
                    return false;
                };
                let mut found = Vec::new();
                for choice in choices.iter_mut() {
                    let index = choice.get("index").and_then(Value::as_u64).unwrap_or(0);
                    let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) else {
                        continue;
                    };
                    for (key, field) in [
                        ("content", Field::Content),
                        ("refusal", Field::Refusal),
                        ("reasoning_content", Field::Reasoning),
                    ] {
                        if let Some(Value::String(s)) = delta.get_mut(key) {
                            found.push((index, field));
                            *s = self.take(index, field, s);
                        }
                    }
                    if let Some(Value::Array(calls)) = delta.get_mut("tool_calls") {
                        for call in calls {
                            let k = call.get("index").and_then(Value::as_u64).unwrap_or(0);
                            if let Some(Value::String(s)) = call.pointer_mut("/function/arguments")
                            {
                                found.push((index, Field::Arguments(k)));
                                *s = self.take(index, Field::Arguments(k), s);
                            }
                        }
                    }
                }
                any = !found.is_empty();
                if any {
                    self.last_chunk = obj
                        .iter()
                        .filter(|(k, _)| *k != "choices" && *k != "usage")
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                }
            }
            WireFormat::Anthropic => {
                if event.get("type").and_then(Value::as_str) != Some("content_block_delta") {
                    return false;
                }
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
                let Some(delta) = event.get_mut("delta").and_then(Value::as_object_mut) else {
                    return false;
                };
                for (key, field) in [
                    ("text", Field::Text),
                    ("partial_json", Field::PartialJson),
                    ("thinking", Field::Thinking),
                ] {
                    if let Some(Value::String(s)) = delta.get_mut(key) {
                        any = true;
                        *s = self.take(index, field, s);
                    }
                }
            }
        }
        any
    }

    /// The text to send for a delta of (`index`, `field`): what was held before it, then
    /// the delta, placeholders restored, minus a new suffix that could begin one.
    fn take(&mut self, index: u64, field: Field, delta: &str) -> String {
        let mut text = match self
            .held
            .iter()
            .position(|h| h.index == index && h.field == field)
        {
            Some(i) => self.held.swap_remove(i).text,
            None => String::new(),
        };
        text.push_str(delta);
        let keep = held_suffix(&text);
        let tail = text.split_off(text.len() - keep);
        if !tail.is_empty() {
            self.held.push(Held {
                index,
                field,
                text: tail,
            });
        }
        self.restorer
            .restore_text(&text, field.json_escaped())
            .unwrap_or(text)
    }

    /// Sends what is held as deltas of their own (nothing completed it).
    fn flush(&mut self, out: &mut BytesMut) {
        for held in std::mem::take(&mut self.held) {
            let Held { index, field, text } = held;
            match self.format {
                WireFormat::OpenAi => {
                    let delta = match field {
                        Field::Refusal => serde_json::json!({ "refusal": text }),
                        Field::Reasoning => serde_json::json!({ "reasoning_content": text }),
                        Field::Arguments(k) => serde_json::json!({
                            "tool_calls": [{"index": k, "function": {"arguments": text}}]
                        }),
                        _ => serde_json::json!({ "content": text }),
                    };
                    let mut chunk = self.last_chunk.clone();
                    chunk.insert(
                        "choices".to_string(),
                        serde_json::json!([{"index": index, "delta": delta}]),
                    );
                    write_data(out, Value::Object(chunk).to_string().as_bytes());
                }
                WireFormat::Anthropic => {
                    let delta = match field {
                        Field::PartialJson => {
                            serde_json::json!({"type": "input_json_delta", "partial_json": text})
                        }
                        Field::Thinking => {
                            serde_json::json!({"type": "thinking_delta", "thinking": text})
                        }
                        _ => serde_json::json!({"type": "text_delta", "text": text}),
                    };
                    let event = serde_json::json!({
                        "type": "content_block_delta", "index": index, "delta": delta
                    });
                    write_event(out, "content_block_delta", event.to_string().as_bytes());
                }
            }
        }
    }
}

impl StreamAdapter for Restoring {
    fn on_frame(&mut self, frame: SseFrame, out: &mut BytesMut) {
        let from = out.len();
        self.inner.on_frame(frame, out);
        self.rewrite_from(out, from);
    }

    fn on_end(&mut self, out: &mut BytesMut) {
        let from = out.len();
        self.inner.on_end(out);
        self.rewrite_from(out, from);
        self.flush(out);
    }

    fn on_error(&mut self, message: &str, out: &mut BytesMut) {
        let from = out.len();
        self.inner.on_error(message, out);
        self.rewrite_from(out, from);
    }

    fn state(&self) -> &StreamState {
        self.inner.state()
    }

    fn output_text(&self) -> String {
        self.inner.output_text()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const P: &str = "[EMAIL_7f3a9c21]";
    const V: &str = "jane@example.com";

    fn restorer() -> Arc<Restorer> {
        Arc::new(Restorer::new(HashMap::from([
            (P.to_string(), V.to_string()),
            (
                "[SECRET_00ff00ff]".to_string(),
                "line1\nline\"2".to_string(),
            ),
        ])))
    }

    /// A same-dialect OpenAI stream of `deltas` through the restoring adapter: the text
    /// the client reads.
    fn openai_stream(deltas: &[&str]) -> String {
        openai_stream_with(restorer(), deltas)
    }

    fn openai_stream_with(restorer: Arc<Restorer>, deltas: &[&str]) -> String {
        let inner = Box::new(crate::relay::passthrough::OpenAiPassthrough::new(false));
        let mut a = Restoring::wrap(inner, restorer, WireFormat::OpenAi);
        let mut out = BytesMut::new();
        let mut parser = SseParser::new();
        for d in deltas {
            let chunk = serde_json::json!({"id":"c","object":"chat.completion.chunk","created":1,
                "model":"m","choices":[{"index":0,"delta":{"content":d}}]});
            parser.push(format!("data: {chunk}\n\n").as_bytes());
        }
        parser.push(b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
        while let Some(f) = parser.next_frame() {
            a.on_frame(f, &mut out);
        }
        a.on_end(&mut out);
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        text.split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<Value>(d).ok())
            .filter_map(|v| {
                v.pointer("/choices/0/delta/content")?
                    .as_str()
                    .map(str::to_string)
            })
            .collect()
    }

    #[test]
    fn a_placeholder_split_anywhere_across_two_or_three_deltas_is_restored() {
        let whole = format!("Mail {P} today");
        let expected = format!("Mail {V} today");
        for i in 0..=whole.len() {
            assert_eq!(
                openai_stream(&[&whole[..i], &whole[i..]]),
                expected,
                "cut at {i}"
            );
            for j in i..=whole.len() {
                assert_eq!(
                    openai_stream(&[&whole[..i], &whole[i..j], &whole[j..]]),
                    expected,
                    "cut at {i}, {j}"
                );
            }
        }
    }

    /// restore(mask(x)) == x for the sentences of the PII test set, the masked text cut into
    /// three deltas at random places (seeded; every cut of one sentence is the test above).
    #[test]
    fn masked_test_set_sentences_come_back_whole_however_the_stream_is_cut() {
        let set = include_str!("../../../tests/pii/holdout.jsonl");
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n.max(1) as u64) as usize
        };
        let mut masked_rows = 0;
        for line in set.lines().step_by(3) {
            let row: Value = serde_json::from_str(line).unwrap();
            let text = row["text"].as_str().unwrap();
            let mut masker = super::super::Masker::new(b"test-key", "tenant");
            let Some(masked) = masker.mask_text(text) else {
                continue;
            };
            masked_rows += 1;
            let restorer = masker.restorer().unwrap();
            let bounds: Vec<usize> = (0..=masked.len())
                .filter(|i| masked.is_char_boundary(*i))
                .collect();
            for _ in 0..20 {
                let mut cut = [bounds[next(bounds.len())], bounds[next(bounds.len())]];
                cut.sort_unstable();
                let pieces = [
                    &masked[..cut[0]],
                    &masked[cut[0]..cut[1]],
                    &masked[cut[1]..],
                ];
                assert_eq!(
                    openai_stream_with(restorer.clone(), &pieces),
                    text,
                    "{pieces:?}"
                );
            }
        }
        assert!(masked_rows > 400, "{masked_rows}");
    }

    #[test]
    fn text_that_only_looks_like_a_placeholder_is_released_unchanged() {
        assert_eq!(openai_stream(&["see [EMA", "IL_7f"]), "see [EMAIL_7f");
        assert_eq!(
            openai_stream(&["[EMAIL_0000000", "0] x"]),
            "[EMAIL_00000000] x"
        );
        assert_eq!(openai_stream(&["array[0", "] and [A"]), "array[0] and [A");
    }

    #[test]
    fn held_suffixes_are_the_longest_that_could_begin_a_placeholder() {
        assert_eq!(held_suffix("abc ["), 1);
        assert_eq!(held_suffix("abc [EMAIL_7f3a"), 11);
        assert_eq!(held_suffix("abc [EMAIL_7f3a9c21"), 15);
        assert_eq!(held_suffix("abc [EMAIL_7f3a9c21]"), 0);
        assert_eq!(held_suffix("abc [Email"), 0);
        assert_eq!(held_suffix("abc [_12"), 0);
        assert_eq!(held_suffix("abc [EMAIL_7f3a9c21x"), 0);
        assert_eq!(held_suffix("no bracket"), 0);
    }

    #[test]
    fn anthropic_deltas_and_tool_json_are_restored_escaped() {
        let inner = Box::new(crate::relay::passthrough::AnthropicPassthrough::new());
        let mut a = Restoring::wrap(inner, restorer(), WireFormat::Anthropic);
        let mut out = BytesMut::new();
        let mut parser = SseParser::new();
        let delta = |i: u32, ty: &str, key: &str, s: &str| {
            let e = serde_json::json!({"type":"content_block_delta","index":i,"delta":{"type":ty,key:s}});
            format!("event: content_block_delta\ndata: {e}\n\n")
        };
        parser.push(delta(0, "text_delta", "text", "to [EMAIL_7f").as_bytes());
        parser.push(
            delta(
                1,
                "input_json_delta",
                "partial_json",
                "{\"k\":\"[SECRET_00ff00ff]\"}",
            )
            .as_bytes(),
        );
        parser.push(delta(0, "text_delta", "text", "3a9c21] ok").as_bytes());
        parser.push(
            b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        );
        while let Some(f) = parser.next_frame() {
            a.on_frame(f, &mut out);
        }
        let text = std::str::from_utf8(&out).unwrap();
        let mut texts = String::new();
        let mut json = String::new();
        for e in text.split("\n\n").filter_map(|e| e.split("data: ").nth(1)) {
            let v: Value = serde_json::from_str(e).unwrap();
            if let Some(t) = v.pointer("/delta/text").and_then(Value::as_str) {
                texts.push_str(t);
            }
            if let Some(t) = v.pointer("/delta/partial_json").and_then(Value::as_str) {
                json.push_str(t);
            }
        }
        assert_eq!(texts, format!("to {V} ok"));
        let args: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(args["k"], "line1\nline\"2");
    }

    #[test]
    fn whole_bodies_restore_content_and_arguments_or_fail_closed() {
        let r = restorer();
        let body = serde_json::json!({"choices":[{"message":{"content":format!("hi {P}"),
            "tool_calls":[{"function":{"name":"f","arguments":"{\"to\":\"[SECRET_00ff00ff]\"}"}}]}}]});
        let out = r
            .restore_body(body.to_string().as_bytes())
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v.pointer("/choices/0/message/content").unwrap(),
            &format!("hi {V}")
        );
        let args: Value = serde_json::from_str(
            v.pointer("/choices/0/message/tool_calls/0/function/arguments")
                .unwrap()
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(args["to"], "line1\nline\"2");
        assert!(r.restore_body(b"{\"x\":\"nothing\"}").unwrap().is_none());
        assert!(r.restore_body(b"not json [EMAIL_7f3a9c21]").is_err());
    }
}
