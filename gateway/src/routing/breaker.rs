//! The circuit breaker of one deployment.
//!
//! ```text
//!            N failures in a row, or failure ratio ≥ r over the window (≥ min calls)
//!   Closed ─────────────────────────────────────────────────────────────▶ Open
//!     ▲                                                                  │ open_ms elapsed
//!     │ half_open_probes successes                                       ▼
//!     └──────────────────────────────────────── HalfOpen ◀───────────────┘
//!                                                  │ a probe fails
//!                                                  └──────────────▶ Open (again)
//! ```
//!
//! Slow calls (time to first byte over `slow_call_ms`) count as failures in the ratio but do
//! not break the run of successes that the consecutive count watches. Time is passed in, so
//! the state machine is tested without sleeping. Which failures reach the breaker is the
//! dispatcher's rule (`dispatch.rs`, "Breaker counting": a failure the request's own retry
//! on the same deployment recovered is not counted).

use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::config::BreakerConfig;

/// Buckets of the sliding window.
const BUCKETS: usize = 10;

/// A breaker's state, as shown in metrics (`0` closed, `1` open, `2` half-open) and the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The gauge value.
    pub fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

/// Whether a call may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Closed: go ahead.
    Allowed,
    /// Half-open: go ahead as a probe (report its outcome, or [`Breaker::abandon_probe`]).
    Probe,
    /// Open (or half-open with every probe slot taken).
    Rejected,
}

/// How a call ended, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallResult {
    Success { slow: bool },
    Failure,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which window tick this bucket holds (stale buckets are reset on use).
    tick: u64,
    calls: u32,
    failures: u32,
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive_failures: u32,
    buckets: [Bucket; BUCKETS],
}

/// One deployment's breaker.
#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    origin: Instant,
    bucket_len: Duration,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(cfg: &BreakerConfig) -> Breaker {
        let window = Duration::from_millis(cfg.window_ms.max(BUCKETS as u64));
        Breaker {
            cfg: cfg.clone(),
            origin: Instant::now(),
            bucket_len: window / BUCKETS as u32,
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
                buckets: [Bucket::default(); BUCKETS],
            }),
        }
    }

    fn tick(&self, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(nanos / self.bucket_len.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    /// The state at `now` (an open breaker whose time is up reads as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        if !self.cfg.enabled {
            return BreakerState::Closed;
        }
        match self.inner.lock().state {
            State::Closed => BreakerState::Closed,
            State::Open { until } if now < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a call could be admitted now, without taking a probe slot (for ranking).
    pub fn would_admit(&self, now: Instant) -> bool {
        if !self.cfg.enabled {
            return true;
        }
        match self.inner.lock().state {
            State::Closed => true,
            State::Open { until } => now >= until,
            State::HalfOpen { in_flight, .. } => in_flight < self.cfg.half_open_probes,
        }
    }

    /// Admits a call (taking a probe slot when half-open).
    pub fn admit(&self, now: Instant) -> Admission {
        if !self.cfg.enabled {
            return Admission::Allowed;
        }
        let mut inner = self.inner.lock();
        match inner.state {
            State::Closed => Admission::Allowed,
            State::Open { until } if now < until => Admission::Rejected,
            State::Open { .. } => {
                inner.state = State::HalfOpen {
                    in_flight: 1,
                    successes: 0,
                };
                Admission::Probe
            }
            State::HalfOpen {
                in_flight,
                successes,
            } => {
                if in_flight < self.cfg.half_open_probes {
                    inner.state = State::HalfOpen {
                        in_flight: in_flight + 1,
                        successes,
                    };
                    Admission::Probe
                } else {
                    Admission::Rejected
                }
            }
        }
    }

    /// Lets a call through whatever the state, as a probe (its outcome closes or re-opens
    /// the breaker). For a request that no other deployment could take: a breaker moves load
    /// to healthy deployments, it does not turn away requests nobody else can serve.
    pub fn force_probe(&self) {
        if !self.cfg.enabled {
            return;
        }
        let mut inner = self.inner.lock();
        inner.state = match inner.state {
            State::Closed => State::Closed,
            State::Open { .. } => State::HalfOpen {
                in_flight: 1,
                successes: 0,
            },
            State::HalfOpen {
                in_flight,
                successes,
            } => State::HalfOpen {
                in_flight: in_flight + 1,
                successes,
            },
        };
    }

    /// A probe ended without an outcome (cancelled): frees its slot.
    pub fn abandon_probe(&self) {
        let mut inner = self.inner.lock();
        if let State::HalfOpen {
            in_flight,
            successes,
        } = inner.state
        {
            inner.state = State::HalfOpen {
                in_flight: in_flight.saturating_sub(1),
                successes,
            };
        }
    }

    /// Records the outcome of an admitted call; returns the new state if it changed.
    pub fn record(&self, now: Instant, result: CallResult, probe: bool) -> Option<BreakerState> {
        if !self.cfg.enabled {
            return None;
        }
        let tick = self.tick(now);
        let mut inner = self.inner.lock();
        let failed = result == CallResult::Failure;
        let counted_failure = failed || result == (CallResult::Success { slow: true });
        let bucket = &mut inner.buckets[(tick % BUCKETS as u64) as usize];
        if bucket.tick != tick {
            *bucket = Bucket {
                tick,
                ..Bucket::default()
            };
        }
        bucket.calls += 1;
        bucket.failures += u32::from(counted_failure);
        inner.consecutive_failures = if failed {
            inner.consecutive_failures.saturating_add(1)
        } else {
            0
        };
        match inner.state {
            State::HalfOpen {
                in_flight,
                successes,
            } if probe => {
                if failed {
                    return Some(self.open(&mut inner, now));
                }
                let successes = successes + 1;
                if successes >= self.cfg.half_open_probes {
                    inner.state = State::Closed;
                    inner.consecutive_failures = 0;
                    inner.buckets = [Bucket::default(); BUCKETS];
                    return Some(BreakerState::Closed);
                }
                inner.state = State::HalfOpen {
                    in_flight: in_flight.saturating_sub(1),
                    successes,
                };
                None
            }
            State::Closed if counted_failure => {
                let (calls, failures) = inner
                    .buckets
                    .iter()
                    .filter(|b| tick.saturating_sub(b.tick) < BUCKETS as u64)
                    .fold((0u32, 0u32), |(c, f), b| (c + b.calls, f + b.failures));
                let ratio_tripped = calls >= self.cfg.min_calls.max(1)
                    && f64::from(failures) >= self.cfg.failure_ratio * f64::from(calls);
                if inner.consecutive_failures >= self.cfg.consecutive_failures || ratio_tripped {
                    Some(self.open(&mut inner, now))
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant) -> BreakerState {
        inner.state = State::Open {
            until: now + Duration::from_millis(self.cfg.open_ms),
        };
        BreakerState::Open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            enabled: true,
            consecutive_failures: 3,
            failure_ratio: 0.5,
            min_calls: 10,
            window_ms: 10_000,
            slow_call_ms: 0,
            open_ms: 1_000,
            half_open_probes: 2,
        }
    }

    const OK: CallResult = CallResult::Success { slow: false };

    #[test]
    fn opens_after_consecutive_failures_and_recovers_through_half_open() {
        let b = Breaker::new(&cfg());
        let t0 = Instant::now();
        assert_eq!(b.record(t0, CallResult::Failure, false), None);
        assert_eq!(b.record(t0, CallResult::Failure, false), None);
        assert_eq!(
            b.record(t0, CallResult::Failure, false),
            Some(BreakerState::Open)
        );
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.admit(t0), Admission::Rejected);
        assert!(!b.would_admit(t0));

        // After open_ms: half-open, two probe slots, a third call is rejected.
        let t1 = t0 + Duration::from_millis(1_001);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert_eq!(b.admit(t1), Admission::Probe);
        assert_eq!(b.admit(t1), Admission::Probe);
        assert_eq!(b.admit(t1), Admission::Rejected);
        assert_eq!(b.record(t1, OK, true), None);
        assert_eq!(b.record(t1, OK, true), Some(BreakerState::Closed));
        assert_eq!(b.admit(t1), Admission::Allowed);
    }

    #[test]
    fn a_failed_probe_reopens() {
        let b = Breaker::new(&cfg());
        let t0 = Instant::now();
        for _ in 0..3 {
            b.record(t0, CallResult::Failure, false);
        }
        let t1 = t0 + Duration::from_millis(1_500);
        assert_eq!(b.admit(t1), Admission::Probe);
        assert_eq!(
            b.record(t1, CallResult::Failure, true),
            Some(BreakerState::Open)
        );
        assert_eq!(b.admit(t1), Admission::Rejected);
        // Open for another open_ms from the failed probe.
        assert_eq!(b.admit(t1 + Duration::from_millis(1_001)), Admission::Probe);
    }

    #[test]
    fn a_forced_probe_goes_through_an_open_breaker() {
        let b = Breaker::new(&cfg());
        let t0 = Instant::now();
        for _ in 0..3 {
            b.record(t0, CallResult::Failure, false);
        }
        assert_eq!(b.admit(t0), Admission::Rejected);
        b.force_probe();
        assert_eq!(
            b.record(t0, CallResult::Failure, true),
            Some(BreakerState::Open)
        );
        b.force_probe();
        b.force_probe();
        assert_eq!(b.record(t0, OK, true), None);
        assert_eq!(b.record(t0, OK, true), Some(BreakerState::Closed));
    }

    #[test]
    fn an_abandoned_probe_frees_its_slot() {
        let mut c = cfg();
        c.half_open_probes = 1;
        let b = Breaker::new(&c);
        let t0 = Instant::now();
        for _ in 0..3 {
            b.record(t0, CallResult::Failure, false);
        }
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(b.admit(t1), Admission::Probe);
        assert_eq!(b.admit(t1), Admission::Rejected);
        b.abandon_probe();
        assert_eq!(b.admit(t1), Admission::Probe);
    }

    #[test]
    fn opens_on_the_failure_ratio_once_enough_calls_were_seen() {
        let b = Breaker::new(&cfg());
        let t0 = Instant::now();
        // Alternate: never 3 failures in a row, but half of the calls fail.
        let mut opened = None;
        for i in 0..10 {
            let r = if i % 2 == 0 { CallResult::Failure } else { OK };
            if let Some(s) = b.record(t0, r, false) {
                opened = Some((i, s));
                break;
            }
        }
        // The 9th call (index 8) makes 9 calls, 5 failures: under min_calls (10) still.
        assert_eq!(opened, None);
        assert_eq!(
            b.record(t0, CallResult::Failure, false),
            Some(BreakerState::Open)
        );
    }

    #[test]
    fn slow_calls_count_for_the_ratio_only() {
        let b = Breaker::new(&cfg());
        let t0 = Instant::now();
        let slow = CallResult::Success { slow: true };
        let mut states = Vec::new();
        for _ in 0..10 {
            states.push(b.record(t0, slow, false));
        }
        assert_eq!(states.last(), Some(&Some(BreakerState::Open)));
        assert!(states[..9].iter().all(Option::is_none));
    }

    #[test]
    fn old_failures_leave_the_window() {
        let b = Breaker::new(&cfg());
        let t0 = Instant::now();
        for i in 0..10 {
            let r = if i % 2 == 0 { CallResult::Failure } else { OK };
            b.record(t0, r, false);
        }
        // Those ten were half failures but min_calls was only just reached by the 10th (a
        // success). Much later, one failure among fresh successes does not open it.
        let later = t0 + Duration::from_secs(30);
        for _ in 0..10 {
            b.record(later, OK, false);
        }
        assert_eq!(b.record(later, CallResult::Failure, false), None);
        assert_eq!(b.state(later), BreakerState::Closed);
    }

    #[test]
    fn disabled_breakers_always_admit() {
        let mut c = cfg();
        c.enabled = false;
        let b = Breaker::new(&c);
        let t0 = Instant::now();
        for _ in 0..10 {
            assert_eq!(b.record(t0, CallResult::Failure, false), None);
        }
        assert_eq!(b.admit(t0), Admission::Allowed);
    }
}
