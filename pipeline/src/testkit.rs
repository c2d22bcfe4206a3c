//! Synthetic completion events for tests and benchmarks: deterministic, with known usage, so
//! that expected totals can be computed independently of the dataflow.

use std::time::{Duration, SystemTime};

use tollgate_schemas::events::{
    format_event_time, new_event_id, recovered_event_id, CompletionEvent, CompletionStatus,
    SCHEMA_VERSION,
};
use tollgate_schemas::{TokenUsage, UsageSource};

use crate::fact::SourceRecord;

/// A small deterministic generator (xorshift), so runs are reproducible without a crate.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// One synthetic completion.
#[derive(Debug, Clone)]
pub struct Synthetic {
    pub event_id: String,
    /// The gateway's form: `req_` and a UUID in 32 hex digits.
    pub request_id: String,
    pub tenant_id: String,
    pub model: String,
    pub event_ms: i64,
    pub usage: TokenUsage,
    pub status: CompletionStatus,
    pub ttft_ms: Option<u64>,
    /// A response cache hit: the original answer's usage and the fraction of its price billed
    /// (`usage` is then zero).
    pub cache: Option<(TokenUsage, String)>,
}

impl Synthetic {
    /// A random completion of one of `tenants` × `models` at `event_ms`.
    pub fn random(rng: &mut Rng, tenants: u64, models: u64, event_ms: i64) -> Synthetic {
        let input = 1 + rng.below(4000);
        let cached = rng.below(input / 2 + 1);
        let status = match rng.below(50) {
            0 => CompletionStatus::UpstreamError,
            1 => CompletionStatus::ClientDisconnected,
            _ => CompletionStatus::Completed,
        };
        let event_id = new_event_id();
        Synthetic {
            request_id: format!("req_{}", event_id.replace('-', "")),
            event_id,
            tenant_id: format!("ten_{}", rng.below(tenants)),
            model: format!("model-{}", rng.below(models)),
            event_ms,
            usage: TokenUsage {
                input_tokens: input,
                cached_input_tokens: cached,
                cache_write_input_tokens: 0,
                output_tokens: rng.below(1500),
                source: UsageSource::Provider,
            },
            status,
            ttft_ms: (status != CompletionStatus::UpstreamError).then(|| 20 + rng.below(3000)),
            cache: None,
        }
    }

    /// This completion answered from the response cache instead, billed at `fraction` of its
    /// price: its usage becomes the saved usage, and it processed nothing.
    pub fn cache_hit(self, fraction: &str) -> Synthetic {
        Synthetic {
            cache: Some((self.usage, fraction.to_string())),
            usage: TokenUsage {
                source: self.usage.source,
                ..TokenUsage::default()
            },
            status: CompletionStatus::Completed,
            ..self
        }
    }

    /// The completion the recovery scanner publishes for this one's request had its gateway
    /// died at `cut_ms` after relaying `output_tokens`: the prompt (as estimated), no cache.
    pub fn recovered(&self, output_tokens: u64, cut_ms: i64) -> Synthetic {
        Synthetic {
            event_id: recovered_event_id(&self.request_id),
            event_ms: cut_ms,
            usage: TokenUsage {
                input_tokens: self.usage.input_tokens,
                cached_input_tokens: 0,
                cache_write_input_tokens: 0,
                output_tokens,
                source: UsageSource::Recovered,
            },
            status: CompletionStatus::GatewayLost,
            ttft_ms: None,
            cache: None,
            ..self.clone()
        }
    }

    /// The event as the gateway publishes it.
    pub fn event(&self) -> CompletionEvent {
        let t = SystemTime::UNIX_EPOCH
            + Duration::from_millis(u64::try_from(self.event_ms).unwrap_or(0));
        CompletionEvent {
            schema_version: SCHEMA_VERSION,
            event_id: self.event_id.clone(),
            event_time: format_event_time(t),
            request_id: self.request_id.clone(),
            tenant_id: self.tenant_id.clone(),
            key_id: format!("key_{}", self.tenant_id),
            route: "chat".into(),
            requested_model: self.model.clone(),
            model_alias: self.model.clone(),
            deployment: "synthetic".into(),
            provider: "mock".into(),
            upstream_model: self.model.clone(),
            stream: true,
            status: self.status,
            finish_reason: Some("stop".into()),
            error: None,
            usage: self.usage,
            chunks: 10,
            ttft_ms: self.ttft_ms,
            latency_ms: self.ttft_ms.unwrap_or(0).saturating_add(100),
            gateway_overhead_us: 100,
            retries: 0,
            fallbacks: 0,
            cache_hit: self.cache.is_some(),
            cache_saved_usage: self.cache.as_ref().map(|(u, _)| *u),
            cache_price_fraction: self.cache.as_ref().map(|(_, f)| f.clone()),
            price_book_version: None,
            received_at: format_event_time(t),
        }
    }

    /// The JSON payload of the event.
    pub fn payload(&self) -> Vec<u8> {
        serde_json::to_vec(&self.event()).unwrap_or_default()
    }

    /// As a source record at `partition`/`offset`.
    pub fn record(&self, partition: u32, offset: i64) -> SourceRecord {
        SourceRecord {
            partition,
            offset,
            timestamp_ms: self.event_ms,
            payload: self.payload(),
            replay_only: false,
        }
    }
}
