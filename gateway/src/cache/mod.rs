//! The exact response cache (`[cache]`, off by default): an answer is replayed to a request of
//! the same tenant whose model and every output-affecting member are the same
//! ([`key::cache_key`]).
//!
//! | file | owns |
//! |---|---|
//! | `key.rs` | the key: tenant, API, model, canonical JSON of the body |
//! | `memory.rs` | bounded LRU store of the embedded default |
//! | `redis.rs` + `put.lua` | the shared store: TTL, per-tenant byte budget |
//!
//! What is stored is what the client received, in its dialect, with the model it asked for:
//! a whole answer's JSON, or a stream's SSE bytes, replayed with the same events (sent at
//! once). Only answers that completed normally are stored — never an interrupted stream, an
//! upstream error, a cut by a limit, or one over `max_entry_bytes`.
//!
//! Per request: `Cache-Control: no-store` or `x-tollgate-cache: bypass` neither reads nor
//! stores; `Cache-Control: no-cache` or `x-tollgate-cache: refresh` skips the read and stores
//! the fresh answer. Responses say `x-tollgate-cache: hit | miss | refresh | bypass`.
//!
//! Billing (`bill_hits`): a hit's completion event bills no provider tokens (`usage` is zero);
//! it carries the original answer's usage (`cache_saved_usage`) and the fraction of its price
//! the tenant pays (`cache_price_fraction`: `free` 0, the default; `full` 1; or e.g. `0.25`).
//! The pipeline prices both and books the hit and what it saved apart.

mod key;
mod memory;
mod redis;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::http::HeaderMap;
use bytes::{Bytes, BytesMut};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tollgate_schemas::TokenUsage;

pub use key::{cache_key, CacheKey};

use crate::error::GatewayError;
use crate::metrics::CacheMetrics;

/// Request and response header of the cache's per-request control and outcome.
pub const CACHE_HEADER: &str = "x-tollgate-cache";

/// `[cache]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// `memory` (this process) or `redis` (shared by every gateway).
    pub backend: Backend,
    /// Redis URL for `backend = "redis"`.
    pub redis_url: Option<String>,
    pub ttl_s: u64,
    /// The memory store's bound, all tenants together.
    pub max_bytes: usize,
    /// Each tenant's bound (both stores).
    pub tenant_max_bytes: usize,
    /// Larger answers are not stored.
    pub max_entry_bytes: usize,
    /// Models (as clients name them) never cached.
    pub exclude_models: Vec<String>,
    pub bill_hits: BillHits,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Memory,
    Redis,
}

/// What a cache hit costs the tenant: a fraction of what the original answer's usage costs
/// at the tenant's price. `"free"` (0, the default), `"full"` (1), or a decimal between them
/// such as `"0.25"` (at most six decimal places).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BillHits(Decimal);

impl BillHits {
    /// The fraction of the price billed.
    pub fn fraction(self) -> Decimal {
        self.0
    }

    /// Parses `free`, `full` or a fraction.
    pub fn parse(s: &str) -> Result<BillHits, String> {
        let fraction = match s {
            "free" => Decimal::ZERO,
            "full" => Decimal::ONE,
            _ => s.parse::<Decimal>().map_err(|_| {
                format!("bill_hits must be \"free\", \"full\" or a fraction such as \"0.25\", got {s:?}")
            })?,
        };
        if fraction.is_sign_negative()
            || fraction > Decimal::ONE
            || fraction.normalize().scale() > tollgate_schemas::pricing::MAX_FRACTION_SCALE
        {
            return Err(format!(
                "bill_hits must be a fraction between 0 and 1 with at most 6 decimal places, got {s:?}"
            ));
        }
        Ok(BillHits(fraction.normalize()))
    }
}

impl<'de> Deserialize<'de> for BillHits {
    /// A string, or a number (`bill_hits = 0.25`, or an environment override): read through
    /// its shortest decimal spelling, so `0.1` is exactly one tenth.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Int(u64),
            Float(f64),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Text(s) => s,
            Raw::Int(n) => n.to_string(),
            Raw::Float(f) => f.to_string(),
        };
        BillHits::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            backend: Backend::Memory,
            redis_url: None,
            ttl_s: 24 * 3600,
            max_bytes: 64 * 1024 * 1024,
            tenant_max_bytes: 16 * 1024 * 1024,
            max_entry_bytes: 1024 * 1024,
            exclude_models: Vec::new(),
            bill_hits: BillHits::default(),
        }
    }
}

/// One cached answer.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Entry {
    /// SSE bytes (a stream) or JSON (a whole answer), as the client received them.
    #[serde(skip)]
    pub body: Bytes,
    pub stream: bool,
    /// What the original answer used (what a hit would have cost; billed at `bill_hits`).
    pub usage: TokenUsage,
    pub finish_reason: Option<String>,
    /// Where the original answer came from.
    pub model_label: String,
    pub deployment: String,
    pub upstream_model: String,
    pub chunks: u64,
}

impl Entry {
    /// Bytes it takes in a store.
    pub fn size(&self) -> usize {
        self.body.len() + 256 + self.model_label.len() + self.deployment.len()
    }

    /// `[u32 header length][header JSON][body]`.
    pub fn encode(&self) -> Vec<u8> {
        let header = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + header.len() + self.body.len());
        out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(&self.body);
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        let header = bytes.get(4..4 + len)?;
        let mut entry: Entry = serde_json::from_slice(header).ok()?;
        entry.body = Bytes::copy_from_slice(bytes.get(4 + len..)?);
        Some(entry)
    }
}

/// Whether an entry was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Yes,
    TooLarge,
    OverBudget,
}

/// Where entries live.
#[async_trait]
pub trait CacheStore: Send + Sync {
    async fn get(&self, tenant: &str, key: &CacheKey) -> Result<Option<Entry>, String>;
    async fn put(&self, tenant: &str, key: &CacheKey, entry: Entry) -> Result<Stored, String>;
    /// Bytes held (the memory store; 0 when the store does not know).
    fn bytes(&self) -> u64;
    fn evictions(&self) -> u64;
    fn label(&self) -> &'static str;
}

/// What the cache does for one request.
#[derive(Debug, Clone)]
pub struct CachePlan {
    pub key: CacheKey,
    pub tenant: String,
    /// Look the key up.
    pub read: bool,
    /// Store the answer once it completed normally.
    pub write: bool,
    /// What a hit costs: the alias's `cache_bill_hits`, else `[cache] bill_hits`.
    pub bill_hits: BillHits,
}

/// An alias's own response cache settings (`[[models]] cache`, `cache_bill_hits`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AliasCache {
    /// `Some(false)`: never cached.
    pub enabled: Option<bool>,
    pub bill_hits: Option<BillHits>,
}

/// The cache, as the request path uses it.
pub struct ResponseCache {
    store: Arc<dyn CacheStore>,
    pub config: CacheConfig,
    metrics: CacheMetrics,
}

/// The outcome a response reports (`x-tollgate-cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Refresh,
    Bypass,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Refresh => "refresh",
            Outcome::Bypass => "bypass",
        }
    }
}

impl ResponseCache {
    /// The cache `config` asks for; `None` when it is off.
    pub fn from_config(
        config: &CacheConfig,
        metrics: CacheMetrics,
    ) -> Result<Option<Arc<ResponseCache>>, GatewayError> {
        if !config.enabled {
            return Ok(None);
        }
        let ttl = Duration::from_secs(config.ttl_s);
        let store: Arc<dyn CacheStore> = match config.backend {
            Backend::Memory => Arc::new(memory::MemoryStore::new(
                config.max_bytes,
                config.tenant_max_bytes,
                ttl,
            )),
            Backend::Redis => {
                let url = config.redis_url.as_deref().unwrap_or_default();
                Arc::new(
                    redis::RedisStore::new(url, ttl, config.tenant_max_bytes)
                        .map_err(|e| GatewayError::Internal(format!("cache.redis_url: {e}")))?,
                )
            }
        };
        Ok(Some(Arc::new(ResponseCache {
            store,
            config: config.clone(),
            metrics,
        })))
    }

    /// What to do for a request of `tenant` to `model` on `api` with `body`, given its
    /// headers: `Err(outcome)` when the cache stays out of it (`Bypass`).
    pub fn plan(
        &self,
        headers: &HeaderMap,
        tenant: &str,
        api: &str,
        model: &str,
        alias: AliasCache,
        body: &[u8],
    ) -> Result<CachePlan, Outcome> {
        let control = |name: &str| {
            headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .map(|d| d.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        };
        let cache_control = control("cache-control");
        let ours = control(CACHE_HEADER);
        let has = |list: &[String], d: &str| list.iter().any(|x| x == d);
        let bypass = has(&cache_control, "no-store") || has(&ours, "bypass");
        let excluded =
            alias.enabled == Some(false) || self.config.exclude_models.iter().any(|m| m == model);
        if bypass || excluded {
            self.metrics
                .bypass(if bypass { "requested" } else { "excluded" });
            return Err(Outcome::Bypass);
        }
        let refresh = has(&cache_control, "no-cache") || has(&ours, "refresh");
        let key = cache_key(tenant, api, model, body).map_err(|_| {
            self.metrics.bypass("unreadable");
            Outcome::Bypass
        })?;
        Ok(CachePlan {
            key,
            tenant: tenant.to_string(),
            read: !refresh,
            write: true,
            bill_hits: alias.bill_hits.unwrap_or(self.config.bill_hits),
        })
    }

    /// The entry for `plan`, if any (a store error is a miss, logged once per error).
    pub async fn lookup(&self, plan: &CachePlan) -> Option<Entry> {
        if !plan.read {
            return None;
        }
        let started = Instant::now();
        let found = self.store.get(&plan.tenant, &plan.key).await;
        self.metrics.lookup(started.elapsed());
        match found {
            Ok(Some(entry)) => {
                self.metrics.hit();
                Some(entry)
            }
            Ok(None) => {
                self.metrics.miss();
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, store = self.store.label(), "cache lookup failed; answered as a miss");
                self.metrics.error("lookup");
                None
            }
        }
    }

    /// Stores `entry` for `plan` (in the background: the response does not wait for it).
    pub fn store(self: &Arc<Self>, plan: &CachePlan, entry: Entry) {
        if !plan.write {
            return;
        }
        if entry.body.len() > self.config.max_entry_bytes {
            self.metrics.not_stored("too_large");
            return;
        }
        let (cache, plan) = (self.clone(), plan.clone());
        tokio::spawn(async move {
            match cache.store.put(&plan.tenant, &plan.key, entry).await {
                Ok(Stored::Yes) => cache.metrics.stored(),
                Ok(Stored::TooLarge) => cache.metrics.not_stored("too_large"),
                Ok(Stored::OverBudget) => cache.metrics.not_stored("tenant_budget"),
                Err(e) => {
                    tracing::warn!(error = %e, store = cache.store.label(), "cache store failed");
                    cache.metrics.error("store");
                }
            }
            cache
                .metrics
                .set_store(cache.store.bytes(), cache.store.evictions());
        });
    }

    /// Counts what a hit saved (tokens, for the savings series).
    pub fn saved(&self, model: &str, usage: &TokenUsage) {
        self.metrics.saved(model, usage);
    }
}

/// A stream's bytes gathered for the cache while they are relayed, stored only if the stream
/// completes normally.
pub struct CacheFill {
    cache: Arc<ResponseCache>,
    plan: CachePlan,
    buf: BytesMut,
    /// Over `max_entry_bytes`: nothing more is gathered, nothing stored.
    abandoned: bool,
    /// Where the answer came from (the entry's metadata).
    pub origin: Entry,
}

impl CacheFill {
    pub fn new(cache: Arc<ResponseCache>, plan: CachePlan, origin: Entry) -> CacheFill {
        CacheFill {
            cache,
            plan,
            buf: BytesMut::new(),
            abandoned: false,
            origin,
        }
    }

    /// Bytes the client was sent.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.abandoned {
            return;
        }
        if self.buf.len() + bytes.len() > self.cache.config.max_entry_bytes {
            self.abandoned = true;
            self.buf = BytesMut::new();
            return;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The stream completed normally with `usage`: store what it sent.
    pub fn complete(self, usage: TokenUsage, finish_reason: Option<String>, chunks: u64) {
        if self.abandoned {
            self.cache.metrics.not_stored("too_large");
            return;
        }
        let entry = Entry {
            body: self.buf.freeze(),
            usage,
            finish_reason,
            chunks,
            ..self.origin
        };
        self.cache.store(&self.plan, entry);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bill(toml_value: &str) -> Result<Decimal, String> {
        #[derive(Deserialize)]
        struct C {
            bill_hits: BillHits,
        }
        toml::from_str::<C>(&format!("bill_hits = {toml_value}"))
            .map(|c| c.bill_hits.fraction())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn hits_are_billed_free_in_full_or_at_an_exact_fraction() {
        assert_eq!(bill("\"free\""), Ok(Decimal::ZERO));
        assert_eq!(bill("\"full\""), Ok(Decimal::ONE));
        assert_eq!(bill("\"0.25\""), Ok(Decimal::new(25, 2)));
        assert_eq!(bill("0.1"), Ok(Decimal::new(1, 1)), "a TOML float, exactly");
        assert_eq!(bill("1"), Ok(Decimal::ONE));
        for bad in ["\"1.5\"", "\"-0.1\"", "\"0.0000001\"", "\"half\"", "2"] {
            assert!(bill(bad).is_err(), "{bad}");
        }
        assert_eq!(BillHits::default().fraction(), Decimal::ZERO);
    }
}
