//! Local accounting of each deployment's requests and tokens per minute against its configured
//! `limits` (the provider key's RPM/TPM), so that load moves elsewhere before the upstream
//! starts answering 429.
//!
//! [`DeploymentLimiter`] is the seam; [`MemoryLimiter`] counts per gateway instance (several
//! gateways sharing one provider key each see only their own traffic: give each a share of
//! the key's limits, or back the trait with a shared store). The window is a sliding minute
//! approximated from two fixed one-minute buckets (the previous one weighted by how much of
//! it the sliding minute still covers).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::config::DeploymentLimits;

const MINUTE: Duration = Duration::from_secs(60);

/// Requests and tokens of one deployment in the last minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MinuteUsage {
    pub requests: u64,
    pub tokens: u64,
}

/// Per-deployment RPM/TPM accounting.
pub trait DeploymentLimiter: Send + Sync {
    /// `Ok` if `deployment` can take one more request of about `tokens` tokens now, else the
    /// instant it probably can.
    fn check(
        &self,
        deployment: &str,
        limits: &DeploymentLimits,
        tokens: u64,
        now: Instant,
    ) -> Result<(), Instant>;
    /// Counts a request sent to `deployment`.
    fn record_request(&self, deployment: &str, now: Instant);
    /// Counts tokens `deployment` used (input + output, once known).
    fn record_tokens(&self, deployment: &str, tokens: u64, now: Instant);
    /// Usage over the last minute.
    fn usage(&self, deployment: &str, now: Instant) -> MinuteUsage;
}

#[derive(Debug, Default, Clone, Copy)]
struct Window {
    /// Start of the current bucket.
    start: Option<Instant>,
    current: MinuteUsage,
    previous: MinuteUsage,
}

impl Window {
    fn roll(&mut self, now: Instant) {
        let start = *self.start.get_or_insert(now);
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= MINUTE * 2 {
            *self = Window {
                start: Some(now),
                ..Window::default()
            };
        } else if elapsed >= MINUTE {
            self.previous = self.current;
            self.current = MinuteUsage::default();
            self.start = Some(start + MINUTE);
        }
    }

    /// The sliding-minute estimate and the end of the current bucket.
    fn estimate(&self, now: Instant) -> (MinuteUsage, Instant) {
        let start = self.start.unwrap_or(now);
        let into = now.saturating_duration_since(start).min(MINUTE);
        let prev_share = 1.0 - into.as_secs_f64() / MINUTE.as_secs_f64();
        let weigh = |p: u64, c: u64| c + (p as f64 * prev_share).ceil() as u64;
        (
            MinuteUsage {
                requests: weigh(self.previous.requests, self.current.requests),
                tokens: weigh(self.previous.tokens, self.current.tokens),
            },
            start + MINUTE,
        )
    }
}

/// In-memory [`DeploymentLimiter`] for one gateway instance.
#[derive(Debug, Default)]
pub struct MemoryLimiter {
    windows: HashMap<String, Mutex<Window>>,
}

impl MemoryLimiter {
    /// Accounting for these deployments (others are never limited).
    pub fn new<'a>(deployments: impl IntoIterator<Item = &'a str>) -> MemoryLimiter {
        MemoryLimiter {
            windows: deployments
                .into_iter()
                .map(|d| (d.to_string(), Mutex::new(Window::default())))
                .collect(),
        }
    }
}

impl DeploymentLimiter for MemoryLimiter {
    fn check(
        &self,
        deployment: &str,
        limits: &DeploymentLimits,
        tokens: u64,
        now: Instant,
    ) -> Result<(), Instant> {
        if limits.rpm.is_none() && limits.tpm.is_none() {
            return Ok(());
        }
        let Some(w) = self.windows.get(deployment) else {
            return Ok(());
        };
        let mut w = w.lock();
        w.roll(now);
        let (used, bucket_end) = w.estimate(now);
        let over_requests = limits.rpm.is_some_and(|rpm| used.requests >= rpm);
        let over_tokens = limits
            .tpm
            .is_some_and(|tpm| used.tokens.saturating_add(tokens) > tpm && used.tokens > 0);
        if over_requests || over_tokens {
            Err(bucket_end)
        } else {
            Ok(())
        }
    }

    fn record_request(&self, deployment: &str, now: Instant) {
        if let Some(w) = self.windows.get(deployment) {
            let mut w = w.lock();
            w.roll(now);
            w.current.requests += 1;
        }
    }

    fn record_tokens(&self, deployment: &str, tokens: u64, now: Instant) {
        if let Some(w) = self.windows.get(deployment) {
            let mut w = w.lock();
            w.roll(now);
            w.current.tokens = w.current.tokens.saturating_add(tokens);
        }
    }

    fn usage(&self, deployment: &str, now: Instant) -> MinuteUsage {
        self.windows
            .get(deployment)
            .map_or_else(MinuteUsage::default, |w| {
                let mut w = w.lock();
                w.roll(now);
                w.estimate(now).0
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_per_minute_are_enforced_and_slide_out() {
        let l = MemoryLimiter::new(["a"]);
        let limits = DeploymentLimits {
            rpm: Some(3),
            tpm: None,
        };
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.check("a", &limits, 10, t0), Ok(()));
            l.record_request("a", t0);
        }
        assert_eq!(l.check("a", &limits, 10, t0), Err(t0 + MINUTE));
        // Half a minute into the next bucket, half the previous minute still counts (2 of 3).
        let t1 = t0 + MINUTE + MINUTE / 2;
        assert_eq!(l.usage("a", t1).requests, 2);
        assert_eq!(l.check("a", &limits, 10, t1), Ok(()));
        // Two minutes later nothing counts.
        assert_eq!(l.usage("a", t0 + MINUTE * 3).requests, 0);
    }

    #[test]
    fn tokens_per_minute_are_enforced() {
        let l = MemoryLimiter::new(["a"]);
        let limits = DeploymentLimits {
            rpm: None,
            tpm: Some(1_000),
        };
        let t0 = Instant::now();
        // A first request is never refused for its size alone.
        assert_eq!(l.check("a", &limits, 5_000, t0), Ok(()));
        l.record_tokens("a", 900, t0);
        assert_eq!(l.check("a", &limits, 50, t0), Ok(()));
        assert!(l.check("a", &limits, 200, t0).is_err());
        // Unknown deployments and deployments without limits are never limited.
        assert_eq!(l.check("b", &limits, 1_000_000, t0), Ok(()));
        assert_eq!(
            l.check("a", &DeploymentLimits::default(), 1_000_000, t0),
            Ok(())
        );
    }
}
