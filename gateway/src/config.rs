//! Configuration: defaults, then the TOML file, then `TOLLGATE__`-prefixed environment
//! variables (`TOLLGATE__SERVER__MAX_BODY_BYTES=1048576` sets `server.max_body_bytes`).
//!
//! Every table denies unknown keys, so a typo is an error that names the key. Secrets never
//! live in the file: a deployment names the environment variable that holds its credential.
//!
//! | table | what it sets |
//! |---|---|
//! | `[server]` | listen address, body limits, key cache, built-in models ([`ServerConfig`]) |
//! | `[store]` | the metadata store: PostgreSQL URL, else SQLite in the data directory |
//! | `[events]` | the event sink, tagged by `type`: `local` (default), `kafka`, `log` |
//! | `[billing]` | the embedded billing pipeline ([`crate::billing::BillingConfig`]) |
//! | `[limits]` | quotas and rate limits: memory or Redis ([`crate::limits::LimitsConfig`]) |
//! | `[[deployments]]`, `[[models]]` | provider deployments and the model aliases they serve |
//! | `[routing]` | strategy, retries, breakers, hedging, rate-limit steering ([`crate::routing::config`]) |
//! | `[metrics]` | label bounds of the Prometheus metrics ([`MetricsConfig`]) |
//! | `[edge]` | the gRPC services for an Envoy edge, and trust in its identity headers ([`crate::edge::EdgeConfig`]) |
//!
//! `[billing]` keys (`TOLLGATE__BILLING__PIPELINE=off` and the like override them):
//! - `pipeline = "embedded" | "off"`: run the billing pipeline inside the gateway, over the
//!   local event log, writing the ledger into the store's database. Default: `embedded` when
//!   `[events] type = "local"` (the embedded default), else `off` (with Kafka events
//!   `tollgate-pipeline` runs as its own service; `embedded` is then an error).
//! - `epoch_ms` (default 200): completions read within one epoch are committed together.
//! - `dedup_horizon_ms` (default 6 h): how long event ids are remembered to drop duplicates.

use std::path::Path;

use rust_decimal::Decimal;
use serde::Deserialize;

use crate::routing::config::{DeploymentLimits, DeploymentPrice, RoutingConfig, Strategy};

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// Where tenants, keys, prices and credentials live.
    #[serde(default)]
    pub store: StoreConfig,
    /// Where request, chunk and completion events go.
    #[serde(default)]
    pub events: crate::events::EventsConfig,
    /// Whether this gateway runs the billing pipeline (embedded by default with local events).
    #[serde(default)]
    pub billing: crate::billing::BillingConfig,
    /// Quotas and rate limits: where they are counted, how estimates are made.
    #[serde(default)]
    pub limits: crate::limits::LimitsConfig,
    /// Provider deployments: one upstream endpoint + credential + upstream model each.
    #[serde(default)]
    pub deployments: Vec<DeploymentConfig>,
    /// Model aliases: the names clients use, each served by one or more deployments.
    #[serde(default)]
    pub models: Vec<ModelAliasConfig>,
    /// How aliases choose among their deployments, retry, fall back and hedge.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Label bounds of the Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The exact response cache (off by default).
    #[serde(default)]
    pub cache: crate::cache::CacheConfig,
    /// Chat completions over WebSockets (`GET /v1/realtime/chat`).
    #[serde(default)]
    pub realtime: crate::routes::realtime::RealtimeConfig,
    /// OpenTelemetry traces (off unless an OTLP endpoint is set).
    #[serde(default)]
    pub tracing: crate::telemetry::TracingConfig,
    /// Envoy in front: ext_authz and rate-limit gRPC services, trusted identity headers.
    #[serde(default)]
    pub edge: crate::edge::EdgeConfig,
    /// PII masking before external providers (off by default).
    #[serde(default)]
    pub privacy: crate::privacy::PrivacyConfig,
    /// The audit trail of requests (off by default).
    #[serde(default)]
    pub audit: crate::audit::AuditConfig,
}

/// Prometheus metrics settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `tollgate_cost_total` has a `tenant` label for at most this many tenants (the first
    /// ones this process sees); later tenants are summed under `tenant="other"`. 0: every
    /// tenant is `other`.
    pub cost_tenant_labels_max: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            cost_tenant_labels_max: 100,
        }
    }
}

/// Most serving threads `server.threads` may ask for.
const MAX_SERVING_THREADS: usize = 1024;
/// Longest busy-poll window `server.busy_poll_us` may set (10 ms): longer only burns CPU.
const MAX_BUSY_POLL_US: u64 = 10_000;
/// Longest server timeout (one day): longer is "no limit" in practice, and is written 0.
const MAX_SERVER_TIMEOUT_MS: u64 = 86_400_000;

/// HTTP server settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Listen address; the `--listen` flag wins over it.
    pub listen: String,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// Largest non-streaming upstream response body read.
    pub max_upstream_body_bytes: usize,
    /// Largest server-sent event read from a streaming upstream (all its lines, up to the
    /// blank line that ends it); a longer one ends the client's stream with an error event
    /// and is recorded as an upstream error. Default 8 MiB: the largest legitimate events
    /// carry base64 images (a 1536×1024 PNG is about 4 MB in base64).
    pub max_upstream_event_bytes: usize,
    /// Largest token count an upstream may report for one request (each of input, cached
    /// input, cache writes and output). A report above it, or inconsistent (a total that is
    /// not the sum of its parts, more cached tokens than prompt tokens, a sum that
    /// overflows), is not billed: the gateway's own count is, marked `usage_source =
    /// counted`, and `tollgate_upstream_usage_rejected_total` counts it.
    pub max_reported_tokens: u64,
    /// Production mode: no default tenant or key is ever created automatically, the free
    /// `mock/...` models and the `openai/*` / `anthropic/*` routes paid with the operator's
    /// environment keys are off unless enabled explicitly, and `/metrics` is not served on the
    /// API port (see [`ServerConfig::metrics_listen`]).
    pub production: bool,
    /// How long an authenticated key stays in the in-memory cache before it is re-read.
    pub key_cache_ttl_ms: u64,
    /// Add the simulated `mock/...` models. Unset: on, except in production. Read it through
    /// [`ServerConfig::mock_models_enabled`].
    pub mock_models: Option<bool>,
    /// Add `openai/*` and `anthropic/*` routes when `OPENAI_API_KEY` / `ANTHROPIC_API_KEY` are
    /// set, so that any tenant key can spend the operator's provider keys on any model. Unset:
    /// on, except in production. Read it through [`ServerConfig::env_providers_enabled`].
    pub env_providers: Option<bool>,
    /// A second listen address serving only `GET /metrics` (Prometheus), for a port that is
    /// not exposed to API clients. When set, `/metrics` is served there and no longer on the
    /// API port; in production `/metrics` is never served on the API port, so without this
    /// the metrics are not served at all.
    pub metrics_listen: Option<String>,
    /// Serving threads, each with its own single-threaded runtime; 0: one per core.
    pub threads: usize,
    /// How long (µs) a serving thread keeps polling its sockets after it handled something
    /// before it sleeps; 0 turns busy polling off. See `server::busy_poll`.
    pub busy_poll_us: u64,
    /// Load the token encodings at start (about 60 MB) instead of on first need; with the
    /// default (`false`) the first requests' pre-flight estimates count by bytes until their
    /// encoding has loaded (see `tokens`).
    pub preload_tokenizers: bool,
    /// How long a client may take to send a request's headers, and how long a keep-alive
    /// connection may wait for its next request, before it is closed; 0: no limit. A new
    /// connection's first request (HTTP/1.1 or HTTP/2) must be complete within this time of
    /// its first byte.
    pub header_read_timeout_ms: u64,
    /// How long a new connection may take to send its first byte before it is closed; 0: no
    /// limit.
    pub first_byte_timeout_ms: u64,
    /// How long a connection may have no request in progress before it is closed (HTTP/2:
    /// with a GOAWAY); 0: no limit. HTTP/1.1 keep-alive connections are also closed by
    /// `header_read_timeout_ms`, whichever comes first.
    pub idle_timeout_ms: u64,
    /// How long a request's body may take to arrive, from the end of its head; a slower one
    /// gets a 408 and its connection is closed. 0: no limit.
    pub body_read_timeout_ms: u64,
    /// Most client connections open at once; more are refused at accept with a 503. 0: derived
    /// from the open-files limit (raised to its hard limit at start-up): half of what is left
    /// after 256 descriptors kept for the gateway's own files and connections.
    pub max_connections: usize,
    /// Most client connections open at once from one client address (IPv6: one /64); more
    /// are refused at accept with a 503. 0: no such cap (behind a proxy or load balancer that
    /// connects from few addresses).
    pub max_connections_per_ip: usize,
    /// How long shutdown waits for in-flight requests (streams) before it cuts them; 0: until
    /// they end. Keep it below the orchestrator's kill timeout (Kubernetes: 30 s).
    pub shutdown_grace_ms: u64,
    /// The level of the access log's lines (`info`, `debug` or `off`); failed requests are
    /// logged at `warn` whatever it says. See `crate::access_log`.
    pub access_log: crate::access_log::AccessLog,
    /// TLS on the listener (`[server.tls]`: certificate and key files, optional client CAs
    /// for mTLS, minimum version, reload interval); absent: plain HTTP. See `server::tls`.
    pub tls: Option<crate::server::tls::TlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".to_string(),
            max_body_bytes: 4 * 1024 * 1024,
            max_upstream_body_bytes: 64 * 1024 * 1024,
            max_upstream_event_bytes: crate::relay::sse::DEFAULT_MAX_EVENT_BYTES,
            max_reported_tokens: 10_000_000,
            production: false,
            key_cache_ttl_ms: 5_000,
            mock_models: None,
            env_providers: None,
            metrics_listen: None,
            threads: 0,
            busy_poll_us: 0,
            preload_tokenizers: false,
            header_read_timeout_ms: 30_000,
            first_byte_timeout_ms: 10_000,
            idle_timeout_ms: 60_000,
            body_read_timeout_ms: 60_000,
            max_connections: 0,
            max_connections_per_ip: 1024,
            shutdown_grace_ms: 20_000,
            access_log: crate::access_log::AccessLog::Info,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Whether the simulated `mock/...` models are served: as set, else not in production.
    pub fn mock_models_enabled(&self) -> bool {
        self.mock_models.unwrap_or(!self.production)
    }

    /// Whether `openai/*` and `anthropic/*` are routed with the operator's environment keys:
    /// as set, else not in production.
    pub fn env_providers_enabled(&self) -> bool {
        self.env_providers.unwrap_or(!self.production)
    }

    /// Whether the API port answers `GET /metrics`: only outside production, and only while
    /// the metrics have no listener of their own (`metrics_listen`).
    pub fn metrics_on_api_port(&self) -> bool {
        !self.production && self.metrics_listen.is_none()
    }
}

/// The metadata store: PostgreSQL when `database_url` is set (or `DATABASE_URL` is in the
/// environment), else SQLite in the data directory.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://user:password@host:port/db`.
    pub database_url: Option<String>,
}

/// One deployment, tagged by provider `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DeploymentConfig {
    /// OpenAI's API.
    Openai(HttpDeploymentConfig),
    /// Any OpenAI-compatible server (TGI, Ollama, LM Studio, llama.cpp...).
    OpenaiCompatible(HttpDeploymentConfig),
    /// vLLM's OpenAI-compatible server (its extra sampling parameters pass through).
    Vllm(HttpDeploymentConfig),
    /// Anthropic's Messages API.
    Anthropic(HttpDeploymentConfig),
    /// The built-in simulated provider.
    Mock(MockDeploymentConfig),
}

impl DeploymentConfig {
    pub fn name(&self) -> &str {
        match self {
            DeploymentConfig::Openai(c)
            | DeploymentConfig::OpenaiCompatible(c)
            | DeploymentConfig::Vllm(c)
            | DeploymentConfig::Anthropic(c) => &c.name,
            DeploymentConfig::Mock(c) => &c.name,
        }
    }

    /// Whether its credential comes from the store (`api_key_credential`).
    pub fn uses_stored_credential(&self) -> bool {
        match self {
            DeploymentConfig::Openai(c)
            | DeploymentConfig::OpenaiCompatible(c)
            | DeploymentConfig::Vllm(c)
            | DeploymentConfig::Anthropic(c) => c.api_key_credential.is_some(),
            DeploymentConfig::Mock(_) => false,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            DeploymentConfig::Openai(c)
            | DeploymentConfig::OpenaiCompatible(c)
            | DeploymentConfig::Vllm(c)
            | DeploymentConfig::Anthropic(c) => c.weight,
            DeploymentConfig::Mock(c) => c.weight,
        }
    }
}

/// An HTTP upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpDeploymentConfig {
    /// Unique name, referenced by model aliases.
    pub name: String,
    /// The model name sent upstream; `*` forwards the part of the client's model name that a
    /// wildcard alias (`openai/*`) matched.
    pub model: String,
    /// Base URL. OpenAI style includes the version (`https://api.openai.com/v1`); Anthropic
    /// style does not (`https://api.anthropic.com`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// Environment variable holding the credential.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Name of a provider credential stored (encrypted) in the metadata store; wins over
    /// `api_key_env`.
    #[serde(default)]
    pub api_key_credential: Option<String>,
    /// Relative weight for weighted-random routing.
    #[serde(default = "one")]
    pub weight: u32,
    /// Connect timeout.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed until the response headers and the first body byte arrive (the
    /// time-to-first-token timeout).
    #[serde(default = "default_first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// Longest pause allowed between two upstream data events once a response has begun
    /// (keep-alive comments do not count: an upstream that sends only `: ping` is idle), and
    /// between two body reads of a whole response; when it passes, the stream ends with an
    /// error event and the request is recorded as an upstream error. Default 120000 (two
    /// minutes); 0: no bound.
    #[serde(default = "default_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Whether this deployment serves `/v1/embeddings`.
    #[serde(default)]
    pub embeddings: bool,
    /// `anthropic-version` header for Anthropic deployments when the client sends none.
    #[serde(default)]
    pub anthropic_version: Option<String>,
    /// Local requests/tokens-per-minute limits of this deployment's provider key.
    #[serde(default)]
    pub limits: DeploymentLimits,
    /// Price per million tokens (for `lowest_cost` and `commit_aware` routing).
    #[serde(default)]
    pub price: Option<DeploymentPrice>,
    /// Spend committed per calendar month (same currency as `price`), for `commit_aware`.
    #[serde(default, deserialize_with = "crate::routing::config::decimal_opt")]
    pub monthly_commit: Option<Decimal>,
    /// vLLM: its Prometheus endpoint (`http://host:8000/metrics`), polled for load-aware
    /// routing (running/waiting requests, KV-cache usage).
    #[serde(default)]
    pub metrics_url: Option<String>,
    /// How often `metrics_url` is polled.
    #[serde(default = "default_metrics_poll_ms")]
    pub metrics_poll_ms: u64,
    /// Never mask personal data for this deployment (self-hosted), whatever its type.
    #[serde(default)]
    pub pii_exempt: bool,
}

/// The simulated provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockDeploymentConfig {
    pub name: String,
    /// The model name the simulated upstream reports.
    #[serde(default = "mock_model")]
    pub model: String,
    /// Reply style: `lorem` (generated text), `echo` (the last user message back).
    #[serde(default = "lorem")]
    pub style: String,
    #[serde(default = "one")]
    pub weight: u32,
    /// Content chunks per reply (capped by the request's max tokens).
    #[serde(default = "default_mock_chunks")]
    pub chunks: usize,
    /// Pause between chunks.
    #[serde(default)]
    pub chunk_delay_ms: u64,
    /// Pause before the first chunk.
    #[serde(default)]
    pub first_chunk_delay_ms: u64,
    /// As for HTTP deployments.
    #[serde(default)]
    pub limits: DeploymentLimits,
    #[serde(default)]
    pub price: Option<DeploymentPrice>,
    #[serde(default, deserialize_with = "crate::routing::config::decimal_opt")]
    pub monthly_commit: Option<Decimal>,
}

/// A model alias.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelAliasConfig {
    /// The name clients send; a trailing `/*` makes it a prefix wildcard.
    pub name: String,
    /// Deployment names serving it, in fallback order.
    pub deployments: Vec<String>,
    /// How to choose among them (default: `[routing] strategy`).
    #[serde(default)]
    pub strategy: Option<Strategy>,
    /// Alias to use when every deployment reports the prompt is over its context window.
    #[serde(default)]
    pub context_window_fallback: Option<String>,
    /// Alias to use when the upstream refuses the request under its content policy.
    #[serde(default)]
    pub content_policy_fallback: Option<String>,
    /// Hedge every request of this alias, not only high-priority ones.
    #[serde(default)]
    pub hedge: bool,
    /// PII policy of this alias (`off`, `mask`, `block`); the strictest of it, the tenant's
    /// and `[privacy] default` applies.
    #[serde(default)]
    pub pii: Option<crate::privacy::PiiAction>,
    /// `false`: this alias's answers are never cached (with `[cache]` on); default: cached.
    #[serde(default)]
    pub cache: Option<bool>,
    /// What a cache hit of this alias costs (`free`, `full` or a fraction such as `"0.25"`);
    /// default: `[cache] bill_hits`.
    #[serde(default)]
    pub cache_bill_hits: Option<crate::cache::BillHits>,
}

fn one() -> u32 {
    1
}
fn mock_model() -> String {
    "mock".to_string()
}
fn lorem() -> String {
    "lorem".to_string()
}
fn default_mock_chunks() -> usize {
    20
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_first_byte_timeout_ms() -> u64 {
    600_000
}
fn default_idle_timeout_ms() -> u64 {
    120_000
}
fn default_metrics_poll_ms() -> u64 {
    1_000
}

impl Config {
    /// Loads the file (if any), overlays `TOLLGATE__` environment variables and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|e| ConfigError::Invalid(format!("{}: {e}", p.display())))?
            }
            None => toml::Table::new(),
        };
        Config::from_table_and_env(table, std::env::vars())
    }

    /// The file's table with the `TOLLGATE__` overrides among `vars` laid over it. When an
    /// override makes an otherwise valid configuration invalid, the error names it.
    fn from_table_and_env(
        file: toml::Table,
        vars: impl Iterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let overrides: Vec<(String, String)> = vars
            .filter(|(key, _)| key.starts_with(OVERRIDE_PREFIX))
            .collect();
        let mut table = file.clone();
        overlay_env(&mut table, overrides.iter().cloned())?;
        Config::from_table(table).map_err(|e| blame_override(&file, &overrides).unwrap_or(e))
    }

    fn from_table(table: toml::Table) -> Result<Config, ConfigError> {
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML string (no environment overlay); used by tests.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.cache.enabled
            && self.cache.backend == crate::cache::Backend::Redis
            && self.cache.redis_url.as_deref().unwrap_or("").is_empty()
        {
            return Err(ConfigError::Invalid(
                "cache.backend = \"redis\" needs cache.redis_url".to_string(),
            ));
        }
        if self.server.threads > MAX_SERVING_THREADS {
            return Err(ConfigError::Invalid(format!(
                "server.threads is {}; at most {MAX_SERVING_THREADS} (0: one per core)",
                self.server.threads
            )));
        }
        if self.server.busy_poll_us > MAX_BUSY_POLL_US {
            return Err(ConfigError::Invalid(format!(
                "server.busy_poll_us is {}; at most {MAX_BUSY_POLL_US} (0: off)",
                self.server.busy_poll_us
            )));
        }
        if self.server.max_upstream_event_bytes == 0 || self.server.max_reported_tokens == 0 {
            return Err(ConfigError::Invalid(
                "server.max_upstream_event_bytes and server.max_reported_tokens must be at \
                 least 1"
                    .to_string(),
            ));
        }
        let server = &self.server;
        for (name, ms) in [
            ("header_read_timeout_ms", server.header_read_timeout_ms),
            ("first_byte_timeout_ms", server.first_byte_timeout_ms),
            ("idle_timeout_ms", server.idle_timeout_ms),
            ("body_read_timeout_ms", server.body_read_timeout_ms),
            ("shutdown_grace_ms", server.shutdown_grace_ms),
        ] {
            if ms > MAX_SERVER_TIMEOUT_MS {
                return Err(ConfigError::Invalid(format!(
                    "server.{name} is {ms}; at most {MAX_SERVER_TIMEOUT_MS} (one day; 0: no limit)"
                )));
            }
        }
        if let Some(addr) = &self.server.metrics_listen {
            if addr.trim().is_empty() || *addr == self.server.listen {
                return Err(ConfigError::Invalid(format!(
                    "server.metrics_listen is `{addr}`; it must be an address other than \
                     server.listen"
                )));
            }
        }
        if self
            .privacy
            .can_apply(self.models.iter().filter_map(|m| m.pii))
            && self
                .privacy
                .placeholder_key
                .as_deref()
                .is_none_or(|k| k.len() < 16)
        {
            return Err(ConfigError::Invalid(
                "a PII policy other than \"off\" needs privacy.placeholder_key (a secret of at \
                 least 16 characters; TOLLGATE__PRIVACY__PLACEHOLDER_KEY)"
                    .to_string(),
            ));
        }
        self.billing.validate(&self.events)?;
        self.audit.validate()?;
        self.limits.validate()?;
        self.tracing.validate()?;
        self.edge.validate(&self.server)?;
        let mut names = std::collections::HashSet::new();
        for d in &self.deployments {
            if !names.insert(d.name()) {
                return Err(ConfigError::Invalid(format!(
                    "duplicate deployment name `{}`",
                    d.name()
                )));
            }
            if let DeploymentConfig::Mock(m) = d {
                if m.style != "lorem" && m.style != "echo" {
                    return Err(ConfigError::Invalid(format!(
                        "deployment `{}`: style must be `lorem` or `echo`, not `{}`",
                        m.name, m.style
                    )));
                }
            }
            if d.weight() == 0 {
                return Err(ConfigError::Invalid(format!(
                    "deployment `{}`: weight must be at least 1",
                    d.name()
                )));
            }
        }
        let mut aliases = std::collections::HashSet::new();
        for m in &self.models {
            if !aliases.insert(m.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "duplicate model alias `{}`",
                    m.name
                )));
            }
            if m.deployments.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "model alias `{}` has no deployments",
                    m.name
                )));
            }
            for d in &m.deployments {
                if !names.contains(d.as_str()) {
                    return Err(ConfigError::Invalid(format!(
                        "model alias `{}` names unknown deployment `{d}`",
                        m.name
                    )));
                }
            }
            if m.deployments.len() > crate::routing::MAX_DEPLOYMENTS_PER_ALIAS {
                return Err(ConfigError::Invalid(format!(
                    "model alias `{}` has more than {} deployments",
                    m.name,
                    crate::routing::MAX_DEPLOYMENTS_PER_ALIAS
                )));
            }
        }
        for m in &self.models {
            for (key, target) in [
                ("context_window_fallback", &m.context_window_fallback),
                ("content_policy_fallback", &m.content_policy_fallback),
            ] {
                if let Some(t) = target {
                    if !aliases.contains(t.as_str()) || t.ends_with('*') || *t == m.name {
                        return Err(ConfigError::Invalid(format!(
                            "model alias `{}`: {key} `{t}` must name another exact alias",
                            m.name
                        )));
                    }
                }
            }
        }
        let b = &self.routing.breaker;
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            return Err(ConfigError::Invalid(
                "routing.breaker.failure_ratio must be in (0, 1]".to_string(),
            ));
        }
        if b.consecutive_failures == 0 || b.half_open_probes == 0 {
            return Err(ConfigError::Invalid(
                "routing.breaker: consecutive_failures and half_open_probes must be at least 1"
                    .to_string(),
            ));
        }
        if self.routing.retry.max_attempts == 0 {
            return Err(ConfigError::Invalid(
                "routing.retry.max_attempts must be at least 1".to_string(),
            ));
        }
        Ok(())
    }
}

/// The prefix of configuration overrides: `TOLLGATE__SECTION__KEY`.
const OVERRIDE_PREFIX: &str = "TOLLGATE__";

/// The first override that, alone over the file, makes the configuration invalid, as an error
/// that names the variable; `None` when the file alone is invalid too (its error stands).
fn blame_override(file: &toml::Table, overrides: &[(String, String)]) -> Option<ConfigError> {
    Config::from_table(file.clone()).ok()?;
    overrides.iter().find_map(|(key, value)| {
        let mut table = file.clone();
        let single = std::iter::once((key.clone(), value.clone()));
        match overlay_env(&mut table, single).and_then(|()| Config::from_table(table)) {
            Ok(_) => None,
            Err(ConfigError::Invalid(e)) => Some(ConfigError::Invalid(format!(
                "{key}={value}: {}",
                e.trim_end().replace('\n', " ")
            ))),
            Err(e) => Some(e),
        }
    })
}

/// The top-level tables of the configuration, which `TOLLGATE__SECTION__...` can override.
const CONFIG_SECTIONS: [&str; 14] = [
    "server",
    "store",
    "events",
    "billing",
    "limits",
    "deployments",
    "models",
    "routing",
    "metrics",
    "cache",
    "realtime",
    "tracing",
    "edge",
    "audit",
];

/// The `TOLLGATE_` variables that are not configuration overrides: those the gateway and the
/// pipeline read, then those of the project's scripts, tests and benchmarks (so that running
/// them warns about nothing). [`unknown_env_vars`] warns about any other.
pub const KNOWN_ENV_VARS: &[&str] = &[
    // tollgate and tollgate-pipeline
    "TOLLGATE_ADMIN_TOKEN",
    "TOLLGATE_MASTER_KEY",
    "TOLLGATE_MASTER_KEY_OLD",
    "TOLLGATE_EDGE_SECRET",
    "TOLLGATE_CONFIG",
    "TOLLGATE_DATA_DIR",
    "TOLLGATE_LOG_FORMAT",
    "TOLLGATE_PIPELINE_METRICS_LISTEN",
    "TOLLGATE_PIPELINE_ABORT_AFTER_COMMIT",
    // scripts, tests, benchmarks
    "TOLLGATE_BIN",
    "TOLLGATE_BIN_DIR",
    "TOLLGATE_DATABASE_URL",
    "TOLLGATE_REDIS_URL",
    "TOLLGATE_KAFKA_BOOTSTRAP",
    "TOLLGATE_KAFKA_TOPICS",
    "TOLLGATE_KAFKA_PARTITIONS",
    "TOLLGATE_KAFKA_HEAP",
    "TOLLGATE_CLICKHOUSE_URL",
    "TOLLGATE_ENVOY_BIN",
    "TOLLGATE_PG_DIR",
    "TOLLGATE_SERVICES_DIR",
    "TOLLGATE_SERVICES_TIMEOUT",
    "TOLLGATE_BLESS_SCHEMAS",
    "TOLLGATE_EDGE_TTFT_OUT",
    "TOLLGATE_CHAOS_SEED",
    "TOLLGATE_FUZZ_SEED",
    "TOLLGATE_FUZZ_CASES",
    "TOLLGATE_FLINK_SEED",
    "TOLLGATE_PATH_SEED",
    "TOLLGATE_LOAD_API_KEY",
    "TOLLGATE_CI_RELEASE_BUILD",
];

/// Names under this prefix are the tests' own fixtures (upstream keys and the like).
const TEST_ENV_PREFIX: &str = "TOLLGATE_TEST_";

/// A warning for each `TOLLGATE_`-prefixed variable in `vars` that nothing reads: an override
/// with one underscore after `TOLLGATE` (`TOLLGATE_SERVER__THREADS`), an override of a section
/// that does not exist, or a misspelt name; each names the variable and, when one is close,
/// what was probably meant. (Keys inside a section are checked when `serve` loads the
/// configuration: an unknown one is an error naming the variable.)
pub fn unknown_env_vars(vars: impl Iterator<Item = (String, String)>) -> Vec<String> {
    let mut warnings = Vec::new();
    for (key, _) in vars {
        if let Some(rest) = key.strip_prefix(OVERRIDE_PREFIX) {
            let section = rest.split("__").next().unwrap_or("").to_ascii_lowercase();
            if !CONFIG_SECTIONS.contains(&section.as_str()) {
                let hint = closest(&section, CONFIG_SECTIONS.iter().copied())
                    .map(|s| format!(" (did you mean [{s}]?)"))
                    .unwrap_or_default();
                warnings.push(format!(
                    "{key} is ignored: the configuration has no [{section}] section{hint}"
                ));
            }
            continue;
        }
        let Some(rest) = key.strip_prefix("TOLLGATE_") else {
            continue;
        };
        if KNOWN_ENV_VARS.contains(&key.as_str()) || key.starts_with(TEST_ENV_PREFIX) {
            continue;
        }
        let hint = if rest.contains("__") {
            format!(" (a configuration override takes two underscores: {OVERRIDE_PREFIX}{rest})")
        } else {
            closest(&key, KNOWN_ENV_VARS.iter().copied())
                .map(|k| format!(" (did you mean {k}?)"))
                .unwrap_or_default()
        };
        warnings.push(format!(
            "{key} is ignored: Tollgate reads no such variable{hint}"
        ));
    }
    warnings
}

/// The candidate within a small edit distance of `word`, if any.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| {
            (
                edit_distance(&word.to_ascii_lowercase(), &c.to_ascii_lowercase()),
                c,
            )
        })
        .filter(|&(d, c)| d > 0 && d <= (c.len() / 4).max(1))
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over bytes (names here are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// Sets `a.b.c` in `table` for each `TOLLGATE__A__B__C=value`; values parse as TOML scalars
/// when they can (numbers, booleans), else as strings.
fn overlay_env(
    table: &mut toml::Table,
    vars: impl Iterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (key, value) in vars {
        let Some(rest) = key.strip_prefix(OVERRIDE_PREFIX) else {
            continue;
        };
        let path: Vec<String> = rest.split("__").map(|s| s.to_ascii_lowercase()).collect();
        let parsed = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value));
        let mut cursor = &mut *table;
        for (i, segment) in path.iter().enumerate() {
            if i + 1 == path.len() {
                cursor.insert(segment.clone(), parsed.clone());
            } else {
                let entry = cursor
                    .entry(segment.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                cursor = entry.as_table_mut().ok_or_else(|| {
                    ConfigError::Invalid(format!("{key}: `{segment}` is not a table"))
                })?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
[server]
max_body_bytes = 1000

[[deployments]]
type = "openai"
name = "oa"
model = "gpt-4o"
api_key_env = "OPENAI_API_KEY"

[[deployments]]
type = "anthropic"
name = "an"
model = "claude-sonnet-4-5"
weight = 3

[[deployments]]
type = "mock"
name = "m"
chunks = 5

[[models]]
name = "gpt-4o"
deployments = ["oa", "an"]
"#;

    #[test]
    fn parses_tagged_deployments() {
        let c = Config::from_toml(SAMPLE).unwrap();
        assert_eq!(c.deployments.len(), 3);
        assert_eq!(c.deployments[1].weight(), 3);
        assert_eq!(c.server.max_body_bytes, 1000);
    }

    #[test]
    fn server_threads_and_busy_polling_are_bounded() {
        let with = |keys: &str| {
            SAMPLE.replace(
                "max_body_bytes = 1000",
                &format!("max_body_bytes = 1000\n{keys}"),
            )
        };
        let c = Config::from_toml(&with("threads = 3\nbusy_poll_us = 100")).unwrap();
        assert_eq!((c.server.threads, c.server.busy_poll_us), (3, 100));
        let err = Config::from_toml(&with("threads = 5000")).unwrap_err();
        assert!(err.to_string().contains("server.threads"), "{err}");
        let err = Config::from_toml(&with("busy_poll_us = 20000")).unwrap_err();
        assert!(err.to_string().contains("server.busy_poll_us"), "{err}");
    }

    #[test]
    fn a_typo_names_the_key() {
        let bad = SAMPLE.replace("api_key_env", "api_key_evn");
        let err = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("api_key_evn"), "{err}");
    }

    #[test]
    fn unknown_deployment_in_alias_is_rejected() {
        let bad = SAMPLE.replace(r#"["oa", "an"]"#, r#"["oa", "nope"]"#);
        let err = Config::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn an_override_that_does_not_parse_is_named() {
        let file: toml::Table = SAMPLE.parse().unwrap();
        for (key, value) in [
            ("TOLLGATE__SERVER__THREADS", "abc"),
            ("TOLLGATE__SERVER__THREADZ", "4"),
            ("TOLLGATE__SERVER__THREADS", "100000"),
        ] {
            let err = Config::from_table_and_env(
                file.clone(),
                env(&[("TOLLGATE__SERVER__LISTEN", "127.0.0.1:1"), (key, value)]),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains(&format!("{key}={value}: ")), "{err}");
        }
        // An invalid file is still blamed on the file, not on a harmless override.
        let bad_file: toml::Table = "[server]\nthreadz = 1".parse().unwrap();
        let err = Config::from_table_and_env(bad_file, env(&[("TOLLGATE__SERVER__THREADS", "2")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("threadz") && !err.contains("TOLLGATE__"),
            "{err}"
        );
    }

    #[test]
    fn unknown_tollgate_variables_are_named_with_a_hint() {
        let warnings = unknown_env_vars(env(&[
            ("TOLLGATE_SERVER__THREADS", "4"),
            ("TOLLGATE_ADMIN_TOKN", "x"),
            ("TOLLGATE_WHATEVER", "x"),
            ("TOLLGATE__SERVR__THREADS", "4"),
            ("TOLLGATE__SERVER__THREADS", "4"),
            ("TOLLGATE_ADMIN_TOKEN", "x"),
            ("TOLLGATE_TEST_UPSTREAM_KEY", "x"),
            ("PATH", "/bin"),
        ]));
        assert_eq!(warnings.len(), 4, "{warnings:#?}");
        assert!(warnings[0].starts_with("TOLLGATE_SERVER__THREADS is ignored"));
        assert!(warnings[0].contains("TOLLGATE__SERVER__THREADS"));
        assert!(warnings[1].contains("did you mean TOLLGATE_ADMIN_TOKEN?"));
        assert!(warnings[2].starts_with("TOLLGATE_WHATEVER") && !warnings[2].contains("mean"));
        assert!(
            warnings[3].contains("did you mean [server]?"),
            "{}",
            warnings[3]
        );
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut t: toml::Table = SAMPLE.parse().unwrap();
        overlay_env(
            &mut t,
            vec![
                (
                    "TOLLGATE__SERVER__MAX_BODY_BYTES".to_string(),
                    "77".to_string(),
                ),
                (
                    "TOLLGATE__SERVER__LISTEN".to_string(),
                    "0.0.0.0:1".to_string(),
                ),
                ("TOLLGATE__BILLING__PIPELINE".to_string(), "off".to_string()),
                ("TOLLGATE__BILLING__EPOCH_MS".to_string(), "50".to_string()),
                ("UNRELATED".to_string(), "x".to_string()),
            ]
            .into_iter(),
        )
        .unwrap();
        let c: Config = toml::Value::Table(t).try_into().unwrap();
        assert_eq!(c.server.max_body_bytes, 77);
        assert_eq!(c.server.listen, "0.0.0.0:1");
        assert_eq!(c.billing.pipeline, Some(crate::billing::PipelineMode::Off));
        assert_eq!(c.billing.epoch_ms, 50);
    }

    #[test]
    fn production_turns_the_free_and_operator_paid_models_off_unless_enabled() {
        let server = |toml: &str| Config::from_toml(toml).unwrap().server;
        let dev = server("");
        assert!(dev.mock_models_enabled() && dev.env_providers_enabled());
        assert!(dev.metrics_on_api_port());

        let prod = server("[server]\nproduction = true");
        assert!(!prod.mock_models_enabled() && !prod.env_providers_enabled());
        assert!(!prod.metrics_on_api_port());

        let opted_in =
            server("[server]\nproduction = true\nmock_models = true\nenv_providers = true");
        assert!(opted_in.mock_models_enabled() && opted_in.env_providers_enabled());

        let opted_out = server("[server]\nmock_models = false\nenv_providers = false");
        assert!(!opted_out.mock_models_enabled() && !opted_out.env_providers_enabled());
    }

    #[test]
    fn a_metrics_listener_takes_metrics_off_the_api_port() {
        let c = Config::from_toml("[server]\nmetrics_listen = \"127.0.0.1:9464\"").unwrap();
        assert!(!c.server.metrics_on_api_port());
        let err = Config::from_toml("[server]\nmetrics_listen = \"127.0.0.1:8080\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server.metrics_listen"), "{err}");
    }
}
