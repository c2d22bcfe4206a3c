//! Prometheus metrics. Labels are bounded: route, model alias pattern, provider, status class
//! and error kind; never a request id, key or free-form client string. The one tenant label,
//! on `tollgate_cost_total`, is capped ([`CostMeter`]).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use parking_lot::Mutex;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;

use crate::limits::PriceBook;
use crate::relay::CompletionRecord;

/// Buckets for latencies from 50 µs to 2 minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];

/// Least time between two warnings about rejected upstream usage reports.
pub const USAGE_REJECTED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

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
    usage_rejected: IntCounterVec,
    /// When a rejected usage report was last logged, and how many were not logged since.
    usage_rejected_log: Mutex<(Option<std::time::Instant>, u64)>,
    /// Set once the price book is known ([`Metrics::track_cost`]).
    cost: OnceLock<std::sync::Arc<CostMeter>>,
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
        let usage_rejected = IntCounterVec::new(
            Opts::new(
                "tollgate_upstream_usage_rejected_total",
                "Upstream usage reports not billed (over server.max_reported_tokens or not adding up); the gateway's own count was billed instead",
            ),
            &["provider", "reason"],
        )?;
        registry.register(Box::new(usage_rejected.clone()))?;
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
            usage_rejected,
            usage_rejected_log: Mutex::new((None, 0)),
            cost: OnceLock::new(),
        })
    }

    /// Starts counting `tollgate_cost_total` with `prices`, with at most `max_tenants` tenant
    /// labels (see [`CostMeter`]). Only the first call counts.
    pub fn track_cost(&self, prices: PriceBook, max_tenants: usize) -> Result<(), MetricsError> {
        if self.cost.get().is_some() {
            return Ok(());
        }
        let meter = std::sync::Arc::new(CostMeter::new(prices, max_tenants)?);
        self.register(vec![Box::new(CostCollector(meter.clone()))])?;
        let _ = self.cost.set(meter);
        Ok(())
    }

    /// Records a finished request.
    pub fn observe_completion(&self, r: &CompletionRecord) {
        if let Some(cost) = self.cost.get() {
            cost.observe(r);
        }
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

    /// An upstream usage report that is not billed (`reason`: a bounded label): counted, and
    /// logged at warn at most once per [`USAGE_REJECTED_LOG_EVERY`] with the number of
    /// others since (a misbehaving upstream must not flood the log).
    pub fn usage_rejected(&self, provider: &str, reason: &str, deployment: &str, request_id: &str) {
        self.usage_rejected
            .with_label_values(&[provider, reason])
            .inc();
        let now = std::time::Instant::now();
        let mut log = self.usage_rejected_log.lock();
        let due = log
            .0
            .is_none_or(|last| now.duration_since(last) >= USAGE_REJECTED_LOG_EVERY);
        if due {
            let others = std::mem::take(&mut log.1);
            log.0 = Some(now);
            drop(log);
            tracing::warn!(
                deployment,
                request_id,
                reason,
                others_since_last_warning = others,
                "upstream usage report rejected; billed by the gateway's own count"
            );
        } else {
            log.1 += 1;
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
        let pipeline = tollgate_pipeline::metrics::PipelineMetrics::new()?;
        self.register(vec![Box::new(up.clone()), Box::new(failures.clone())])?;
        self.register(pipeline.collectors())?;
        Ok(BillingMetrics {
            up,
            failures,
            pipeline,
        })
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
        let refused = IntCounterVec::new(
            Opts::new(
                "tollgate_server_connections_refused_total",
                "Client connections refused at accept because a cap was reached (reason: max_connections, max_connections_per_ip)",
            ),
            &["reason"],
        )?;
        let timed_out = IntCounterVec::new(
            Opts::new(
                "tollgate_server_connections_timed_out_total",
                "Client connections closed for lack of progress (reason: first_byte, first_request, header_read, idle)",
            ),
            &["reason"],
        )?;
        let accept_errors = IntCounter::new(
            "tollgate_server_accept_errors_total",
            "Failed accept calls (out of file descriptors and the like); each is followed by a short pause",
        )?;
        self.register(vec![
            Box::new(connections.clone()),
            Box::new(accepted.clone()),
            Box::new(busy_poll.clone()),
            Box::new(refused.clone()),
            Box::new(timed_out.clone()),
            Box::new(accept_errors.clone()),
        ])?;
        Ok(ServerMetrics {
            connections,
            accepted,
            busy_poll,
            refused,
            timed_out,
            accept_errors,
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

/// The tenant label of tenants past the cap.
pub const OTHER_TENANTS: &str = "other";

/// `tollgate_cost_total{tenant, model, currency}`: what completed requests cost at the price
/// book in force (the pipeline's rule, so it tracks the ledger; the ledger is the authority).
/// Totals are kept as exact decimals and converted to floats only when exported.
///
/// Cardinality: `model` is the alias pattern (from the config) and `currency` comes from the
/// price book; `tenant` is the tenant id for the first `max_tenants` tenants this process
/// sees, and `other` for every later one (a tenant never moves between series, so `rate()`
/// stays right). Unpriced completions cost nothing and are not counted here.
pub struct CostMeter {
    prices: PriceBook,
    max_tenants: usize,
    state: Mutex<CostState>,
    exported: prometheus::CounterVec,
}

#[derive(Default)]
struct CostState {
    /// Tenants with a label of their own.
    labelled: HashSet<String>,
    /// tenant label → model → currency → total.
    totals: HashMap<String, HashMap<String, HashMap<String, Decimal>>>,
}

impl CostMeter {
    fn new(prices: PriceBook, max_tenants: usize) -> Result<CostMeter, MetricsError> {
        Ok(CostMeter {
            prices,
            max_tenants,
            state: Mutex::new(CostState::default()),
            exported: prometheus::CounterVec::new(
                Opts::new(
                    "tollgate_cost_total",
                    "Cost of completed requests at the price book in force, by tenant (capped; the rest as `other`), model alias and currency",
                ),
                &["tenant", "model", "currency"],
            )?,
        })
    }

    fn observe(&self, r: &CompletionRecord) {
        let Some(price) = self.prices.lookup(&r.tenant_id, &r.upstream_model) else {
            return;
        };
        let Some(cost) = price.cost(&r.usage).filter(|c| !c.is_zero()) else {
            return;
        };
        let mut st = self.state.lock();
        let tenant = if st.labelled.contains(&r.tenant_id) {
            r.tenant_id.as_str()
        } else if st.labelled.len() < self.max_tenants {
            st.labelled.insert(r.tenant_id.clone());
            r.tenant_id.as_str()
        } else {
            OTHER_TENANTS
        };
        // Allocates only for a combination not seen before.
        let by_model = match st.totals.get_mut(tenant) {
            Some(m) => m,
            None => st.totals.entry(tenant.to_string()).or_default(),
        };
        let by_currency = match by_model.get_mut(r.model_label.as_str()) {
            Some(m) => m,
            None => by_model.entry(r.model_label.clone()).or_default(),
        };
        match by_currency.get_mut(price.currency.as_str()) {
            Some(total) => *total += cost,
            None => {
                by_currency.insert(price.currency.clone(), cost);
            }
        }
    }
}

/// Exports a [`CostMeter`]: the exact totals become floats here, at each scrape.
struct CostCollector(std::sync::Arc<CostMeter>);

impl prometheus::core::Collector for CostCollector {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.exported.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        // Under the lock, so that two concurrent scrapes never see a counter go down.
        let st = self.0.state.lock();
        for (tenant, by_model) in &st.totals {
            for (model, by_currency) in by_model {
                for (currency, total) in by_currency {
                    let c = self
                        .0
                        .exported
                        .with_label_values(&[tenant, model, currency]);
                    c.reset();
                    c.inc_by(total.to_f64().unwrap_or(f64::MAX));
                }
            }
        }
        self.0.exported.collect()
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
    /// `tollgate_server_connections_refused_total`, by cap.
    pub refused: IntCounterVec,
    /// `tollgate_server_connections_timed_out_total`, by reason.
    pub timed_out: IntCounterVec,
    /// `tollgate_server_accept_errors_total`.
    pub accept_errors: IntCounter,
}

/// The embedded billing pipeline's health (see [`crate::billing`]). Serving never waits on
/// the pipeline, so `/readyz` does not reflect it: these do.
#[derive(Clone)]
pub struct BillingMetrics {
    /// `tollgate_billing_pipeline_up`.
    pub up: IntGauge,
    /// `tollgate_billing_pipeline_failures_total`.
    pub failures: IntCounter,
    /// The pipeline's own metrics (`tollgate_pipeline_*`), as `tollgate-pipeline` exports them.
    pub pipeline: tollgate_pipeline::metrics::PipelineMetrics,
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
    /// Rounds of shared deployment accounting that failed (`routing/shared.rs`).
    pub shared_sync_failures: prometheus::IntCounter,
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
            shared_sync_failures: prometheus::IntCounter::new(
                "tollgate_routing_shared_sync_failures_total",
                "Rounds of deployment RPM/TPM accounting not shared through Redis (each instance \
                 then counts alone)",
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
            Box::new(self.shared_sync_failures.clone()),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tollgate_schemas::pricing::PriceRow;

    fn price(model: &str) -> PriceRow {
        PriceRow {
            model: model.to_string(),
            tenant_id: None,
            effective_from_ms: 0,
            input_per_mtok: Decimal::new(1, 1), // 0.1 per million
            cached_input_per_mtok: Decimal::ZERO,
            output_per_mtok: Decimal::new(3, 1), // 0.3 per million
            currency: "USD".into(),
        }
    }

    fn cost_lines(m: &Metrics) -> Vec<String> {
        m.render()
            .lines()
            .filter(|l| l.starts_with("tollgate_cost_total{"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn cost_is_exact_per_tenant_and_later_tenants_share_other() {
        let m = Metrics::new().unwrap();
        m.track_cost(PriceBook::from_rows(vec![price("normal")]), 2)
            .unwrap();
        // 9 input + 20 output tokens: 0.0000009 + 0.000006 = 0.0000069, many times over:
        // summed as decimals, so a million of them is exactly 6.9.
        let record = crate::events::wire::tests::completion("t1", "r");
        for _ in 0..1_000_000 {
            m.observe_completion(&record);
        }
        for tenant in ["t2", "t3", "t4", "t2"] {
            m.observe_completion(&crate::events::wire::tests::completion(tenant, "r"));
        }
        let mut unpriced = crate::events::wire::tests::completion("t5", "r");
        unpriced.upstream_model = "unpriced".into();
        m.observe_completion(&unpriced);
        let mut lines = cost_lines(&m);
        lines.sort();
        assert_eq!(
            lines,
            vec![
                "tollgate_cost_total{currency=\"USD\",model=\"oa/*\",tenant=\"other\"} 0.0000138",
                "tollgate_cost_total{currency=\"USD\",model=\"oa/*\",tenant=\"t1\"} 6.9",
                "tollgate_cost_total{currency=\"USD\",model=\"oa/*\",tenant=\"t2\"} 0.0000138",
            ]
        );
    }
}

/// The response cache's series (`crate::cache`).
#[derive(Clone)]
pub struct CacheMetrics {
    lookups: IntCounterVec,
    bypasses: IntCounterVec,
    stores: IntCounterVec,
    errors: IntCounterVec,
    lookup_seconds: prometheus::Histogram,
    bytes: IntGauge,
    evictions: IntGauge,
    saved_tokens: IntCounterVec,
}

impl Metrics {
    /// The cache's series, registered.
    pub fn cache(&self) -> Result<CacheMetrics, MetricsError> {
        let m = CacheMetrics {
            lookups: IntCounterVec::new(
                Opts::new("tollgate_cache_lookups_total", "Cache lookups, by result"),
                &["result"],
            )?,
            bypasses: IntCounterVec::new(
                Opts::new(
                    "tollgate_cache_bypasses_total",
                    "Requests the cache stayed out of, by reason",
                ),
                &["reason"],
            )?,
            stores: IntCounterVec::new(
                Opts::new(
                    "tollgate_cache_stores_total",
                    "Answers offered to the cache, by result (stored, too_large, tenant_budget)",
                ),
                &["result"],
            )?,
            errors: IntCounterVec::new(
                Opts::new(
                    "tollgate_cache_errors_total",
                    "Cache store failures (the request went on without the cache)",
                ),
                &["operation"],
            )?,
            lookup_seconds: prometheus::Histogram::with_opts(
                HistogramOpts::new("tollgate_cache_lookup_seconds", "Cache lookup latency")
                    .buckets(vec![
                        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05,
                    ]),
            )?,
            bytes: IntGauge::new(
                "tollgate_cache_bytes",
                "Bytes held by this gateway's memory cache",
            )?,
            evictions: IntGauge::new(
                "tollgate_cache_evictions",
                "Entries this gateway's memory cache evicted since start",
            )?,
            saved_tokens: IntCounterVec::new(
                Opts::new(
                    "tollgate_cache_saved_tokens_total",
                    "Tokens cache hits answered without a provider, by model and kind",
                ),
                &["model", "kind"],
            )?,
        };
        self.register(vec![
            Box::new(m.lookups.clone()),
            Box::new(m.bypasses.clone()),
            Box::new(m.stores.clone()),
            Box::new(m.errors.clone()),
            Box::new(m.lookup_seconds.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.evictions.clone()),
            Box::new(m.saved_tokens.clone()),
        ])?;
        Ok(m)
    }
}

impl CacheMetrics {
    pub fn hit(&self) {
        self.lookups.with_label_values(&["hit"]).inc();
    }
    pub fn miss(&self) {
        self.lookups.with_label_values(&["miss"]).inc();
    }
    pub fn bypass(&self, reason: &str) {
        self.bypasses.with_label_values(&[reason]).inc();
    }
    pub fn stored(&self) {
        self.stores.with_label_values(&["stored"]).inc();
    }
    pub fn not_stored(&self, reason: &str) {
        self.stores.with_label_values(&[reason]).inc();
    }
    pub fn error(&self, operation: &str) {
        self.errors.with_label_values(&[operation]).inc();
    }
    pub fn lookup(&self, took: std::time::Duration) {
        self.lookup_seconds.observe(took.as_secs_f64());
    }
    pub fn set_store(&self, bytes: u64, evictions: u64) {
        self.bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        self.evictions
            .set(i64::try_from(evictions).unwrap_or(i64::MAX));
    }
    pub fn saved(&self, model: &str, usage: &tollgate_schemas::TokenUsage) {
        let count = |kind: &str, n: u64| {
            if n > 0 {
                self.saved_tokens
                    .with_label_values(&[model, kind])
                    .inc_by(n);
            }
        };
        count("input", usage.input_tokens);
        count("output", usage.output_tokens);
    }
}
