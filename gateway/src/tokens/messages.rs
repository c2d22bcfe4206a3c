//! The pre-flight estimate of an Anthropic Messages request's input tokens.
//!
//! Claude's tokenizer is not public, so text is counted with `o200k_base` and scaled by
//! [`CLAUDE_TEXT_FACTOR`]. What Anthropic does publish is used as published: the tool-use
//! system prompt per model and `tool_choice`, the fixed cost of its client tools (bash, text
//! editor, computer use), images at `width × height / 750` after Claude's resize, and thinking
//! blocks of earlier assistant turns not counting. Per-message framing (the `Human:` and
//! `Assistant:` turns) is not published: 3 tokens per message and 3 priming the reply, as in
//! OpenAI's chat format, which reproduces the token-counting guide's first example exactly.

use serde_json::Value;

use super::media;
use super::{Tally, CLAUDE_TEXT_FACTOR};
use crate::api::anthropic;

/// Framing of one turn (`\n\nHuman:` or `\n\nAssistant:`), an approximation.
const PER_MESSAGE: u64 = 3;
/// Framing of the reply Claude is asked for.
const REPLY_PRIMING: u64 = 3;
/// Per `tool_use` block, beyond its name and input (an approximation).
const TOOL_USE_OVERHEAD: u64 = 3;
/// Per `tool_result` block, beyond its content (an approximation).
const TOOL_RESULT_OVERHEAD: u64 = 3;
/// Added when extended thinking is enabled. Not published: fitted to the one public example
/// (the token-counting guide's thinking request, 88 tokens), which the estimate otherwise
/// undercounts by 24.
const THINKING_OVERHEAD: u64 = 24;

/// The tool-use system prompt Anthropic adds when `tools` is not empty, from its tool-use
/// pricing table: `(auto or none, any or tool)`.
fn tool_system_prompt(model: &str) -> (u64, u64) {
    let m = super::bare(model);
    if m.starts_with("claude-3-opus") {
        (530, 281)
    } else if m.starts_with("claude-3-sonnet") {
        (159, 235)
    } else if m.starts_with("claude-3-haiku") || m.starts_with("claude-3-5-haiku") {
        (264, 340)
    } else if m.starts_with("claude-3-5-sonnet-20240620") {
        (294, 261)
    } else {
        // Claude 3.5 Sonnet (October), 3.7 Sonnet, the Claude 4 models and, as an
        // approximation, anything newer.
        (346, 313)
    }
}

/// Definition tokens of Anthropic-defined client tools, from their documentation.
fn anthropic_tool_tokens(kind: &str) -> u64 {
    if kind.starts_with("bash_") {
        245
    } else if kind.starts_with("text_editor_") {
        700
    } else if kind.starts_with("computer_") {
        735
    } else {
        0
    }
}

/// Estimated input tokens of an Anthropic Messages request: system prompt, messages (text,
/// images, documents, tool use and results, current-turn thinking) and tool definitions.
pub fn count_anthropic_prompt(req: &anthropic::MessagesRequest) -> u64 {
    anthropic_prompt(req, super::TextCounter::exact(&req.model))
}

/// [`count_anthropic_prompt`] for the pre-flight estimate: never waits for the encoding to
/// load (see the module's "Memory").
pub fn estimate_anthropic_prompt(req: &anthropic::MessagesRequest) -> u64 {
    anthropic_prompt(req, super::TextCounter::estimate(&req.model))
}

fn anthropic_prompt(req: &anthropic::MessagesRequest, c: super::TextCounter) -> u64 {
    let model = req.model.as_str();
    let mut t = Tally::default();
    t.fixed(REPLY_PRIMING);
    if let Some(system) = &req.system {
        t.text(c.count(&system.text()));
    }
    let thinking = req
        .thinking
        .as_ref()
        .and_then(|v| v.get("type"))
        .and_then(Value::as_str);
    if thinking.is_some_and(|kind| kind != "disabled") {
        t.fixed(THINKING_OVERHEAD);
    }
    let last = req.messages.len().saturating_sub(1);
    for (i, m) in req.messages.iter().enumerate() {
        t.fixed(PER_MESSAGE);
        // Thinking from earlier assistant turns is dropped; the current turn's counts.
        let current_turn = i == last && m.role == anthropic::Role::Assistant;
        match &m.content {
            anthropic::MessageContent::Text(s) => t.text(c.count(s)),
            anthropic::MessageContent::Blocks(blocks) => {
                for b in blocks {
                    count_block(c, b, current_turn, &mut t);
                }
            }
        }
    }
    if let Some(tools) = req.tools.as_ref().filter(|t| !t.is_empty()) {
        let (auto, forced) = tool_system_prompt(model);
        t.fixed(match req.tool_choice {
            Some(anthropic::ToolChoice::Any { .. }) | Some(anthropic::ToolChoice::Tool { .. }) => {
                forced
            }
            _ => auto,
        });
        for tool in tools {
            t.text(c.count(&tool.name));
            if let Some(d) = &tool.description {
                t.text(c.count(d));
            }
            if let Some(s) = &tool.input_schema {
                t.text(c.count(&s.to_string()));
            }
            if let Some(kind) = &tool.kind {
                t.fixed(anthropic_tool_tokens(kind));
            }
        }
    }
    t.total(CLAUDE_TEXT_FACTOR)
}

fn count_block(
    c: super::TextCounter,
    b: &anthropic::ContentBlock,
    current_turn: bool,
    t: &mut Tally,
) {
    use anthropic::ContentBlock as B;
    match b {
        B::Text { text, .. } => t.text(c.count(text)),
        B::Image { source } => t.fixed(media::anthropic_image_tokens(match source {
            anthropic::ImageSource::Base64 { data, .. } => media::image_dims_base64(data),
            anthropic::ImageSource::Url { .. } => None,
        })),
        B::Document { source } => count_document(c, source, t),
        B::ToolUse { name, input, .. } => {
            t.text(c.count(name) + c.count(&input.to_string()));
            t.fixed(TOOL_USE_OVERHEAD);
        }
        B::ToolResult { content, .. } => {
            t.fixed(TOOL_RESULT_OVERHEAD);
            match content {
                Some(anthropic::ToolResultContent::Text(s)) => t.text(c.count(s)),
                Some(anthropic::ToolResultContent::Blocks(blocks)) => {
                    for b in blocks {
                        count_block(c, b, current_turn, t);
                    }
                }
                None => {}
            }
        }
        B::Thinking { thinking, .. } if current_turn => t.text(c.count(thinking)),
        B::Thinking { .. } | B::RedactedThinking { .. } => {}
    }
}

/// A `document` block: a base64 PDF by its pages, plain text by its tokens, content blocks by
/// their text, anything else (a URL, a file id) as one page.
fn count_document(c: super::TextCounter, source: &Value, t: &mut Tally) {
    let kind = source.get("type").and_then(Value::as_str).unwrap_or("");
    let data = source.get("data").and_then(Value::as_str);
    match (kind, data) {
        ("text", Some(text)) => t.text(c.count(text)),
        ("base64", Some(b64)) => t.fixed(media::pdf_tokens_base64(b64)),
        ("content", _) => {
            for block in source
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(text) = block.get("text").and_then(Value::as_str) {
                    t.text(c.count(text));
                } else if block.get("type").and_then(Value::as_str) == Some("image") {
                    t.fixed(media::anthropic_image_tokens(None));
                }
            }
            if let Some(text) = source.get("content").and_then(Value::as_str) {
                t.text(c.count(text));
            }
        }
        _ => t.fixed(media::PDF_PAGE_TOKENS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(json: &str) -> anthropic::MessagesRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn earlier_thinking_is_not_counted() {
        let earlier = req(r#"{"model":"claude-sonnet-4-5","max_tokens":1,"messages":[
              {"role":"user","content":"q"},
              {"role":"assistant","content":[{"type":"thinking","thinking":"a long chain of thought","signature":"s"},{"type":"text","text":"a"}]},
              {"role":"user","content":"more"}]}"#);
        let current = req(r#"{"model":"claude-sonnet-4-5","max_tokens":1,"messages":[
              {"role":"user","content":"q"},
              {"role":"assistant","content":[{"type":"thinking","thinking":"a long chain of thought","signature":"s"}]}]}"#);
        let without = req(r#"{"model":"claude-sonnet-4-5","max_tokens":1,"messages":[
              {"role":"user","content":"q"},
              {"role":"assistant","content":[{"type":"text","text":"a"}]},
              {"role":"user","content":"more"}]}"#);
        assert_eq!(
            count_anthropic_prompt(&earlier),
            count_anthropic_prompt(&without)
        );
        assert!(count_anthropic_prompt(&current) > 3 + 3 + 3 + 1);
    }

    #[test]
    fn tool_choice_selects_the_system_prompt() {
        let body = |choice: &str| {
            format!(
                r#"{{"model":"claude-3-opus-20240229","max_tokens":1,"messages":[],"tools":[{{"name":"f"}}]{choice}}}"#
            )
        };
        let auto = count_anthropic_prompt(&req(&body("")));
        let any = count_anthropic_prompt(&req(&body(r#","tool_choice":{"type":"any"}"#)));
        assert_eq!(auto - any, 530 - 281);
    }

    #[test]
    fn documents_and_images() {
        let r = req(
            r#"{"model":"claude-sonnet-4-5","max_tokens":1,"messages":[{"role":"user","content":[
              {"type":"image","source":{"type":"url","url":"https://example.com/a.jpg"}},
              {"type":"image","source":{"type":"base64","media_type":"image/png","data":"not an image"}},
              {"type":"document","source":{"type":"url","url":"https://example.com/a.pdf"}}]}]}"#,
        );
        assert_eq!(
            count_anthropic_prompt(&r),
            3 + 3 + 1600 + 1600 + media::PDF_PAGE_TOKENS
        );
    }
}
