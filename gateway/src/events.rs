//! The event-sink seam: where each request's completion record goes.
//!
//! | implementation | use |
//! |---|---|
//! | [`LogSink`] | default: one structured log line per completion |
//! | [`MemorySink`] | tests: keeps records for assertions |
//!
//! Kafka and the durable local event log arrive with the issue "Every request, chunk and
//! completion to Kafka"; they implement this same trait.

use parking_lot::Mutex;
use serde::Deserialize;

use crate::relay::CompletionRecord;

/// Which event sink the gateway uses (`[events]` in the config).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum EventsConfig {
    /// Log each completion (the default until the Kafka and local-log sinks exist).
    #[default]
    Log,
}

/// Builds the configured sink. `data_dir` holds any local state (spool, embedded log).
pub async fn from_config(
    config: &EventsConfig,
    _data_dir: &std::path::Path,
) -> Result<std::sync::Arc<dyn EventSink>, EventsError> {
    match config {
        EventsConfig::Log => Ok(std::sync::Arc::new(LogSink)),
    }
}

/// Failures setting up an event sink.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("event sink setup failed: {0}")]
    Setup(String),
}

/// Receives every completion record. Must not block: it is called on the request path.
pub trait EventSink: Send + Sync {
    fn record_completion(&self, record: &CompletionRecord);
}

/// Logs each completion at info level (target `tollgate::completion`).
pub struct LogSink;

impl EventSink for LogSink {
    fn record_completion(&self, r: &CompletionRecord) {
        tracing::info!(
            target: "tollgate::completion",
            request_id = %r.request_id,
            tenant_id = %r.tenant_id,
            route = r.route,
            model = %r.requested_model,
            deployment = %r.deployment,
            provider = r.provider,
            outcome = r.outcome.label(),
            input_tokens = r.usage.input_tokens,
            cached_input_tokens = r.usage.cached_input_tokens,
            output_tokens = r.usage.output_tokens,
            usage_source = ?r.usage.source,
            chunks = r.chunks,
            duration_ms = r.duration.as_secs_f64() * 1e3,
            "completion"
        );
    }
}

/// Keeps completions in memory (tests).
#[derive(Default)]
pub struct MemorySink {
    records: Mutex<Vec<CompletionRecord>>,
}

impl MemorySink {
    pub fn records(&self) -> Vec<CompletionRecord> {
        self.records.lock().clone()
    }
}

impl EventSink for MemorySink {
    fn record_completion(&self, record: &CompletionRecord) {
        self.records.lock().push(record.clone());
    }
}
