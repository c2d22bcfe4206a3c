//! OpenAI ↔ Anthropic translation, both ways: requests, responses, streams and usage.
//!
//! | file | owns |
//! |---|---|
//! | `usage.rs` | usage in each dialect ↔ the canonical [`tollgate_schemas::TokenUsage`] |
//! | `request.rs` | request bodies: OpenAI → Anthropic and Anthropic → OpenAI |
//! | `response.rs` | non-streaming responses, both ways |
//! | `stream.rs` | stream adapters: Anthropic events → OpenAI chunks, OpenAI chunks → Anthropic events |
//!
//! What has no equivalent on the other side is documented where it is dropped or approximated.

pub mod request;
pub mod response;
pub mod stream;
pub mod usage;

/// OpenAI `finish_reason` for an Anthropic `stop_reason`.
pub fn finish_reason_from_anthropic(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and anything new.
        _ => "stop",
    }
}

/// Anthropic `stop_reason` for an OpenAI `finish_reason`.
pub fn stop_reason_from_openai(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}
