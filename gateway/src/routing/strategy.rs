//! Which deployment of an alias to try next.
//!
//! Each pick looks at the deployments not tried yet for this request and sorts them into
//! tiers: *free*, *near a limit* (upstream headers say few requests/tokens are left, or a vLLM
//! server's KV cache is nearly full) and *unavailable* (breaker open, over the local RPM/TPM
//! limit, or upstream-exhausted until a reset; never picked). The alias's strategy chooses
//! within the best non-empty tier. Nothing here allocates: an alias has at most 64 deployments
//! and "tried" is a bit mask.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use rust_decimal::Decimal;

use super::config::Strategy;
use super::health::Headroom;
use super::limiter::DeploymentLimiter;
use super::Deployment;
use tollgate_schemas::TokenUsage;

/// One in twenty `lowest_latency` picks explores a random deployment, so that an estimate
/// made during a bad minute is measured again.
const EXPLORE_ONE_IN: u32 = 20;

/// What a pick needs to know about the request.
#[derive(Debug, Clone)]
pub struct RankInput {
    /// The tenant asking (for its fair share of a saturated deployment).
    pub tenant: Arc<str>,
    pub prompt_tokens: u64,
    pub expected_output_tokens: u64,
    pub now: Instant,
    pub wall: SystemTime,
    pub near_requests: u64,
    pub near_tokens: u64,
    /// vLLM load older than this is ignored.
    pub load_stale_after: Duration,
}

/// Why no deployment could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Every untried deployment's breaker is open.
    BreakerOpen,
    /// Every untried deployment is over a rate limit; the earliest reset.
    RateLimited(Instant),
}

/// The outcome of a pick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    Deployment(usize),
    /// Every deployment has been tried.
    Exhausted,
    /// Some are left, none usable now.
    Unavailable(Unavailable),
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    Free = 0,
    Near = 1,
}

/// Picks the next deployment among `deployments` not in `tried` (bit i = index i).
pub fn pick(
    strategy: Strategy,
    deployments: &[std::sync::Arc<Deployment>],
    tried: u64,
    input: &RankInput,
    limiter: &dyn DeploymentLimiter,
    rng: &mut impl Rng,
) -> Pick {
    let tokens = input.prompt_tokens + input.expected_output_tokens;
    let mut best_tier = None;
    let mut unavailable = None;
    let mut tiers = [None; 64];
    for (i, d) in deployments.iter().enumerate().take(64) {
        if tried & (1u64 << i) != 0 {
            continue;
        }
        match tier(d, input, tokens, limiter) {
            Ok(t) => {
                tiers[i] = Some(t);
                best_tier = Some(best_tier.map_or(t, |b: Tier| b.min(t)));
            }
            Err(u) => {
                unavailable = Some(match (unavailable, u) {
                    (Some(Unavailable::RateLimited(a)), Unavailable::RateLimited(b)) => {
                        Unavailable::RateLimited(a.min(b))
                    }
                    (Some(Unavailable::RateLimited(a)), Unavailable::BreakerOpen) => {
                        Unavailable::RateLimited(a)
                    }
                    (_, u) => u,
                })
            }
        }
    }
    let Some(best) = best_tier else {
        return unavailable.map_or(Pick::Exhausted, Pick::Unavailable);
    };
    let eligible = |i: usize| tiers[i] == Some(best);
    let first = || (0..deployments.len().min(64)).find(|&i| eligible(i));
    let min_by = |key: &dyn Fn(&Deployment) -> Option<Decimal>| {
        let mut best: Option<(usize, Option<Decimal>)> = None;
        for i in (0..deployments.len().min(64)).filter(|&i| eligible(i)) {
            let k = key(&deployments[i]);
            // `None` sorts after every value.
            let better = match (&best, &k) {
                (None, _) => true,
                (Some((_, None)), Some(_)) => true,
                (Some((_, Some(b))), Some(k)) => k < b,
                _ => false,
            };
            if better {
                best = Some((i, k));
            }
        }
        best.map(|(i, _)| i)
    };
    let chosen = match strategy {
        Strategy::Ordered => first(),
        Strategy::WeightedRandom => weighted(deployments, &eligible, rng),
        Strategy::LeastInFlight => min_by(&|d| {
            Some(Decimal::from(
                d.health.load(input.now, input.load_stale_after),
            ))
        }),
        Strategy::LowestLatency => {
            if rng.gen_range(0..EXPLORE_ONE_IN) == 0 {
                uniform(deployments, &eligible, rng)
            } else {
                // Unmeasured deployments (estimate 0) go first: they get measured.
                min_by(&|d| {
                    Some(Decimal::from(d.health.ttft_estimate().map_or(0, |t| {
                        u64::try_from(t.as_micros()).unwrap_or(u64::MAX)
                    })))
                })
            }
        }
        Strategy::LowestCost => min_by(&|d| expected_cost(d, input)),
        Strategy::CommitAware => {
            // Most committed spend left first (as a negative key), then the cheapest.
            let with_commit = min_by(&|d| {
                commit_left(d, input.wall)
                    .filter(|left| *left > Decimal::ZERO)
                    .map(|left| -left)
            });
            match with_commit {
                Some(i)
                    if commit_left(&deployments[i], input.wall)
                        .is_some_and(|l| l > Decimal::ZERO) =>
                {
                    Some(i)
                }
                _ => min_by(&|d| expected_cost(d, input)),
            }
        }
    };
    chosen
        .or_else(first)
        .map_or(Pick::Exhausted, Pick::Deployment)
}

/// The deployment a request goes to when the strategy has none left to offer but some of
/// `candidates` (bit i = index i) were never sent this request: only an open breaker (or a
/// probe slot taken at the moment of sending) keeps them out, and a breaker moves load to
/// healthy deployments, it does not turn away requests nobody else can serve. The one whose
/// last success is the most recent goes first (those that never succeeded last, ties in config
/// order). Deployments over a rate limit are not candidates: the limit is the operator's (or
/// the upstream's) word.
pub fn last_resort(
    deployments: &[Arc<Deployment>],
    candidates: u64,
    input: &RankInput,
    limiter: &dyn DeploymentLimiter,
) -> Option<usize> {
    let tokens = input.prompt_tokens + input.expected_output_tokens;
    let mut best: Option<(usize, Option<Instant>)> = None;
    for (i, d) in deployments.iter().enumerate().take(64) {
        if candidates & (1u64 << i) == 0 || rate_tier(d, input, tokens, limiter).is_err() {
            continue;
        }
        let last = d.health.last_success();
        // `None` < `Some(_)`: a deployment that never succeeded loses to any that did.
        if best.is_none_or(|(_, b)| last > b) {
            best = Some((i, last));
        }
    }
    best.map(|(i, _)| i)
}

fn tier(
    d: &Deployment,
    input: &RankInput,
    tokens: u64,
    limiter: &dyn DeploymentLimiter,
) -> Result<Tier, Unavailable> {
    if !d.health.breaker.would_admit(input.now) {
        return Err(Unavailable::BreakerOpen);
    }
    rate_tier(d, input, tokens, limiter)
}

/// [`tier`] as the rate limits alone see it.
fn rate_tier(
    d: &Deployment,
    input: &RankInput,
    tokens: u64,
    limiter: &dyn DeploymentLimiter,
) -> Result<Tier, Unavailable> {
    if let Err(until) = limiter.check(&d.name, &input.tenant, &d.limits, tokens, input.now) {
        return Err(Unavailable::RateLimited(until));
    }
    match d
        .health
        .upstream_headroom(input.now, tokens, input.near_requests, input.near_tokens)
    {
        Headroom::Exhausted(until) => Err(Unavailable::RateLimited(until)),
        Headroom::Near => Ok(Tier::Near),
        Headroom::Free
            if d.health
                .kv_cache_nearly_full(input.now, input.load_stale_after) =>
        {
            Ok(Tier::Near)
        }
        Headroom::Free => Ok(Tier::Free),
    }
}

/// The cost of the request at `d`'s price, with the expected output; `None` when unpriced
/// (or beyond the exact range: absurd token counts).
pub fn expected_cost(d: &Deployment, input: &RankInput) -> Option<Decimal> {
    let usage = TokenUsage {
        input_tokens: input.prompt_tokens,
        output_tokens: input.expected_output_tokens,
        ..TokenUsage::default()
    };
    super::dispatch::price_of(d, &usage)
}

/// Monthly commit not yet spent; `None` without a commit.
pub fn commit_left(d: &Deployment, wall: SystemTime) -> Option<Decimal> {
    d.monthly_commit
        .map(|c| c - d.health.spent_this_month(wall))
}

fn weighted(
    deployments: &[std::sync::Arc<Deployment>],
    eligible: &dyn Fn(usize) -> bool,
    rng: &mut impl Rng,
) -> Option<usize> {
    let n = deployments.len().min(64);
    let total: u64 = (0..n)
        .filter(|&i| eligible(i))
        .map(|i| u64::from(deployments[i].weight))
        .sum();
    if total == 0 {
        return None;
    }
    let mut ticket = rng.gen_range(0..total);
    for i in (0..n).filter(|&i| eligible(i)) {
        let w = u64::from(deployments[i].weight);
        if ticket < w {
            return Some(i);
        }
        ticket -= w;
    }
    None
}

fn uniform(
    deployments: &[std::sync::Arc<Deployment>],
    eligible: &dyn Fn(usize) -> bool,
    rng: &mut impl Rng,
) -> Option<usize> {
    let n = deployments.len().min(64);
    let count = (0..n).filter(|&i| eligible(i)).count();
    if count == 0 {
        return None;
    }
    let k = rng.gen_range(0..count);
    (0..n).filter(|&i| eligible(i)).nth(k)
}
