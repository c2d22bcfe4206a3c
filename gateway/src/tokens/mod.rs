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
//!
//! Memory: an encoding's tables take tens of MB (`o200k_base` about 50, `cl100k_base` about
//! 12), most of an idle gateway's memory, so each is loaded on first need, not at start
//! (`server.preload_tokenizers` loads both at start instead). Exact counts ([`count_text`],
//! [`count_openai_prompt`], [`count_anthropic_prompt`]) wait for the load (about 0.1 s, once);
//! pre-flight estimates ([`estimate_openai_prompt`], [`estimate_anthropic_prompt`],
//! [`TextCounter::estimate`]) never wait: while their encoding is still loading, on a
//! background thread that the first one starts, they count a quarter of a token per byte.
//!
//! Hostile input: every count goes through [`count_with`], linear in the text's length and
//! bounded in cost (segments of [`SEGMENT_BYTES`], the first [`EXACT_BYTES`] counted exactly,
//! the rest extrapolated) and never panicking; callers count inputs of [`OFF_THREAD_BYTES`]
//! or more on the blocking pool ([`off_thread`]).

mod chat;
mod media;
mod messages;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tiktoken_rs::CoreBPE;

pub use chat::{count_openai_prompt, estimate_openai_prompt};
pub use media::{anthropic_image_tokens, openai_image_tokens, ImageDetail};
pub use messages::{count_anthropic_prompt, estimate_anthropic_prompt};

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

/// The two encodings, by index: `o200k_base`, `cl100k_base`.
const ENCODINGS: usize = 2;

fn index_of(model: &str) -> usize {
    usize::from(uses_cl100k(model))
}

/// Each encoding once loaded; whether its background load was started.
static LOADED: [OnceLock<&'static CoreBPE>; ENCODINGS] = [OnceLock::new(), OnceLock::new()];
static LOADING: [AtomicBool; ENCODINGS] = [AtomicBool::new(false), AtomicBool::new(false)];

/// Encoding `i`, loaded now if it is not yet (blocking).
fn load(i: usize) -> &'static CoreBPE {
    LOADED[i].get_or_init(|| {
        if i == 0 {
            tiktoken_rs::o200k_base_singleton()
        } else {
            tiktoken_rs::cl100k_base_singleton()
        }
    })
}

/// `model`'s encoding, loaded first if needed (blocking, once).
fn encoding_for(model: &str) -> &'static CoreBPE {
    load(index_of(model))
}

/// `model`'s encoding if it is loaded; else `None`, with its load started on a background
/// thread (once).
fn encoding_if_loaded(model: &str) -> Option<&'static CoreBPE> {
    let i = index_of(model);
    if let Some(enc) = LOADED[i].get() {
        return Some(enc);
    }
    if !LOADING[i].swap(true, Ordering::AcqRel) {
        let started = std::thread::Builder::new()
            .name("tollgate-tokenizer".into())
            .spawn(move || {
                load(i);
            });
        if started.is_err() {
            // No thread: the next exact count loads it.
            LOADING[i].store(false, Ordering::Release);
        }
    }
    None
}

/// Loads both encodings now (`server.preload_tokenizers`), so the first requests count
/// exactly without waiting.
pub fn warm_up() {
    let _ = count_with(load(0), "warm up");
    let _ = count_with(load(1), "warm up");
}

/// How text of one model is counted: with its encoding, or, for an estimate whose encoding is
/// still loading, at a quarter of a token per byte ([`fallback_count`]).
#[derive(Clone, Copy)]
pub struct TextCounter(Option<&'static CoreBPE>);

impl TextCounter {
    /// Exact: waits for `model`'s encoding if it is loading.
    pub fn exact(model: &str) -> TextCounter {
        TextCounter(Some(encoding_for(model)))
    }

    /// Never waits: exact once `model`'s encoding is loaded, by bytes until then.
    pub fn estimate(model: &str) -> TextCounter {
        TextCounter(encoding_if_loaded(model))
    }

    pub fn count(&self, text: &str) -> u64 {
        match self.0 {
            Some(enc) => count_with(enc, text),
            None => fallback_count(text),
        }
    }
}

/// Tokens in `text` under `model`'s encoding (no family scaling: this is tiktoken's count,
/// in bounded pieces; see [`count_with`]).
pub fn count_text(model: &str, text: &str) -> u64 {
    count_with(encoding_for(model), text)
}

/// Longest segment of text handed to tiktoken in one call. Its pre-split regex makes a run
/// without whitespace one piece, and its byte-pair merge costs the square of a piece's
/// length (4.5 s of CPU for 100 KB of `x`, and past about 1 MB the regex gives up and
/// tiktoken panics). Text is cut into segments of at most this many bytes: before a space
/// that follows a non-space, when the second half of the segment has one (a boundary of
/// tiktoken's own pre-split, so ordinary text is counted exactly), else at the last char
/// boundary. A cut inside a run without spaces costs at most about one token more than
/// tiktoken's count of the whole run (under 1% at this size).
pub const SEGMENT_BYTES: usize = 512;

/// Text counted exactly, segment by segment; what follows is estimated at the rate of the
/// counted part (tokens per byte, rounded up), so that counting stays within a bounded cost
/// whatever the size of a prompt or an output.
pub const EXACT_BYTES: usize = 256 * 1024;

/// Inputs (request bodies, texts) at least this large are counted on the blocking pool, never
/// on a serving thread, whose other connections would wait meanwhile.
pub const OFF_THREAD_BYTES: usize = 16 * 1024;

/// Tokens in `text` under `enc`, in time linear in its length: [`SEGMENT_BYTES`]-long
/// segments, the first [`EXACT_BYTES`] counted exactly and the rest extrapolated. Never
/// panics: a segment tiktoken fails on counts as its bytes / 4, rounded up.
pub fn count_with(enc: &CoreBPE, text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let mut tokens: u64 = 0;
    let mut at = 0;
    while at < text.len() && at < EXACT_BYTES {
        let end = segment_end(text, at);
        tokens = tokens.saturating_add(count_segment(enc, &text[at..end]));
        at = end;
    }
    if at >= text.len() {
        return tokens;
    }
    // The rest at the counted part's rate, rounded up.
    let rest = (text.len() - at) as u128;
    let extra = (u128::from(tokens) * rest).div_ceil(at.max(1) as u128);
    tokens.saturating_add(u64::try_from(extra).unwrap_or(u64::MAX))
}

/// The fallback count of text tiktoken could not count: a byte-based estimate (about four
/// bytes a token in English under both encodings), rounded up.
pub fn fallback_count(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4)
}

fn count_segment(enc: &CoreBPE, segment: &str) -> u64 {
    // Segments are short enough that tiktoken's regex cannot fail on them; should it panic
    // all the same, the request must not fail with it.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        enc.encode_ordinary(segment).len() as u64
    }))
    .unwrap_or_else(|_| fallback_count(segment))
}

/// Where the segment starting at `start` ends (see [`SEGMENT_BYTES`]): the end of the text,
/// before the last space that follows a non-space in the second half of the window, or the
/// last char boundary of the window.
fn segment_end(text: &str, start: usize) -> usize {
    let limit = start + SEGMENT_BYTES;
    if limit >= text.len() {
        return text.len();
    }
    let bytes = text.as_bytes();
    let half = start + SEGMENT_BYTES / 2;
    let mut p = limit;
    while p > half {
        if bytes[p] == b' ' && !bytes[p - 1].is_ascii_whitespace() {
            return p;
        }
        p -= 1;
    }
    let mut p = limit;
    while !text.is_char_boundary(p) {
        p -= 1;
    }
    p
}

/// Runs a count on the blocking pool when its input is `bytes` ≥ [`OFF_THREAD_BYTES`]
/// long, inline otherwise. `None` if the count could not finish (its task panicked or was
/// cancelled at shutdown).
pub async fn off_thread<T, F>(bytes: usize, count: F) -> Option<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if bytes < OFF_THREAD_BYTES {
        return Some(count());
    }
    tokio::task::spawn_blocking(count).await.ok()
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

    /// English prose with punctuation, numbers and line breaks, `n` bytes or a little more.
    fn prose(n: usize) -> String {
        let sentence = "The gateway streams 1,024 tokens to the client, and bills them \
                        exactly once (it's cheap).\nNew paragraph:  two spaces, tab\there. ";
        sentence.repeat(n / sentence.len() + 1)
    }

    #[test]
    fn ordinary_text_is_counted_exactly_in_segments() {
        for model in ["gpt-4o", "gpt-4"] {
            let text = prose(20_000);
            let whole = encoding_for(model).encode_ordinary(&text).len() as u64;
            assert_eq!(count_text(model, &text), whole, "{model}");
        }
    }

    #[test]
    fn runs_without_spaces_are_counted_close_to_tiktoken() {
        // Small enough for tiktoken to count whole; cut into segments here.
        let samples = [
            "x".repeat(6_000),
            "aGVsbG8gd29ybGQ".repeat(400),
            "漢字かな交じり文".repeat(300),
            "🦀🚀✨".repeat(500),
            "abcабвαβγ١٢٣".repeat(300),
        ];
        for text in &samples {
            let whole = encoding_for("gpt-4o").encode_ordinary(text).len() as u64;
            let ours = count_text("gpt-4o", text);
            let cuts = text.len().div_ceil(SEGMENT_BYTES) as u64;
            assert!(
                ours.abs_diff(whole) <= cuts,
                "{}…: {ours} vs {whole}",
                &text[..12]
            );
        }
    }

    #[test]
    fn a_megabyte_without_spaces_is_counted_without_panicking() {
        // tiktoken alone panics on this (its regex gives up on a 1 MB piece).
        let text = "x".repeat(1 << 20);
        let n = count_text("gpt-4o", &text);
        // The counted part's rate, extrapolated: about the same per byte as 256 KiB.
        let head = count_text("gpt-4o", &text[..EXACT_BYTES]);
        assert!(n.abs_diff(head * 4) <= 4, "{n} vs {}", head * 4);
        assert!(n > 0);
    }

    #[test]
    fn long_whitespace_and_mixed_scripts_hold() {
        for text in [
            " ".repeat(300_000),
            "\n".repeat(300_000),
            "a\u{301}".repeat(100_000),
            "\u{10FFFF}".repeat(100_000),
        ] {
            assert!(count_text("gpt-4o", &text) > 0);
            assert!(count_text("gpt-4", &text) > 0);
        }
    }

    #[test]
    fn segments_end_on_char_boundaries_and_advance() {
        let text = "é".repeat(1000) + &"ab ".repeat(500);
        let mut at = 0;
        while at < text.len() {
            let end = segment_end(&text, at);
            assert!(end > at && end - at <= SEGMENT_BYTES && text.is_char_boundary(end));
            at = end;
        }
        assert_eq!(fallback_count("abcde"), 2);
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
