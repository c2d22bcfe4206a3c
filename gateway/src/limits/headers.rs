//! `x-ratelimit-*` headers (OpenAI's names: limit, remaining and reset for requests and for
//! tokens, the tightest scope of each) and the 429 a refused request gets.

use std::time::SystemTime;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::{Asked, Check, Kind, Verdict};
use crate::error::GatewayError;

/// One figure: limit, remaining after this request, time until it resets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Figure {
    limit: u64,
    remaining: u64,
    reset_ms: u64,
}

/// The rate-limit headers of one response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateHeaders {
    requests: Option<Figure>,
    tokens: Option<Figure>,
}

pub(crate) fn ms_to_next_minute() -> u64 {
    let now = u64::try_from(tollgate_schemas::events::unix_ms(SystemTime::now())).unwrap_or(0);
    60_000 - now % 60_000
}

impl RateHeaders {
    /// The tightest requests and tokens figures of a reserve.
    pub(crate) fn from_verdict(checks: &[Check], v: &Verdict, ask: &Asked) -> Self {
        let reset_ms = ms_to_next_minute();
        let mut h = RateHeaders::default();
        for (i, c) in checks.iter().enumerate() {
            let used = v.used.get(i).copied().unwrap_or(0);
            let (slot, asked) = match c.kind {
                Kind::Requests => (&mut h.requests, 1),
                Kind::Tokens => (&mut h.tokens, ask.tokens),
                _ => continue,
            };
            let granted = v.failed.is_none();
            let remaining =
                c.limit
                    .saturating_sub(used)
                    .saturating_sub(if granted { asked } else { 0 });
            let figure = Figure {
                limit: c.limit,
                remaining,
                reset_ms,
            };
            if slot.is_none_or(|f| f.remaining > remaining) {
                *slot = Some(figure);
            }
        }
        h
    }

    /// The header lines, in order.
    pub fn lines(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (name, f) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(f) = f else { continue };
            let (limit, remaining, reset) = match name {
                "requests" => (
                    "x-ratelimit-limit-requests",
                    "x-ratelimit-remaining-requests",
                    "x-ratelimit-reset-requests",
                ),
                _ => (
                    "x-ratelimit-limit-tokens",
                    "x-ratelimit-remaining-tokens",
                    "x-ratelimit-reset-tokens",
                ),
            };
            out.push((limit, f.limit.to_string()));
            out.push((remaining, f.remaining.to_string()));
            out.push((reset, go_duration(f.reset_ms)));
        }
        out
    }

    /// Adds the headers to a response.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in self.lines() {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(HeaderName::from_static(name), v);
            }
        }
    }
}

/// A duration the way OpenAI writes resets: `350ms`, `12s`, `1.5s`, `6m0s`.
fn go_duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let s = format!("{}.{:03}", ms / 1000, ms % 1000);
        let s = s.trim_end_matches('0').trim_end_matches('.');
        format!("{s}s")
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

/// Seconds until the next UTC month (when a period's spend resets).
fn secs_to_next_period() -> u64 {
    let now = time::OffsetDateTime::now_utc();
    let (y, m) = match now.month() {
        time::Month::December => (now.year() + 1, time::Month::January),
        m => (now.year(), m.next()),
    };
    time::Date::from_calendar_date(y, m, 1)
        .map(|d| d.midnight().assume_utc())
        .map_or(3600, |next| {
            u64::try_from((next - now).whole_seconds()).unwrap_or(3600)
        })
}

/// The 429 for a request `check` refused.
pub(crate) fn refusal(check: &Check, used: u64, ask: &Asked, h: &RateHeaders) -> GatewayError {
    let scope = match check.scope {
        super::Scope::Key => "this API key".to_string(),
        super::Scope::Tenant => "your organization".to_string(),
        super::Scope::TenantModel => format!(
            "your organization on model `{}`",
            check.model.as_deref().unwrap_or("")
        ),
    };
    let (what, requested, retry_after_s) = match check.kind {
        Kind::Requests => (
            "requests per minute (RPM)",
            1,
            ms_to_next_minute().div_ceil(1000),
        ),
        Kind::Tokens => (
            "tokens per minute (TPM)",
            ask.tokens,
            ms_to_next_minute().div_ceil(1000),
        ),
        Kind::Concurrency => ("concurrent requests", 1, 1),
        Kind::Spend => (
            "spend this billing period",
            ask.micros,
            secs_to_next_period(),
        ),
    };
    let figures = if check.kind == Kind::Spend {
        format!(
            "limit {}, used {}, requested {} (in {} units)",
            money(check.limit),
            money(used),
            money(requested),
            check
                .balance
                .as_ref()
                .map_or("currency", |b| b.currency.as_str()),
        )
    } else {
        format!("limit {}, used {used}, requested {requested}", check.limit)
    };
    let hint = if check.kind == Kind::Tokens && requested > check.limit {
        " The request alone is larger than the limit: lower max_tokens or the prompt."
    } else {
        ""
    };
    GatewayError::RateLimited {
        message: format!(
            "Rate limit reached for {scope} on {what}: {figures}. Please try again in {retry_after_s}s.{hint}"
        ),
        limit: format!("{}_{}", check.scope.label(), check.kind.label()),
        quota: check.kind == Kind::Spend,
        retry_after_s,
        headers: h.lines(),
    }
}

/// Micro-units as a decimal amount.
fn money(micros: u64) -> String {
    let s = format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000);
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_openai_resets() {
        assert_eq!(go_duration(350), "350ms");
        assert_eq!(go_duration(12_000), "12s");
        assert_eq!(go_duration(1_500), "1.5s");
        assert_eq!(go_duration(360_000), "6m0s");
        assert_eq!(money(1_500_000), "1.5");
        assert_eq!(money(0), "0");
    }
}
