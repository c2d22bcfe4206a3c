//! Fault injection, per server and changeable while it runs: latency before every answer,
//! one-shot faults for the next requests, a fault for a share of requests (spread evenly, so
//! runs are reproducible), and rate-limit headers on successful answers. Faults apply to
//! `POST /v1/chat/completions` and `POST /v1/messages`; each answer keeps the wire format of
//! the route it was asked on.
//!
//! | [`Fault`] | OpenAI route | Anthropic route |
//! | --- | --- | --- |
//! | `Status(500)` | 500 `server_error` | 500 `api_error` |
//! | `Status(503)`, `Status(529)` | 503 `server_error` | 529 `overloaded_error` |
//! | `Status(s)` other | `s` `server_error` | `s` `api_error` |
//! | `RateLimited(d)` | 429 `rate_limit_exceeded`, `retry-after` (s, rounded up), `retry-after-ms`, `x-ratelimit-remaining-requests: 0`, `x-ratelimit-reset-requests` | 429 `rate_limit_error`, `retry-after`, `anthropic-ratelimit-requests-remaining: 0`, `-reset` |
//! | `Reset` | the connection is closed without an answer | same |
//! | `Hang` | no answer at all, until the client gives up | same |
//! | `DropMidstream` | the `drop-midstream` scenario (3 chunks, then the connection drops) | same |
//! | `ContextLength` | the `context-length-exceeded` scenario | same |

use std::collections::VecDeque;
use std::time::Duration;

use super::scenario::Scenario;

/// One injected failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// An error status before any body (see the module table).
    Status(u16),
    /// HTTP 429 asking to retry after this long.
    RateLimited(Duration),
    /// Close the connection without answering.
    Reset,
    /// Never answer.
    Hang,
    /// Start streaming, then drop the connection.
    DropMidstream,
    /// The provider's context-window error.
    ContextLength,
}

/// Rate-limit headers put on successful answers (replacing the normal ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub remaining_requests: u64,
    pub remaining_tokens: u64,
    /// Time until the limits reset.
    pub reset: Duration,
}

/// A server's fault settings.
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Pause before answering every request (before any fault or the normal answer).
    pub latency: Duration,
    /// Faults for the next requests, one each, in order.
    pub next: VecDeque<Fault>,
    /// After `next` is used up: this fault for `ratio` of the requests (0..=1).
    pub ratio: f64,
    pub ratio_fault: Option<Fault>,
    /// Headers on successful answers.
    pub rate_limit_headers: Option<RateLimitHeaders>,
}

impl Faults {
    /// No faults.
    pub fn none() -> Faults {
        Faults::default()
    }

    /// `fault` for the next `n` requests.
    pub fn next_n(fault: Fault, n: usize) -> Faults {
        Faults {
            next: std::iter::repeat_n(fault, n).collect(),
            ..Faults::default()
        }
    }

    /// `fault` for every request.
    pub fn always(fault: Fault) -> Faults {
        Faults::ratio(fault, 1.0)
    }

    /// `fault` for `ratio` of the requests.
    pub fn ratio(fault: Fault, ratio: f64) -> Faults {
        Faults {
            ratio: ratio.clamp(0.0, 1.0),
            ratio_fault: Some(fault),
            ..Faults::default()
        }
    }

    /// Adds latency before every answer.
    pub fn with_latency(mut self, latency: Duration) -> Faults {
        self.latency = latency;
        self
    }

    /// The fault for request number `n` (0-based count of faultable requests so far), taking
    /// a one-shot fault if any is queued. Ratio faults hit request n when
    /// `floor((n+1)·r) > floor(n·r)`: exactly `r` of any long run, evenly spread.
    pub(crate) fn take(&mut self, n: u64) -> Option<Fault> {
        if let Some(f) = self.next.pop_front() {
            return Some(f);
        }
        let fault = self.ratio_fault?;
        let r = self.ratio;
        let hit = ((n + 1) as f64 * r).floor() > (n as f64 * r).floor();
        hit.then_some(fault)
    }
}

impl Fault {
    /// The scenario a streaming fault turns into (handled by the provider modules).
    pub(crate) fn scenario(self) -> Option<Scenario> {
        match self {
            Fault::DropMidstream => Some(Scenario::DropMidstream),
            Fault::ContextLength => Some(Scenario::ContextLengthExceeded),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_faults_are_evenly_spread_and_exact() {
        let mut f = Faults::ratio(Fault::Status(503), 0.3);
        let hits: Vec<bool> = (0..10).map(|n| f.take(n).is_some()).collect();
        assert_eq!(hits.iter().filter(|h| **h).count(), 3);
        let mut f = Faults::ratio(Fault::Reset, 0.3);
        assert_eq!((0..1000).filter(|n| f.take(*n).is_some()).count(), 300);
    }

    #[test]
    fn one_shot_faults_come_first() {
        let mut f = Faults::next_n(Fault::Status(500), 2);
        assert_eq!(f.take(0), Some(Fault::Status(500)));
        assert_eq!(f.take(1), Some(Fault::Status(500)));
        assert_eq!(f.take(2), None);
    }
}
