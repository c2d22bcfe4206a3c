//! Quotas and rate limits, enforced before the provider is called and settled when the
//! response ends.
//!
//! Every request reserves its pre-flight estimate ([`estimate`]) against each limit that
//! applies to it ([`scopes`]: per key, per tenant, per tenant × model — requests and tokens
//! per minute, concurrent requests, spend per billing period). One atomic step checks them
//! all and moves every counter, or refuses with the first limit that would be crossed (429).
//! When the response ends the actual usage replaces the estimate ([`Reservation::settle`]);
//! a stream that outgrows its reservation asks for more as it runs, and is cut off with a
//! well-formed error event when a hard limit refuses ([`StreamAllowance`]).
//!
//! | file | owns |
//! |---|---|
//! | `scopes.rs` | which limits apply to a request, from the key, its tenant and the plan |
//! | `estimate.rs` | pre-flight tokens and price (the price book, refreshed from the store) |
//! | `redis.rs` + `reserve.lua`, `settle.lua` | the shared limiter: one Lua call per reserve/settle |
//! | `resp.rs` | the minimal Redis client it uses (pooled plain connections, RESP2) |
//! | `memory.rs` | the in-process limiter: the embedded default, and the fallback when Redis is down |
//! | `headers.rs` | `x-ratelimit-*` headers and the 429 error |
//!
//! Algorithms (the README's "Quotas and rate limits" says the same):
//! - Requests and tokens per minute: a sliding window of 60 s, counted as this minute's
//!   counter plus the previous minute's weighted by the share of it still inside the window.
//! - Concurrency: a lease per request (expiring after `lease_ms` if never released).
//! - Spend per billing period, tenant-wide: the pipeline's exactly-once balance (the
//!   authority), plus what gateways settled since that balance was written (less a lag
//!   allowance), plus open reservations. Key and tenant × model budgets are counted by the
//!   gateways alone (the ledger has no per-key balance). Spend is counted in whole
//!   micro-units of the currency, estimates rounded up; the ledger itself stays exact.
//! - Hard limits refuse what would cross them and cut a running stream that would; soft
//!   limits let a running request finish and refuse new ones once crossed.

mod estimate;
mod headers;
mod memory;
mod redis;
pub(crate) mod resp;
mod scopes;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus::{IntCounterVec, IntGauge, Opts};
use serde::Deserialize;
use tollgate_schemas::TokenUsage;

use crate::auth::Caller;
use crate::error::GatewayError;
use crate::store::MetaStore;

pub use estimate::{Estimate, PriceBook};
pub use headers::RateHeaders;
pub use scopes::{Check, Kind, Scope};

use memory::MemoryLimiter;
use redis::RedisLimiter;

/// `[limits]`: where limits are counted and how estimates are made.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// `memory` (one gateway; the embedded default) or `redis` (shared by every gateway).
    pub backend: Backend,
    /// Redis URL for `backend = "redis"` (`TOLLGATE__LIMITS__REDIS_URL`).
    pub redis_url: Option<String>,
    /// Prefix of every Redis key (the pipeline's balances use the same one).
    pub key_prefix: String,
    /// How long a Redis call may take before the gateway serves on the local limiter.
    pub redis_timeout_ms: u64,
    /// While Redis is unreachable each gateway enforces this share of every limit on its own
    /// (e.g. 0.5 with two gateways).
    pub local_share: f64,
    /// Output tokens reserved when a request sets no maximum.
    pub default_max_output_tokens: u64,
    /// A reservation or concurrency lease never settled (a gateway died) expires after this.
    pub lease_ms: u64,
    /// How far the pipeline's balances may trail the gateways' settlements.
    pub ledger_lag_ms: u64,
    /// Output tokens a stream reserves each time it outgrows its reservation.
    pub stream_increment_tokens: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            backend: Backend::Memory,
            redis_url: None,
            key_prefix: "tollgate:".to_string(),
            redis_timeout_ms: 250,
            local_share: 1.0,
            default_max_output_tokens: 4096,
            lease_ms: 10 * 60 * 1000,
            ledger_lag_ms: 2_000,
            stream_increment_tokens: 1024,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        let invalid = |m: &str| Err(crate::config::ConfigError::Invalid(m.to_string()));
        if self.backend == Backend::Redis && self.redis_url.as_deref().unwrap_or("").is_empty() {
            return invalid("limits.backend = \"redis\" needs limits.redis_url");
        }
        if !(self.local_share > 0.0 && self.local_share <= 1.0) {
            return invalid("limits.local_share must be in (0, 1]");
        }
        if self.lease_ms == 0 || self.stream_increment_tokens == 0 {
            return invalid("limits.lease_ms and limits.stream_increment_tokens must be positive");
        }
        Ok(())
    }
}

/// `limits.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    Memory,
    Redis,
}

/// Output tokens an uncapped request is admitted with when the default allowance does not
/// fit its limits.
const MIN_UNCAPPED_OUTPUT_TOKENS: u64 = 16;

/// The amounts of an [`Ask`], without its borrowed ids.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Asked {
    pub tokens: u64,
    pub micros: u64,
}

/// What one reserve (or extension) asks for.
#[derive(Debug)]
pub(crate) struct Ask<'a> {
    pub request_id: &'a str,
    pub checks: &'a [Check],
    pub tokens: u64,
    pub micros: u64,
    pub extend: bool,
}

/// A limiter's answer.
#[derive(Debug, Clone)]
pub(crate) struct Verdict {
    /// The first check that refused, if any.
    pub failed: Option<usize>,
    /// The minute window the request was counted in.
    pub window: i64,
    /// Per check: what was used before this request.
    pub used: Vec<u64>,
}

/// What one settlement reports.
#[derive(Debug)]
pub(crate) struct Settlement<'a> {
    pub request_id: &'a str,
    pub checks: &'a [Check],
    /// Actual tokens minus reserved tokens.
    pub tokens_delta: i64,
    pub window: i64,
    pub micros: u64,
}

/// A limiter failed to answer (Redis unreachable or too slow).
#[derive(Debug, thiserror::Error)]
#[error("limiter unavailable: {0}")]
pub struct Unavailable(pub String);

/// Which limiter holds a reservation: it is settled where it was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holder {
    Shared,
    Local,
}

/// Limiter metrics.
#[derive(Clone)]
struct LimiterMetrics {
    degraded: IntGauge,
    transitions: IntCounterVec,
    refused: IntCounterVec,
    cut: IntCounterVec,
    errors: IntCounterVec,
}

impl LimiterMetrics {
    fn new() -> Result<Self, prometheus::Error> {
        Ok(LimiterMetrics {
            degraded: IntGauge::new(
                "tollgate_limiter_degraded",
                "1 while Redis is unreachable and limits are enforced per instance",
            )?,
            transitions: IntCounterVec::new(
                Opts::new(
                    "tollgate_limiter_transitions_total",
                    "Limiter switches between Redis and the local fallback",
                ),
                &["to"],
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "tollgate_limit_refusals_total",
                    "Requests refused by a limit",
                ),
                &["scope", "limit"],
            )?,
            cut: IntCounterVec::new(
                Opts::new(
                    "tollgate_limit_stream_cuts_total",
                    "Streams cut off because a hard limit refused more tokens",
                ),
                &["scope", "limit"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "tollgate_limiter_errors_total",
                    "Limiter calls that failed (the request was served anyway)",
                ),
                &["op"],
            )?,
        })
    }

    fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.degraded.clone()),
            Box::new(self.transitions.clone()),
            Box::new(self.refused.clone()),
            Box::new(self.cut.clone()),
            Box::new(self.errors.clone()),
        ]
    }
}

/// The limiter every request passes: Redis when configured (falling back to the local one
/// while it is unreachable), else the local one.
pub struct Limiter {
    config: LimitsConfig,
    shared: Option<RedisLimiter>,
    local: MemoryLimiter,
    degraded: AtomicBool,
    prices: PriceBook,
    metrics: LimiterMetrics,
}

impl Limiter {
    /// Builds the limiter. With Redis configured, it connects lazily: an unreachable Redis
    /// at start means serving on the local limiter until it answers.
    pub async fn start(
        config: LimitsConfig,
        store: Arc<dyn MetaStore>,
        balances: tollgate_pipeline::sink::memory::MemoryBalances,
    ) -> Result<Arc<Limiter>, GatewayError> {
        let shared = match (config.backend, &config.redis_url) {
            (Backend::Redis, Some(url)) => Some(
                RedisLimiter::new(url, &config)
                    .map_err(|e| GatewayError::Internal(format!("limits.redis_url: {e}")))?,
            ),
            _ => None,
        };
        let local_share = if shared.is_some() {
            config.local_share
        } else {
            1.0
        };
        let local = MemoryLimiter::new(&config, local_share, balances);
        let metrics = LimiterMetrics::new().map_err(|e| GatewayError::Internal(e.to_string()))?;
        let prices = PriceBook::load(store).await?;
        Ok(Arc::new(Limiter {
            config,
            shared,
            local,
            degraded: AtomicBool::new(false),
            prices,
            metrics,
        }))
    }

    /// Metrics to register with the gateway's registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        self.metrics.collectors()
    }

    /// The price book the limiter estimates spend with (shared: it refreshes itself).
    pub fn price_book(&self) -> PriceBook {
        self.prices.clone()
    }

    /// For `/readyz`: the backend (`redis` or `memory`) and its state: `ok`, `degraded`
    /// (Redis was unreachable; limits are enforced per instance until it answers) or
    /// `unreachable` (Redis does not answer a PING now; the next request will degrade).
    pub async fn state(&self) -> (&'static str, &'static str) {
        let Some(shared) = &self.shared else {
            return ("memory", "ok");
        };
        if self.is_degraded() {
            return ("redis", "degraded");
        }
        match shared.ping().await {
            Ok(()) => ("redis", "ok"),
            Err(_) => ("redis", "unreachable"),
        }
    }

    /// Whether limits are currently enforced per instance because Redis is unreachable.
    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    /// Reserves `estimate` against every limit of `caller` for `model`. `Ok(None)` when no
    /// limit applies (nothing is counted). A refusal is a 429 naming the limit.
    pub async fn admit(
        self: &Arc<Self>,
        caller: &Caller,
        model: &str,
        estimate: impl FnOnce() -> Estimate,
    ) -> Result<Option<Admission>, GatewayError> {
        if !scopes::any_apply(caller, model) {
            return Ok(None);
        }
        let period = estimate::current_period();
        let checks = scopes::checks(caller, model, &period, &self.config.key_prefix);
        if checks.is_empty() {
            return Ok(None);
        }
        let mut estimate = estimate();
        let request_id = format!("res_{}", uuid::Uuid::now_v7().simple());
        let price = self.prices.price(&caller.tenant_id, &estimate.models);
        let (mut holder, mut verdict, mut ask) = self
            .try_reserve(&request_id, &checks, &estimate, price.as_ref())
            .await;
        // A request without an output cap that does not fit with the default allowance is
        // admitted with a small one: a stream then reserves more as it runs (and a hard
        // limit cuts it); a whole answer settles what it used.
        let refused_for_size = verdict
            .failed
            .is_some_and(|i| matches!(checks[i].kind, Kind::Tokens | Kind::Spend));
        if refused_for_size && !estimate.output_capped {
            estimate.max_output_tokens = estimate.max_output_tokens.min(MIN_UNCAPPED_OUTPUT_TOKENS);
            (holder, verdict, ask) = self
                .try_reserve(&request_id, &checks, &estimate, price.as_ref())
                .await;
        }
        let headers = RateHeaders::from_verdict(&checks, &verdict, &ask);
        if let Some(i) = verdict.failed {
            let check = &checks[i];
            self.metrics
                .refused
                .with_label_values(&[check.scope.label(), check.kind.label()])
                .inc();
            return Err(headers::refusal(check, verdict.used[i], &ask, &headers));
        }
        Ok(Some(Admission {
            headers,
            reservation: Reservation {
                limiter: self.clone(),
                holder,
                request_id,
                window: verdict.window,
                prompt_tokens: estimate.prompt_tokens,
                output_capped: estimate.output_capped,
                tokens: ask.tokens,
                micros: ask.micros,
                checks,
                price,
                settled: false,
            },
        }))
    }

    /// Counts `hits` against `caller`'s per-minute limit of `kind` (requests or tokens) in
    /// `scope`, for the edge's rate-limit service ([`crate::edge`]). The limit is the one the
    /// HTTP path enforces (same config, same store), counted on counters of the edge's own
    /// (`…:edge`), so a request that passes both is never counted twice on one of them.
    /// `None`: no such limit.
    pub async fn count_at_edge(
        &self,
        caller: &Caller,
        scope: Scope,
        kind: Kind,
        hits: EdgeHits,
    ) -> Option<EdgeCount> {
        let (hits, record) = match hits {
            EdgeHits::Ask(n) => (n, false),
            EdgeHits::Record(n) => (n, true),
        };
        if !matches!(kind, Kind::Requests | Kind::Tokens) {
            return None;
        }
        let period = estimate::current_period();
        let check = scopes::checks(caller, "", &period, &self.config.key_prefix)
            .into_iter()
            .find(|c| c.scope == scope && c.kind == kind)?;
        // Counted as an amount (`hits`) on a sliding window: the tokens rule does that.
        let mut counter = check.clone();
        counter.kind = Kind::Tokens;
        counter.key.push_str(":edge");
        // A record is added whatever the window holds: a soft limit's extension (which never
        // refuses) does that in both limiters.
        counter.soft |= record;
        let request_id = format!("edge_{}", uuid::Uuid::now_v7().simple());
        let ask = Ask {
            request_id: &request_id,
            checks: std::slice::from_ref(&counter),
            tokens: hits,
            micros: 0,
            extend: record,
        };
        let (_, mut verdict) = self.reserve(&ask).await;
        let used = verdict.used.first().copied().unwrap_or(0);
        if hits == 0 && used >= check.limit {
            verdict.failed = Some(0);
        }
        let asked = Asked {
            tokens: hits,
            micros: 0,
        };
        let checks = std::slice::from_ref(&check);
        let headers = RateHeaders::from_verdict(checks, &verdict, &asked);
        let refusal = verdict.failed.map(|_| {
            self.metrics
                .refused
                .with_label_values(&[check.scope.label(), check.kind.label()])
                .inc();
            headers::refusal(&check, used, &asked, &headers)
        });
        let granted = if refusal.is_none() { hits } else { 0 };
        Some(EdgeCount {
            limit: check.limit,
            remaining: check.limit.saturating_sub(used).saturating_sub(granted),
            reset_ms: headers::ms_to_next_minute(),
            headers,
            refusal,
        })
    }

    /// One reserve of `estimate`; returns where it was made, the verdict, and what was asked
    /// (tokens and spend; the ids are the caller's).
    async fn try_reserve(
        &self,
        request_id: &str,
        checks: &[Check],
        estimate: &Estimate,
        price: Option<&tollgate_schemas::pricing::PriceRow>,
    ) -> (Holder, Verdict, Asked) {
        let micros = price.map_or(0, |p| estimate::cost_micros(p, &estimate.usage()));
        let ask = Ask {
            request_id,
            checks,
            tokens: estimate.total_tokens(),
            micros,
            extend: false,
        };
        let (holder, verdict) = self.reserve(&ask).await;
        (
            holder,
            verdict,
            Asked {
                tokens: ask.tokens,
                micros,
            },
        )
    }

    /// Reserves on Redis, or locally when Redis is not configured or does not answer.
    async fn reserve(&self, ask: &Ask<'_>) -> (Holder, Verdict) {
        if let Some(shared) = self.shared.as_ref().filter(|_| !self.is_degraded()) {
            match shared.reserve(ask).await {
                Ok(v) => return (Holder::Shared, v),
                Err(e) => self.degrade(&e),
            }
        }
        (Holder::Local, self.local.reserve(ask))
    }

    /// Switches to the local limiter and starts probing Redis until it answers again.
    fn degrade(&self, e: &Unavailable) {
        self.metrics.errors.with_label_values(&["reserve"]).inc();
        if self.degraded.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::warn!("rate limiter: {e}; enforcing limits per instance until Redis answers");
        self.metrics.degraded.set(1);
        self.metrics.transitions.with_label_values(&["local"]).inc();
    }

    /// Probes Redis once a second while degraded; returns to it when it answers. Runs until
    /// the process ends.
    pub fn spawn_recovery(self: &Arc<Self>) {
        let Some(_) = self.shared else { return };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(limiter) = weak.upgrade() else {
                    return;
                };
                if !limiter.is_degraded() {
                    continue;
                }
                let Some(shared) = &limiter.shared else {
                    return;
                };
                if shared.ping().await.is_ok() {
                    limiter.degraded.store(false, Ordering::SeqCst);
                    limiter.metrics.degraded.set(0);
                    limiter
                        .metrics
                        .transitions
                        .with_label_values(&["redis"])
                        .inc();
                    tracing::info!("rate limiter: Redis answers again; limits are shared again");
                }
            }
        });
    }

    async fn extend_on(&self, holder: Holder, ask: &Ask<'_>) -> Verdict {
        match (holder, &self.shared) {
            (Holder::Shared, Some(shared)) => match shared.reserve(ask).await {
                Ok(v) => v,
                Err(e) => {
                    // The reservation lives in Redis: without it the stream runs on (fail
                    // open), and the local limiter counts the extra.
                    self.degrade(&e);
                    self.local.reserve(ask)
                }
            },
            _ => self.local.reserve(ask),
        }
    }

    async fn settle_on(&self, holder: Holder, s: &Settlement<'_>) {
        match (holder, &self.shared) {
            (Holder::Shared, Some(shared)) => {
                if let Err(e) = shared.settle(s).await {
                    self.metrics.errors.with_label_values(&["settle"]).inc();
                    tracing::warn!(
                        "rate limiter: settle failed ({e}); the reservation expires with its lease"
                    );
                }
            }
            _ => self.local.settle(s),
        }
    }
}

/// What the edge asks [`Limiter::count_at_edge`] to count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EdgeHits {
    /// Counted only if they fit under the limit (a request about to run); `Ask(0)` only
    /// reads, and is refused once the window is full.
    Ask(u64),
    /// Counted whatever the window holds, never refused: what a finished request used (its
    /// tokens, reported when its stream ended).
    Record(u64),
}

/// What [`Limiter::count_at_edge`] found.
#[derive(Debug)]
pub struct EdgeCount {
    pub limit: u64,
    /// What is left in the window after these hits.
    pub remaining: u64,
    /// Until the current minute window ends.
    pub reset_ms: u64,
    /// The `x-ratelimit-*` headers the HTTP path would send.
    pub headers: RateHeaders,
    /// The 429 the HTTP path would answer, when the hits do not fit.
    pub refusal: Option<GatewayError>,
}

/// An admitted request: its reservation and the headers to send.
pub struct Admission {
    pub headers: RateHeaders,
    pub reservation: Reservation,
}

/// What a request holds against its limits until it ends. Settle it exactly once (the
/// completion does); dropping it unsettled releases it with no usage.
pub struct Reservation {
    limiter: Arc<Limiter>,
    holder: Holder,
    checks: Vec<Check>,
    request_id: String,
    window: i64,
    prompt_tokens: u64,
    /// The request caps its own output: the reservation covers it all.
    output_capped: bool,
    /// Tokens reserved so far (estimate plus extensions).
    tokens: u64,
    /// Spend reserved so far (micro-units).
    micros: u64,
    price: Option<tollgate_schemas::pricing::PriceRow>,
    settled: bool,
}

impl Reservation {
    /// Output tokens the reservation covers so far.
    pub fn output_allowance(&self) -> u64 {
        self.tokens.saturating_sub(self.prompt_tokens)
    }

    /// Whether a stream can outgrow the reservation (its request sets no output cap) and a
    /// hard token or spend limit could then cut it.
    fn has_hard_stream_limits(&self) -> bool {
        !self.output_capped
            && self
                .checks
                .iter()
                .any(|c| !c.soft && matches!(c.kind, Kind::Tokens | Kind::Spend))
    }

    /// Reserves `tokens` more output tokens; `Err` names the hard limit that refuses.
    pub async fn extend(&mut self, tokens: u64) -> Result<(), Check> {
        let micros = self.price.as_ref().map_or(0, |p| {
            estimate::cost_micros(
                p,
                &TokenUsage {
                    output_tokens: tokens,
                    ..TokenUsage::default()
                },
            )
        });
        let ask = Ask {
            request_id: &self.request_id,
            checks: &self.checks,
            tokens,
            micros,
            extend: true,
        };
        let verdict = self.limiter.extend_on(self.holder, &ask).await;
        if let Some(i) = verdict.failed {
            let check = self.checks[i].clone();
            self.limiter
                .metrics
                .cut
                .with_label_values(&[check.scope.label(), check.kind.label()])
                .inc();
            return Err(check);
        }
        self.tokens += tokens;
        self.micros += micros;
        Ok(())
    }

    /// Replaces the reservation by the actual usage, in the background.
    pub fn settle(mut self, usage: &TokenUsage) {
        self.settled = true;
        let actual_tokens = usage.input_tokens + usage.output_tokens;
        let micros = self
            .price
            .as_ref()
            .map_or(0, |p| estimate::cost_micros(p, usage));
        let tokens_delta = i64::try_from(actual_tokens).unwrap_or(i64::MAX)
            - i64::try_from(self.tokens).unwrap_or(i64::MAX);
        self.finish(tokens_delta, micros);
    }

    fn finish(&self, tokens_delta: i64, micros: u64) {
        let limiter = self.limiter.clone();
        let (holder, checks, request_id, window) = (
            self.holder,
            self.checks.clone(),
            self.request_id.clone(),
            self.window,
        );
        let run = async move {
            let s = Settlement {
                request_id: &request_id,
                checks: &checks,
                tokens_delta,
                window,
                micros,
            };
            limiter.settle_on(holder, &s).await;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(run);
            }
            Err(_) => tracing::warn!("rate limiter: no runtime to settle a reservation on"),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.settled = true;
            // Released without usage: the tokens it reserved are given back.
            let delta = -i64::try_from(self.tokens).unwrap_or(i64::MAX);
            self.finish(delta, 0);
        }
    }
}

type Growth = Pin<Box<dyn Future<Output = (Reservation, Result<(), Check>)> + Send>>;

/// A running stream's reservation: checked as content events arrive; more is reserved in
/// the background before the stream runs out, so relaying never waits on the limiter.
pub struct StreamAllowance {
    idle: Option<Reservation>,
    growing: Option<Growth>,
    /// The hard limit that refused more, once one has.
    refused: Option<Check>,
    /// Output tokens per content event, for the running estimate (OpenAI-style streams send
    /// about one token per event; Anthropic's text deltas a few).
    tokens_per_event: u64,
    increment: u64,
}

impl StreamAllowance {
    pub fn new(reservation: Option<Reservation>, tokens_per_event: u64, increment: u64) -> Self {
        StreamAllowance {
            idle: reservation,
            growing: None,
            refused: None,
            tokens_per_event,
            increment,
        }
    }

    /// Called with the content events relayed so far: `Some(check)` when a hard limit
    /// refused more and the stream has used what it had, so it must end now.
    pub fn check(&mut self, events: u64, cx: &mut Context<'_>) -> Option<Check> {
        if let Some(growth) = self.growing.as_mut() {
            if let Poll::Ready((reservation, result)) = growth.as_mut().poll(cx) {
                self.growing = None;
                self.idle = Some(reservation);
                if let Err(check) = result {
                    self.refused = Some(check);
                }
            }
        }
        let reservation = self.idle.as_ref()?;
        if !reservation.has_hard_stream_limits() {
            return None;
        }
        let used = events.saturating_mul(self.tokens_per_event);
        let allowance = reservation.output_allowance();
        if let Some(check) = &self.refused {
            return (used >= allowance).then(|| check.clone());
        }
        // Ask for more once three quarters of the allowance are used.
        if used.saturating_mul(4) >= allowance.saturating_mul(3) {
            let mut reservation = self.idle.take()?;
            let increment = self.increment;
            let mut growth: Growth = Box::pin(async move {
                let result = reservation.extend(increment).await;
                (reservation, result)
            });
            if let Poll::Ready((reservation, result)) = growth.as_mut().poll(cx) {
                self.idle = Some(reservation);
                if let Err(check) = result {
                    self.refused = Some(check);
                    return (used >= self.idle.as_ref()?.output_allowance())
                        .then(|| self.refused.clone())
                        .flatten();
                }
            } else {
                self.growing = Some(growth);
            }
        }
        None
    }

    /// Settles with the actual usage (after a pending extension, if one is running).
    pub fn settle(&mut self, usage: &TokenUsage) {
        if let Some(reservation) = self.idle.take() {
            reservation.settle(usage);
        } else if let Some(growth) = self.growing.take() {
            let usage = *usage;
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    let (reservation, _) = growth.await;
                    reservation.settle(&usage);
                });
            }
        }
    }
}
