//! The attempt plan of one request: after each failed attempt, what next — retry the same
//! deployment, move to another, switch to a fallback alias, or give up. Pure: time, jitter,
//! breaker state and availability come in as inputs, so every rule is tested without sockets
//! or sleeps. [`super::dispatch`] sends; this decides.
//!
//! ```text
//!            failed attempt ──▶ next_action ──▶ Retry(wait)      same deployment, after wait
//!                                          ├──▶ NextDeployment   the strategy's next pick
//!                                          ├──▶ SwitchAlias      context-window / content-policy fallback
//!                                          └──▶ Fail             answer the client with the error
//! ```
//!
//! The rules:
//!
//! - **Client faults end the request** (`400`, `422`...: [`Disposition::Fatal`]); a context-
//!   window or content-policy error switches to the alias's fallback alias (at most
//!   [`MAX_ALIAS_SWITCHES`] times), else ends it too.
//! - **Every deployment gets a turn before the request fails.** `max_attempts` is shared
//!   fairly: a retry of the same deployment is allowed only if, after it, the budget still
//!   holds one attempt for each deployment of the alias not yet sent this request. So a
//!   first pass over untried deployments always fits, and the retries that are left go to the
//!   deployment at hand. With the defaults (6 attempts, 2 retries) and three deployments
//!   whose first two refuse connections: `dead ×3, dead2 ×2, third ×1`.
//! - **Retries** (5xx, connection errors, protocol errors, timeouts when `retry_timeouts`):
//!   at most `max_retries` per deployment, after the jittered backoff or the upstream's
//!   `retry-after`, whichever is longer; not when the `retry-after` is over
//!   `max_retry_after_ms`, not when its breaker would refuse the call, and not when the wait
//!   would not end before the deadline.
//! - **A 429 moves on at once**; with nowhere else to go it waits for the `retry-after` (or
//!   1 s), under the same limits as a retry.
//! - **Nothing is sent after the deadline or beyond `max_attempts`.**
//!
//! Which deployment "next" is — including the last resort when every breaker is open — is
//! the dispatcher's choice (`strategy.rs`); the plan only keeps count of who was sent.

use std::time::Duration;

use super::retry::Disposition;

/// Most alias switches (context-window, content-policy fallbacks) in one request.
pub const MAX_ALIAS_SWITCHES: u32 = 2;

/// How long a 429 without `retry-after` is waited for when there is nowhere else to go.
const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);

/// The limits of one request's attempts (from `[routing.retry]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Attempts sent upstream, all deployments and aliases together.
    pub max_attempts: u32,
    /// Retries on one deployment.
    pub max_retries: u32,
    /// A longer `retry-after` is not waited for.
    pub max_retry_after: Duration,
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Send to the same deployment again after this wait.
    Retry(Duration),
    /// Send to another deployment of the alias.
    NextDeployment,
    /// Route to the alias `to` (`reason`: the route log's reason).
    SwitchAlias { to: &'a str, reason: &'static str },
    /// Answer the client with the last error.
    Fail,
}

/// What the plan needs to know about a failed attempt and the world around it.
#[derive(Debug, Clone, Copy)]
pub struct Failed<'a> {
    pub disposition: Disposition,
    /// The upstream's `retry-after`.
    pub retry_after: Option<Duration>,
    /// The upstream answered 429.
    pub rate_limited: bool,
    /// The jittered backoff before the next retry of this deployment
    /// (`retry::backoff(cfg, plan.retries_here())`).
    pub backoff: Duration,
    /// Time left before the routing deadline.
    pub remaining: Duration,
    /// Whether the deployment's breaker would let a retry through (true for a deployment
    /// tried as the last resort: it was sent through an open breaker already).
    pub breaker_admits: bool,
    /// Whether the strategy has another deployment to offer now (a 429 then moves on).
    pub elsewhere: bool,
    /// The alias's fallback alias for this disposition (context window, content policy).
    pub fallback: Option<&'a str>,
}

/// The attempts of one request so far.
#[derive(Debug, Clone)]
pub struct Plan {
    budget: Budget,
    /// Deployments of the current alias this request may use (bit i = index i).
    eligible: u64,
    /// Deployments sent at least once on the current alias.
    sent: u64,
    /// Deployments the strategy should not offer again: sent, or passed over at sending time.
    passed: u64,
    attempts: u32,
    /// The deployment of the last attempt, and its retries so far.
    current: Option<usize>,
    retries_here: u32,
    switches: u32,
}

fn bit(i: usize) -> u64 {
    1u64.checked_shl(u32::try_from(i).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

impl Plan {
    /// A request on an alias whose usable deployments are `eligible` (bit i = index i).
    pub fn new(budget: Budget, eligible: u64) -> Plan {
        Plan {
            budget,
            eligible,
            sent: 0,
            passed: 0,
            attempts: 0,
            current: None,
            retries_here: 0,
            switches: 0,
        }
    }

    /// Whether the attempt budget allows another send.
    pub fn can_send(&self) -> bool {
        self.attempts < self.budget.max_attempts
    }

    /// Attempts sent so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Retries of the current deployment so far (the `n` of its next backoff).
    pub fn retries_here(&self) -> u32 {
        self.retries_here
    }

    /// Deployments the strategy must not offer (the `tried` mask of `strategy::pick`).
    pub fn not_to_pick(&self) -> u64 {
        !self.eligible | self.passed
    }

    /// Eligible deployments not sent yet.
    pub fn unsent(&self) -> u64 {
        self.eligible & !self.sent
    }

    /// An attempt was sent to `i` (a retry if it was the last one's deployment too).
    pub fn sent(&mut self, i: usize) {
        if self.current == Some(i) {
            self.retries_here += 1;
        } else {
            self.current = Some(i);
            self.retries_here = 0;
        }
        self.mark_sent(i);
    }

    /// A hedge went to `i` beside the current attempt.
    pub fn hedged(&mut self, i: usize) {
        self.mark_sent(i);
    }

    fn mark_sent(&mut self, i: usize) {
        self.attempts += 1;
        self.sent |= bit(i);
        self.passed |= bit(i);
    }

    /// `i` was picked but could not be sent (its breaker filled up in between): the
    /// strategy moves on; it stays a last-resort candidate.
    pub fn passed_over(&mut self, i: usize) {
        self.passed |= bit(i);
        if self.current == Some(i) {
            self.current = None;
        }
    }

    /// The request moved to another alias, with these usable deployments. The attempt
    /// budget goes on; the rest starts over.
    pub fn switched_alias(&mut self, eligible: u64) {
        self.switches += 1;
        self.eligible = eligible;
        self.sent = 0;
        self.passed = 0;
        self.current = None;
        self.retries_here = 0;
    }

    /// What to do after the attempt on the current deployment failed (see the module docs).
    pub fn next_action<'a>(&self, f: &Failed<'a>) -> Action<'a> {
        match f.disposition {
            Disposition::Fatal => Action::Fail,
            Disposition::ContextWindow | Disposition::ContentPolicy => match f.fallback {
                Some(to) if self.switches < MAX_ALIAS_SWITCHES => Action::SwitchAlias {
                    to,
                    reason: if f.disposition == Disposition::ContextWindow {
                        "context_window_fallback"
                    } else {
                        "content_policy_fallback"
                    },
                },
                _ => Action::Fail,
            },
            Disposition::Retry => {
                let wait = f.backoff.max(f.retry_after.unwrap_or_default());
                let asked_too_long = f
                    .retry_after
                    .is_some_and(|r| r > self.budget.max_retry_after);
                if f.breaker_admits && !asked_too_long && self.may_retry(wait, f.remaining) {
                    Action::Retry(wait)
                } else {
                    self.move_on(f.remaining)
                }
            }
            Disposition::NextDeployment => {
                let wait = f.retry_after.unwrap_or(DEFAULT_RATE_LIMIT_WAIT);
                if f.rate_limited
                    && !f.elsewhere
                    && wait <= self.budget.max_retry_after
                    && self.may_retry(wait, f.remaining)
                {
                    Action::Retry(wait)
                } else {
                    self.move_on(f.remaining)
                }
            }
        }
    }

    /// A retry of the current deployment after `wait`: within its retries, the deadline, and
    /// leaving one attempt for every deployment not sent yet.
    fn may_retry(&self, wait: Duration, remaining: Duration) -> bool {
        let left_after = self
            .budget
            .max_attempts
            .saturating_sub(self.attempts)
            .saturating_sub(1);
        self.current.is_some()
            && self.retries_here < self.budget.max_retries
            && self.can_send()
            && left_after >= self.unsent().count_ones()
            && wait < remaining
    }

    fn move_on<'a>(&self, remaining: Duration) -> Action<'a> {
        if self.can_send() && !remaining.is_zero() && self.unsent() != 0 {
            Action::NextDeployment
        } else {
            Action::Fail
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]

    use super::*;

    const BUDGET: Budget = Budget {
        max_attempts: 6,
        max_retries: 2,
        max_retry_after: Duration::from_secs(10),
    };

    fn all(n: usize) -> u64 {
        (0..n).fold(0, |m, i| m | bit(i))
    }

    fn failed(disposition: Disposition) -> Failed<'static> {
        Failed {
            disposition,
            retry_after: None,
            rate_limited: false,
            backoff: Duration::from_millis(10),
            remaining: Duration::from_secs(60),
            breaker_admits: true,
            elsewhere: true,
            fallback: None,
        }
    }

    /// Drives a plan the way the dispatcher does (lowest unsent index next), every attempt
    /// failing with `f`; returns the deployments sent, in order.
    fn drive(budget: Budget, n: usize, f: Failed<'static>) -> Vec<usize> {
        let mut plan = Plan::new(budget, all(n));
        let mut order = Vec::new();
        let mut next = (0..n).find(|i| plan.unsent() & bit(*i) != 0);
        while let Some(i) = next {
            assert!(plan.can_send());
            plan.sent(i);
            order.push(i);
            next = match plan.next_action(&f) {
                Action::Retry(_) => Some(i),
                Action::NextDeployment => (0..n).find(|i| plan.unsent() & bit(*i) != 0),
                Action::Fail | Action::SwitchAlias { .. } => None,
            };
        }
        order
    }

    #[test]
    fn the_first_pass_fits_before_retries_use_up_the_budget() {
        // Three deployments that all fail: retries of the first two stop where the budget
        // would no longer hold one attempt of the third.
        assert_eq!(
            drive(BUDGET, 3, failed(Disposition::Retry)),
            [0, 0, 0, 1, 1, 2]
        );
        // Two: the usual retries on each.
        assert_eq!(
            drive(BUDGET, 2, failed(Disposition::Retry)),
            [0, 0, 0, 1, 1, 1]
        );
        // More deployments than attempts: one each, as far as the budget goes.
        assert_eq!(
            drive(BUDGET, 8, failed(Disposition::Retry)),
            [0, 1, 2, 3, 4, 5]
        );
        // One deployment, no retries: one attempt.
        let no_retries = Budget {
            max_retries: 0,
            ..BUDGET
        };
        assert_eq!(drive(no_retries, 1, failed(Disposition::Retry)), [0]);
    }

    #[test]
    fn client_faults_fail_at_once_and_policy_errors_switch_alias() {
        let mut plan = Plan::new(BUDGET, all(3));
        plan.sent(0);
        assert_eq!(plan.next_action(&failed(Disposition::Fatal)), Action::Fail);
        let mut f = failed(Disposition::ContextWindow);
        assert_eq!(plan.next_action(&f), Action::Fail, "no fallback alias");
        f.fallback = Some("long");
        assert_eq!(
            plan.next_action(&f),
            Action::SwitchAlias {
                to: "long",
                reason: "context_window_fallback"
            }
        );
        plan.switched_alias(all(1));
        plan.switched_alias(all(1));
        assert_eq!(plan.next_action(&f), Action::Fail, "at most two switches");
    }

    #[test]
    fn retries_respect_retry_after_the_breaker_and_the_deadline() {
        let mut plan = Plan::new(BUDGET, all(2));
        plan.sent(0);
        let mut f = failed(Disposition::Retry);
        f.retry_after = Some(Duration::from_secs(2));
        assert_eq!(plan.next_action(&f), Action::Retry(Duration::from_secs(2)));
        f.retry_after = Some(Duration::from_secs(11));
        assert_eq!(plan.next_action(&f), Action::NextDeployment);
        f.retry_after = None;
        f.breaker_admits = false;
        assert_eq!(plan.next_action(&f), Action::NextDeployment);
        f.breaker_admits = true;
        f.remaining = Duration::from_millis(10);
        assert_eq!(
            plan.next_action(&f),
            Action::NextDeployment,
            "wait ≥ time left"
        );
        f.remaining = Duration::ZERO;
        assert_eq!(plan.next_action(&f), Action::Fail);
    }

    #[test]
    fn a_429_moves_on_unless_there_is_nowhere_else() {
        let mut plan = Plan::new(BUDGET, all(2));
        plan.sent(0);
        let mut f = failed(Disposition::NextDeployment);
        f.rate_limited = true;
        f.retry_after = Some(Duration::from_secs(1));
        assert_eq!(plan.next_action(&f), Action::NextDeployment);
        f.elsewhere = false;
        // The other deployment is unsent: the budget keeps its attempt, the wait fits.
        assert_eq!(plan.next_action(&f), Action::Retry(Duration::from_secs(1)));
        f.retry_after = Some(Duration::from_secs(30));
        assert_eq!(plan.next_action(&f), Action::NextDeployment);
        // A credential refused (401) is never waited for.
        let mut g = failed(Disposition::NextDeployment);
        g.elsewhere = false;
        assert_eq!(plan.next_action(&g), Action::NextDeployment);
    }

    /// xorshift64*: a small seeded generator, so failures replay.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// Random budgets, aliases and outcome sequences, driven as the dispatcher drives a plan
    /// (the next deployment is a random unsent one; time passes with each attempt and wait).
    /// Whatever happens: the loop ends within `max_attempts` sends, no wait or send goes past
    /// the deadline, and when a request fails with budget and time left and no error that
    /// ends it early, every deployment was sent.
    #[test]
    fn random_outcome_sequences_keep_the_invariants() {
        let dispositions = [
            Disposition::Retry,
            Disposition::Retry,
            Disposition::NextDeployment,
            Disposition::Fatal,
            Disposition::ContextWindow,
        ];
        for seed in 1..=20_000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let n = 1 + rng.below(6) as usize;
            let budget = Budget {
                max_attempts: 1 + rng.below(10) as u32,
                max_retries: rng.below(4) as u32,
                max_retry_after: Duration::from_millis(rng.below(2_000)),
            };
            // Some deployments pinned away.
            let mut eligible = all(n) & !(rng.next() & all(n));
            if eligible == 0 {
                eligible = bit(rng.below(n as u64) as usize);
            }
            let mut plan = Plan::new(budget, eligible);
            // A request starts before its deadline.
            let mut remaining = Duration::from_millis(1 + rng.below(3_000));
            let ends_early =
                |d: Disposition| !matches!(d, Disposition::Retry | Disposition::NextDeployment);
            let pick = |plan: &Plan, rng: &mut Rng| {
                let unsent: Vec<usize> = (0..n).filter(|i| plan.unsent() & bit(*i) != 0).collect();
                (!unsent.is_empty()).then(|| unsent[rng.below(unsent.len() as u64) as usize])
            };
            let mut next = pick(&plan, &mut rng);
            let mut sends = 0u32;
            while let Some(i) = next {
                assert!(plan.can_send(), "seed {seed}: sent beyond max_attempts");
                assert!(!remaining.is_zero(), "seed {seed}: sent after the deadline");
                plan.sent(i);
                sends += 1;
                assert!(sends <= budget.max_attempts, "seed {seed}");
                remaining = remaining.saturating_sub(Duration::from_millis(rng.below(400)));
                if rng.below(8) == 0 {
                    break; // a first byte: served
                }
                let disposition = dispositions[rng.below(dispositions.len() as u64) as usize];
                let f = Failed {
                    disposition,
                    retry_after: (rng.below(3) == 0)
                        .then(|| Duration::from_millis(rng.below(3_000))),
                    rate_limited: rng.below(2) == 0,
                    backoff: Duration::from_millis(rng.below(200)),
                    remaining,
                    breaker_admits: rng.below(5) != 0,
                    elsewhere: rng.below(2) == 0,
                    fallback: (rng.below(2) == 0).then_some("fallback"),
                };
                next = match plan.next_action(&f) {
                    Action::Retry(wait) => {
                        assert!(wait < remaining, "seed {seed}: waits past the deadline");
                        assert!(plan.retries_here() < budget.max_retries, "seed {seed}");
                        remaining -= wait;
                        Some(i)
                    }
                    Action::NextDeployment => {
                        assert!(plan.unsent() != 0 && !remaining.is_zero(), "seed {seed}");
                        pick(&plan, &mut rng)
                    }
                    Action::SwitchAlias { .. } => {
                        assert!(matches!(disposition, Disposition::ContextWindow));
                        break;
                    }
                    Action::Fail => {
                        let budget_allowed = budget.max_attempts >= eligible.count_ones();
                        if budget_allowed && !ends_early(disposition) && !remaining.is_zero() {
                            assert_eq!(
                                plan.unsent(),
                                0,
                                "seed {seed}: failed before every deployment was tried"
                            );
                        }
                        None
                    }
                };
            }
        }
    }
}
