//! What the router knows about one deployment at run time: requests in flight from this
//! gateway, a moving estimate of its time to first byte, its breaker, the rate-limit state its
//! upstream reported in response headers, the load its vLLM server reports, and this month's
//! spend (for commit-aware routing). All of it is per gateway instance, in memory.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::http::HeaderMap;
use parking_lot::Mutex;
use rust_decimal::Decimal;

use super::breaker::{Breaker, BreakerState};
use super::config::BreakerConfig;

/// Weight of a new sample in the time-to-first-byte estimate.
const EWMA_ALPHA: f64 = 0.3;

/// How long a 429 without `retry-after`, or a remaining count without a reset time, holds.
const DEFAULT_BLOCK: Duration = Duration::from_secs(1);

/// Run-time state of one deployment.
#[derive(Debug)]
pub struct Health {
    in_flight: AtomicI64,
    /// Time-to-first-byte estimate in µs; 0 until measured.
    ttft_ewma_us: AtomicU64,
    pub breaker: Breaker,
    upstream: Mutex<UpstreamLimits>,
    /// Load reported by a vLLM server's `/metrics` (see `vllm.rs`).
    pub server_load: Mutex<Option<ServerLoad>>,
    spend: Mutex<MonthlySpend>,
    /// When a call last got its first byte, in µs after `origin` plus one; 0: never. Orders
    /// the deployments a request tries when every breaker is open.
    last_success_us: AtomicU64,
    origin: Instant,
}

/// What a vLLM server last reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ServerLoad {
    pub running: u64,
    pub waiting: u64,
    /// KV-cache usage, 0..=1.
    pub kv_cache_usage: f64,
    pub at: Instant,
}

/// Rate-limit state from upstream headers (`x-ratelimit-*`, `anthropic-ratelimit-*`,
/// `retry-after`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UpstreamLimits {
    pub requests_remaining: Option<u64>,
    pub requests_reset: Option<Instant>,
    pub tokens_remaining: Option<u64>,
    pub tokens_reset: Option<Instant>,
    /// Set by a 429: no request before this.
    pub blocked_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct MonthlySpend {
    /// Year × 12 + month (0-based) of `spent`.
    month: i32,
    spent: Decimal,
}

/// How close a deployment is to its limits, for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Headroom {
    /// Free to use.
    Free,
    /// Close to a limit: try the others first.
    Near,
    /// Over a limit until the instant: skip it.
    Exhausted(Instant),
}

impl Health {
    pub fn new(breaker: &BreakerConfig) -> Health {
        Health {
            in_flight: AtomicI64::new(0),
            ttft_ewma_us: AtomicU64::new(0),
            breaker: Breaker::new(breaker),
            upstream: Mutex::new(UpstreamLimits::default()),
            server_load: Mutex::new(None),
            spend: Mutex::new(MonthlySpend::default()),
            last_success_us: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    /// Records that a call got its first byte at `now`.
    pub fn mark_success(&self, now: Instant) {
        let us = u64::try_from(now.saturating_duration_since(self.origin).as_micros())
            .unwrap_or(u64::MAX - 1);
        self.last_success_us.fetch_max(us + 1, Ordering::Relaxed);
    }

    /// When a call last got its first byte; `None` if none ever did.
    pub fn last_success(&self) -> Option<Instant> {
        match self.last_success_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(self.origin + Duration::from_micros(us - 1)),
        }
    }

    /// Requests in flight from this gateway.
    pub fn in_flight(&self) -> u64 {
        u64::try_from(self.in_flight.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Counts a request in flight until the guard is dropped.
    pub fn start(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightGuard(self.clone())
    }

    /// The time-to-first-byte estimate; `None` until a call succeeded.
    pub fn ttft_estimate(&self) -> Option<Duration> {
        match self.ttft_ewma_us.load(Ordering::Relaxed) {
            0 => None,
            us => Some(Duration::from_micros(us)),
        }
    }

    /// Adds a time-to-first-byte sample to the estimate.
    pub fn observe_ttft(&self, ttft: Duration) {
        let sample = u64::try_from(ttft.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self
            .ttft_ewma_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    let next = old as f64 + EWMA_ALPHA * (sample as f64 - old as f64);
                    (next as u64).max(1)
                })
            });
    }

    /// The load to compare for least-in-flight routing: this gateway's in-flight requests, or
    /// the server's running + waiting when it reports more (other clients use it too).
    pub fn load(&self, now: Instant, stale_after: Duration) -> u64 {
        let mine = self.in_flight();
        match *self.server_load.lock() {
            Some(l) if now.saturating_duration_since(l.at) <= stale_after => {
                mine.max(l.running + l.waiting)
            }
            _ => mine,
        }
    }

    /// Whether a vLLM server reported its KV cache as nearly full (requests would queue).
    pub fn kv_cache_nearly_full(&self, now: Instant, stale_after: Duration) -> bool {
        matches!(*self.server_load.lock(),
            Some(l) if now.saturating_duration_since(l.at) <= stale_after && l.kv_cache_usage >= 0.95)
    }

    /// Headroom for a request of about `tokens` tokens, from upstream headers.
    pub fn upstream_headroom(
        &self,
        now: Instant,
        tokens: u64,
        near_requests: u64,
        near_tokens: u64,
    ) -> Headroom {
        let l = *self.upstream.lock();
        if let Some(until) = l.blocked_until.filter(|u| *u > now) {
            return Headroom::Exhausted(until);
        }
        let live = |reset: Option<Instant>| reset.is_none_or(|r| r > now);
        let mut near = false;
        if let (Some(left), true) = (l.requests_remaining, live(l.requests_reset)) {
            if left == 0 {
                return Headroom::Exhausted(l.requests_reset.unwrap_or(now + DEFAULT_BLOCK));
            }
            near |= left <= near_requests;
        }
        if let (Some(left), true) = (l.tokens_remaining, live(l.tokens_reset)) {
            if left < tokens.max(1) {
                return Headroom::Exhausted(l.tokens_reset.unwrap_or(now + DEFAULT_BLOCK));
            }
            near |= left <= near_tokens;
        }
        if near {
            Headroom::Near
        } else {
            Headroom::Free
        }
    }

    /// Whether the upstream reported its remaining tokens and that figure still holds (a
    /// request's prompt size then matters to [`Health::upstream_headroom`]).
    pub fn upstream_token_headroom_known(&self, now: Instant) -> bool {
        let l = self.upstream.lock();
        l.tokens_remaining.is_some() && l.tokens_reset.is_none_or(|r| r > now)
    }

    /// The current upstream rate-limit state (admin API).
    pub fn upstream_limits(&self) -> UpstreamLimits {
        *self.upstream.lock()
    }

    /// Reads rate-limit headers of a response (any status). Costs a few header lookups when
    /// the upstream sends none.
    pub fn observe_rate_headers(&self, headers: &HeaderMap, now: Instant) {
        let parsed = parse_rate_headers(headers, now, SystemTime::now());
        if parsed == UpstreamLimits::default() {
            return;
        }
        let mut l = self.upstream.lock();
        if parsed.requests_remaining.is_some() {
            l.requests_remaining = parsed.requests_remaining;
            l.requests_reset = parsed.requests_reset;
        }
        if parsed.tokens_remaining.is_some() {
            l.tokens_remaining = parsed.tokens_remaining;
            l.tokens_reset = parsed.tokens_reset;
        }
        if parsed.blocked_until.is_some() {
            l.blocked_until = parsed.blocked_until;
        }
    }

    /// A 429: blocked for `retry_after` (or a second when the upstream said nothing).
    pub fn block_for(&self, retry_after: Option<Duration>, now: Instant) {
        let until = now + retry_after.unwrap_or(DEFAULT_BLOCK);
        let mut l = self.upstream.lock();
        l.blocked_until = Some(l.blocked_until.map_or(until, |u| u.max(until)));
    }

    /// Adds `cost` to this month's spend.
    pub fn add_spend(&self, cost: Decimal, at: SystemTime) {
        let month = month_of(at);
        let mut s = self.spend.lock();
        if s.month != month {
            s.month = month;
            s.spent = Decimal::ZERO;
        }
        s.spent += cost;
    }

    /// This month's spend so far.
    pub fn spent_this_month(&self, at: SystemTime) -> Decimal {
        let s = self.spend.lock();
        if s.month == month_of(at) {
            s.spent
        } else {
            Decimal::ZERO
        }
    }

    pub fn breaker_state(&self, now: Instant) -> BreakerState {
        self.breaker.state(now)
    }
}

fn month_of(t: SystemTime) -> i32 {
    let dt = time::OffsetDateTime::from(t);
    dt.year() * 12 + i32::from(u8::from(dt.month())) - 1
}

/// Decrements the in-flight count on drop.
#[derive(Debug)]
pub struct InFlightGuard(Arc<Health>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// The rate-limit headers of one response: OpenAI's `x-ratelimit-remaining-requests/-tokens`
/// with `x-ratelimit-reset-*` durations (`1s`, `6m0s`, `20ms`), Anthropic's
/// `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{remaining,reset}` with
/// RFC 3339 reset times, and `retry-after` (seconds) / `retry-after-ms`.
pub fn parse_rate_headers(headers: &HeaderMap, now: Instant, wall: SystemTime) -> UpstreamLimits {
    let num = |name: &str| header(headers, name).and_then(|v| v.parse::<u64>().ok());
    // A count without a reset time is trusted for a second.
    let openai_reset = |name: &str| {
        Some(
            header(headers, name)
                .and_then(parse_go_duration)
                .map_or(now + DEFAULT_BLOCK, |d| now + d),
        )
    };
    let anthropic_reset = |name: &str| {
        header(headers, name)
            .and_then(|v| {
                time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(|t| now + SystemTime::from(t).duration_since(wall).unwrap_or_default())
            .or(Some(now + DEFAULT_BLOCK))
    };
    let mut l = UpstreamLimits::default();
    if let Some(r) = num("x-ratelimit-remaining-requests") {
        l.requests_remaining = Some(r);
        l.requests_reset = openai_reset("x-ratelimit-reset-requests");
    } else if let Some(r) = num("anthropic-ratelimit-requests-remaining") {
        l.requests_remaining = Some(r);
        l.requests_reset = anthropic_reset("anthropic-ratelimit-requests-reset");
    }
    if let Some(t) = num("x-ratelimit-remaining-tokens") {
        l.tokens_remaining = Some(t);
        l.tokens_reset = openai_reset("x-ratelimit-reset-tokens");
    } else {
        // Anthropic reports a combined and per-direction token limits: the tightest one binds.
        for (remaining, reset) in [
            (
                "anthropic-ratelimit-tokens-remaining",
                "anthropic-ratelimit-tokens-reset",
            ),
            (
                "anthropic-ratelimit-input-tokens-remaining",
                "anthropic-ratelimit-input-tokens-reset",
            ),
            (
                "anthropic-ratelimit-output-tokens-remaining",
                "anthropic-ratelimit-output-tokens-reset",
            ),
        ] {
            let Some(t) = num(remaining) else {
                continue;
            };
            if l.tokens_remaining.is_none_or(|cur| t < cur) {
                l.tokens_remaining = Some(t);
                l.tokens_reset = anthropic_reset(reset);
            }
        }
    }
    let retry_after = header(headers, "retry-after-ms")
        .and_then(|v| v.parse::<f64>().ok())
        .map(|ms| Duration::from_secs_f64((ms / 1000.0).clamp(0.0, 86_400.0)))
        .or_else(|| {
            header(headers, "retry-after")
                .and_then(|v| v.parse::<f64>().ok())
                .map(|s| Duration::from_secs_f64(s.clamp(0.0, 86_400.0)))
        });
    l.blocked_until = retry_after.map(|d| now + d);
    l
}

/// A Go-style duration as OpenAI writes it: `1s`, `6m0s`, `20ms`, `1h2m3.5s`, `250us`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest.get(..digits)?.parse().ok()?;
        rest = rest.get(digits..)?;
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match rest.get(..unit_len)? {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += value * scale;
        rest = rest.get(unit_len..)?;
    }
    (total.is_finite() && total < 1e9).then(|| Duration::from_secs_f64(total))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("20ms"), Some(Duration::from_millis(20)));
        assert_eq!(
            parse_go_duration("1h2m3.5s"),
            Some(Duration::from_millis(3_723_500))
        );
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration("5x"), None);
    }

    #[test]
    fn openai_headers_exhaust_until_reset() {
        let now = Instant::now();
        let h = Health::new(&BreakerConfig::default());
        h.observe_rate_headers(
            &headers(&[
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-reset-requests", "2s"),
                ("x-ratelimit-remaining-tokens", "90000"),
            ]),
            now,
        );
        assert_eq!(
            h.upstream_headroom(now, 10, 2, 2000),
            Headroom::Exhausted(now + Duration::from_secs(2))
        );
        assert_eq!(
            h.upstream_headroom(now + Duration::from_secs(3), 10, 2, 2000),
            Headroom::Free
        );
    }

    #[test]
    fn a_count_without_a_reset_holds_for_a_second_only() {
        let now = Instant::now();
        let h = Health::new(&BreakerConfig::default());
        h.observe_rate_headers(&headers(&[("x-ratelimit-remaining-requests", "0")]), now);
        assert!(matches!(
            h.upstream_headroom(now, 1, 2, 2000),
            Headroom::Exhausted(_)
        ));
        assert_eq!(
            h.upstream_headroom(now + Duration::from_millis(1_100), 1, 2, 2000),
            Headroom::Free
        );
    }

    #[test]
    fn anthropic_headers_and_near_limits() {
        let now = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let l = parse_rate_headers(
            &headers(&[
                ("anthropic-ratelimit-requests-remaining", "1"),
                ("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:30Z"),
                ("anthropic-ratelimit-tokens-remaining", "50000"),
                ("anthropic-ratelimit-input-tokens-remaining", "1500"),
            ]),
            now,
            wall,
        );
        assert_eq!(l.requests_remaining, Some(1));
        assert_eq!(l.requests_reset, Some(now + Duration::from_secs(10)));
        assert_eq!(l.tokens_remaining, Some(1500));
        let h = Health::new(&BreakerConfig::default());
        *h.upstream.lock() = l;
        assert_eq!(h.upstream_headroom(now, 100, 2, 2000), Headroom::Near);
        assert!(matches!(
            h.upstream_headroom(now, 5000, 2, 2000),
            Headroom::Exhausted(_)
        ));
    }

    #[test]
    fn a_429_blocks_for_its_retry_after() {
        let now = Instant::now();
        let h = Health::new(&BreakerConfig::default());
        h.block_for(Some(Duration::from_millis(1500)), now);
        assert!(matches!(
            h.upstream_headroom(now, 1, 2, 2000),
            Headroom::Exhausted(_)
        ));
        assert_eq!(
            h.upstream_headroom(now + Duration::from_secs(2), 1, 2, 2000),
            Headroom::Free
        );
    }

    #[test]
    fn ttft_estimate_moves_towards_samples() {
        let h = Health::new(&BreakerConfig::default());
        assert_eq!(h.ttft_estimate(), None);
        h.observe_ttft(Duration::from_millis(100));
        assert_eq!(h.ttft_estimate(), Some(Duration::from_millis(100)));
        for _ in 0..20 {
            h.observe_ttft(Duration::from_millis(10));
        }
        let e = h.ttft_estimate().unwrap();
        assert!(e < Duration::from_millis(12), "{e:?}");
    }

    #[test]
    fn in_flight_guards_count() {
        let h = Arc::new(Health::new(&BreakerConfig::default()));
        let a = h.start();
        let b = h.start();
        assert_eq!(h.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(h.in_flight(), 0);
    }

    #[test]
    fn spend_resets_each_month() {
        let h = Health::new(&BreakerConfig::default());
        let jan = SystemTime::UNIX_EPOCH + Duration::from_secs(1_704_067_200 + 86_400);
        let feb = jan + Duration::from_secs(40 * 86_400);
        h.add_spend(Decimal::new(125, 2), jan);
        h.add_spend(Decimal::new(5, 1), jan);
        assert_eq!(h.spent_this_month(jan), Decimal::new(175, 2));
        assert_eq!(h.spent_this_month(feb), Decimal::ZERO);
        h.add_spend(Decimal::ONE, feb);
        assert_eq!(h.spent_this_month(feb), Decimal::ONE);
    }
}
