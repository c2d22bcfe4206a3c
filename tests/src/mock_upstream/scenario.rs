//! Which behaviour a request gets, chosen by the `model` field of its body.
//!
//! What each scenario sends (N = [`MockOptions::chunks`](super::MockOptions), P =
//! [`prompt_tokens_for`](super::prompt_tokens_for)):
//!
//! | model | OpenAI `/v1/chat/completions` | Anthropic `/v1/messages` |
//! | --- | --- | --- |
//! | anything else (`normal`) | role chunk, N content chunks, finish chunk (`stop`, or `length` truncated to `max_completion_tokens`/`max_tokens`), usage-only chunk `choices:[]` iff `stream_options.include_usage` (then every other chunk has `"usage":null`), `data: [DONE]`; usage P / N | `message_start` (input P, output 1), `content_block_start`, one `ping`, N `text_delta`s, `content_block_stop`, `message_delta` (`end_turn` or `max_tokens`, `usage:{output_tokens:N}`), `message_stop` |
//! | `cached` | as normal, `prompt_tokens_details.cached_tokens` = P/2 | as normal, `cache_read_input_tokens` = P/2, `input_tokens` = P − P/2 |
//! | `usage-in-last-choice-chunk` | the finish chunk also carries `usage` (always); no usage-only chunk | = normal |
//! | `anthropic-usage-split` | = normal | `message_delta.usage` repeats `input_tokens` (P + [`SPLIT_EXTRA_INPUT_TOKENS`](super::SPLIT_EXTRA_INPUT_TOKENS)), cache fields, `output_tokens` N |
//! | `tools` | two parallel `tool_calls` (index 0, 1; id+name+`""` first, then argument fragments), `finish_reason: tool_calls` | text block (3 deltas), two `tool_use` blocks streamed as `input_json_delta` (first one empty), `stop_reason: tool_use` |
//! | `split-frames` | normal stream with CRLF, comment lines, cut across writes 1 ms apart | same |
//! | `error-midstream` | 3 content chunks, `data: {"error":{...server_error...}}`, clean end without `[DONE]`; non-streaming: 500 | 3 deltas, `event: error` `overloaded_error`, clean end; non-streaming: 529 |
//! | `rate-limited` | 429 `type: requests`, `code: rate_limit_exceeded`, `retry-after: 1`, `retry-after-ms: 1000`, `x-ratelimit-remaining-requests: 0`, `x-ratelimit-reset-requests: 1s` | 429 `rate_limit_error`, `retry-after: 1`, `anthropic-ratelimit-requests-*` |
//! | `server-error` | 500 `server_error` | 500 `api_error` |
//! | `overloaded` | 503 `server_error` | 529 `overloaded_error` |
//! | `bad-request` | 400 `invalid_request_error`, `param: temperature` | 400 `invalid_request_error` |
//! | `hang` | streaming: headers only, then nothing; otherwise nothing at all | same |
//! | `slow` | normal, at least 50 ms between content chunks | same |
//! | `context-length-exceeded` | 400 `invalid_request_error`, `code: context_length_exceeded`, `param: messages` | 400 `invalid_request_error` "prompt is too long: … tokens > 200000 maximum" |
//! | `drop-midstream` | 3 content chunks, then the connection is aborted (no terminating chunk); non-streaming: half the body under a full `content-length`, then abort | same |
//! | `stall-midstream` | 3 content chunks, then nothing more, the connection held open until the client leaves; non-streaming: half the body under a full `content-length`, then nothing | same |
//!
//! | `huge-line` | 3 content chunks, then one data line of [`HUGE_LINE_BYTES`](super::HUGE_LINE_BYTES) without a newline (in 64 KiB writes), then nothing | = normal |
//! | `keepalive-only` | 3 content chunks, then only `: ping` comments, one every [`KEEPALIVE_INTERVAL`](super::KEEPALIVE_INTERVAL), for minutes | = normal |
//! | `huge-usage` | as normal, but usage reports `prompt_tokens` 18446744073709551615 and a wrapped `total_tokens` (streamed: in the usage chunk whether or not it was asked for) | = normal |
//! | `giant-no-space` | streamed: [`GIANT_REPLY_BYTES`](super::GIANT_REPLY_BYTES) of `x` without a space, in 5,000-byte content chunks, no usage chunk (even if asked), `[DONE]` | = normal |
//!
//! Error, `hang` and `rate-limited`-style scenarios apply to `/v1/embeddings` too; `no-usage`
//! applies to it only: the embeddings come without a `usage` object (some OpenAI-compatible
//! servers leave it out).

/// A mock behaviour, selected by the request's `model` (see [`Scenario::from_model`]).
///
/// The gateway forwards the deployment's upstream model name, so an end-to-end test picks a
/// scenario by naming it as the upstream model in the gateway's config.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scenario {
    /// Any model name that is not one of the names below.
    Normal,
    /// `cached`: usage reports half the prompt as read from the prompt cache.
    Cached,
    /// `usage-in-last-choice-chunk` (OpenAI route only): the finish chunk carries the usage.
    UsageInLastChoiceChunk,
    /// `anthropic-usage-split` (Anthropic route only): `message_delta` repeats the input usage.
    AnthropicUsageSplit,
    /// `tools`: two parallel tool calls instead of text.
    Tools,
    /// `split-frames`: SSE frames cut across TCP writes, CRLF line endings, comment lines.
    SplitFrames,
    /// `error-midstream`: three content chunks, then the provider's in-stream error.
    ErrorMidstream,
    /// `rate-limited`: HTTP 429 with retry headers.
    RateLimited,
    /// `server-error`: HTTP 500.
    ServerError,
    /// `overloaded`: HTTP 529 `overloaded_error` (Anthropic); HTTP 503 on the OpenAI route.
    Overloaded,
    /// `bad-request`: HTTP 400 `invalid_request_error`.
    BadRequest,
    /// `hang`: never sends a body byte.
    Hang,
    /// `slow`: like normal with at least 50 ms between chunks.
    Slow,
    /// `drop-midstream`: three content chunks, then the connection is dropped.
    DropMidstream,
    /// `stall-midstream`: three content chunks, then silence until the client goes away, so
    /// that the response can only end by the client's cancellation.
    StallMidstream,
    /// `context-length-exceeded`: HTTP 400, the prompt is over the model's context window.
    ContextLengthExceeded,
    /// `no-usage` (`/v1/embeddings` only): no `usage` object.
    NoUsage,
    /// `huge-line` (OpenAI route): an endless data line after three chunks.
    HugeLine,
    /// `keepalive-only` (OpenAI route): keep-alive comments and no data after three chunks.
    KeepaliveOnly,
    /// `huge-usage` (OpenAI route): a usage report of u64::MAX prompt tokens.
    HugeUsage,
    /// `giant-no-space` (OpenAI route, streamed): megabytes of output without a space and no
    /// usage.
    GiantNoSpace,
}

impl Scenario {
    /// Every scenario, in declaration order.
    pub const ALL: [Scenario; 21] = [
        Scenario::Normal,
        Scenario::Cached,
        Scenario::UsageInLastChoiceChunk,
        Scenario::AnthropicUsageSplit,
        Scenario::Tools,
        Scenario::SplitFrames,
        Scenario::ErrorMidstream,
        Scenario::RateLimited,
        Scenario::ServerError,
        Scenario::Overloaded,
        Scenario::BadRequest,
        Scenario::Hang,
        Scenario::Slow,
        Scenario::DropMidstream,
        Scenario::StallMidstream,
        Scenario::ContextLengthExceeded,
        Scenario::NoUsage,
        Scenario::HugeLine,
        Scenario::KeepaliveOnly,
        Scenario::HugeUsage,
        Scenario::GiantNoSpace,
    ];

    /// The scenario a model name selects; unknown names are [`Scenario::Normal`].
    pub fn from_model(model: &str) -> Scenario {
        match model {
            "cached" => Scenario::Cached,
            "usage-in-last-choice-chunk" => Scenario::UsageInLastChoiceChunk,
            "anthropic-usage-split" => Scenario::AnthropicUsageSplit,
            "tools" => Scenario::Tools,
            "split-frames" => Scenario::SplitFrames,
            "error-midstream" => Scenario::ErrorMidstream,
            "rate-limited" => Scenario::RateLimited,
            "server-error" => Scenario::ServerError,
            "overloaded" => Scenario::Overloaded,
            "bad-request" => Scenario::BadRequest,
            "hang" => Scenario::Hang,
            "slow" => Scenario::Slow,
            "drop-midstream" => Scenario::DropMidstream,
            "stall-midstream" => Scenario::StallMidstream,
            "context-length-exceeded" => Scenario::ContextLengthExceeded,
            "no-usage" => Scenario::NoUsage,
            "huge-line" => Scenario::HugeLine,
            "keepalive-only" => Scenario::KeepaliveOnly,
            "huge-usage" => Scenario::HugeUsage,
            "giant-no-space" => Scenario::GiantNoSpace,
            _ => Scenario::Normal,
        }
    }

    /// The model name that selects this scenario (`normal` for [`Scenario::Normal`], though
    /// any unknown name does).
    pub fn model_name(self) -> &'static str {
        match self {
            Scenario::Normal => "normal",
            Scenario::Cached => "cached",
            Scenario::UsageInLastChoiceChunk => "usage-in-last-choice-chunk",
            Scenario::AnthropicUsageSplit => "anthropic-usage-split",
            Scenario::Tools => "tools",
            Scenario::SplitFrames => "split-frames",
            Scenario::ErrorMidstream => "error-midstream",
            Scenario::RateLimited => "rate-limited",
            Scenario::ServerError => "server-error",
            Scenario::Overloaded => "overloaded",
            Scenario::BadRequest => "bad-request",
            Scenario::Hang => "hang",
            Scenario::Slow => "slow",
            Scenario::DropMidstream => "drop-midstream",
            Scenario::StallMidstream => "stall-midstream",
            Scenario::ContextLengthExceeded => "context-length-exceeded",
            Scenario::NoUsage => "no-usage",
            Scenario::HugeLine => "huge-line",
            Scenario::KeepaliveOnly => "keepalive-only",
            Scenario::HugeUsage => "huge-usage",
            Scenario::GiantNoSpace => "giant-no-space",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Scenario;

    #[test]
    fn names_round_trip() {
        for scenario in Scenario::ALL {
            assert_eq!(Scenario::from_model(scenario.model_name()), scenario);
        }
        assert_eq!(Scenario::from_model("gpt-4o-mini"), Scenario::Normal);
    }
}
