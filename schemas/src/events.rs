//! The events the gateway publishes, one versioned type per topic.
//!
//! | type | topic (default name) | one per |
//! |---|---|---|
//! | [`RequestEvent`] | `llm.requests` | request accepted and routed to a deployment |
//! | [`ChunkEvent`] | `llm.chunks` | SSE data event relayed to the client |
//! | [`CompletionEvent`] | `llm.completions` | request, however it ended |
//! | [`AuditEvent`] | `llm.audit` | request of an audited tenant (`[audit]`), with its bodies |
//!
//! Wire rules shared by all three:
//! - JSON, one event per message; the message key is the tenant id, so one tenant's events
//!   stay in one partition and in order.
//! - `schema_version` is [`SCHEMA_VERSION`]. Fields are only ever added within a version, so
//!   readers must ignore fields they do not know; a removal or a change of meaning bumps it.
//! - `event_id` is a UUIDv7 string, unique per event and fixed when the event is first
//!   serialized: a retry or a replay from the gateway's spool re-sends the same id, so readers
//!   drop duplicates by it. Within one gateway process ids increase in publish order.
//! - `event_time` is RFC 3339 in UTC with millisecond precision (`2025-01-31T12:00:00.123Z`):
//!   readable in a console consumer, parsed by ClickHouse's `parseDateTime64BestEffort` and by
//!   Flink's JSON format with `json.timestamp-format.standard = 'ISO-8601'`.
//! - Durations carry their unit in the name (`_ms`, `_us`).
//!
//! The JSON Schema of each topic is in `schemas/json/<topic>.schema.json`; a test regenerates
//! them from these types and fails if a file differs (`TOLLGATE_BLESS_SCHEMAS=1` rewrites them).

use std::time::SystemTime;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use time::format_description::FormatItem;
use time::macros::format_description;
use time::OffsetDateTime;

use crate::usage::TokenUsage;

/// The version every event of this crate carries in `schema_version`.
pub const SCHEMA_VERSION: u32 = 1;

/// Default topic names (configurable in the gateway's `[events]` section).
pub mod topics {
    /// [`super::RequestEvent`]s.
    pub const REQUESTS: &str = "llm.requests";
    /// [`super::ChunkEvent`]s.
    pub const CHUNKS: &str = "llm.chunks";
    /// [`super::CompletionEvent`]s.
    pub const COMPLETIONS: &str = "llm.completions";
    /// [`super::AuditEvent`]s (only for tenants under `[audit]`).
    pub const AUDIT: &str = "llm.audit";
}

const EVENT_TIME_FORMAT: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");

/// Formats a wall-clock time as an `event_time` (RFC 3339, UTC, milliseconds).
pub fn format_event_time(t: SystemTime) -> String {
    let dt = OffsetDateTime::from(t);
    if !(0..=9999).contains(&dt.year()) {
        return dt
            .format(EVENT_TIME_FORMAT)
            .unwrap_or_else(|_| "1970-01-01T00:00:00.000Z".to_string());
    }
    // Written by hand: once per event on the sink's thread, and `time`'s general formatter
    // costs several times more.
    let mut out = String::with_capacity(24);
    let mut push = |v: u32, width: u32, sep: Option<char>| {
        for p in (0..width).rev() {
            let digit = (v / 10u32.pow(p)) % 10;
            out.push(char::from(b'0' + digit as u8));
        }
        if let Some(c) = sep {
            out.push(c);
        }
    };
    push(dt.year() as u32, 4, Some('-'));
    push(u32::from(u8::from(dt.month())), 2, Some('-'));
    push(u32::from(dt.day()), 2, Some('T'));
    push(u32::from(dt.hour()), 2, Some(':'));
    push(u32::from(dt.minute()), 2, Some(':'));
    push(u32::from(dt.second()), 2, Some('.'));
    push(u32::from(dt.millisecond()), 3, Some('Z'));
    out
}

/// Parses an `event_time` (any RFC 3339 time) into a wall-clock time.
pub fn parse_event_time(s: &str) -> Option<SystemTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(SystemTime::from)
}

/// Milliseconds since the Unix epoch (the Kafka message timestamp of an event).
pub fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The embedded default's durable event log (`<data dir>/events.sqlite`): written by the
/// gateway's local event sink, read by the embedded billing pipeline. Statements to create
/// it, idempotent; whichever process opens the file first runs them.
pub const LOCAL_EVENT_LOG_DDL: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS event_log (
        log_offset INTEGER PRIMARY KEY AUTOINCREMENT,
        topic TEXT NOT NULL,
        event_key TEXT NOT NULL,
        event_id TEXT NOT NULL,
        timestamp_ms INTEGER NOT NULL,
        payload TEXT NOT NULL
    )",
    "CREATE INDEX IF NOT EXISTS event_log_by_topic ON event_log (topic, log_offset)",
];

/// Milliseconds since the Unix epoch of a calendar time (saturating).
pub fn offset_unix_ms(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// The calendar time (UTC) of milliseconds since the Unix epoch; the epoch itself when out
/// of range.
pub fn from_unix_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

/// Milliseconds since the Unix epoch as RFC 3339 (UTC), the text form SQLite columns hold.
pub fn rfc3339_from_unix_ms(ms: i64) -> String {
    from_unix_ms(ms)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// A new event id: a UUIDv7 string (time-ordered, monotonic within a process).
pub fn new_event_id() -> String {
    uuid::Uuid::now_v7().hyphenated().to_string()
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CompletionStatus {
    /// The upstream finished and the client received everything.
    Completed,
    /// The client went away first; the upstream call was cancelled. Billed for what was
    /// generated until then.
    ClientDisconnected,
    /// The upstream failed, before or during the response.
    UpstreamError,
    /// A hard quota or rate limit of the caller refused more tokens and the gateway cut the
    /// stream off (with an error event). Billed for what was generated until then.
    LimitExceeded,
    /// The gateway died before it could record how the request ended: a completion recovered
    /// by the billing pipeline from the request's request and chunk events after the orphan
    /// timeout (`usage.source = recovered`, event id from [`recovered_event_id`]).
    GatewayLost,
}

/// The event id of the recovered completion of `request_id`: a UUIDv8 made of the first 16
/// bytes of SHA-256 over a fixed prefix and the request id. Every scanner that recovers the
/// same request publishes the same id, so a second publish is dropped as a duplicate.
pub fn recovered_event_id(request_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"tollgate recovered completion\0");
    h.update(request_id.as_bytes());
    let digest = h.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// `llm.requests`: a request the gateway accepted (authenticated, valid) and routed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "llm.requests event")]
pub struct RequestEvent {
    /// Version of this event's schema: 1.
    #[schemars(extend("const" = 1))]
    pub schema_version: u32,
    /// Unique id of this event (UUIDv7); duplicates carry the same id.
    pub event_id: String,
    /// When the request was routed (RFC 3339, UTC, milliseconds).
    #[schemars(extend("format" = "date-time"))]
    pub event_time: String,
    /// The gateway's request id (also the `x-request-id` response header).
    pub request_id: String,
    /// The tenant that owns the key (also the message key).
    pub tenant_id: String,
    /// The API key used (its id, never the secret).
    pub key_id: String,
    /// The API surface: `chat` (OpenAI), `messages` (Anthropic) or `embeddings`.
    pub route: String,
    /// The model name the client sent.
    pub requested_model: String,
    /// The alias pattern that matched it (e.g. `openai/*`).
    pub model_alias: String,
    /// The deployment chosen.
    pub deployment: String,
    /// The provider kind of that deployment (`openai`, `anthropic`, `openai_compatible`, `mock`...).
    pub provider: String,
    /// The model name sent upstream.
    pub upstream_model: String,
    /// Whether the client asked for a streamed response.
    pub stream: bool,
    /// Pre-flight estimate of the prompt's tokens (tiktoken); 0 where none is made.
    pub prompt_tokens_estimate: u64,
    /// When the gateway received the request (RFC 3339, UTC, milliseconds).
    #[schemars(extend("format" = "date-time"))]
    pub received_at: String,
}

/// `llm.chunks`: one SSE data event relayed to the client (terminators such as `[DONE]`
/// included; comments and keep-alives not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "llm.chunks event")]
pub struct ChunkEvent {
    /// Version of this event's schema: 1.
    #[schemars(extend("const" = 1))]
    pub schema_version: u32,
    /// Unique id of this event (UUIDv7); duplicates carry the same id.
    pub event_id: String,
    /// When the chunk was handed to the client (RFC 3339, UTC, milliseconds).
    #[schemars(extend("format" = "date-time"))]
    pub event_time: String,
    /// The request this chunk belongs to.
    pub request_id: String,
    /// The tenant that owns the key (also the message key).
    pub tenant_id: String,
    /// Position of this chunk in the client's stream, from 0.
    pub sequence: u64,
    /// Time from the gateway receiving the request to this chunk leaving it, in microseconds.
    pub offset_us: u64,
    /// Bytes of the SSE event as the client received it.
    pub bytes: u64,
    /// Output tokens relayed to the client so far, this chunk included, counted like the
    /// completion's fallback (the upstream model's tokenizer over the text relayed). A
    /// stream cut by a gateway crash is billed from its last chunk. `null` where the count is
    /// moot or unknown: the local log leaves it out when the request's completion is
    /// committed in the same transaction, and records that went through the overflow spool
    /// carry none.
    pub tokens: Option<u64>,
}

/// `llm.completions`: the outcome of one request, and what is billed for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "llm.completions event")]
pub struct CompletionEvent {
    /// Version of this event's schema: 1.
    #[schemars(extend("const" = 1))]
    pub schema_version: u32,
    /// Unique id of this event (UUIDv7); duplicates carry the same id.
    pub event_id: String,
    /// When the request ended (RFC 3339, UTC, milliseconds).
    #[schemars(extend("format" = "date-time"))]
    pub event_time: String,
    /// The gateway's request id.
    pub request_id: String,
    /// The tenant that owns the key (also the message key).
    pub tenant_id: String,
    /// The API key used (its id, never the secret).
    pub key_id: String,
    /// The API surface: `chat`, `messages` or `embeddings`.
    pub route: String,
    /// The model name the client sent.
    pub requested_model: String,
    /// The alias pattern that matched it.
    pub model_alias: String,
    /// The deployment that served the request.
    pub deployment: String,
    /// The provider kind of that deployment.
    pub provider: String,
    /// The model name sent upstream.
    pub upstream_model: String,
    /// Whether the response was streamed.
    pub stream: bool,
    /// How the request ended.
    pub status: CompletionStatus,
    /// The finish/stop reason in the client's dialect (`stop`, `end_turn`, `tool_calls`...).
    pub finish_reason: Option<String>,
    /// The error message when `status` is `upstream_error` or `limit_exceeded`.
    pub error: Option<String>,
    /// Tokens billed: the provider's figures when it reported them (`usage.source =
    /// provider`), otherwise counted by the gateway (`counted`: prompt estimate plus tokens of
    /// the output relayed so far).
    pub usage: TokenUsage,
    /// SSE data events relayed to the client (0 for a non-streamed response).
    pub chunks: u64,
    /// Time from the request to the first byte of output relayed, in milliseconds; `null` when
    /// nothing was relayed.
    pub ttft_ms: Option<u64>,
    /// Time from the request to its end, in milliseconds.
    pub latency_ms: u64,
    /// Time the gateway itself spent (before the upstream call, and turning the first upstream
    /// bytes into client bytes), in microseconds.
    pub gateway_overhead_us: u64,
    /// Upstream attempts retried on the same deployment.
    pub retries: u32,
    /// Fallbacks to another deployment.
    pub fallbacks: u32,
    /// Whether the answer came from a response cache.
    pub cache_hit: bool,
    /// A cache hit: the usage of the original answer, what the hit would have cost at the
    /// list price; `usage` is then zero (no provider processed anything). Absent otherwise.
    /// (Written before `cache_price_fraction` existed, by hits billed in full, `usage` held
    /// the original answer's usage and this was absent.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_saved_usage: Option<TokenUsage>,
    /// A cache hit: the fraction of the price of `cache_saved_usage` the tenant is billed, a
    /// decimal between `"0"` (free) and `"1"` (the full price), from `[cache] bill_hits`.
    /// Absent means `"0"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_price_fraction: Option<String>,
    /// Version of the price book used for the pre-flight cost estimate; `null` when none was.
    pub price_book_version: Option<String>,
    /// When the gateway received the request (RFC 3339, UTC, milliseconds).
    #[schemars(extend("format" = "date-time"))]
    pub received_at: String,
}

/// Optional routing details of a completion, published beside the [`CompletionEvent`] fields
/// in the same JSON object (added within version 1: readers that do not know them, such as
/// the billing pipeline, ignore them). Present when routing did more than send the request
/// once to the strategy's first pick: a retry, a fallback, a pin or a hedge.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
pub struct CompletionRouting {
    /// The alias's routing strategy (`weighted_random`, `least_in_flight`...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_strategy: Option<String>,
    /// Why the route left the normal path: `pinned`, `context_window_fallback`,
    /// `content_policy_fallback`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_reason: Option<String>,
    /// Every attempt, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<RouteAttempt>>,
    /// The hedged request that lost the race and was cancelled. Not billed (the pipeline
    /// bills the completion's own `usage` only); recorded so that its cost is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hedge_cancelled: Option<HedgeCancelled>,
}

/// One upstream attempt of a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RouteAttempt {
    pub deployment: String,
    pub provider: String,
    /// `ok`, an HTTP status (`503`), `timeout`, `unreachable`, `protocol`, `breaker_open`
    /// (skipped), `hedge_cancelled` or `error`.
    pub outcome: String,
    /// From sending to the first byte or the error, in milliseconds.
    pub latency_ms: u64,
}

/// The cancelled side of a hedged request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HedgeCancelled {
    pub deployment: String,
    pub provider: String,
    pub upstream_model: String,
    /// Estimated (`source: counted`): the prompt the upstream received, no output.
    pub usage: TokenUsage,
    /// `usage` at the deployment's configured price (a decimal string); `null` when the
    /// deployment has no price.
    pub estimated_cost: Option<String>,
}

/// A `llm.completions` event as published: the [`CompletionEvent`] fields and, flattened into
/// the same object, the optional [`CompletionRouting`] fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "llm.completions event")]
pub struct PublishedCompletion {
    #[serde(flatten)]
    pub event: CompletionEvent,
    #[serde(flatten)]
    pub routing: CompletionRouting,
}

/// What [`AuditEvent::response_body`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditResponseKind {
    /// The JSON body the client received (a non-streamed response, or a cached one).
    Body,
    /// A stream's output text as relayed to the client (content, tool names and arguments),
    /// assembled from its SSE events.
    Text,
    /// No response reached the client (an error before any output, a client gone).
    None,
}

/// `llm.audit`: one request of an audited tenant, with what the client sent and what it
/// received, redacted (credentials and API-key-shaped secrets replaced by `[REDACTED]`) and
/// each body capped at `[audit] max_body_bytes` (on a UTF-8 boundary; `*_truncated` says so).
/// Published after the request ended, never on its critical path; written to ClickHouse's
/// `audit_log` by the pipeline. Headers are never recorded (the tenant's API key is not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "llm.audit event")]
pub struct AuditEvent {
    /// Version of this event's schema: 1.
    #[schemars(extend("const" = 1))]
    pub schema_version: u32,
    /// Unique id of this event (UUIDv7); duplicates carry the same id.
    pub event_id: String,
    /// When the request ended (RFC 3339, UTC, milliseconds).
    #[schemars(extend("format" = "date-time"))]
    pub event_time: String,
    /// The gateway's request id (the `x-request-id` of the response).
    pub request_id: String,
    /// The tenant that owns the key (also the message key).
    pub tenant_id: String,
    /// The API key used (its id, never the secret).
    pub key_id: String,
    /// The API surface: `chat` or `messages`.
    pub route: String,
    /// The model name the client sent.
    pub requested_model: String,
    /// The alias pattern that matched it.
    pub model_alias: String,
    /// The deployment that served the request.
    pub deployment: String,
    /// The provider kind of that deployment.
    pub provider: String,
    /// The model name sent upstream.
    pub upstream_model: String,
    /// Whether the response was streamed.
    pub stream: bool,
    /// How the request ended.
    pub status: CompletionStatus,
    /// The error message when `status` is `upstream_error` or `limit_exceeded` (redacted).
    pub error: Option<String>,
    /// Tokens billed for the request (as in its completion event).
    pub usage: TokenUsage,
    /// When the gateway received the request (RFC 3339, UTC, milliseconds).
    #[schemars(extend("format" = "date-time"))]
    pub received_at: String,
    /// The client's request body, redacted and capped (invalid UTF-8 replaced).
    pub request_body: String,
    /// Size of the client's request body before redaction and capping, in bytes.
    pub request_bytes: u64,
    /// Whether `request_body` was cut at the cap.
    pub request_truncated: bool,
    /// What `response_body` holds.
    pub response_kind: AuditResponseKind,
    /// The response as the client received it, redacted and capped.
    pub response_body: String,
    /// Size of that response before redaction and capping, in bytes.
    pub response_bytes: u64,
    /// Whether `response_body` was cut at the cap.
    pub response_truncated: bool,
}

/// The JSON Schema (draft 2020-12) of each topic's events: `(default topic name, schema)`.
pub fn json_schemas() -> [(&'static str, serde_json::Value); 4] {
    [
        (
            topics::AUDIT,
            header_first(schemars::schema_for!(AuditEvent)),
        ),
        (
            topics::REQUESTS,
            header_first(schemars::schema_for!(RequestEvent)),
        ),
        (
            topics::CHUNKS,
            header_first(schemars::schema_for!(ChunkEvent)),
        ),
        (
            topics::COMPLETIONS,
            header_first(schemars::schema_for!(PublishedCompletion)),
        ),
    ]
}

/// The schema with `$schema` and `title` first, for readers of the files.
fn header_first(schema: schemars::Schema) -> serde_json::Value {
    let mut rest = match schema.to_value() {
        serde_json::Value::Object(m) => m,
        other => return other,
    };
    let mut out = serde_json::Map::new();
    for key in ["$schema", "title"] {
        if let Some(v) = rest.remove(key) {
            out.insert(key.to_string(), v);
        }
    }
    out.extend(rest);
    serde_json::Value::Object(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::usage::UsageSource;

    fn json_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json")
    }

    fn file_text(schema: &serde_json::Value) -> String {
        let mut s = serde_json::to_string_pretty(schema).unwrap();
        s.push('\n');
        s
    }

    /// The committed schema files are exactly what the Rust types generate.
    #[test]
    fn committed_json_schemas_match_the_rust_types() {
        let bless = std::env::var_os("TOLLGATE_BLESS_SCHEMAS").is_some();
        for (topic, schema) in json_schemas() {
            let path = json_dir().join(format!("{topic}.schema.json"));
            let want = file_text(&schema);
            if bless {
                std::fs::create_dir_all(json_dir()).unwrap();
                std::fs::write(&path, &want).unwrap();
                continue;
            }
            let have = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(
                have,
                want,
                "{} differs from the Rust type; rerun with TOLLGATE_BLESS_SCHEMAS=1 and commit",
                path.display()
            );
            assert_eq!(
                schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
                "{topic}"
            );
        }
    }

    fn samples() -> Vec<(&'static str, serde_json::Value)> {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_760_000_000_123);
        let request = RequestEvent {
            schema_version: SCHEMA_VERSION,
            event_id: new_event_id(),
            event_time: format_event_time(t),
            request_id: "req_1".into(),
            tenant_id: "ten_1".into(),
            key_id: "key_1".into(),
            route: "chat".into(),
            requested_model: "oa/normal".into(),
            model_alias: "oa/*".into(),
            deployment: "oa".into(),
            provider: "openai".into(),
            upstream_model: "normal".into(),
            stream: true,
            prompt_tokens_estimate: 12,
            received_at: format_event_time(t),
        };
        let chunk = ChunkEvent {
            schema_version: SCHEMA_VERSION,
            event_id: new_event_id(),
            event_time: format_event_time(t),
            request_id: "req_1".into(),
            tenant_id: "ten_1".into(),
            sequence: 3,
            offset_us: 1500,
            bytes: 140,
            tokens: None,
        };
        let completion = CompletionEvent {
            schema_version: SCHEMA_VERSION,
            event_id: new_event_id(),
            event_time: format_event_time(t),
            request_id: "req_1".into(),
            tenant_id: "ten_1".into(),
            key_id: "key_1".into(),
            route: "chat".into(),
            requested_model: "oa/normal".into(),
            model_alias: "oa/*".into(),
            deployment: "oa".into(),
            provider: "openai".into(),
            upstream_model: "normal".into(),
            stream: true,
            status: CompletionStatus::Completed,
            finish_reason: Some("stop".into()),
            error: None,
            usage: TokenUsage {
                input_tokens: 12,
                cached_input_tokens: 4,
                cache_write_input_tokens: 0,
                output_tokens: 20,
                source: UsageSource::Provider,
            },
            chunks: 23,
            ttft_ms: Some(3),
            latency_ms: 40,
            gateway_overhead_us: 90,
            retries: 0,
            fallbacks: 0,
            cache_hit: false,
            cache_saved_usage: None,
            cache_price_fraction: None,
            price_book_version: None,
            received_at: format_event_time(t),
        };
        let recovered = CompletionEvent {
            event_id: recovered_event_id("req_1"),
            status: CompletionStatus::GatewayLost,
            finish_reason: None,
            usage: TokenUsage {
                input_tokens: 12,
                cached_input_tokens: 0,
                cache_write_input_tokens: 0,
                output_tokens: 5,
                source: UsageSource::Recovered,
            },
            ..completion.clone()
        };
        let audit = AuditEvent {
            schema_version: SCHEMA_VERSION,
            event_id: new_event_id(),
            event_time: format_event_time(t),
            request_id: "req_1".into(),
            tenant_id: "ten_1".into(),
            key_id: "key_1".into(),
            route: "chat".into(),
            requested_model: "oa/normal".into(),
            model_alias: "oa/*".into(),
            deployment: "oa".into(),
            provider: "openai".into(),
            upstream_model: "normal".into(),
            stream: true,
            status: CompletionStatus::Completed,
            error: None,
            usage: completion.usage,
            received_at: format_event_time(t),
            request_body: r#"{"model":"oa/normal","messages":[]}"#.into(),
            request_bytes: 35,
            request_truncated: false,
            response_kind: AuditResponseKind::Text,
            response_body: "Hello".into(),
            response_bytes: 5,
            response_truncated: false,
        };
        vec![
            (topics::AUDIT, serde_json::to_value(audit).unwrap()),
            (topics::REQUESTS, serde_json::to_value(request).unwrap()),
            (
                topics::COMPLETIONS,
                serde_json::to_value(recovered).unwrap(),
            ),
            (topics::CHUNKS, serde_json::to_value(chunk).unwrap()),
            (
                topics::COMPLETIONS,
                serde_json::to_value(completion).unwrap(),
            ),
        ]
    }

    fn validator(topic: &str) -> jsonschema::Validator {
        let path = json_dir().join(format!("{topic}.schema.json"));
        let schema: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .unwrap()
    }

    /// Events the types serialize are valid against the committed files, and the files reject
    /// what the types would not produce.
    #[test]
    fn sample_events_validate_against_the_committed_files() {
        for (topic, event) in samples() {
            let v = validator(topic);
            let errors: Vec<String> = v.iter_errors(&event).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{topic}: {errors:?}\n{event}");

            let mut wrong_version = event.clone();
            wrong_version["schema_version"] = 2.into();
            assert!(!v.is_valid(&wrong_version), "{topic} accepts version 2");

            let mut missing = event.clone();
            missing.as_object_mut().unwrap().remove("tenant_id");
            assert!(!v.is_valid(&missing), "{topic} accepts no tenant_id");

            let mut bad_time = event.clone();
            bad_time["event_time"] = "yesterday".into();
            assert!(!v.is_valid(&bad_time), "{topic} accepts a bad event_time");

            // Readers ignore fields added later within the version.
            let mut extra = event.clone();
            extra["added_later"] = true.into();
            assert!(v.is_valid(&extra), "{topic} rejects an added field");
        }
    }

    #[test]
    fn events_round_trip_and_tolerate_unknown_fields() {
        for (topic, mut event) in samples() {
            event["added_later"] = 1.into();
            let back = match topic {
                topics::REQUESTS => serde_json::to_value(
                    serde_json::from_value::<RequestEvent>(event.clone()).unwrap(),
                ),
                topics::CHUNKS => serde_json::to_value(
                    serde_json::from_value::<ChunkEvent>(event.clone()).unwrap(),
                ),
                topics::AUDIT => serde_json::to_value(
                    serde_json::from_value::<AuditEvent>(event.clone()).unwrap(),
                ),
                _ => serde_json::to_value(
                    serde_json::from_value::<CompletionEvent>(event.clone()).unwrap(),
                ),
            }
            .unwrap();
            event.as_object_mut().unwrap().remove("added_later");
            assert_eq!(back, event, "{topic}");
        }
    }

    #[test]
    fn event_time_is_rfc3339_utc_with_milliseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_007);
        let s = format_event_time(t);
        assert_eq!(s, "2023-11-14T22:13:20.007Z");
        assert_eq!(parse_event_time(&s), Some(t));
        assert_eq!(unix_ms(t), 1_700_000_000_007);
        // Sub-millisecond parts are cut, not rounded; the hand-written path agrees with the
        // general formatter over a range of instants.
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_709_251_199_999_999_999);
        assert_eq!(format_event_time(t), "2024-02-29T23:59:59.999Z");
        for i in 0..2000u64 {
            let t = SystemTime::UNIX_EPOCH + Duration::from_millis(i * 15_778_463_001);
            let general = OffsetDateTime::from(t).format(EVENT_TIME_FORMAT).unwrap();
            assert_eq!(format_event_time(t), general);
        }
    }

    #[test]
    fn recovered_event_ids_are_deterministic_uuid_v8() {
        let a = recovered_event_id("req_0192f0c2a1b27c3d8e9f001122334455");
        assert_eq!(
            a,
            recovered_event_id("req_0192f0c2a1b27c3d8e9f001122334455")
        );
        assert_ne!(
            a,
            recovered_event_id("req_0192f0c2a1b27c3d8e9f001122334456")
        );
        assert_eq!(uuid::Uuid::parse_str(&a).unwrap().get_version_num(), 8);
    }

    #[test]
    fn event_ids_are_uuid_v7_and_increase() {
        let a = new_event_id();
        let b = new_event_id();
        let u = uuid::Uuid::parse_str(&a).unwrap();
        assert_eq!(u.get_version_num(), 7);
        assert!(a < b, "{a} {b}");
    }
}
