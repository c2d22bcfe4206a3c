//! The durability barrier: a response's terminal event (`data: [DONE]`, `message_stop`, the
//! end of a non-streamed body) leaves the gateway only once its completion record is durable,
//! so a gateway killed at any moment never leaves a response the client received whole
//! unbilled.
//!
//! A sink that keeps the policy hands back a [`Durable`] with every completion record and
//! keeps the matching [`DurableTx`] beside the record; it resolves the ticket once the record
//! is durable: committed to the local event log (with every record handed over before it, in
//! one transaction shared by every completion in the batch: group commit), acknowledged by
//! Kafka (`acks=all`), or written to a disk spool. The relay awaits the ticket before the
//! terminal bytes go out; nothing before them waits, so time to first token is untouched.
//!
//! A sink that cannot make the record durable in time must not hold the response forever:
//! after `durable_timeout_ms` the response goes out anyway and the miss is counted
//! (`tollgate_completions_not_durable_total{reason="timeout"}`) and logged; a record the sink
//! lost (spool full, sink stopped) is counted with `reason="lost"`.

use std::future::Future;
use std::pin::Pin;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts};
use serde::Deserialize;
use tokio::sync::oneshot;

use super::internal_events::LogLimiter;

/// When a response may end (`[events] durability`).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DurabilityPolicy {
    /// A response's terminal event waits for its completion record to be durable.
    #[default]
    Completion,
    /// Responses end at once; a gateway that dies may lose the records still in memory.
    None,
}

/// Buckets for the barrier's wait: 10 µs to 10 s.
const WAIT_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The barrier's metrics (registered with the sink's).
#[derive(Clone)]
pub struct DurabilityMetrics {
    /// From the completion being handed over to it being durable.
    pub wait: Histogram,
    /// Responses that ended without their completion being durable, by reason.
    pub not_durable: IntCounterVec,
}

impl DurabilityMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let metrics = DurabilityMetrics {
            wait: Histogram::with_opts(
                HistogramOpts::new(
                    "tollgate_completion_durable_wait_seconds",
                    "How long a response's terminal event waited for its completion record to be durable",
                )
                .buckets(WAIT_BUCKETS.to_vec()),
            )?,
            not_durable: IntCounterVec::new(
                Opts::new(
                    "tollgate_completions_not_durable_total",
                    "Responses that ended before their completion record was durable, by reason (timeout, lost)",
                ),
                &["reason"],
            )?,
        };
        // Every reason exported from the start (at 0), so that `increase()` sees the first one.
        for reason in ["timeout", "lost"] {
            metrics.not_durable.with_label_values(&[reason]);
        }
        Ok(metrics)
    }

    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.wait.clone()),
            Box::new(self.not_durable.clone()),
        ]
    }
}

/// How long a response waits for its completion record, and what it reports.
#[derive(Clone)]
pub struct Barrier {
    pub policy: DurabilityPolicy,
    pub timeout: Duration,
    pub metrics: DurabilityMetrics,
}

impl Barrier {
    /// A ticket pair for one completion record, or `None` when the policy waits for nothing.
    pub fn ticket(&self) -> Option<(DurableTx, Durable)> {
        if self.policy == DurabilityPolicy::None {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        Some((
            DurableTx(tx),
            Durable {
                state: State::Waiting {
                    rx,
                    sleep: None,
                    timeout: self.timeout,
                    started: Instant::now(),
                    metrics: self.metrics.clone(),
                },
            },
        ))
    }
}

/// The sink's end of a ticket: resolve it once the record is durable. Dropped unresolved,
/// the waiting response counts the record as lost.
#[derive(Debug)]
pub struct DurableTx(oneshot::Sender<()>);

impl DurableTx {
    /// The record is durable.
    pub fn done(self) {
        let _ = self.0.send(());
    }
}

/// How the wait for a completion record ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurableOutcome {
    /// The record is durable.
    Durable,
    /// The sink keeps nothing durable, or the policy is `none`.
    NotRequired,
    /// Not durable within `durable_timeout_ms`: the response ended anyway.
    TimedOut,
    /// The sink lost the record (spool full, sink stopped).
    Lost,
}

/// Resolves when a completion record is durable, or when waiting for it is given up. Polling
/// it needs a Tokio runtime with a timer only while the record is not yet durable.
pub struct Durable {
    state: State,
}

enum State {
    Ready(DurableOutcome),
    Waiting {
        rx: oneshot::Receiver<()>,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        timeout: Duration,
        started: Instant,
        metrics: DurabilityMetrics,
    },
}

impl Durable {
    /// Nothing to wait for.
    pub fn not_required() -> Durable {
        Durable {
            state: State::Ready(DurableOutcome::NotRequired),
        }
    }

    /// Whether waiting would return at once.
    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready(_))
    }
}

static LOG_LIMIT: LazyLock<Mutex<LogLimiter>> = LazyLock::new(|| Mutex::new(LogLimiter::default()));

impl Future for Durable {
    type Output = DurableOutcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<DurableOutcome> {
        let this = self.get_mut();
        let outcome = match &mut this.state {
            State::Ready(o) => return Poll::Ready(*o),
            State::Waiting {
                rx,
                sleep,
                timeout,
                started,
                metrics,
            } => {
                let outcome = match Pin::new(rx).poll(cx) {
                    Poll::Ready(Ok(())) => DurableOutcome::Durable,
                    Poll::Ready(Err(_)) => DurableOutcome::Lost,
                    Poll::Pending => {
                        let deadline = tokio::time::Instant::from_std(*started + *timeout);
                        let timer = sleep
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                        match timer.as_mut().poll(cx) {
                            Poll::Ready(()) => DurableOutcome::TimedOut,
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                };
                report(outcome, started.elapsed(), metrics);
                outcome
            }
        };
        this.state = State::Ready(outcome);
        Poll::Ready(outcome)
    }
}

fn report(outcome: DurableOutcome, waited: Duration, metrics: &DurabilityMetrics) {
    let reason = match outcome {
        DurableOutcome::Durable => {
            metrics.wait.observe(waited.as_secs_f64());
            return;
        }
        DurableOutcome::NotRequired => return,
        DurableOutcome::TimedOut => "timeout",
        DurableOutcome::Lost => "lost",
    };
    metrics.not_durable.with_label_values(&[reason]).inc();
    if let Some(held_back) = LOG_LIMIT.lock().allow() {
        tracing::error!(
            target: "tollgate::events",
            reason,
            waited_ms = waited.as_millis() as u64,
            earlier_lines_held_back = held_back,
            "a response ended before its completion record was durable: a crash now could leave it unbilled"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn barrier(timeout_ms: u64) -> Barrier {
        Barrier {
            policy: DurabilityPolicy::Completion,
            timeout: Duration::from_millis(timeout_ms),
            metrics: DurabilityMetrics::new().unwrap(),
        }
    }

    #[tokio::test]
    async fn a_ticket_resolves_when_the_sink_says_durable() {
        let b = barrier(10_000);
        let (tx, durable) = b.ticket().unwrap();
        assert!(!durable.is_ready());
        let waiter = tokio::spawn(durable);
        tokio::task::yield_now().await;
        tx.done();
        assert_eq!(waiter.await.unwrap(), DurableOutcome::Durable);
        assert_eq!(b.metrics.wait.get_sample_count(), 1);
    }

    #[tokio::test]
    async fn a_lost_record_and_a_slow_sink_end_the_wait_and_are_counted() {
        let b = barrier(30);
        let (tx, durable) = b.ticket().unwrap();
        drop(tx);
        assert_eq!(durable.await, DurableOutcome::Lost);
        let (_tx, durable) = b.ticket().unwrap();
        assert_eq!(durable.await, DurableOutcome::TimedOut);
        let c = |r: &str| b.metrics.not_durable.with_label_values(&[r]).get();
        assert_eq!((c("lost"), c("timeout")), (1, 1));
    }

    #[test]
    fn the_none_policy_waits_for_nothing() {
        let b = Barrier {
            policy: DurabilityPolicy::None,
            ..barrier(1)
        };
        assert!(b.ticket().is_none());
        assert!(Durable::not_required().is_ready());
    }
}
