//! Usage in each dialect ↔ canonical usage, and the checks an upstream's report must pass
//! before it is billed (every number from outside is input).

use tollgate_schemas::{TokenUsage, UsageSource};

use crate::api::{anthropic, openai};

/// Why an upstream's usage report is not believed (billed by the gateway's own count
/// instead). A bounded label set for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Implausible {
    /// A figure above `server.max_reported_tokens`.
    OverCeiling,
    /// OpenAI's `total_tokens` (when given, i.e. not 0) is not `prompt_tokens +
    /// completion_tokens`.
    TotalMismatch,
    /// More cached tokens than prompt tokens.
    CachedOverPrompt,
    /// The parts do not add up within 64 bits.
    Overflow,
}

impl Implausible {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Implausible::OverCeiling => "over_ceiling",
            Implausible::TotalMismatch => "total_mismatch",
            Implausible::CachedOverPrompt => "cached_over_prompt",
            Implausible::Overflow => "overflow",
        }
    }
}

/// OpenAI usage (prompt tokens include cached ones) to canonical, if it is consistent.
pub fn from_openai(u: &openai::Usage) -> Result<TokenUsage, Implausible> {
    let cached = u
        .prompt_tokens_details
        .as_ref()
        .and_then(|d| d.cached_tokens)
        .unwrap_or(0);
    let sum = u
        .prompt_tokens
        .checked_add(u.completion_tokens)
        .ok_or(Implausible::Overflow)?;
    if u.total_tokens != 0 && u.total_tokens != sum {
        return Err(Implausible::TotalMismatch);
    }
    if cached > u.prompt_tokens {
        return Err(Implausible::CachedOverPrompt);
    }
    Ok(TokenUsage {
        input_tokens: u.prompt_tokens,
        cached_input_tokens: cached,
        cache_write_input_tokens: 0,
        output_tokens: u.completion_tokens,
        source: UsageSource::Provider,
    })
}

/// Anthropic usage (input tokens exclude cache reads and writes) to canonical, if its parts
/// add up.
pub fn from_anthropic(u: &anthropic::Usage) -> Result<TokenUsage, Implausible> {
    let read = u.cache_read_input_tokens.unwrap_or(0);
    let write = u.cache_creation_input_tokens.unwrap_or(0);
    let input = u
        .input_tokens
        .unwrap_or(0)
        .checked_add(read)
        .and_then(|n| n.checked_add(write))
        .ok_or(Implausible::Overflow)?;
    Ok(TokenUsage {
        input_tokens: input,
        cached_input_tokens: read,
        cache_write_input_tokens: write,
        output_tokens: u.output_tokens.unwrap_or(0),
        source: UsageSource::Provider,
    })
}

/// `u` if none of its figures is above `max` and its total fits in 64 bits.
pub fn within(u: TokenUsage, max: u64) -> Result<TokenUsage, Implausible> {
    let figures = [
        u.input_tokens,
        u.cached_input_tokens,
        u.cache_write_input_tokens,
        u.output_tokens,
    ];
    if figures.iter().any(|n| *n > max) {
        return Err(Implausible::OverCeiling);
    }
    u.input_tokens
        .checked_add(u.output_tokens)
        .ok_or(Implausible::Overflow)?;
    Ok(u)
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
        let c = from_anthropic(&a).unwrap();
        assert_eq!(c.input_tokens, 18);
        assert_eq!(to_anthropic(&c), a);
        let o = to_openai(&c);
        assert_eq!(o.prompt_tokens, 18);
        assert_eq!(o.total_tokens, 25);
        let back = from_openai(&o).unwrap();
        assert_eq!(back.cached_input_tokens, 5);
        assert_eq!(back.output_tokens, 7);
    }

    #[test]
    fn implausible_reports_are_refused() {
        let openai = |prompt, completion, total, cached| openai::Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total,
            prompt_tokens_details: Some(openai::PromptTokensDetails {
                cached_tokens: Some(cached),
                audio_tokens: None,
            }),
            completion_tokens_details: None,
        };
        assert!(from_openai(&openai(10, 5, 15, 4)).is_ok());
        // No total given (some compatible servers leave it out).
        assert!(from_openai(&openai(10, 5, 0, 0)).is_ok());
        // What a tester sent: u64::MAX prompt tokens, wrapped to a negative in the ledger.
        assert_eq!(
            from_openai(&openai(u64::MAX, 5, 4, 0)),
            Err(Implausible::Overflow)
        );
        assert_eq!(
            from_openai(&openai(10, 5, 16, 0)),
            Err(Implausible::TotalMismatch)
        );
        assert_eq!(
            from_openai(&openai(10, 5, 15, 11)),
            Err(Implausible::CachedOverPrompt)
        );
        let anthropic = anthropic::Usage {
            input_tokens: Some(u64::MAX),
            cache_creation_input_tokens: Some(1),
            cache_read_input_tokens: None,
            output_tokens: Some(1),
        };
        assert_eq!(from_anthropic(&anthropic), Err(Implausible::Overflow));

        let u = from_openai(&openai(10, 5, 0, 0)).unwrap();
        assert_eq!(within(u, 10), Ok(u));
        assert_eq!(within(u, 9), Err(Implausible::OverCeiling));
        let huge = TokenUsage {
            output_tokens: u64::MAX,
            ..u
        };
        assert_eq!(within(huge, u64::MAX), Err(Implausible::Overflow));
    }
}
