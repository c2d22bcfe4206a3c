//! What matters to billing about the event pipeline itself: each one typed event that both logs
//! and counts, in one place. A writer thread emits them (aggregated per loop turn, never per
//! record on the request path); logs of the same kind are limited to one a second, and the
//! counters always see every record.
//!
//! | event | counter | log |
//! |---|---|---|
//! | [`EventsDropped`] | `tollgate_events_dropped_total{reason}` | error |
//! | [`SpoolingStarted`] | `tollgate_events_spool_active` = 1 | warn |
//! | [`EventsSpooled`] | `tollgate_events_spooled_total{reason}` | debug |
//! | [`EventsReplayed`] | `tollgate_events_replayed_total` | debug |
//! | [`SpoolDrained`] | `tollgate_events_spool_active` = 0 | info |
//! | [`DeliveryFailed`] | `tollgate_events_delivery_errors_total{kind}` | warn |
//! | [`EventsDeadLettered`] | `tollgate_events_dead_lettered_total` | error |
//! | [`SpoolCorrupted`] | `tollgate_events_dropped_total{reason="spool_corrupt"}` | warn |
//! | [`EventsPublished`] | `tollgate_events_published_total{topic}` + latency histogram | — |
//! | overflow (`wire::Handoff::report`) | `tollgate_events_overflowed_total`, `tollgate_events_overflow_events` | — |
//! | lost completions | `tollgate_events_lost_tokens_total` (with `EventsDropped`) | error |
//! | durability barrier (`durable.rs`) | `tollgate_completion_durable_wait_seconds`, `tollgate_completions_not_durable_total{reason}` | error |

use std::time::{Duration, Instant};

use prometheus::core::Collector;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
};

use super::durable::DurabilityMetrics;
use super::wire::Topic;

/// Buckets for produce latency, 100 µs to 2 minutes (an outage shows as the top buckets).
const PRODUCE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The event sink's metrics (labels bounded: topic, reason, error kind).
#[derive(Clone)]
pub struct EventMetrics {
    /// Records waiting in the hand-off channel.
    pub handoff_queue: IntGauge,
    /// Messages held by the Kafka producer (queued or awaiting acknowledgement).
    pub producer_queue: IntGauge,
    /// Bytes in the spool's segment files.
    pub spool_bytes: IntGauge,
    /// Records in the spool not yet acknowledged by Kafka.
    pub spool_events: IntGauge,
    /// 1 while new events go to the spool instead of straight to Kafka.
    pub spool_active: IntGauge,
    pub published: IntCounterVec,
    pub spooled: IntCounterVec,
    pub replayed: IntCounter,
    pub dropped: IntCounterVec,
    pub dead_lettered: IntCounter,
    pub delivery_errors: IntCounterVec,
    pub produce_latency: HistogramVec,
    /// Records the request path wrote to the overflow spool (hand-off channel full).
    pub overflowed: IntCounter,
    /// Records waiting in the overflow spool.
    pub overflow_events: IntGauge,
    /// Tokens of completion records that were lost (the usage that will not be billed).
    pub lost_tokens: IntCounter,
    /// The durability barrier's wait and misses.
    pub durability: DurabilityMetrics,
    published_by_topic: [IntCounter; 4],
    latency_by_topic: [Histogram; 4],
}

impl EventMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| IntGauge::new(name, help);
        let published = IntCounterVec::new(
            Opts::new(
                "tollgate_events_published_total",
                "Events acknowledged by Kafka or committed to the local event log, by topic",
            ),
            &["topic"],
        )?;
        let produce_latency = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_events_produce_latency_seconds",
                "From the relay handing an event over to its acknowledgement (events sent straight, not replayed)",
            )
            .buckets(PRODUCE_BUCKETS.to_vec()),
            &["topic"],
        )?;
        let by_topic_counter = |t: Topic| published.with_label_values(&[t.label()]);
        let by_topic_hist = |t: Topic| produce_latency.with_label_values(&[t.label()]);
        let metrics = EventMetrics {
            handoff_queue: gauge(
                "tollgate_events_handoff_queue_events",
                "Events handed over by the relay, waiting for the sink's writer thread",
            )?,
            producer_queue: gauge(
                "tollgate_events_producer_queue_events",
                "Messages held by the Kafka producer: queued or awaiting acknowledgement",
            )?,
            spool_bytes: gauge(
                "tollgate_events_spool_bytes",
                "Bytes of spooled events on disk",
            )?,
            spool_events: gauge(
                "tollgate_events_spool_events",
                "Spooled events not yet acknowledged by Kafka",
            )?,
            spool_active: gauge(
                "tollgate_events_spool_active",
                "1 while new events go to the disk spool rather than straight to Kafka",
            )?,
            published_by_topic: Topic::ALL.map(by_topic_counter),
            latency_by_topic: Topic::ALL.map(by_topic_hist),
            published,
            spooled: IntCounterVec::new(
                Opts::new(
                    "tollgate_events_spooled_total",
                    "Events written to the disk spool, by reason",
                ),
                &["reason"],
            )?,
            replayed: IntCounter::new(
                "tollgate_events_replayed_total",
                "Spooled events acknowledged by Kafka after replay",
            )?,
            dropped: IntCounterVec::new(
                Opts::new(
                    "tollgate_events_dropped_total",
                    "Events lost, by reason (each one is also logged)",
                ),
                &["reason"],
            )?,
            dead_lettered: IntCounter::new(
                "tollgate_events_dead_lettered_total",
                "Events Kafka refused permanently, kept in the spool's dead-letter file",
            )?,
            delivery_errors: IntCounterVec::new(
                Opts::new(
                    "tollgate_events_delivery_errors_total",
                    "Kafka delivery failures, by error kind",
                ),
                &["kind"],
            )?,
            produce_latency,
            overflowed: IntCounter::new(
                "tollgate_events_overflowed_total",
                "Events written to the overflow spool because the hand-off channel was full",
            )?,
            overflow_events: gauge(
                "tollgate_events_overflow_events",
                "Events waiting in the overflow spool",
            )?,
            lost_tokens: IntCounter::new(
                "tollgate_events_lost_tokens_total",
                "Tokens (input + output) of completion events that were lost: usage that will not be billed",
            )?,
            durability: DurabilityMetrics::new()?,
        };
        // Every drop reason exported from the start (at 0), so that `increase()` and alerts
        // see the first drop.
        for reason in DropReason::ALL {
            metrics.dropped.with_label_values(&[reason.label()]);
        }
        Ok(metrics)
    }

    /// The sink's state from its gauges (see [`super::SinkState`]); `spool_max_bytes` is the
    /// disk spool's bound (0: the sink has none). Nearly full (99 %) already counts as not
    /// durable: the next records may not fit.
    pub fn state(&self, spool_max_bytes: u64) -> super::SinkState {
        let spool_bytes = u64::try_from(self.spool_bytes.get()).unwrap_or(0);
        if spool_max_bytes > 0 && spool_bytes >= spool_max_bytes / 100 * 99 {
            super::SinkState::NotDurable
        } else if self.spool_active.get() > 0 {
            super::SinkState::Spooling
        } else if self.overflow_events.get() > 0 {
            super::SinkState::Overflowing
        } else {
            super::SinkState::Ok
        }
    }

    /// Every collector, for the gateway's registry.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        let mine: Vec<Box<dyn Collector>> = vec![
            Box::new(self.handoff_queue.clone()),
            Box::new(self.producer_queue.clone()),
            Box::new(self.spool_bytes.clone()),
            Box::new(self.spool_events.clone()),
            Box::new(self.spool_active.clone()),
            Box::new(self.published.clone()),
            Box::new(self.spooled.clone()),
            Box::new(self.replayed.clone()),
            Box::new(self.dropped.clone()),
            Box::new(self.dead_lettered.clone()),
            Box::new(self.delivery_errors.clone()),
            Box::new(self.produce_latency.clone()),
            Box::new(self.overflowed.clone()),
            Box::new(self.overflow_events.clone()),
            Box::new(self.lost_tokens.clone()),
        ];
        mine.into_iter()
            .chain(self.durability.collectors())
            .collect()
    }
}

/// Limits how often one kind of log line is written; counts what it held back.
#[derive(Debug)]
pub struct LogLimiter {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter {
            every: Duration::from_secs(1),
            last: None,
            suppressed: 0,
        }
    }
}

impl LogLimiter {
    /// `Some(lines held back since the last one)` if a line may be written now.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Why events were lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The hand-off channel was full: the writer thread could not keep up.
    HandoffFull,
    /// The spool reached `spool_max_bytes`.
    SpoolFull,
    /// The spool could not be written (disk error).
    SpoolWrite,
    /// An event could not be serialized (a bug).
    Serialize,
    /// The sink had shut down.
    AfterShutdown,
}

impl DropReason {
    pub const COUNT: usize = 5;
    pub const ALL: [DropReason; DropReason::COUNT] = [
        DropReason::HandoffFull,
        DropReason::SpoolFull,
        DropReason::SpoolWrite,
        DropReason::Serialize,
        DropReason::AfterShutdown,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DropReason::HandoffFull => "handoff_full",
            DropReason::SpoolFull => "spool_full",
            DropReason::SpoolWrite => "spool_write",
            DropReason::Serialize => "serialize",
            DropReason::AfterShutdown => "after_shutdown",
        }
    }
}

/// Why events went to the spool rather than straight to Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolReason {
    /// The producer's in-memory queue was full (Kafka slow or unreachable).
    QueueFull,
    /// Kafka looked down (a broker connection lost or refused, or deliveries stalled).
    BrokersDown,
    /// The producer refused the message for another reason.
    ProduceError,
    /// A sent message failed or was taken back from the producer (purged), to be replayed.
    Undelivered,
    /// Earlier events are still in the spool: later ones queue behind them to keep order.
    BehindSpool,
    /// Left in the spool by a previous run.
    PreviousRun,
    /// The hand-off channel was full: the request path wrote to the overflow spool.
    Overflow,
}

impl SpoolReason {
    pub fn label(self) -> &'static str {
        match self {
            SpoolReason::QueueFull => "queue_full",
            SpoolReason::BrokersDown => "brokers_down",
            SpoolReason::ProduceError => "produce_error",
            SpoolReason::Undelivered => "undelivered",
            SpoolReason::BehindSpool => "behind_spool",
            SpoolReason::PreviousRun => "previous_run",
            SpoolReason::Overflow => "overflow",
        }
    }
}

/// Events were lost.
pub struct EventsDropped {
    pub count: u64,
    pub reason: DropReason,
}

impl EventsDropped {
    pub fn emit(self, m: &EventMetrics, limiter: &mut LogLimiter) {
        if self.count == 0 {
            return;
        }
        m.dropped
            .with_label_values(&[self.reason.label()])
            .inc_by(self.count);
        if let Some(held_back) = limiter.allow() {
            tracing::error!(
                target: "tollgate::events",
                count = self.count,
                reason = self.reason.label(),
                earlier_lines_held_back = held_back,
                "events dropped"
            );
        }
    }
}

/// New events now go to the spool.
pub struct SpoolingStarted {
    pub reason: SpoolReason,
    pub detail: String,
}

impl SpoolingStarted {
    pub fn emit(self, m: &EventMetrics) {
        m.spool_active.set(1);
        tracing::warn!(
            target: "tollgate::events",
            reason = self.reason.label(),
            detail = %self.detail,
            "Kafka not keeping up: spooling events to disk, will replay them in order"
        );
    }
}

/// Events were written to the spool.
pub struct EventsSpooled {
    pub count: u64,
    pub reason: SpoolReason,
}

impl EventsSpooled {
    pub fn emit(self, m: &EventMetrics) {
        if self.count == 0 {
            return;
        }
        m.spooled
            .with_label_values(&[self.reason.label()])
            .inc_by(self.count);
        tracing::debug!(target: "tollgate::events", count = self.count, reason = self.reason.label(), "events spooled");
    }
}

/// Spooled events were acknowledged by Kafka.
pub struct EventsReplayed {
    pub count: u64,
}

impl EventsReplayed {
    pub fn emit(self, m: &EventMetrics) {
        if self.count == 0 {
            return;
        }
        m.replayed.inc_by(self.count);
        tracing::debug!(target: "tollgate::events", count = self.count, "spooled events replayed");
    }
}

/// Everything spooled has been handed back to Kafka: new events go straight to it again.
pub struct SpoolDrained {
    pub replayed: u64,
    pub spooled_for: Duration,
}

impl SpoolDrained {
    pub fn emit(self, m: &EventMetrics) {
        m.spool_active.set(0);
        tracing::info!(
            target: "tollgate::events",
            replayed = self.replayed,
            spooled_for_s = self.spooled_for.as_secs_f64(),
            "spool replayed: events go straight to Kafka again"
        );
    }
}

/// Kafka reported a delivery failure.
pub struct DeliveryFailed<'a> {
    pub count: u64,
    pub kind: &'static str,
    pub error: &'a str,
}

impl DeliveryFailed<'_> {
    pub fn emit(self, m: &EventMetrics, limiter: &mut LogLimiter) {
        m.delivery_errors
            .with_label_values(&[self.kind])
            .inc_by(self.count);
        if let Some(held_back) = limiter.allow() {
            tracing::warn!(
                target: "tollgate::events",
                count = self.count,
                kind = self.kind,
                error = self.error,
                earlier_lines_held_back = held_back,
                "Kafka delivery failed"
            );
        }
    }
}

/// Kafka refused events permanently; they are kept in the dead-letter file.
pub struct EventsDeadLettered<'a> {
    pub count: u64,
    pub error: &'a str,
    pub file: &'a std::path::Path,
}

impl EventsDeadLettered<'_> {
    pub fn emit(self, m: &EventMetrics, limiter: &mut LogLimiter) {
        m.dead_lettered.inc_by(self.count);
        if let Some(held_back) = limiter.allow() {
            tracing::error!(
                target: "tollgate::events",
                count = self.count,
                error = self.error,
                file = %self.file.display(),
                earlier_lines_held_back = held_back,
                "events refused by Kafka, kept in the dead-letter file"
            );
        }
    }
}

/// A spool segment ended in a damaged record (a crash while writing it): the rest of the
/// segment is skipped.
pub struct SpoolCorrupted<'a> {
    pub segment: &'a std::path::Path,
    pub offset: u64,
    pub skipped_bytes: u64,
}

impl SpoolCorrupted<'_> {
    pub fn emit(self, m: &EventMetrics) {
        m.dropped
            .with_label_values(&["spool_corrupt"])
            .inc_by(u64::from(self.skipped_bytes > 0));
        tracing::warn!(
            target: "tollgate::events",
            segment = %self.segment.display(),
            offset = self.offset,
            skipped_bytes = self.skipped_bytes,
            "spool segment ends in a damaged record (crash while writing): skipped"
        );
    }
}

/// Events acknowledged by Kafka (or committed to the local log).
pub struct EventsPublished {
    pub topic: Topic,
    pub count: u64,
    /// From hand-over to acknowledgement, when known.
    pub latency: Option<Duration>,
}

impl EventsPublished {
    pub fn emit(self, m: &EventMetrics) {
        let i = self.topic as usize;
        m.published_by_topic[i].inc_by(self.count);
        if let Some(l) = self.latency {
            m.latency_by_topic[i].observe(l.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::events::SinkState;

    #[test]
    fn the_sink_state_follows_the_gauges_worst_first() {
        let m = EventMetrics::new().unwrap();
        assert_eq!(m.state(1000), SinkState::Ok);
        m.overflow_events.set(3);
        assert_eq!(m.state(1000), SinkState::Overflowing);
        m.spool_active.set(1);
        m.spool_bytes.set(500);
        assert_eq!(m.state(1000), SinkState::Spooling);
        m.spool_bytes.set(990);
        assert_eq!(m.state(1000), SinkState::NotDurable);
        // Without a spool bound (the local log), bytes never make it not durable.
        assert_eq!(m.state(0), SinkState::Spooling);
    }
}
