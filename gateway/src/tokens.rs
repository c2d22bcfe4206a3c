//! Token counting with tiktoken: the pre-flight prompt estimate and the fallback count of
//! output tokens when an upstream reports no usage (or the client left before it did).
//!
//! Encodings: `o200k_base` for GPT-4o, GPT-4.1, GPT-5 and the o-series; `cl100k_base` for
//! GPT-4, GPT-3.5 and the `text-embedding-*` models. Other families (Claude, Llama, Mistral...)
//! have tokenizers that are not public or not tiktoken's; they are approximated with
//! `o200k_base`, which lands within a few percent on English prose.

use tiktoken_rs::CoreBPE;

use crate::api::{anthropic, openai};

/// Tokens OpenAI adds per message (role and separators), per the OpenAI cookbook.
const PER_MESSAGE: u64 = 3;
/// Tokens priming the assistant's reply.
const REPLY_PRIMING: u64 = 3;
/// A flat estimate for an image part (OpenAI's "low detail" cost).
const IMAGE_TOKENS: u64 = 85;

fn encoding_for(model: &str) -> &'static CoreBPE {
    let m = model.rsplit('/').next().unwrap_or(model);
    if m.starts_with("gpt-4-")
        || m == "gpt-4"
        || m.starts_with("gpt-3.5")
        || m.starts_with("text-embedding")
    {
        tiktoken_rs::cl100k_base_singleton()
    } else {
        tiktoken_rs::o200k_base_singleton()
    }
}

/// Loads both encodings now, so the first request does not pay for it (about a second).
pub fn warm_up() {
    let _ = tiktoken_rs::o200k_base_singleton().encode_ordinary("warm up");
    let _ = tiktoken_rs::cl100k_base_singleton().encode_ordinary("warm up");
}

/// Tokens in `text` under `model`'s encoding.
pub fn count_text(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    encoding_for(model).encode_ordinary(text).len() as u64
}

fn count_content(model: &str, content: &openai::Content) -> u64 {
    match content {
        openai::Content::Text(s) => count_text(model, s),
        openai::Content::Parts(parts) => parts
            .iter()
            .map(|p| match p {
                openai::ContentPart::Text { text } => count_text(model, text),
                openai::ContentPart::Refusal { refusal } => count_text(model, refusal),
                openai::ContentPart::ImageUrl { .. } => IMAGE_TOKENS,
                openai::ContentPart::InputAudio { .. } | openai::ContentPart::File { .. } => 0,
            })
            .sum(),
    }
}

/// Estimated prompt tokens of an OpenAI chat request (messages, names, tool definitions).
pub fn count_openai_prompt(req: &openai::ChatRequest) -> u64 {
    let model = req.model.as_str();
    let mut total = REPLY_PRIMING;
    for m in &req.messages {
        total += PER_MESSAGE;
        total += match m {
            openai::ChatMessage::System { content, name }
            | openai::ChatMessage::Developer { content, name }
            | openai::ChatMessage::User { content, name } => {
                count_content(model, content) + name.as_ref().map_or(0, |_| 1)
            }
            openai::ChatMessage::Assistant {
                content,
                tool_calls,
                refusal,
                ..
            } => {
                content.as_ref().map_or(0, |c| count_content(model, c))
                    + refusal.as_deref().map_or(0, |r| count_text(model, r))
                    + tool_calls.as_ref().map_or(0, |calls| {
                        calls
                            .iter()
                            .map(|c| {
                                count_text(model, &c.function.name)
                                    + count_text(model, &c.function.arguments)
                                    + 3
                            })
                            .sum()
                    })
            }
            openai::ChatMessage::Tool { content, .. } => count_content(model, content),
            openai::ChatMessage::Function { content, name } => {
                count_text(model, content.as_deref().unwrap_or("")) + count_text(model, name)
            }
        };
    }
    if let Some(tools) = &req.tools {
        for t in tools {
            total += 8 + count_text(model, &t.function.name);
            if let Some(d) = &t.function.description {
                total += count_text(model, d);
            }
            if let Some(p) = &t.function.parameters {
                total += count_text(model, &p.to_string());
            }
        }
    }
    total
}

/// Estimated prompt tokens of an Anthropic Messages request.
pub fn count_anthropic_prompt(req: &anthropic::MessagesRequest) -> u64 {
    let model = req.model.as_str();
    let mut total = REPLY_PRIMING;
    if let Some(system) = &req.system {
        total += PER_MESSAGE + count_text(model, &system.text());
    }
    for m in &req.messages {
        total += PER_MESSAGE;
        match &m.content {
            anthropic::MessageContent::Text(s) => total += count_text(model, s),
            anthropic::MessageContent::Blocks(blocks) => {
                for b in blocks {
                    total += count_block(model, b);
                }
            }
        }
    }
    if let Some(tools) = &req.tools {
        for t in tools {
            total += 8 + count_text(model, &t.name);
            if let Some(d) = &t.description {
                total += count_text(model, d);
            }
            if let Some(s) = &t.input_schema {
                total += count_text(model, &s.to_string());
            }
        }
    }
    total
}

fn count_block(model: &str, b: &anthropic::ContentBlock) -> u64 {
    match b {
        anthropic::ContentBlock::Text { text, .. } => count_text(model, text),
        anthropic::ContentBlock::Image { .. } | anthropic::ContentBlock::Document { .. } => {
            IMAGE_TOKENS
        }
        anthropic::ContentBlock::ToolUse { name, input, .. } => {
            count_text(model, name) + count_text(model, &input.to_string()) + 3
        }
        anthropic::ContentBlock::ToolResult { content, .. } => {
            content.as_ref().map_or(0, |c| count_text(model, &c.text()))
        }
        anthropic::ContentBlock::Thinking { thinking, .. } => count_text(model, thinking),
        anthropic::ContentBlock::RedactedThinking { .. } => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_known_strings() {
        // "hello world" is two tokens in both cl100k and o200k.
        assert_eq!(count_text("gpt-4o", "hello world"), 2);
        assert_eq!(count_text("gpt-4", "hello world"), 2);
        assert_eq!(count_text("gpt-4o", ""), 0);
    }

    #[test]
    fn prompt_overhead_follows_the_cookbook() {
        let req: openai::ChatRequest = serde_json::from_str(
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hello world"}]}"#,
        )
        .unwrap();
        // 3 priming + 3 per message + 2 content tokens.
        assert_eq!(count_openai_prompt(&req), 8);
    }
}
