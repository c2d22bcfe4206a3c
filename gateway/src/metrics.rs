//! Prometheus metrics. Labels are bounded: route, model alias pattern, provider, status class
//! and error kind; never a request id, key, tenant or free-form client string.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::relay::CompletionRecord;

/// Buckets for latencies from 50 µs to 2 minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// All gateway metrics, registered in one registry.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    errors: IntCounterVec,
    duration: HistogramVec,
    ttft: HistogramVec,
    overhead: HistogramVec,
    tokens: IntCounterVec,
    in_flight: IntGaugeVec,
}

/// Metric construction failures (only on duplicate registration, a programming error).
#[derive(Debug, thiserror::Error)]
#[error("metrics registration failed: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

impl Metrics {
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("tollgate_requests_total", "Requests finished, by outcome"),
            &["route", "model", "provider", "outcome"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new(
                "tollgate_errors_total",
                "Requests answered with an error, by kind and status class",
            ),
            &["route", "kind", "status_class"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_request_duration_seconds",
                "Request duration until the last byte",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "model", "provider"],
        )?;
        let ttft = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_time_to_first_token_seconds",
                "Time from request to the first relayed event",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "model", "provider"],
        )?;
        let overhead = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_gateway_overhead_seconds",
                "Latency the gateway itself adds: work before the upstream call plus turning the first upstream bytes into client bytes",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route", "model", "provider"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new("tollgate_tokens_total", "Tokens billed, by kind"),
            &["model", "provider", "kind"],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new("tollgate_in_flight_requests", "Requests being served"),
            &["route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(overhead.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            errors,
            duration,
            ttft,
            overhead,
            tokens,
            in_flight,
        })
    }

    /// Records a finished request.
    pub fn observe_completion(&self, r: &CompletionRecord) {
        let labels = [r.route, r.model_label.as_str(), r.provider];
        self.requests
            .with_label_values(&[
                r.route,
                r.model_label.as_str(),
                r.provider,
                r.outcome.label(),
            ])
            .inc();
        self.duration
            .with_label_values(&labels)
            .observe(r.duration.as_secs_f64());
        if let Some(t) = r.time_to_first_token {
            self.ttft
                .with_label_values(&labels)
                .observe(t.as_secs_f64());
        }
        self.overhead
            .with_label_values(&labels)
            .observe(r.gateway_overhead.as_secs_f64());
        let u = &r.usage;
        for (kind, n) in [
            ("input", u.input_tokens),
            ("cached_input", u.cached_input_tokens),
            ("output", u.output_tokens),
        ] {
            if n > 0 {
                self.tokens
                    .with_label_values(&[r.model_label.as_str(), r.provider, kind])
                    .inc_by(n);
            }
        }
    }

    /// Records a request answered with an error before any streaming began.
    pub fn observe_error(&self, route: &str, kind: &str, status: u16) {
        let class = match status {
            400..=499 => "4xx",
            500..=599 => "5xx",
            _ => "other",
        };
        self.errors.with_label_values(&[route, kind, class]).inc();
    }

    /// A guard counting a request as in flight until dropped.
    pub fn in_flight(&self, route: &str) -> InFlight {
        let gauge = self.in_flight.with_label_values(&[route]);
        gauge.inc();
        InFlight(gauge)
    }

    /// Registers more collectors (e.g. the event sink's); one already registered is skipped,
    /// so calling this twice with the same collectors is harmless.
    pub fn register(
        &self,
        collectors: Vec<Box<dyn prometheus::core::Collector>>,
    ) -> Result<(), MetricsError> {
        for c in collectors {
            match self.registry.register(c) {
                Ok(()) | Err(prometheus::Error::AlreadyReg) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Creates and registers the embedded billing pipeline's metrics (only a gateway that runs
    /// the pipeline has them).
    pub fn billing(&self) -> Result<BillingMetrics, MetricsError> {
        let up = IntGauge::new(
            "tollgate_billing_pipeline_up",
            "1 while the embedded billing pipeline runs; 0 after it failed, until it restarts",
        )?;
        let failures = IntCounter::new(
            "tollgate_billing_pipeline_failures_total",
            "Times the embedded billing pipeline stopped with an error (each is followed by a restart)",
        )?;
        self.register(vec![Box::new(up.clone()), Box::new(failures.clone())])?;
        Ok(BillingMetrics { up, failures })
    }

    /// Creates and registers the serving threads' metrics ([`crate::server`]).
    pub fn server(&self) -> Result<ServerMetrics, MetricsError> {
        let connections = IntGaugeVec::new(
            Opts::new(
                "tollgate_server_connections",
                "Open client connections per serving thread",
            ),
            &["thread"],
        )?;
        let accepted = IntCounterVec::new(
            Opts::new(
                "tollgate_server_connections_total",
                "Client connections handed to each serving thread",
            ),
            &["thread"],
        )?;
        let busy_poll = prometheus::CounterVec::new(
            Opts::new(
                "tollgate_server_busy_poll_seconds_total",
                "Time each serving thread spent in busy-poll windows, polling instead of sleeping (work done meanwhile included)",
            ),
            &["thread"],
        )?;
        self.register(vec![
            Box::new(connections.clone()),
            Box::new(accepted.clone()),
            Box::new(busy_poll.clone()),
        ])?;
        Ok(ServerMetrics {
            connections,
            accepted,
            busy_poll,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let encoder = TextEncoder::new();
        if encoder.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Decrements the in-flight gauge on drop.
pub struct InFlight(prometheus::IntGauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The serving threads' metrics, labelled by thread number (1, 2, ...: bounded by the core
/// count).
#[derive(Clone)]
pub struct ServerMetrics {
    /// `tollgate_server_connections`.
    pub connections: IntGaugeVec,
    /// `tollgate_server_connections_total`.
    pub accepted: IntCounterVec,
    /// `tollgate_server_busy_poll_seconds_total`.
    pub busy_poll: prometheus::CounterVec,
}

/// The embedded billing pipeline's health (see [`crate::billing`]). Serving never waits on
/// the pipeline, so `/readyz` does not reflect it: these do.
#[derive(Clone)]
pub struct BillingMetrics {
    /// `tollgate_billing_pipeline_up`.
    pub up: IntGauge,
    /// `tollgate_billing_pipeline_failures_total`.
    pub failures: IntCounter,
}

/// Routing metrics: per-deployment state (set before each scrape) and counters of retries,
/// fallbacks, hedges, attempts and breaker transitions. Labels are alias patterns, deployment
/// names (both from the config) and bounded outcome labels.
#[derive(Clone)]
pub struct RoutingMetrics {
    breaker_state: IntGaugeVec,
    deployment_in_flight: IntGaugeVec,
    ttft_estimate: prometheus::GaugeVec,
    retries: IntCounterVec,
    fallbacks: IntCounterVec,
    hedges: IntCounterVec,
    attempts: IntCounterVec,
    breaker_transitions: IntCounterVec,
}

impl RoutingMetrics {
    pub fn new() -> Result<Self, MetricsError> {
        Ok(RoutingMetrics {
            breaker_state: IntGaugeVec::new(
                Opts::new(
                    "tollgate_deployment_breaker_state",
                    "Circuit breaker of each deployment: 0 closed, 1 open, 2 half-open",
                ),
                &["deployment"],
            )?,
            deployment_in_flight: IntGaugeVec::new(
                Opts::new(
                    "tollgate_deployment_in_flight_requests",
                    "Requests this gateway has in flight to each deployment",
                ),
                &["deployment"],
            )?,
            ttft_estimate: prometheus::GaugeVec::new(
                Opts::new(
                    "tollgate_deployment_ttft_estimate_seconds",
                    "Moving estimate of each deployment's time to first byte (0 until measured)",
                ),
                &["deployment"],
            )?,
            retries: IntCounterVec::new(
                Opts::new(
                    "tollgate_routing_retries_total",
                    "Attempts repeated on the same deployment",
                ),
                &["model", "deployment"],
            )?,
            fallbacks: IntCounterVec::new(
                Opts::new(
                    "tollgate_routing_fallbacks_total",
                    "Moves to another deployment or alias, by the reason (the last error's kind)",
                ),
                &["model", "reason"],
            )?,
            hedges: IntCounterVec::new(
                Opts::new(
                    "tollgate_routing_hedges_total",
                    "Hedged requests, by how the race ended",
                ),
                &["model", "outcome"],
            )?,
            attempts: IntCounterVec::new(
                Opts::new(
                    "tollgate_routing_attempts_total",
                    "Upstream attempts, by deployment and outcome",
                ),
                &["deployment", "outcome"],
            )?,
            breaker_transitions: IntCounterVec::new(
                Opts::new(
                    "tollgate_breaker_transitions_total",
                    "Circuit breaker state changes, by the state entered",
                ),
                &["deployment", "state"],
            )?,
        })
    }

    /// The collectors, for [`Metrics::register`].
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.breaker_state.clone()),
            Box::new(self.deployment_in_flight.clone()),
            Box::new(self.ttft_estimate.clone()),
            Box::new(self.retries.clone()),
            Box::new(self.fallbacks.clone()),
            Box::new(self.hedges.clone()),
            Box::new(self.attempts.clone()),
            Box::new(self.breaker_transitions.clone()),
        ]
    }

    pub fn set_deployment(
        &self,
        deployment: &str,
        breaker: i64,
        in_flight: u64,
        ttft: Option<std::time::Duration>,
    ) {
        self.breaker_state
            .with_label_values(&[deployment])
            .set(breaker);
        self.deployment_in_flight
            .with_label_values(&[deployment])
            .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        self.ttft_estimate
            .with_label_values(&[deployment])
            .set(ttft.map_or(0.0, |t| t.as_secs_f64()));
    }

    pub fn retry(&self, model: &str, deployment: &str) {
        self.retries.with_label_values(&[model, deployment]).inc();
    }

    pub fn fallback(&self, model: &str, reason: &str) {
        self.fallbacks.with_label_values(&[model, reason]).inc();
    }

    pub fn hedge(&self, model: &str, outcome: &str) {
        self.hedges.with_label_values(&[model, outcome]).inc();
    }

    pub fn attempt(&self, deployment: &str, outcome: &str) {
        self.attempts
            .with_label_values(&[deployment, outcome])
            .inc();
    }

    pub fn breaker_transition(&self, deployment: &str, state: &str) {
        self.breaker_transitions
            .with_label_values(&[deployment, state])
            .inc();
    }
}
