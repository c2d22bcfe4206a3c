//! Token counting with tiktoken: the pre-flight prompt estimate and the fallback count of
//! output tokens when an upstream reports no usage (or the client left before it did).
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | encodings per model, plain text counts, the model-family profile |
//! | `chat.rs` | OpenAI Chat Completions: message, name, tool-definition and image overheads |
//! | `messages.rs` | Anthropic Messages: tool-use system prompt, images, documents, thinking |
//! | `media.rs` | image dimensions read from data-URL headers, PDF page counts, image formulas |
//!
//! Encodings: `o200k_base` for GPT-4o, GPT-4.1, GPT-4.5, GPT-5 and the o-series; `cl100k_base`
//! for GPT-4, GPT-3.5 and the `text-embedding-*` models. Other families (Claude, Llama,
//! Mistral...) have tokenizers that are not public or not tiktoken's; they are counted with
//! `o200k_base`, and Claude's text count is scaled by [`CLAUDE_TEXT_FACTOR`] (see the README's
//! "Pre-flight token estimate" for the sources and the measured error).

mod chat;
mod media;
mod messages;

use tiktoken_rs::CoreBPE;

pub use chat::count_openai_prompt;
pub use media::{anthropic_image_tokens, openai_image_tokens, ImageDetail};
pub use messages::count_anthropic_prompt;

/// Claude's tokenizer yields more tokens than `o200k_base` for the same text: a published
/// comparison of Claude 3.5 Sonnet and GPT-4o measured about 16% more on English articles (21%
/// on maths, 30% on Python). The estimate scales Claude's text tokens (not its fixed overheads,
/// images or documents) by the English figure.
pub const CLAUDE_TEXT_FACTOR: f64 = 1.16;

/// The model name without a `provider/` prefix (`openai/gpt-4o` → `gpt-4o`).
fn bare(model: &str) -> &str {
    model.rsplit('/').next().unwrap_or(model)
}

/// Whether `model` is one of OpenAI's `cl100k_base` models (GPT-4 and GPT-3.5 generations,
/// the embeddings models). Everything else, OpenAI's newer models and other families alike,
/// uses `o200k_base`.
fn uses_cl100k(model: &str) -> bool {
    let m = bare(model);
    let gpt4_classic = m.starts_with("gpt-4")
        && !m.starts_with("gpt-4o")
        && !m.starts_with("gpt-4.1")
        && !m.starts_with("gpt-4.5");
    gpt4_classic
        || m.starts_with("gpt-3.5")
        || m.starts_with("gpt-35")
        || m.starts_with("text-embedding")
}

/// The tiktoken encoding used to count `model`'s text: `"o200k_base"` or `"cl100k_base"`.
pub fn encoding_name(model: &str) -> &'static str {
    if uses_cl100k(model) {
        "cl100k_base"
    } else {
        "o200k_base"
    }
}

fn encoding_for(model: &str) -> &'static CoreBPE {
    if uses_cl100k(model) {
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

/// Tokens in `text` under `model`'s encoding (no family scaling: this is tiktoken's count).
pub fn count_text(model: &str, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    encoding_for(model).encode_ordinary(text).len() as u64
}

/// Which published rules apply to a model name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// OpenAI's own models: the cookbook's overheads are exact for them.
    OpenAi,
    /// Anthropic's Claude: `o200k_base` scaled by [`CLAUDE_TEXT_FACTOR`].
    Claude,
    /// Anything else served through an OpenAI-compatible API (Llama, Mistral, Qwen...): counted
    /// as if it were an OpenAI model, a documented approximation.
    Other,
}

impl Family {
    fn of(model: &str) -> Family {
        let m = bare(model);
        if m.contains("claude") {
            Family::Claude
        } else if m.starts_with("gpt-")
            || m.starts_with("chatgpt-")
            || m.starts_with("text-embedding")
            || m.starts_with("computer-use")
            || m.starts_with("codex-")
            || is_o_series(m)
        {
            Family::OpenAi
        } else {
            Family::Other
        }
    }
}

/// `o1`, `o1-pro`, `o3-mini`, `o4-mini-2025-04-16`...
fn is_o_series(m: &str) -> bool {
    let b = m.as_bytes();
    b.len() >= 2
        && b[0] == b'o'
        && b[1].is_ascii_digit()
        && b.get(2).is_none_or(|c| *c == b'-' || c.is_ascii_digit())
}

/// Token counts kept in two parts so that a family's text factor scales only the text.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    /// Tokens of text the client wrote (content, names, tool schemas), in tiktoken's count.
    text: u64,
    /// Fixed overheads, images and documents: not scaled.
    fixed: u64,
}

impl Tally {
    fn text(&mut self, n: u64) {
        self.text = self.text.saturating_add(n);
    }

    fn fixed(&mut self, n: u64) {
        self.fixed = self.fixed.saturating_add(n);
    }

    /// The total, with the text part scaled by `factor` (rounded up).
    fn total(self, factor: f64) -> u64 {
        let text = if factor == 1.0 {
            self.text
        } else {
            (self.text as f64 * factor).ceil() as u64
        };
        text.saturating_add(self.fixed)
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
    fn encodings_follow_the_model_family() {
        for m in [
            "gpt-4o",
            "gpt-4o-mini",
            "gpt-4.1-nano",
            "gpt-5",
            "o1",
            "o3-mini",
            "o4-mini",
        ] {
            assert_eq!(encoding_name(m), "o200k_base", "{m}");
        }
        for m in [
            "gpt-4",
            "gpt-4-0613",
            "gpt-4-turbo",
            "gpt-3.5-turbo",
            "gpt-35-turbo",
            "text-embedding-3-small",
            "openai/gpt-4-32k",
        ] {
            assert_eq!(encoding_name(m), "cl100k_base", "{m}");
        }
        assert_eq!(encoding_name("claude-sonnet-4-5"), "o200k_base");
        assert_eq!(encoding_name("llama-3.1-70b"), "o200k_base");
    }

    #[test]
    fn families() {
        assert_eq!(Family::of("o3"), Family::OpenAi);
        assert_eq!(Family::of("o4-mini-2025-04-16"), Family::OpenAi);
        assert_eq!(Family::of("gpt-4o"), Family::OpenAi);
        assert_eq!(Family::of("anthropic/claude-3-5-haiku"), Family::Claude);
        assert_eq!(Family::of("olmo-7b"), Family::Other);
        assert_eq!(Family::of("mistral-large"), Family::Other);
    }
}
