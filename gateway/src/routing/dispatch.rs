//! [`ModelRouter::dispatch`]: from a client's model name to an upstream response whose first
//! byte has arrived, trying deployments in the order the alias's strategy gives, retrying and
//! falling back as the errors allow, all within one deadline. Nothing has reached the client
//! while this runs, so every attempt is free to fail.
//!
//! ```text
//! choose (strategy; breaker, rate limits; last resort) ─▶ send ─▶ first byte? ─▶ done
//!    ▲                                                        │ error
//!    └──────────────── plan.next_action (plan.rs) ◀───────────┘
//!        Retry(wait): same deployment     5xx, connection error (backoff, retry-after)
//!        NextDeployment                   429, 401/403/404, timeout, retries spent
//!        SwitchAlias                      context window / content policy (alias fallbacks)
//!        Fail                             4xx that is the client's fault; nothing left to try
//! ```
//!
//! The loop sends and waits; what to do after a failure is [`Plan`]'s decision (its module
//! docs hold the rules: the attempt budget is shared so that every deployment of the alias
//! gets a turn before the request fails). Which deployment comes next is `strategy.rs`'s.
//!
//! **When every breaker is open** (or every deployment left has one open), the request is not
//! refused: the deployments it has not been sent to are tried through their open breakers
//! as probes, the one whose last success is the most recent first
//! ([`strategy::last_resort`]), within the attempt budget and the deadline. Such a last-resort
//! deployment keeps its retries: there is nowhere better to go.
//!
//! **Breaker counting.** A failed attempt (5xx, connection error, timeout) is not counted by
//! the deployment's breaker at once: while the request retries the same deployment, its
//! failures there are held (`Unsettled`). If a retry gets a first byte, they are forgiven —
//! the deployment served the request, and the breaker counts one successful call. If the
//! request leaves the deployment any other way (moves on, fails, is dropped), each held
//! failure is counted as before. So a deployment that answers every request on its first
//! retry (scenario: 503 to every other call) never trips its breaker, while one whose failures
//! lose requests does, by the same consecutive-failure and ratio thresholds. The cost of the
//! forgiven failures still shows: in the route log, the `x-tollgate-route` header and the
//! per-attempt metrics. Half-open probes are the exception: their outcome is counted at once,
//! since it decides the breaker's state.
//!
//! High-priority requests (and aliases with `hedge = true`) race a second deployment after
//! `[routing.hedge] delay_ms` without a first byte (`ModelRouter::hedged` over
//! [`hedge::race`]).
//!
//! The single-deployment, first-try path costs one pick (no allocation), one breaker check,
//! one attempt record and the deadline timer around the upstream call.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rust_decimal::Decimal;
use tollgate_schemas::{TokenUsage, UsageSource};

use super::breaker::{Admission, Breaker};
use super::health::InFlightGuard;
use super::hedge::{self, Raced};
use super::limiter::DeploymentLimiter;
use super::plan::{Action, Budget, Failed, Plan};
use super::retry::{self, Deadline, Disposition};
use super::strategy::{self, Pick, RankInput, Unavailable};
use super::{Alias, Deployment, ModelRouter, Strategy, Target};
use crate::error::GatewayError;
use crate::providers::{Endpoint, Forwarded, UpstreamResponse};
use crate::telemetry;
use tracing::Instrument;

/// Builds the upstream body for each attempt, in the attempt's dialect and model (a request
/// may be sent several times, to providers of either dialect).
pub trait UpstreamBody: Send {
    /// The body for deployment `to` (its dialect; masked for PII where the policy says so).
    fn body_for(&mut self, to: &Deployment, model: &str) -> Result<Bytes, GatewayError>;
    /// The pre-flight prompt estimate. Counting costs time before the upstream call, so the
    /// router asks only when a decision depends on it (cost ranking, token limits, token
    /// headroom an upstream reported, a hedge's cancelled cost); implementations count once.
    fn prompt_tokens(&mut self) -> u64;
}

/// A request's pins (`x-tollgate-deployment`, `x-tollgate-provider`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Pins<'a> {
    pub deployment: Option<&'a str>,
    pub provider: Option<&'a str>,
}

/// What the router needs to know about a request.
#[derive(Debug, Clone)]
pub struct DispatchRequest<'a> {
    /// The model the client asked for.
    pub model: &'a str,
    /// The caller's tenant (its fair share of saturated deployments).
    pub tenant: Arc<str>,
    pub endpoint: Endpoint,
    pub forwarded: &'a Forwarded,
    pub pins: Pins<'a>,
    /// Expected output (for cost and token limits; the prompt is counted by the body).
    pub expected_output_tokens: u64,
    /// Hedge this request (`x-tollgate-priority: high`).
    pub high_priority: bool,
    /// Whether the response streams. Only streams are hedged: a non-streamed answer's first
    /// byte comes with its last, so a hedge delay would fire on nearly every request.
    pub stream: bool,
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// First byte received: this attempt serves the request.
    Ok,
    /// The upstream answered this status.
    Status(u16),
    /// No first byte in time (deployment timeout or the routing deadline).
    Timeout,
    /// Connection refused, reset, DNS, TLS.
    Unreachable,
    /// Not the provider's wire format.
    Protocol,
    /// Skipped: its breaker opened between the pick and the send.
    BreakerOpen,
    /// A hedged attempt that lost the race and was cancelled.
    HedgeCancelled,
    /// Anything else (a translation error, for instance).
    Error,
}

impl AttemptOutcome {
    fn of(e: &GatewayError) -> AttemptOutcome {
        match e {
            GatewayError::Upstream { status, .. } => AttemptOutcome::Status(*status),
            GatewayError::UpstreamTimeout(_) => AttemptOutcome::Timeout,
            GatewayError::UpstreamUnavailable(_) => AttemptOutcome::Unreachable,
            GatewayError::UpstreamProtocol(_) => AttemptOutcome::Protocol,
            _ => AttemptOutcome::Error,
        }
    }

    /// Short text for the `x-tollgate-route` header and the completion event.
    pub fn write_label(&self, out: &mut String) {
        let _ = match self {
            AttemptOutcome::Ok => out.write_str("ok"),
            AttemptOutcome::Status(s) => write!(out, "{s}"),
            AttemptOutcome::Timeout => out.write_str("timeout"),
            AttemptOutcome::Unreachable => out.write_str("unreachable"),
            AttemptOutcome::Protocol => out.write_str("protocol"),
            AttemptOutcome::BreakerOpen => out.write_str("breaker_open"),
            AttemptOutcome::HedgeCancelled => out.write_str("hedge_cancelled"),
            AttemptOutcome::Error => out.write_str("error"),
        };
    }

    pub fn label(&self) -> String {
        let mut s = String::new();
        self.write_label(&mut s);
        s
    }
}

/// One attempt of a request.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub deployment: Arc<Deployment>,
    pub outcome: AttemptOutcome,
    /// From sending to the first byte or the error.
    pub elapsed: Duration,
}

/// The hedged attempt that lost: cancelled, not billed, its estimated cost recorded.
#[derive(Debug, Clone)]
pub struct HedgeLoser {
    pub deployment: Arc<Deployment>,
    pub upstream_model: String,
    /// Estimated: the prompt (the upstream had it), no output.
    pub usage: TokenUsage,
    /// `usage` at the deployment's configured price; `None` when it has none.
    pub cost: Option<Decimal>,
}

/// How a request was routed: every attempt, and why.
#[derive(Debug, Clone, Default)]
pub struct RouteLog {
    /// The alias's strategy label.
    pub strategy: &'static str,
    /// Why the route left the normal path: `pinned`, `context_window_fallback`,
    /// `content_policy_fallback`.
    pub reason: Option<&'static str>,
    pub attempts: Vec<Attempt>,
    /// When the first attempt was sent (the end of the gateway's own pre-processing).
    pub first_sent_at: Option<Instant>,
    /// Whether a hedge request was sent.
    pub hedged: bool,
    pub hedge_loser: Option<HedgeLoser>,
}

impl RouteLog {
    fn push(&mut self, deployment: &Arc<Deployment>, outcome: AttemptOutcome, elapsed: Duration) {
        self.attempts.push(Attempt {
            deployment: deployment.clone(),
            outcome,
            elapsed,
        });
    }

    /// Attempts repeated on the deployment just tried (hedge losers and skips not counted).
    pub fn retries(&self) -> u32 {
        let (mut retries, mut prev): (u32, Option<&str>) = (0, None);
        for a in self.sent() {
            if prev == Some(a.deployment.name.as_str()) {
                retries += 1;
            }
            prev = Some(a.deployment.name.as_str());
        }
        retries
    }

    /// Moves to another deployment after a failure (hedge losers and skips not counted).
    pub fn fallbacks(&self) -> u32 {
        let (mut fallbacks, mut prev): (u32, Option<&str>) = (0, None);
        for a in self.sent() {
            if prev.is_some_and(|p| p != a.deployment.name) {
                fallbacks += 1;
            }
            prev = Some(a.deployment.name.as_str());
        }
        fallbacks
    }

    fn sent(&self) -> impl Iterator<Item = &Attempt> {
        self.attempts.iter().filter(|a| {
            !matches!(
                a.outcome,
                AttemptOutcome::HedgeCancelled | AttemptOutcome::BreakerOpen
            )
        })
    }

    /// Attempts actually sent upstream (`x-tollgate-attempts`).
    pub fn attempts_sent(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| a.outcome != AttemptOutcome::BreakerOpen)
            .count()
    }

    /// `deployment:outcome` per attempt, comma-separated (`x-tollgate-route`).
    pub fn trace(&self) -> String {
        let mut out = String::with_capacity(self.attempts.len() * 24);
        for (i, a) in self.attempts.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&a.deployment.name);
            out.push(':');
            a.outcome.write_label(&mut out);
        }
        out
    }

    /// Whether anything beyond a first-try success on a strategy's pick happened.
    pub fn is_eventful(&self) -> bool {
        self.reason.is_some() || self.hedged || self.attempts.len() > 1
    }
}

/// The chosen deployment for as long as the response lasts: counts it in flight, and settles
/// what the request used when it ends.
pub struct Lease {
    deployment: Arc<Deployment>,
    tenant: Arc<str>,
    _in_flight: InFlightGuard,
    limiter: Arc<dyn DeploymentLimiter>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("deployment", &self.deployment.name)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// Records what the request used once it ended: tokens for the local TPM accounting,
    /// spend for commit-aware routing, and a stream that failed after it started as a breaker
    /// failure.
    pub fn settle(&self, usage: &TokenUsage, failed_midstream: bool) {
        let d = &self.deployment;
        let now = Instant::now();
        if d.limits.tpm.is_some() {
            self.limiter.record_tokens(
                &d.name,
                &self.tenant,
                usage.input_tokens + usage.output_tokens,
                now,
            );
        }
        if d.monthly_commit.is_some() {
            if let Some(cost) = price_of(d, usage) {
                d.health.add_spend(cost, SystemTime::now());
            }
        }
        if failed_midstream {
            d.health
                .breaker
                .record(now, super::breaker::CallResult::Failure, false);
        }
    }

    pub fn deployment(&self) -> &Arc<Deployment> {
        &self.deployment
    }
}

/// `usage` at `d`'s configured price by the pricing rule (cached input at the input price);
/// `None` when unpriced or beyond the rule's exact range.
pub fn price_of(d: &Deployment, usage: &TokenUsage) -> Option<Decimal> {
    let p = d.price.as_ref()?;
    tollgate_schemas::pricing::cost(usage, p.input_per_mtok, p.input_per_mtok, p.output_per_mtok)
}

/// A dispatched request: the upstream response (first byte arrived) and how it got there.
pub struct Dispatched<'r> {
    pub target: Target<'r>,
    pub upstream: UpstreamResponse,
    pub route: RouteLog,
    pub lease: Lease,
}

/// A request no deployment served; `target` is the last one tried (or the alias's first when
/// none could be), for the completion record.
pub struct DispatchFailure<'r> {
    pub error: GatewayError,
    pub target: Option<Target<'r>>,
    pub route: RouteLog,
}

/// The result of one attempt.
struct AttemptDone {
    deployment: Arc<Deployment>,
    upstream_model: String,
    result: Result<UpstreamResponse, GatewayError>,
    guard: InFlightGuard,
    elapsed: Duration,
    /// A failure its breaker has not counted yet: the dispatcher settles it once it knows
    /// whether a retry recovers it (see the module docs, "Breaker counting").
    unsettled: bool,
    /// The routing deadline, not the upstream, ended the attempt.
    cut_by_deadline: bool,
}

/// What [`ModelRouter::choose`] found.
enum Chosen {
    /// Send to this deployment (`true`: as the last resort, through its open breaker).
    Deployment(usize, bool),
    /// Waited for a rate limit to reset: choose again.
    Waited,
    /// Nothing can take the request; the error to answer if no attempt left one.
    Nothing(Option<GatewayError>),
}

/// The request a hedge belongs to.
struct Hedging<'a, 'q, 'm> {
    alias: &'a Alias,
    suffix: Option<&'m str>,
    req: &'q DispatchRequest<'m>,
    first_idx: usize,
    deadline: Deadline,
}

/// Retryable failures of one deployment in one request that its breaker has not counted yet.
/// Held while the request retries that deployment: forgiven if a retry gets a first byte,
/// counted (one failure each) when the request leaves the deployment any other way — moving
/// on, failing, or being dropped.
struct Unsettled<'a> {
    router: &'a ModelRouter,
    deployment: Option<Arc<Deployment>>,
    failures: u32,
}

impl<'a> Unsettled<'a> {
    fn new(router: &'a ModelRouter) -> Unsettled<'a> {
        Unsettled {
            router,
            deployment: None,
            failures: 0,
        }
    }

    /// Whether the failures held are `d`'s.
    fn is(&self, d: &Arc<Deployment>) -> bool {
        self.deployment.as_ref().is_some_and(|h| Arc::ptr_eq(h, d))
    }

    /// Holds one more failure of `d` (settling another deployment's first).
    fn hold(&mut self, d: &Arc<Deployment>) {
        if !self.is(d) {
            self.settle();
            self.deployment = Some(d.clone());
        }
        self.failures += 1;
    }

    /// A retry on the same deployment got a first byte: the failures are not counted.
    fn forgive(&mut self) {
        self.deployment = None;
        self.failures = 0;
    }

    /// Counts the failures held.
    fn settle(&mut self) {
        if let Some(d) = self.deployment.take() {
            self.router.charge_failures(&d, self.failures);
        }
        self.failures = 0;
    }
}

impl Drop for Unsettled<'_> {
    fn drop(&mut self) {
        self.settle();
    }
}

/// Every deployment of `alias` (bit i = index i).
fn all_of(alias: &Alias) -> u64 {
    if alias.deployments.len() >= 64 {
        u64::MAX
    } else {
        (1u64 << alias.deployments.len()) - 1
    }
}

/// Frees a half-open breaker's probe slot if the attempt is dropped before it ends.
struct ProbeSlot<'a> {
    breaker: &'a Breaker,
    armed: bool,
}

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.breaker.abandon_probe();
        }
    }
}

fn target<'r>(alias: &'r Alias, d: &Arc<Deployment>, upstream_model: String) -> Target<'r> {
    Target {
        alias,
        deployment: d.clone(),
        upstream_model,
    }
}

impl ModelRouter {
    /// Sends the request to the alias's deployments until one answers with a first byte, or
    /// nothing is left to try (see the module docs). The decisions are [`Plan`]'s; this loop
    /// picks, sends and waits.
    pub async fn dispatch<'r>(
        &'r self,
        req: &DispatchRequest<'_>,
        body: &mut dyn UpstreamBody,
    ) -> Result<Dispatched<'r>, Box<DispatchFailure<'r>>> {
        let started = Instant::now();
        let mut log = RouteLog::default();
        let failure = |error, target, route| {
            Box::new(DispatchFailure {
                error,
                target,
                route,
            })
        };
        let Some((mut alias, mut suffix)) = self
            .resolve(req.model)
            .filter(|(a, _)| !a.deployments.is_empty())
        else {
            return Err(failure(
                GatewayError::ModelNotFound(req.model.to_string()),
                None,
                log,
            ));
        };
        log.strategy = alias.strategy.label();
        let eligible = match excluded(alias, req, true) {
            Ok(mask) => !mask & all_of(alias),
            Err(e) => return Err(failure(e, None, log)),
        };
        if req.pins.deployment.is_some() || req.pins.provider.is_some() {
            log.reason = Some("pinned");
        }
        let retry = &self.config.retry;
        let mut plan = Plan::new(
            Budget {
                max_attempts: retry.max_attempts,
                max_retries: retry.max_retries,
                max_retry_after: Duration::from_millis(retry.max_retry_after_ms),
            },
            eligible,
        );
        let deadline = Deadline::after(started, retry.deadline_ms);
        let mut last: Option<(GatewayError, Target<'r>)> = None;
        let mut unsettled = Unsettled::new(self);
        // The deployment of a retry decided by the plan (and whether it is a last resort).
        let mut again: Option<(usize, bool)> = None;

        while plan.can_send() && !deadline.passed() {
            let is_retry = again.is_some();
            let (idx, last_resort) = match again.take() {
                Some(next) => next,
                None => match self.choose(alias, req, body, &plan, deadline).await {
                    Chosen::Deployment(i, last_resort) => (i, last_resort),
                    Chosen::Waited => continue,
                    Chosen::Nothing(why) => {
                        if last.is_none() {
                            last = why.map(|e| (e, self.first_target(alias, req.model, suffix)));
                        }
                        break;
                    }
                },
            };
            let d = alias.deployments[idx].clone();
            let model = d.upstream_model(req.model, suffix);
            if !is_retry {
                if let Some((e, _)) = &last {
                    self.metrics.fallback(&alias.name, e.label());
                }
            }
            let admission = if last_resort {
                d.health.breaker.force_probe();
                Admission::Probe
            } else {
                d.health.breaker.admit(Instant::now())
            };
            if admission == Admission::Rejected {
                log.push(&d, AttemptOutcome::BreakerOpen, Duration::ZERO);
                unsettled.settle();
                plan.passed_over(idx);
                continue;
            }
            let probe = admission == Admission::Probe;
            let bytes = match body.body_for(&d, &model) {
                Ok(b) => b,
                Err(e) => {
                    if probe {
                        d.health.breaker.abandon_probe();
                    }
                    return Err(failure(e, Some(target(alias, &d, model)), log));
                }
            };
            plan.sent(idx);
            log.first_sent_at.get_or_insert_with(Instant::now);
            let first = self.attempt(d.clone(), model, req, bytes, probe, true, deadline);
            let hedge = (req.high_priority || alias.hedge)
                && req.stream
                && req.endpoint == Endpoint::Chat
                && !log.hedged
                && !is_retry
                && plan.can_send();
            let done = if hedge {
                let hedging = Hedging {
                    alias,
                    suffix,
                    req,
                    first_idx: idx,
                    deadline,
                };
                self.hedged(hedging, first, body, &mut plan, &mut log).await
            } else {
                first.await
            };
            let AttemptDone {
                deployment: served_by,
                upstream_model,
                result,
                guard,
                elapsed,
                unsettled: charge_pending,
                cut_by_deadline,
            } = done;
            let e = match result {
                Ok(upstream) => {
                    if unsettled.is(&served_by) {
                        unsettled.forgive();
                    }
                    log.push(&served_by, AttemptOutcome::Ok, elapsed);
                    let lease = Lease {
                        deployment: served_by.clone(),
                        tenant: req.tenant.clone(),
                        _in_flight: guard,
                        limiter: self.limiter.clone(),
                    };
                    return Ok(Dispatched {
                        target: target(alias, &served_by, upstream_model),
                        upstream,
                        route: log,
                        lease,
                    });
                }
                Err(e) => e,
            };
            drop(guard);
            log.push(&served_by, AttemptOutcome::of(&e), elapsed);
            let disposition = retry::classify(&e, retry.retry_timeouts);
            let failed = Failed {
                disposition,
                retry_after: retry_after(&e),
                rate_limited: matches!(e, GatewayError::Upstream { status: 429, .. }),
                backoff: retry::backoff(retry, plan.retries_here(), &mut rand::thread_rng()),
                remaining: deadline.remaining(),
                breaker_admits: last_resort || d.health.breaker.would_admit(Instant::now()),
                elsewhere: disposition == Disposition::NextDeployment
                    && self.has_another(alias, req, body, &plan),
                fallback: match disposition {
                    Disposition::ContextWindow => alias.context_window_fallback.as_deref(),
                    Disposition::ContentPolicy => alias.content_policy_fallback.as_deref(),
                    _ => None,
                },
            };
            let action = plan.next_action(&failed);
            if charge_pending {
                unsettled.hold(&served_by);
            }
            if !matches!(action, Action::Retry(_)) {
                unsettled.settle();
            }
            match action {
                Action::Retry(wait) => {
                    self.metrics.retry(&alias.name, &d.name);
                    last = Some((e, target(alias, &served_by, upstream_model)));
                    tokio::time::sleep(wait).await;
                    again = Some((idx, last_resort));
                }
                Action::NextDeployment => {
                    last = Some((e, target(alias, &served_by, upstream_model)));
                }
                Action::SwitchAlias { to, reason } => match self.alias(to) {
                    Some(next) => {
                        self.metrics.fallback(&alias.name, reason);
                        alias = next;
                        suffix = None;
                        plan.switched_alias(
                            !excluded(alias, req, false).unwrap_or(0) & all_of(alias),
                        );
                        log.reason = Some(reason);
                        last = None;
                    }
                    None => {
                        return Err(failure(
                            e,
                            Some(target(alias, &served_by, upstream_model)),
                            log,
                        ))
                    }
                },
                Action::Fail => {
                    // An attempt the deadline cut short says less than the upstream's own
                    // error before it (the 503 that kept being retried, say).
                    let (e, t) = match last {
                        Some(earlier) if cut_by_deadline => earlier,
                        _ => (e, target(alias, &served_by, upstream_model)),
                    };
                    return Err(failure(e, Some(t), log));
                }
            }
        }
        drop(unsettled);
        let (error, last_target) = match last {
            Some((e, t)) => (e, Some(t)),
            None if deadline.passed() => (
                GatewayError::UpstreamTimeout(format!(
                    "no deployment answered within the routing deadline of {} ms",
                    retry.deadline_ms
                )),
                Some(self.first_target(alias, req.model, suffix)),
            ),
            None => (
                GatewayError::UpstreamUnavailable(format!(
                    "no deployment of `{}` could take the request",
                    alias.name
                )),
                Some(self.first_target(alias, req.model, suffix)),
            ),
        };
        Err(failure(error, last_target, log))
    }

    /// The next deployment for a request: the strategy's pick among those not yet passed;
    /// when every one left is at a rate limit, a wait for the first reset (if near and the
    /// deadline allows); when none is left or only open breakers keep them out, the last
    /// resort ([`strategy::last_resort`]) among those never sent.
    async fn choose(
        &self,
        alias: &Alias,
        req: &DispatchRequest<'_>,
        body: &mut dyn UpstreamBody,
        plan: &Plan,
        deadline: Deadline,
    ) -> Chosen {
        let input = self.rank_input(req, alias, body);
        let picked = strategy::pick(
            alias.strategy,
            &alias.deployments,
            plan.not_to_pick(),
            &input,
            &*self.limiter,
            &mut rand::thread_rng(),
        );
        let rate_limited = match picked {
            Pick::Deployment(i) => return Chosen::Deployment(i, false),
            Pick::Unavailable(Unavailable::RateLimited(until)) => {
                let wait = until.saturating_duration_since(Instant::now());
                let max_wait = Duration::from_millis(self.config.retry.max_retry_after_ms);
                if wait <= max_wait && deadline.allows_wait(wait) {
                    tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
                    return Chosen::Waited;
                }
                Some(wait)
            }
            Pick::Exhausted | Pick::Unavailable(Unavailable::BreakerOpen) => None,
        };
        if let Some(i) =
            strategy::last_resort(&alias.deployments, plan.unsent(), &input, &*self.limiter)
        {
            return Chosen::Deployment(i, true);
        }
        Chosen::Nothing(match rate_limited {
            Some(wait) => Some(GatewayError::Upstream {
                status: 429,
                message: format!("Every deployment of `{}` is at its rate limit.", alias.name),
                retry_after_s: Some(wait.as_secs().max(1)),
                param: None,
                code: None,
            }),
            None if plan.attempts() == 0 => Some(GatewayError::UpstreamUnavailable(format!(
                "every deployment of `{}` is failing (circuit breakers open)",
                alias.name
            ))),
            None => None,
        })
    }

    /// Whether the strategy could offer another deployment now (a 429 then moves on rather
    /// than waits).
    fn has_another(
        &self,
        alias: &Alias,
        req: &DispatchRequest<'_>,
        body: &mut dyn UpstreamBody,
        plan: &Plan,
    ) -> bool {
        matches!(
            strategy::pick(
                Strategy::Ordered,
                &alias.deployments,
                plan.not_to_pick(),
                &self.rank_input(req, alias, body),
                &*self.limiter,
                &mut rand::thread_rng(),
            ),
            Pick::Deployment(_)
        )
    }

    /// Races `first` against a hedge to the strategy's next pick, sent after
    /// `[routing.hedge] delay_ms` without a first byte ([`hedge::race`]); returns the attempt
    /// that decides the request: the winner, or the first deployment's failure when both
    /// failed. The loser is recorded in `log` (cancelled, its estimated cost kept).
    async fn hedged(
        &self,
        h: Hedging<'_, '_, '_>,
        first: impl std::future::Future<Output = AttemptDone>,
        body: &mut dyn UpstreamBody,
        plan: &mut Plan,
        log: &mut RouteLog,
    ) -> AttemptDone {
        let Hedging {
            alias,
            suffix,
            req,
            first_idx,
            deadline,
        } = h;
        let delay = Duration::from_millis(self.config.hedge.delay_ms);
        let not_to_pick = plan.not_to_pick();
        let mut second_idx = None;
        let second = || {
            let (i, d2, admission) = self.hedge_candidate(alias, not_to_pick, req, &mut *body)?;
            let model2 = d2.upstream_model(req.model, suffix);
            let Ok(bytes2) = body.body_for(&d2, &model2) else {
                if admission == Admission::Probe {
                    d2.health.breaker.abandon_probe();
                }
                return None;
            };
            second_idx = Some(i);
            Some(self.attempt(
                d2,
                model2,
                req,
                bytes2,
                admission == Admission::Probe,
                false,
                deadline,
            ))
        };
        let raced = hedge::race(first, second, delay, |a: &AttemptDone| a.result.is_ok()).await;
        if let Some(i) = second_idx {
            plan.hedged(i);
            log.hedged = true;
        }
        match raced {
            Raced::Alone(done) => done,
            Raced::Won { winner, result } => {
                let loser_idx = if winner == 0 {
                    second_idx
                } else {
                    Some(first_idx)
                };
                if let Some(li) = loser_idx {
                    let loser = alias.deployments[li].clone();
                    let loser_model = loser.upstream_model(req.model, suffix);
                    let prompt_tokens = body.prompt_tokens();
                    self.record_hedge_loser(log, &loser, loser_model, prompt_tokens);
                }
                self.metrics.hedge(
                    &alias.name,
                    if winner == 0 {
                        "first_won"
                    } else {
                        "hedge_won"
                    },
                );
                result
            }
            Raced::Both([a, b]) => {
                // The first to finish failed; take the one that succeeded, if any.
                let (ok, failed) = if b.result.is_ok() { (b, a) } else { (a, b) };
                let e = match &failed.result {
                    Err(e) => e.clone(),
                    Ok(_) => GatewayError::Internal("hedge".to_string()),
                };
                log.push(&failed.deployment, AttemptOutcome::of(&e), failed.elapsed);
                self.metrics.hedge(&alias.name, "one_failed");
                // With both failed, `ok` is the first attempt (results come in attempt order):
                // the request goes on from its error.
                if failed.unsettled {
                    self.charge_failures(&failed.deployment, 1);
                }
                ok
            }
        }
    }

    /// Counts `n` failures of `d` in its breaker (failures a retry did not recover).
    fn charge_failures(&self, d: &Deployment, n: u32) {
        use super::breaker::CallResult;
        let now = Instant::now();
        for _ in 0..n {
            let transition = d.health.breaker.record(now, CallResult::Failure, false);
            self.breaker_changed(d, transition);
        }
    }

    fn breaker_changed(&self, d: &Deployment, transition: Option<super::breaker::BreakerState>) {
        if let Some(state) = transition {
            tracing::warn!(deployment = %d.name, state = state.label(), "circuit breaker changed state");
            self.metrics.breaker_transition(&d.name, state.label());
        }
    }

    /// What the strategy ranks with; the prompt is counted only if `alias`'s ranking or
    /// limits can depend on it.
    fn rank_input(
        &self,
        req: &DispatchRequest<'_>,
        alias: &Alias,
        body: &mut dyn UpstreamBody,
    ) -> RankInput {
        let limits = &self.config.rate_limits;
        let now = Instant::now();
        let counts_tokens = matches!(alias.strategy, Strategy::LowestCost | Strategy::CommitAware)
            || alias
                .deployments
                .iter()
                .any(|d| d.limits.tpm.is_some() || d.health.upstream_token_headroom_known(now));
        RankInput {
            tenant: req.tenant.clone(),
            prompt_tokens: if counts_tokens {
                body.prompt_tokens()
            } else {
                0
            },
            expected_output_tokens: req.expected_output_tokens,
            now,
            wall: SystemTime::now(),
            near_requests: limits.near_limit_requests,
            near_tokens: limits.near_limit_tokens,
            load_stale_after: Duration::from_secs(10),
        }
    }

    fn first_target<'r>(
        &'r self,
        alias: &'r Alias,
        model: &str,
        suffix: Option<&str>,
    ) -> Target<'r> {
        let d = &alias.deployments[0];
        target(alias, d, d.upstream_model(model, suffix))
    }

    /// The deployment a hedge goes to: the strategy's next pick, admitted by its breaker.
    fn hedge_candidate(
        &self,
        alias: &Alias,
        tried: u64,
        req: &DispatchRequest<'_>,
        body: &mut dyn UpstreamBody,
    ) -> Option<(usize, Arc<Deployment>, Admission)> {
        let input = self.rank_input(req, alias, body);
        let Pick::Deployment(i) = strategy::pick(
            alias.strategy,
            &alias.deployments,
            tried,
            &input,
            &*self.limiter,
            &mut rand::thread_rng(),
        ) else {
            return None;
        };
        let d = alias.deployments[i].clone();
        match d.health.breaker.admit(Instant::now()) {
            Admission::Rejected => None,
            a => Some((i, d, a)),
        }
    }

    fn record_hedge_loser(
        &self,
        log: &mut RouteLog,
        loser: &Arc<Deployment>,
        upstream_model: String,
        prompt_tokens: u64,
    ) {
        log.push(loser, AttemptOutcome::HedgeCancelled, Duration::ZERO);
        let usage = TokenUsage {
            input_tokens: prompt_tokens,
            source: UsageSource::Counted,
            ..TokenUsage::default()
        };
        log.hedge_loser = Some(HedgeLoser {
            deployment: loser.clone(),
            upstream_model,
            cost: price_of(loser, &usage),
            usage,
        });
    }

    /// One attempt on `d`: counts it, sends, waits (bounded by the deadline) for the first
    /// byte, and feeds the outcome to the deployment's health and breaker. With `defer`, a
    /// failure of a call that is not a probe is left for the dispatcher to count
    /// ([`AttemptDone::unsettled`]); a probe's outcome is always counted at once, since it
    /// decides the breaker's state.
    #[allow(clippy::too_many_arguments)] // one call's inputs, each from a different place
    async fn attempt(
        &self,
        d: Arc<Deployment>,
        upstream_model: String,
        req: &DispatchRequest<'_>,
        bytes: Bytes,
        probe: bool,
        defer: bool,
        deadline: Deadline,
    ) -> AttemptDone {
        let mut slot = ProbeSlot {
            breaker: &d.health.breaker,
            armed: probe,
        };
        let sent = Instant::now();
        if d.limits.rpm.is_some() || d.limits.tpm.is_some() {
            self.limiter.record_request(&d.name, &req.tenant, sent);
        }
        let guard = d.health.start();
        let span = telemetry::attempt_span(&d.name, d.provider.label(), &upstream_model);
        let first_byte =
            telemetry::span!(parent: &span, "upstream.first_byte", otel.kind = "client");
        let forwarded = telemetry::forwarded_in(req.forwarded, &first_byte);
        let send = d
            .provider
            .send(req.endpoint, bytes, &forwarded)
            .instrument(first_byte);
        let mut cut_by_deadline = false;
        let result = match tokio::time::timeout(deadline.remaining(), send).await {
            Ok(r) => r,
            Err(_) => {
                cut_by_deadline = true;
                Err(GatewayError::UpstreamTimeout(format!(
                    "no first byte within the routing deadline of {} ms",
                    self.config.retry.deadline_ms
                )))
            }
        };
        let elapsed = sent.elapsed();
        slot.armed = false;
        drop(slot);
        telemetry::record_attempt(&span, &result);
        let unsettled = self.observe(&d, &result, elapsed, probe, defer && !probe);
        AttemptDone {
            deployment: d,
            upstream_model,
            result,
            guard,
            elapsed,
            unsettled,
            cut_by_deadline,
        }
    }

    fn observe(
        &self,
        d: &Deployment,
        result: &Result<UpstreamResponse, GatewayError>,
        elapsed: Duration,
        probe: bool,
        defer_failure: bool,
    ) -> bool {
        use super::breaker::CallResult;
        let now = Instant::now();
        let breaker = &d.health.breaker;
        let transition = match result {
            Ok(response) => {
                d.health.mark_success(now);
                if self.config.rate_limits.follow_upstream_headers {
                    d.health.observe_rate_headers(&response.headers, now);
                }
                d.health.observe_ttft(elapsed);
                let slow_ms = self.config.breaker.slow_call_ms;
                let slow = slow_ms > 0 && elapsed > Duration::from_millis(slow_ms);
                self.metrics.attempt(&d.name, "ok");
                breaker.record(now, CallResult::Success { slow }, probe)
            }
            Err(e) => {
                self.metrics.attempt(&d.name, e.label());
                match e {
                    GatewayError::Upstream { status: 429, .. } => {
                        // Rate limits say nothing about health.
                        d.health.block_for(retry_after(e), now);
                        if probe {
                            breaker.abandon_probe();
                        }
                        None
                    }
                    _ => match retry::classify(e, true) {
                        Disposition::Fatal
                        | Disposition::ContextWindow
                        | Disposition::ContentPolicy => {
                            breaker.record(now, CallResult::Success { slow: false }, probe)
                        }
                        _ if defer_failure => return true,
                        _ => breaker.record(now, CallResult::Failure, probe),
                    },
                }
            }
        };
        self.breaker_changed(d, transition);
        false
    }
}

/// An upstream error's `retry-after`.
fn retry_after(e: &GatewayError) -> Option<Duration> {
    match e {
        GatewayError::Upstream {
            retry_after_s: Some(s),
            ..
        } => Some(Duration::from_secs(*s)),
        _ => None,
    }
}

/// Deployments of `alias` the request may not use (bit i set): pinned away, or (for
/// embeddings) not serving the endpoint.
fn excluded(alias: &Alias, req: &DispatchRequest<'_>, pins: bool) -> Result<u64, GatewayError> {
    let mut mask = 0u64;
    for (i, d) in alias.deployments.iter().enumerate().take(64) {
        let pinned_away = pins
            && (req.pins.deployment.is_some_and(|p| p != d.name)
                || req.pins.provider.is_some_and(|p| p != d.provider.label()));
        let wrong_endpoint = req.endpoint == Endpoint::Embeddings && !d.embeddings;
        if pinned_away || wrong_endpoint {
            mask |= 1u64 << i;
        }
    }
    let all = if alias.deployments.len() >= 64 {
        u64::MAX
    } else {
        (1u64 << alias.deployments.len()) - 1
    };
    if mask == all {
        return Err(if let Some(p) = req.pins.deployment.filter(|_| pins) {
            GatewayError::bad_param(
                format!(
                    "The deployment `{p}` does not serve the model `{}`.",
                    req.model
                ),
                "x-tollgate-deployment",
            )
        } else if let Some(p) = req.pins.provider.filter(|_| pins) {
            GatewayError::bad_param(
                format!(
                    "No deployment of provider `{p}` serves the model `{}`.",
                    req.model
                ),
                "x-tollgate-provider",
            )
        } else {
            GatewayError::bad_param(
                format!("The model `{}` does not serve embeddings.", req.model),
                "model",
            )
        });
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::HashMap;

    use super::super::breaker::{BreakerState, CallResult};
    use super::*;
    use crate::config::Config;

    #[test]
    fn failures_a_retry_recovered_are_forgiven_and_lost_ones_are_counted() {
        let config = Config::from_toml(
            r#"
[server]
mock_models = false
[routing.breaker]
consecutive_failures = 3
min_calls = 4
[[deployments]]
type = "mock"
name = "b"
[[models]]
name = "x"
deployments = ["b"]
"#,
        )
        .unwrap();
        let r = ModelRouter::from_config(&config, &HashMap::new()).unwrap();
        let d = r.alias("x").unwrap().deployments[0].clone();
        let (breaker, now) = (&d.health.breaker, Instant::now());
        // Fifty requests that each fail once and are served by their retry: half the calls
        // failed, none of the requests was lost.
        for _ in 0..50 {
            let mut held = Unsettled::new(&r);
            held.hold(&d);
            breaker.record(now, CallResult::Success { slow: false }, false);
            held.forgive();
        }
        assert_eq!(breaker.state(now), BreakerState::Closed);
        // A request that leaves after two failures: both count.
        let mut held = Unsettled::new(&r);
        held.hold(&d);
        held.hold(&d);
        held.settle();
        assert_eq!(breaker.state(now), BreakerState::Closed);
        // One dropped while it waited to retry: its failure counts too (three in a row).
        let mut held = Unsettled::new(&r);
        held.hold(&d);
        drop(held);
        assert_eq!(breaker.state(now), BreakerState::Open);
    }
}
