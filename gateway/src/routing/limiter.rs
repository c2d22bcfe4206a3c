//! Local accounting of each deployment's requests and tokens per minute against its configured
//! `limits` (the provider key's RPM/TPM), so that load moves elsewhere before the upstream
//! starts answering 429.
//!
//! [`DeploymentLimiter`] is the seam; [`MemoryLimiter`] counts per gateway instance (several
//! gateways sharing one provider key each see only their own traffic: give each a share of
//! the key's limits, or back the trait with a shared store). The window is a sliding minute
//! approximated from two fixed one-minute buckets (the previous one weighted by how much of
//! it the sliding minute still covers).
//!
//! Fair share: once a deployment has used [`FAIR_SHARE_FROM`] of its RPM or TPM within the
//! minute, a tenant that already used more than its share of the limit (the limit divided
//! by the tenants using the deployment this minute, the asking one included) is steered to
//! another deployment, so that one tenant cannot take a saturated provider key's capacity
//! from the others.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::config::DeploymentLimits;

const MINUTE: Duration = Duration::from_secs(60);

/// Share of a deployment's limit used within the minute from which tenants are held to their
/// fair share.
pub const FAIR_SHARE_FROM: f64 = 0.8;

/// Requests and tokens of one deployment in the last minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MinuteUsage {
    pub requests: u64,
    pub tokens: u64,
}

/// Per-deployment RPM/TPM accounting.
pub trait DeploymentLimiter: Send + Sync {
    /// `Ok` if `deployment` can take one more request of about `tokens` tokens from `tenant`
    /// now, else the instant it probably can.
    fn check(
        &self,
        deployment: &str,
        tenant: &str,
        limits: &DeploymentLimits,
        tokens: u64,
        now: Instant,
    ) -> Result<(), Instant>;
    /// Counts a request `tenant` sent to `deployment`.
    fn record_request(&self, deployment: &str, tenant: &str, now: Instant);
    /// Counts tokens `tenant` used on `deployment` (input + output, once known).
    fn record_tokens(&self, deployment: &str, tenant: &str, tokens: u64, now: Instant);
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

/// One deployment's window and its tenants' windows (in the same buckets).
#[derive(Debug, Default)]
struct Usage {
    total: Window,
    tenants: HashMap<String, Window>,
}

impl Usage {
    fn roll(&mut self, now: Instant) {
        self.total.roll(now);
        for w in self.tenants.values_mut() {
            w.roll(now);
        }
        self.tenants.retain(|_, w| {
            w.current != MinuteUsage::default() || w.previous != MinuteUsage::default()
        });
    }

    /// A tenant's window, started on the deployment's bucket boundary.
    fn tenant(&mut self, tenant: &str, now: Instant) -> &mut Window {
        let start = self.total.start.or(Some(now));
        self.tenants
            .entry(tenant.to_string())
            .or_insert_with(|| Window {
                start,
                ..Window::default()
            })
    }
}

/// In-memory [`DeploymentLimiter`] for one gateway instance.
#[derive(Debug, Default)]
pub struct MemoryLimiter {
    windows: HashMap<String, Mutex<Usage>>,
}

impl MemoryLimiter {
    /// Accounting for these deployments (others are never limited).
    pub fn new<'a>(deployments: impl IntoIterator<Item = &'a str>) -> MemoryLimiter {
        MemoryLimiter {
            windows: deployments
                .into_iter()
                .map(|d| (d.to_string(), Mutex::new(Usage::default())))
                .collect(),
        }
    }
}

impl MemoryLimiter {
    /// [`DeploymentLimiter::check`] with `others` (what other gateway instances used over the
    /// minute, see `shared.rs`) counted against the deployment's limit.
    pub fn check_with(
        &self,
        deployment: &str,
        tenant: &str,
        limits: &DeploymentLimits,
        tokens: u64,
        now: Instant,
        others: MinuteUsage,
    ) -> Result<(), Instant> {
        if limits.rpm.is_none() && limits.tpm.is_none() {
            return Ok(());
        }
        let Some(u) = self.windows.get(deployment) else {
            return Ok(());
        };
        let mut u = u.lock();
        u.roll(now);
        let (mut used, bucket_end) = u.total.estimate(now);
        used.requests += others.requests;
        used.tokens = used.tokens.saturating_add(others.tokens);
        let over = |used: MinuteUsage, rpm: Option<f64>, tpm: Option<f64>| {
            rpm.is_some_and(|rpm| used.requests as f64 >= rpm)
                || tpm.is_some_and(|tpm| {
                    used.tokens.saturating_add(tokens) as f64 > tpm && used.tokens > 0
                })
        };
        let (rpm, tpm) = (limits.rpm.map(|n| n as f64), limits.tpm.map(|n| n as f64));
        if over(used, rpm, tpm) {
            return Err(bucket_end);
        }
        let saturation = f64::max(
            rpm.map_or(0.0, |rpm| used.requests as f64 / rpm),
            tpm.map_or(0.0, |tpm| used.tokens as f64 / tpm),
        );
        if saturation < FAIR_SHARE_FROM {
            return Ok(());
        }
        let others = u.tenants.keys().filter(|t| t.as_str() != tenant).count();
        let share = 1.0 / (others + 1) as f64;
        let mine = u
            .tenants
            .get(tenant)
            .map_or_else(MinuteUsage::default, |w| w.estimate(now).0);
        if over(mine, rpm.map(|r| r * share), tpm.map(|t| t * share)) {
            Err(bucket_end)
        } else {
            Ok(())
        }
    }
}

impl DeploymentLimiter for MemoryLimiter {
    fn check(
        &self,
        deployment: &str,
        tenant: &str,
        limits: &DeploymentLimits,
        tokens: u64,
        now: Instant,
    ) -> Result<(), Instant> {
        self.check_with(
            deployment,
            tenant,
            limits,
            tokens,
            now,
            MinuteUsage::default(),
        )
    }

    fn record_request(&self, deployment: &str, tenant: &str, now: Instant) {
        if let Some(u) = self.windows.get(deployment) {
            let mut u = u.lock();
            u.roll(now);
            u.total.current.requests += 1;
            u.tenant(tenant, now).current.requests += 1;
        }
    }

    fn record_tokens(&self, deployment: &str, tenant: &str, tokens: u64, now: Instant) {
        if let Some(u) = self.windows.get(deployment) {
            let mut u = u.lock();
            u.roll(now);
            u.total.current.tokens = u.total.current.tokens.saturating_add(tokens);
            let w = u.tenant(tenant, now);
            w.current.tokens = w.current.tokens.saturating_add(tokens);
        }
    }

    fn usage(&self, deployment: &str, now: Instant) -> MinuteUsage {
        self.windows
            .get(deployment)
            .map_or_else(MinuteUsage::default, |u| {
                let mut u = u.lock();
                u.roll(now);
                u.total.estimate(now).0
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
            assert_eq!(l.check("a", "t", &limits, 10, t0), Ok(()));
            l.record_request("a", "t", t0);
        }
        assert_eq!(l.check("a", "t", &limits, 10, t0), Err(t0 + MINUTE));
        // Half a minute into the next bucket, half the previous minute still counts (2 of 3).
        let t1 = t0 + MINUTE + MINUTE / 2;
        assert_eq!(l.usage("a", t1).requests, 2);
        assert_eq!(l.check("a", "t", &limits, 10, t1), Ok(()));
        // Two minutes later nothing counts.
        assert_eq!(l.usage("a", t0 + MINUTE * 3).requests, 0);
    }

    #[test]
    fn a_saturated_deployment_holds_each_tenant_to_its_share() {
        let l = MemoryLimiter::new(["a"]);
        let limits = DeploymentLimits {
            rpm: Some(10),
            tpm: None,
        };
        let t0 = Instant::now();
        // Alone, a tenant may use the whole limit.
        for _ in 0..8 {
            assert_eq!(l.check("a", "big", &limits, 1, t0), Ok(()));
            l.record_request("a", "big", t0);
        }
        // 80% used: a second tenant still gets in...
        assert_eq!(l.check("a", "small", &limits, 1, t0), Ok(()));
        l.record_request("a", "small", t0);
        // ...and the first, holding 8 of 10 against a share of 5, is steered away while the
        // second may take the last request.
        assert!(l.check("a", "big", &limits, 1, t0).is_err());
        assert_eq!(l.check("a", "small", &limits, 1, t0), Ok(()));
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
        assert_eq!(l.check("a", "t", &limits, 5_000, t0), Ok(()));
        l.record_tokens("a", "t", 900, t0);
        assert_eq!(l.check("a", "t", &limits, 50, t0), Ok(()));
        assert!(l.check("a", "t", &limits, 200, t0).is_err());
        // Unknown deployments and deployments without limits are never limited.
        assert_eq!(l.check("b", "t", &limits, 1_000_000, t0), Ok(()));
        assert_eq!(
            l.check("a", "t", &DeploymentLimits::default(), 1_000_000, t0),
            Ok(())
        );
    }
}
