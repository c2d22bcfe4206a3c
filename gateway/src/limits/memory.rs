//! The in-process limiter: the same rules as `reserve.lua` and `settle.lua`, counted in this
//! process only. It serves the embedded default (with the embedded pipeline's balances as the
//! spend authority) and stands in while Redis is unreachable (each limit scaled by
//! `limits.local_share`; spend then starts from what this instance last saw).

use std::collections::{BTreeMap, HashMap};
use std::time::SystemTime;

use parking_lot::Mutex;
use tollgate_pipeline::sink::memory::MemoryBalances;

use super::scopes::{BalanceRef, Kind};
use super::{Ask, LimitsConfig, Settlement, Verdict};

const WINDOW_MS: u64 = 60_000;
const BUCKET_MS: u64 = 1_000;
/// Operations between sweeps of expired entries.
const SWEEP_EVERY: u64 = 10_000;

#[derive(Default)]
struct Window {
    index: i64,
    current: u64,
    previous: u64,
}

impl Window {
    fn roll(&mut self, index: i64) {
        if index == self.index {
            return;
        }
        self.previous = if index == self.index + 1 {
            self.current
        } else {
            0
        };
        self.current = 0;
        self.index = index;
    }

    fn used(&self, now: u64) -> u64 {
        let remaining = WINDOW_MS - now % WINDOW_MS;
        self.current + (self.previous * remaining).div_ceil(WINDOW_MS)
    }
}

#[derive(Default)]
struct Spend {
    /// Open reservations: request id → (micro-units, lease expiry).
    reserved: HashMap<String, (u64, u64)>,
    /// Counted spend (gateway-counted scopes).
    spent: u64,
    /// Settled spend by second (ledger-backed scopes), and its sum.
    pending: BTreeMap<u64, u64>,
    pending_total: u64,
}

impl Spend {
    fn reserved_now(&mut self, now: u64) -> u64 {
        self.reserved.retain(|_, (_, expiry)| *expiry > now);
        self.reserved.values().map(|(m, _)| m).sum()
    }
}

#[derive(Default)]
struct State {
    windows: HashMap<String, Window>,
    leases: HashMap<String, HashMap<String, u64>>,
    spend: HashMap<String, Spend>,
    /// Balance version → when this process first saw it (the balance's update time).
    seen: HashMap<BalanceRef, (u64, u64)>,
    ops: u64,
}

/// Limits counted in this process.
pub struct MemoryLimiter {
    state: Mutex<State>,
    share: f64,
    lease_ms: u64,
    lag_ms: u64,
    balances: MemoryBalances,
}

fn now_ms() -> u64 {
    u64::try_from(tollgate_schemas::events::unix_ms(SystemTime::now())).unwrap_or(0)
}

impl MemoryLimiter {
    pub fn new(config: &LimitsConfig, share: f64, balances: MemoryBalances) -> Self {
        MemoryLimiter {
            state: Mutex::new(State::default()),
            share,
            lease_ms: config.lease_ms,
            lag_ms: config.ledger_lag_ms,
            balances,
        }
    }

    fn scaled(&self, limit: u64) -> u64 {
        if self.share >= 1.0 {
            return limit;
        }
        // Truncation is the point: each instance gets at most its share.
        ((limit as f64 * self.share) as u64).max(1)
    }

    /// The pipeline's balance in micro-units and when it was last updated, as far as this
    /// process knows.
    fn authority(&self, state: &mut State, b: &BalanceRef, now: u64) -> (u64, Option<u64>) {
        let Some(balance) = self.balances.get_now(&b.tenant_id, &b.period, &b.currency) else {
            return (0, None);
        };
        let seen = state
            .seen
            .entry(b.clone())
            .or_insert((balance.version, now));
        if seen.0 != balance.version {
            *seen = (balance.version, now);
        }
        (super::estimate::micros(balance.spend), Some(seen.1))
    }

    pub fn reserve(&self, ask: &Ask<'_>) -> Verdict {
        let now = now_ms();
        let index = i64::try_from(now / WINDOW_MS).unwrap_or(0);
        let mut guard = self.state.lock();
        let state = &mut *guard;
        state.ops += 1;
        if state.ops.is_multiple_of(SWEEP_EVERY) {
            sweep(state, index, now);
        }
        let mut used = Vec::with_capacity(ask.checks.len());
        let mut failed = None;
        for (i, c) in ask.checks.iter().enumerate() {
            let limit = self.scaled(c.limit);
            let (u, asked) = match c.kind {
                Kind::Requests | Kind::Tokens => {
                    let w = state.windows.entry(c.key.clone()).or_default();
                    w.roll(index);
                    let asked = match (c.kind, ask.extend) {
                        (Kind::Requests, true) => 0,
                        (Kind::Requests, false) => 1,
                        _ => ask.tokens,
                    };
                    (w.used(now), asked)
                }
                Kind::Concurrency => {
                    let leases = state.leases.entry(c.key.clone()).or_default();
                    leases.retain(|_, expiry| *expiry > now);
                    let n = leases.len() as u64;
                    if ask.extend {
                        (n.saturating_sub(1), 0)
                    } else {
                        (n, 1)
                    }
                }
                Kind::Spend => {
                    let (authority, updated) = match &c.balance {
                        Some(b) => self.authority(state, b, now),
                        None => (0, None),
                    };
                    let spend = state.spend.entry(c.key.clone()).or_default();
                    let settled = if c.balance.is_some() {
                        if let Some(updated) = updated {
                            // Buckets the balance already holds: those ending by the cutoff.
                            let first_kept = updated.saturating_sub(self.lag_ms) / BUCKET_MS;
                            let kept = spend.pending.split_off(&first_kept);
                            let dropped: u64 =
                                std::mem::replace(&mut spend.pending, kept).values().sum();
                            spend.pending_total = spend.pending_total.saturating_sub(dropped);
                        }
                        authority + spend.pending_total
                    } else {
                        spend.spent
                    };
                    (settled + spend.reserved_now(now), ask.micros)
                }
            };
            used.push(u);
            if failed.is_none() && asked > 0 {
                let over = match c.kind {
                    Kind::Requests | Kind::Concurrency => u + asked > limit,
                    _ if !c.soft => u + asked > limit,
                    _ => !ask.extend && u >= limit,
                };
                if over {
                    failed = Some(i);
                }
            }
        }
        if failed.is_none() {
            for c in ask.checks {
                match c.kind {
                    Kind::Requests if !ask.extend => {
                        if let Some(w) = state.windows.get_mut(&c.key) {
                            w.current += 1;
                        }
                    }
                    Kind::Tokens => {
                        if let Some(w) = state.windows.get_mut(&c.key) {
                            w.current += ask.tokens;
                        }
                    }
                    Kind::Concurrency => {
                        state
                            .leases
                            .entry(c.key.clone())
                            .or_default()
                            .insert(ask.request_id.to_string(), now + self.lease_ms);
                    }
                    Kind::Spend if ask.micros > 0 => {
                        let r = state
                            .spend
                            .entry(c.key.clone())
                            .or_default()
                            .reserved
                            .entry(ask.request_id.to_string())
                            .or_insert((0, 0));
                        r.0 += ask.micros;
                        r.1 = now + self.lease_ms;
                    }
                    _ => {}
                }
            }
        }
        Verdict {
            failed,
            window: index,
            used,
        }
    }

    pub fn settle(&self, s: &Settlement<'_>) {
        let now = now_ms();
        let mut state = self.state.lock();
        for c in s.checks {
            match c.kind {
                Kind::Tokens if s.tokens_delta != 0 => {
                    if let Some(w) = state.windows.get_mut(&c.key) {
                        let slot = if w.index == s.window {
                            &mut w.current
                        } else if w.index == s.window + 1 {
                            &mut w.previous
                        } else {
                            continue;
                        };
                        *slot = slot.saturating_add_signed(s.tokens_delta);
                    }
                }
                Kind::Concurrency => {
                    if let Some(leases) = state.leases.get_mut(&c.key) {
                        leases.remove(s.request_id);
                    }
                }
                Kind::Spend => {
                    let spend = state.spend.entry(c.key.clone()).or_default();
                    spend.reserved.remove(s.request_id);
                    if s.micros > 0 {
                        if c.balance.is_some() {
                            *spend.pending.entry(now / BUCKET_MS).or_default() += s.micros;
                            spend.pending_total += s.micros;
                        } else {
                            spend.spent += s.micros;
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

/// Drops windows and leases nobody used for two minutes, and empty spend entries.
fn sweep(state: &mut State, index: i64, now: u64) {
    state.windows.retain(|_, w| w.index + 1 >= index);
    state.leases.retain(|_, l| {
        l.retain(|_, expiry| *expiry > now);
        !l.is_empty()
    });
    state.spend.retain(|_, s| {
        s.reserved.retain(|_, (_, expiry)| *expiry > now);
        !s.reserved.is_empty() || s.spent > 0 || !s.pending.is_empty()
    });
}

#[cfg(test)]
mod tests {
    use super::super::scopes::{Check, Scope};
    use super::*;

    fn limiter(share: f64) -> MemoryLimiter {
        MemoryLimiter::new(&LimitsConfig::default(), share, MemoryBalances::new())
    }

    fn check(kind: Kind, limit: u64, soft: bool) -> Check {
        Check {
            scope: Scope::Tenant,
            kind,
            limit,
            soft,
            key: format!("t:{kind:?}"),
            balance: None,
            model: None,
        }
    }

    fn ask<'a>(id: &'a str, checks: &'a [Check], tokens: u64, extend: bool) -> Ask<'a> {
        Ask {
            request_id: id,
            checks,
            tokens,
            micros: tokens,
            extend,
        }
    }

    #[test]
    fn all_checks_pass_or_nothing_is_counted() {
        let l = limiter(1.0);
        let checks = [
            check(Kind::Requests, 10, false),
            check(Kind::Tokens, 100, false),
        ];
        assert!(l.reserve(&ask("a", &checks, 60, false)).failed.is_none());
        // 60 + 60 > 100: refused by the tokens check, and the request is not counted.
        let v = l.reserve(&ask("b", &checks, 60, false));
        assert_eq!(v.failed, Some(1));
        assert_eq!(v.used, vec![1, 60]);
        let v = l.reserve(&ask("c", &checks, 40, false));
        assert!(v.failed.is_none());
        assert_eq!(v.used, vec![1, 60]);
    }

    #[test]
    fn settling_replaces_the_estimate_and_ends_the_lease() {
        let l = limiter(1.0);
        let checks = [
            check(Kind::Tokens, 100, false),
            check(Kind::Concurrency, 1, false),
        ];
        let v = l.reserve(&ask("a", &checks, 90, false));
        assert!(v.failed.is_none());
        assert_eq!(l.reserve(&ask("b", &checks, 5, false)).failed, Some(1));
        l.settle(&Settlement {
            request_id: "a",
            checks: &checks,
            tokens_delta: -80,
            window: v.window,
            micros: 0,
        });
        let v = l.reserve(&ask("b", &checks, 5, false));
        assert!(v.failed.is_none());
        assert_eq!(v.used, vec![10, 0]);
    }

    #[test]
    fn soft_limits_refuse_new_requests_only_once_crossed_and_never_cut() {
        let l = limiter(1.0);
        let checks = [check(Kind::Spend, 100, true)];
        assert!(l.reserve(&ask("a", &checks, 90, false)).failed.is_none());
        // Would cross, but the limit is not crossed yet: admitted.
        assert!(l.reserve(&ask("b", &checks, 50, false)).failed.is_none());
        // Extensions of running requests always pass.
        assert!(l.reserve(&ask("b", &checks, 500, true)).failed.is_none());
        assert_eq!(l.reserve(&ask("c", &checks, 1, false)).failed, Some(0));
        let hard = [check(Kind::Spend, 100, false)];
        let l = limiter(1.0);
        assert!(l.reserve(&ask("a", &hard, 90, false)).failed.is_none());
        assert_eq!(l.reserve(&ask("a", &hard, 20, true)).failed, Some(0));
    }

    #[test]
    fn the_local_share_scales_every_limit() {
        let l = limiter(0.5);
        let checks = [check(Kind::Requests, 4, false)];
        assert!(l.reserve(&ask("a", &checks, 0, false)).failed.is_none());
        assert!(l.reserve(&ask("b", &checks, 0, false)).failed.is_none());
        assert_eq!(l.reserve(&ask("c", &checks, 0, false)).failed, Some(0));
    }

    #[test]
    fn ledger_balances_are_the_authority_and_settlements_since_are_added() {
        let balances = MemoryBalances::new();
        let l = MemoryLimiter::new(&LimitsConfig::default(), 1.0, balances.clone());
        let b = BalanceRef {
            tenant_id: "t".into(),
            period: "2026-11".into(),
            currency: "USD".into(),
            key: String::new(),
        };
        let mut c = check(Kind::Spend, 10_000_000, false);
        c.balance = Some(b);
        let checks = [c];
        balances.publish_now(&[tollgate_pipeline::sink::Balance {
            tenant_id: "t".into(),
            period: "2026-11".into(),
            currency: "USD".into(),
            spend: rust_decimal::Decimal::new(4, 0),
            requests: 1,
            input_tokens: 0,
            cached_input_tokens: 0,
            output_tokens: 0,
            version: 7,
        }]);
        let a = ask("a", &checks, 1_000_000, false);
        let v = l.reserve(&a);
        assert_eq!(v.used, vec![4_000_000]);
        l.settle(&Settlement {
            request_id: "a",
            checks: &checks,
            tokens_delta: 0,
            window: v.window,
            micros: 2_000_000,
        });
        // Balance 4 + settled since 2 (within the lag allowance).
        assert_eq!(
            l.reserve(&ask("b", &checks, 0, false)).used,
            vec![6_000_000]
        );
    }
}
