//! The `[routing]` table (defaults for every alias) and the routing keys of deployments and
//! aliases. Every key has a default, so a config without any of them routes as before:
//! weighted random, with retries, fallbacks and breakers on.

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer};

/// How an alias orders its deployments for a request (the first is tried first, the rest are
/// its fallbacks, in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// First by weight at random, then the rest in config order.
    #[default]
    WeightedRandom,
    /// Config order: the first healthy deployment wins (a priority chain).
    Ordered,
    /// Fewest requests in flight from this gateway (and, for vLLM deployments that expose
    /// their metrics, fewest running + waiting on the server).
    LeastInFlight,
    /// Lowest moving estimate of time to first token; unmeasured deployments first.
    LowestLatency,
    /// Lowest expected cost at the deployment's configured price; unpriced ones last.
    LowestCost,
    /// Deployments with monthly committed spend left first (most left first), then the rest
    /// by lowest cost.
    CommitAware,
}

impl Strategy {
    /// Bounded label for headers, events and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Strategy::WeightedRandom => "weighted_random",
            Strategy::Ordered => "ordered",
            Strategy::LeastInFlight => "least_in_flight",
            Strategy::LowestLatency => "lowest_latency",
            Strategy::LowestCost => "lowest_cost",
            Strategy::CommitAware => "commit_aware",
        }
    }
}

/// `[routing]`: defaults for every alias.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Strategy of aliases that name none.
    pub strategy: Strategy,
    /// `[routing.retry]`.
    pub retry: RetryConfig,
    /// `[routing.breaker]`.
    pub breaker: BreakerConfig,
    /// `[routing.hedge]`.
    pub hedge: HedgeConfig,
    /// `[routing.rate_limits]`.
    pub rate_limits: RateLimitConfig,
}

/// Retries (same deployment) and the deadline that bounds retries and fallbacks together.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries on the same deployment after a retryable failure (5xx, connection error), before
    /// moving to the next deployment. 0 moves on at once.
    pub max_retries: u32,
    /// Most attempts per request, all deployments together (retries + fallbacks + 1).
    pub max_attempts: u32,
    /// Backoff before retry n (from 0) is uniform in `[0, min(max_backoff, base × 2^n)]`
    /// ("full jitter").
    pub base_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Everything before the first byte reaches the client (attempts, waits) fits in this.
    /// The default matches the default `first_byte_timeout_ms`: a non-streamed answer's first
    /// byte only comes once the whole answer is generated.
    pub deadline_ms: u64,
    /// An upstream `retry-after` longer than this is not waited for: the deployment counts as
    /// exhausted and the next one is tried (or the 429 is returned).
    pub max_retry_after_ms: u64,
    /// Whether a time-to-first-token timeout is retried on the same deployment (by default a
    /// deployment that hung is left for the next one).
    pub retry_timeouts: bool,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 2,
            max_attempts: 6,
            base_backoff_ms: 50,
            max_backoff_ms: 2_000,
            deadline_ms: 600_000,
            max_retry_after_ms: 10_000,
            retry_timeouts: false,
        }
    }
}

/// Circuit breaker of every deployment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// `false` turns breakers off (every deployment always closed).
    pub enabled: bool,
    /// Opens after this many failures in a row.
    pub consecutive_failures: u32,
    /// Opens when failures (and slow calls) are at least this share of the calls in the
    /// window, once the window holds `min_calls`.
    pub failure_ratio: f64,
    pub min_calls: u32,
    /// The sliding window for the ratio.
    pub window_ms: u64,
    /// A call whose time to first byte exceeds this counts as slow (a failure for the ratio,
    /// not for the consecutive count). 0: no latency threshold.
    pub slow_call_ms: u64,
    /// How long an open breaker rejects calls before letting probes through (half-open).
    pub open_ms: u64,
    /// Successful probes that close a half-open breaker; one failed probe re-opens it.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            enabled: true,
            consecutive_failures: 5,
            failure_ratio: 0.5,
            min_calls: 20,
            window_ms: 30_000,
            slow_call_ms: 0,
            open_ms: 10_000,
            half_open_probes: 1,
        }
    }
}

/// Hedging of high-priority requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HedgeConfig {
    /// Send a second request after this long without a first byte from the first.
    pub delay_ms: u64,
}

impl Default for HedgeConfig {
    fn default() -> Self {
        HedgeConfig { delay_ms: 500 }
    }
}

/// Steering away from deployments near their upstream rate limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Read the upstream's `x-ratelimit-*` / `anthropic-ratelimit-*` headers.
    pub follow_upstream_headers: bool,
    /// A deployment with at most this many requests left (upstream header) is tried after
    /// the others; with 0 left it is skipped until the reset.
    pub near_limit_requests: u64,
    /// The same for tokens left.
    pub near_limit_tokens: u64,
    /// Share deployments' RPM/TPM accounting with the other gateway instances through this
    /// Redis (see `routing/shared.rs`); unset: each instance counts alone.
    pub shared_redis_url: Option<String>,
    /// How often the shared accounting is exchanged with Redis.
    pub shared_sync_ms: u64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            follow_upstream_headers: true,
            near_limit_requests: 2,
            near_limit_tokens: 2_000,
            shared_redis_url: None,
            shared_sync_ms: 250,
        }
    }
}

/// Routing keys every deployment may carry.
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeploymentLimits {
    /// Requests per minute this deployment (provider key) may take; `None`: no local limit.
    pub rpm: Option<u64>,
    /// Tokens (input + output) per minute.
    pub tpm: Option<u64>,
}

/// A deployment's price, per million tokens (exact decimals, written as strings).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeploymentPrice {
    #[serde(deserialize_with = "price")]
    pub input_per_mtok: Decimal,
    #[serde(deserialize_with = "price")]
    pub output_per_mtok: Decimal,
}

/// A price per million tokens (see [`decimal`]) within the bounds every price has
/// (`tollgate_schemas::pricing::check_price`).
fn price<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    let v = decimal(d)?;
    tollgate_schemas::pricing::check_price(v)
        .map_err(|e| serde::de::Error::custom(format!("a price per million tokens {e}")))?;
    Ok(v)
}

/// A decimal from a TOML string (`"2.50"`, exact) or number.
pub fn decimal<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Int(i64),
        Float(f64),
    }
    let text = match Raw::deserialize(d)? {
        Raw::Text(s) => s,
        Raw::Int(i) => i.to_string(),
        Raw::Float(f) => f.to_string(),
    };
    text.trim()
        .parse::<Decimal>()
        .map_err(|_| serde::de::Error::custom(format!("`{text}` is not a decimal number")))
}

/// An optional decimal (see [`decimal`]).
pub fn decimal_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
    decimal(d).map(Some)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    #[test]
    fn prices_parse_exactly_from_strings_and_numbers() {
        #[derive(Deserialize)]
        struct T {
            price: DeploymentPrice,
        }
        let t: T =
            toml::from_str(r#"price = { input_per_mtok = "2.50", output_per_mtok = 10 }"#).unwrap();
        assert_eq!(t.price.input_per_mtok, Decimal::new(250, 2));
        assert_eq!(t.price.output_per_mtok, Decimal::from(10));
        let huge =
            r#"price = { input_per_mtok = "79228162514264337593543950335", output_per_mtok = 1 }"#;
        let Err(e) = toml::from_str::<T>(huge) else {
            panic!("a price out of range is refused");
        };
        let e = e.to_string();
        assert!(e.contains("must be at most 1000000"), "{e}");
    }
}
