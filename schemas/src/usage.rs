//! Token usage as the gateway bills it, independent of the provider's wire format.
//!
//! OpenAI reports `prompt_tokens` *including* cached tokens (`prompt_tokens_details.cached_tokens`
//! is a subset); Anthropic reports `input_tokens` *excluding* cache reads and cache writes. The
//! canonical form follows OpenAI: `input_tokens` is every prompt token, and `cached_input_tokens`
//! and `cache_write_input_tokens` are the parts of it that were read from or written to a cache.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Most tokens one count of a completion (input, cached input, cache-write input, output)
/// may hold: far above any model's window, low enough that sums and costs stay exact. The
/// gateway records the upstream's usage only when it is within its own, lower ceiling; the
/// pipeline refuses a completion beyond this one (`pipeline_rejects`).
pub const MAX_TOKENS_PER_COUNT: u64 = 1_000_000_000;

/// Where a usage figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum UsageSource {
    /// The upstream provider reported it.
    #[default]
    Provider,
    /// The gateway counted it with a tokenizer (the provider reported nothing, or the client
    /// disconnected before the provider's usage arrived).
    Counted,
    /// Recovered by the billing pipeline for a request whose gateway died before writing its
    /// completion: the prompt estimate of its request event and the output tokens of its last
    /// chunk event. Replaced (exactly once) if the real completion arrives after all.
    Recovered,
}

/// Tokens of one completion, in canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, JsonSchema)]
pub struct TokenUsage {
    /// All prompt tokens, cached ones included.
    pub input_tokens: u64,
    /// Prompt tokens served from the provider's prompt cache (a subset of `input_tokens`).
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the provider's prompt cache (a subset of `input_tokens`).
    pub cache_write_input_tokens: u64,
    /// Generated tokens, reasoning tokens included.
    pub output_tokens: u64,
    /// Where the figures came from.
    pub source: UsageSource,
}

impl TokenUsage {
    /// Prompt tokens billed at the full input price.
    pub fn uncached_input_tokens(&self) -> u64 {
        self.input_tokens
            .saturating_sub(self.cached_input_tokens)
            .saturating_sub(self.cache_write_input_tokens)
    }

    /// Input plus output tokens.
    pub fn total_tokens(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncached_input_excludes_cache_reads_and_writes() {
        let u = TokenUsage {
            input_tokens: 100,
            cached_input_tokens: 30,
            cache_write_input_tokens: 20,
            output_tokens: 7,
            source: UsageSource::Provider,
        };
        assert_eq!(u.uncached_input_tokens(), 50);
        assert_eq!(u.total_tokens(), 107);
    }
}
