//! Usage in each dialect ↔ canonical usage.

use tollgate_schemas::{TokenUsage, UsageSource};

use crate::api::{anthropic, openai};

/// OpenAI usage (prompt tokens include cached ones) to canonical.
pub fn from_openai(u: &openai::Usage) -> TokenUsage {
    TokenUsage {
        input_tokens: u.prompt_tokens,
        cached_input_tokens: u
            .prompt_tokens_details
            .as_ref()
            .and_then(|d| d.cached_tokens)
            .unwrap_or(0),
        cache_write_input_tokens: 0,
        output_tokens: u.completion_tokens,
        source: UsageSource::Provider,
    }
}

/// Anthropic usage (input tokens exclude cache reads and writes) to canonical.
pub fn from_anthropic(u: &anthropic::Usage) -> TokenUsage {
    let read = u.cache_read_input_tokens.unwrap_or(0);
    let write = u.cache_creation_input_tokens.unwrap_or(0);
    TokenUsage {
        input_tokens: u.input_tokens.unwrap_or(0) + read + write,
        cached_input_tokens: read,
        cache_write_input_tokens: write,
        output_tokens: u.output_tokens.unwrap_or(0),
        source: UsageSource::Provider,
    }
}

/// Folds a later Anthropic usage report into an earlier one: a field the later one carries
/// replaces the earlier value (`message_delta` figures are cumulative).
pub fn merge_anthropic(into: &mut anthropic::Usage, later: &anthropic::Usage) {
    if later.input_tokens.is_some() {
        into.input_tokens = later.input_tokens;
    }
    if later.cache_creation_input_tokens.is_some() {
        into.cache_creation_input_tokens = later.cache_creation_input_tokens;
    }
    if later.cache_read_input_tokens.is_some() {
        into.cache_read_input_tokens = later.cache_read_input_tokens;
    }
    if later.output_tokens.is_some() {
        into.output_tokens = later.output_tokens;
    }
}

/// Canonical usage as OpenAI reports it.
pub fn to_openai(u: &TokenUsage) -> openai::Usage {
    openai::Usage {
        prompt_tokens: u.input_tokens,
        completion_tokens: u.output_tokens,
        total_tokens: u.total_tokens(),
        prompt_tokens_details: Some(openai::PromptTokensDetails {
            cached_tokens: Some(u.cached_input_tokens),
            audio_tokens: None,
        }),
        completion_tokens_details: None,
    }
}

/// Canonical usage as Anthropic reports it.
pub fn to_anthropic(u: &TokenUsage) -> anthropic::Usage {
    anthropic::Usage {
        input_tokens: Some(u.uncached_input_tokens()),
        cache_creation_input_tokens: Some(u.cache_write_input_tokens),
        cache_read_input_tokens: Some(u.cached_input_tokens),
        output_tokens: Some(u.output_tokens),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_between_dialects() {
        let a = anthropic::Usage {
            input_tokens: Some(10),
            cache_creation_input_tokens: Some(3),
            cache_read_input_tokens: Some(5),
            output_tokens: Some(7),
        };
        let c = from_anthropic(&a);
        assert_eq!(c.input_tokens, 18);
        assert_eq!(to_anthropic(&c), a);
        let o = to_openai(&c);
        assert_eq!(o.prompt_tokens, 18);
        assert_eq!(o.total_tokens, 25);
        let back = from_openai(&o);
        assert_eq!(back.cached_input_tokens, 5);
        assert_eq!(back.output_tokens, 7);
    }
}
