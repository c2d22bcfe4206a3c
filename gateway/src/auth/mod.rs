//! Authentication: API key format, and the cache in front of the metadata store.
//!
//! A request's key is read from `Authorization: Bearer KEY` or `x-api-key: KEY`, checked for
//! format and checksum (typos never reach the store), hashed, and looked up in the cache, then
//! the store. Validation never fails open: a store error is a 500, never a pass.
//!
//! Consistency: the store publishes an invalidation whenever a key or tenant changes;
//! [`Authenticator::follow`] applies them to the cache as they arrive (PostgreSQL
//! `NOTIFY`: immediately; SQLite: within its 200 ms poll). While the invalidation feed is
//! down the cache is bypassed, so a revocation is never missed. Expiry is checked on every
//! request, cached or not. Entries also age out after `key_cache_ttl_ms` as a backstop.
//!
//! Behind Envoy, a request may carry no key but the identity Envoy's ext_authz call
//! established (`x-tollgate-key-hash`...): it is believed only with `edge.trusted_secret`
//! ([`crate::edge::trust`]) and resolved through the same cache, by the key's stored hash.

pub mod keys;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use parking_lot::{Mutex, RwLock};
use time::OffsetDateTime;

use crate::error::GatewayError;
use crate::store::{Invalidation, KeyLimits, KeyRecord, MetaStore, TenantLimit};

/// Who is calling: attached to every authenticated request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant_id: String,
    pub tenant_name: String,
    pub key_id: String,
    /// Models this key may use (`None`: all).
    pub allowed_models: Option<Vec<String>>,
    /// The key's own limits.
    pub limits: KeyLimits,
    /// The tenant's limit rows (`*` and per model alias).
    pub tenant_limits: Vec<TenantLimit>,
    /// The tenant's plan limits (apply without a `*` row).
    pub plan_limits: Option<KeyLimits>,
    /// Currency of the tenant's spend limits.
    pub currency: String,
    expires_at: Option<OffsetDateTime>,
}

impl Caller {
    /// A caller with no limits (tests).
    #[cfg(test)]
    pub fn for_tests(tenant_id: &str, key_id: &str) -> Caller {
        Caller {
            tenant_id: tenant_id.into(),
            tenant_name: tenant_id.into(),
            key_id: key_id.into(),
            allowed_models: None,
            limits: KeyLimits::default(),
            tenant_limits: Vec::new(),
            plan_limits: None,
            currency: "USD".into(),
            expires_at: None,
        }
    }

    /// Refuses a model the key is not allowed to use (exact names, or `prefix/*` patterns).
    pub fn ensure_model_allowed(&self, model: &str) -> Result<(), GatewayError> {
        let Some(allowed) = &self.allowed_models else {
            return Ok(());
        };
        let ok = allowed.iter().any(|a| match a.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => a == model,
        });
        if ok {
            Ok(())
        } else {
            Err(GatewayError::Forbidden(format!(
                "This API key is not allowed to use the model `{model}`."
            )))
        }
    }
}

struct Cached {
    caller: Caller,
    at: Instant,
}

/// Authenticates keys with an in-memory cache in front of the store.
pub struct Authenticator {
    store: Arc<dyn MetaStore>,
    ttl: Duration,
    cache: RwLock<HashMap<String, Cached>>,
    /// False while the invalidation feed is down (or not started): every request then goes
    /// to the store.
    cache_trusted: AtomicBool,
    /// Key ids used since the last flush of `last_used_at`.
    used: Mutex<HashMap<String, OffsetDateTime>>,
    /// `edge.trusted_secret`: identity headers are believed only with it.
    edge_secret: Option<String>,
}

impl Authenticator {
    /// A cache that is trusted only once [`Authenticator::follow`] runs.
    pub fn new(store: Arc<dyn MetaStore>, ttl: Duration) -> Self {
        Authenticator {
            store,
            ttl,
            cache: RwLock::new(HashMap::new()),
            cache_trusted: AtomicBool::new(false),
            used: Mutex::new(HashMap::new()),
            edge_secret: None,
        }
    }

    /// Believes the identity headers of requests that carry `secret` (`edge.trusted_secret`:
    /// Envoy adds it after its ext_authz call passed); `None` never believes them.
    pub fn trust_edge(mut self, secret: Option<String>) -> Self {
        self.edge_secret = secret.filter(|s| !s.is_empty());
        self
    }

    /// Subscribes to the store's invalidations and applies them for as long as `self` lives;
    /// also flushes `last_used_at` every few seconds.
    pub async fn follow(self: &Arc<Self>) -> Result<(), GatewayError> {
        let mut feed = self
            .store
            .watch()
            .await
            .map_err(|e| GatewayError::Internal(format!("cannot watch key changes: {e}")))?;
        self.cache_trusted.store(true, Ordering::SeqCst);
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(inv) = feed.recv().await {
                let Some(auth) = weak.upgrade() else { return };
                auth.apply(&inv);
            }
            // The feed ended: never trust the cache again.
            if let Some(auth) = weak.upgrade() {
                auth.apply(&Invalidation::Lost);
            }
        });
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                let Some(auth) = weak.upgrade() else { return };
                auth.flush_last_used().await;
            }
        });
        Ok(())
    }

    /// Applies one invalidation to the cache.
    pub fn apply(&self, inv: &Invalidation) {
        match inv {
            Invalidation::Key(hash) => {
                self.cache.write().remove(hash);
            }
            Invalidation::Tenant(tenant) => {
                self.cache
                    .write()
                    .retain(|_, c| &c.caller.tenant_id != tenant);
            }
            Invalidation::All => {
                self.cache.write().clear();
                self.cache_trusted.store(true, Ordering::SeqCst);
            }
            Invalidation::Lost => {
                self.cache_trusted.store(false, Ordering::SeqCst);
                self.cache.write().clear();
                tracing::warn!(
                    "key invalidation feed lost: authenticating every request against the store"
                );
            }
        }
    }

    /// Drops a key from this instance's cache at once (after a change made through this
    /// instance; other instances hear of it through the store's invalidation feed).
    pub fn forget_key(&self, key_id: &str) {
        self.cache.write().retain(|_, c| c.caller.key_id != key_id);
    }

    /// Authenticates the key in `headers`.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, GatewayError> {
        // Behind Envoy: its identity headers, trusted only with the edge's shared secret.
        if let Some(edge) = crate::edge::trust::identity(headers, self.edge_secret.as_deref()) {
            let caller = self.authenticate_hash(edge.key_hash).await?;
            return edge.check(caller);
        }
        let secret = key_from_headers(headers)?.ok_or_else(|| {
            GatewayError::Unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer KEY` or `x-api-key: KEY`."
                    .to_string(),
            )
        })?;
        self.authenticate_secret(secret).await
    }

    /// Authenticates a key given as text.
    pub async fn authenticate_secret(&self, secret: &str) -> Result<Caller, GatewayError> {
        if !keys::is_well_formed(secret) {
            return Err(GatewayError::Unauthorized(
                "Incorrect API key provided: it is not a Tollgate key (bad format or checksum)."
                    .to_string(),
            ));
        }
        self.authenticate_hash(&keys::hash(secret)).await
    }

    /// Authenticates a key by its stored form (the SHA-256 of the secret): the edge's
    /// rate-limit service and requests Envoy already authorized ([`crate::edge::trust`]).
    pub async fn authenticate_hash(&self, hash: &str) -> Result<Caller, GatewayError> {
        let hash = hash.to_string();
        if self.cache_trusted.load(Ordering::Acquire) {
            if let Some(c) = self.cache.read().get(&hash) {
                if c.at.elapsed() < self.ttl {
                    check_expiry(&c.caller)?;
                    self.note_used(&c.caller.key_id);
                    return Ok(c.caller.clone());
                }
            }
        }
        let record = self
            .store
            .key_by_hash(&hash)
            .await
            .map_err(|e| GatewayError::Internal(format!("key store unavailable: {e}")))?;
        let caller = check_record(record)?;
        check_expiry(&caller)?;
        if self.cache_trusted.load(Ordering::Acquire) {
            self.cache.write().insert(
                hash,
                Cached {
                    caller: caller.clone(),
                    at: Instant::now(),
                },
            );
        }
        self.note_used(&caller.key_id);
        Ok(caller)
    }

    fn note_used(&self, key_id: &str) {
        let mut used = self.used.lock();
        if !used.contains_key(key_id) {
            used.insert(key_id.to_string(), OffsetDateTime::now_utc());
        }
    }

    /// Writes `last_used_at` for keys used since the last flush (one statement per batch).
    pub async fn flush_last_used(&self) {
        let batch: Vec<(String, OffsetDateTime)> = self.used.lock().drain().collect();
        if batch.is_empty() {
            return;
        }
        let at = batch
            .iter()
            .map(|(_, t)| *t)
            .max()
            .unwrap_or_else(OffsetDateTime::now_utc);
        let ids: Vec<String> = batch.into_iter().map(|(id, _)| id).collect();
        if let Err(e) = self.store.touch_keys(&ids, at).await {
            tracing::warn!("cannot record key use: {e}");
        }
    }

    /// Number of cached keys (for tests and metrics).
    pub fn cached_keys(&self) -> usize {
        self.cache.read().len()
    }
}

fn check_expiry(caller: &Caller) -> Result<(), GatewayError> {
    match caller.expires_at {
        Some(t) if t <= OffsetDateTime::now_utc() => Err(GatewayError::Unauthorized(
            "This API key has expired.".to_string(),
        )),
        _ => Ok(()),
    }
}

fn check_record(record: Option<KeyRecord>) -> Result<Caller, GatewayError> {
    let record = record
        .ok_or_else(|| GatewayError::Unauthorized("Incorrect API key provided.".to_string()))?;
    if record.key_status != "active" {
        return Err(GatewayError::Unauthorized(
            "This API key has been revoked.".to_string(),
        ));
    }
    if record.tenant_status != "active" {
        return Err(GatewayError::Forbidden(
            "This API key's tenant is suspended.".to_string(),
        ));
    }
    Ok(Caller {
        tenant_id: record.tenant_id,
        tenant_name: record.tenant_name,
        key_id: record.key_id,
        allowed_models: record.allowed_models,
        limits: record.limits,
        tenant_limits: record.tenant_limits,
        plan_limits: record.plan_limits,
        currency: record.currency,
        expires_at: record.expires_at,
    })
}

/// The key a client sent, if any: the token of `Authorization: Bearer KEY` (the scheme in
/// any case, RFC 7235) or `x-api-key: KEY`. An `Authorization` header of another scheme
/// (`Basic`...) is not a key and does not hide `x-api-key`. Two different keys in one request
/// are refused: which one would be billed is not the gateway's guess to make.
pub fn key_from_headers(headers: &HeaderMap) -> Result<Option<&str>, GatewayError> {
    let bearer = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token);
    let x_api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty());
    match (bearer, x_api_key) {
        (Some(a), Some(b)) if a != b => Err(GatewayError::bad_request(
            "The request carries two different API keys (`Authorization: Bearer` and \
             `x-api-key`); send one.",
        )),
        (Some(key), _) | (None, Some(key)) => Ok(Some(key)),
        (None, None) => Ok(None),
    }
}

/// The token of an `Authorization` value whose scheme is `Bearer` (in any case), if it is one.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once([' ', '\t'])?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn caller(models: Option<Vec<&str>>) -> Caller {
        Caller {
            tenant_id: "t".into(),
            tenant_name: "t".into(),
            key_id: "k".into(),
            allowed_models: models.map(|m| m.into_iter().map(String::from).collect()),
            ..Caller::for_tests("t", "k")
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, axum::http::HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in [
            "Bearer k1",
            "bearer k1",
            "BEARER k1",
            "bEaReR   k1 ",
            "Bearer\tk1",
        ] {
            let h = headers(&[("authorization", value)]);
            assert_eq!(key_from_headers(&h), Ok(Some("k1")), "{value}");
        }
        for value in ["Bearer", "Bearer ", "Bearerk1", "Token k1"] {
            let h = headers(&[("authorization", value)]);
            assert_eq!(key_from_headers(&h), Ok(None), "{value}");
        }
    }

    #[test]
    fn another_authorization_scheme_does_not_hide_x_api_key() {
        let h = headers(&[("authorization", "Basic dXNlcjpwdw=="), ("x-api-key", "k2")]);
        assert_eq!(key_from_headers(&h), Ok(Some("k2")));
        assert_eq!(
            key_from_headers(&headers(&[("x-api-key", " k2 ")])),
            Ok(Some("k2"))
        );
        assert_eq!(key_from_headers(&HeaderMap::new()), Ok(None));
    }

    #[test]
    fn two_different_keys_are_refused_and_the_same_one_twice_is_not() {
        let h = headers(&[("authorization", "Bearer k1"), ("x-api-key", "k2")]);
        let err = key_from_headers(&h).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(err.to_string().contains("two different API keys"), "{err}");
        let h = headers(&[("authorization", "bearer k1"), ("x-api-key", "k1")]);
        assert_eq!(key_from_headers(&h), Ok(Some("k1")));
    }

    #[test]
    fn model_allow_lists_support_prefixes() {
        assert!(caller(None).ensure_model_allowed("anything").is_ok());
        let c = caller(Some(vec!["gpt-4o", "mock/*"]));
        assert!(c.ensure_model_allowed("gpt-4o").is_ok());
        assert!(c.ensure_model_allowed("mock/fast").is_ok());
        assert!(matches!(
            c.ensure_model_allowed("gpt-4o-mini"),
            Err(GatewayError::Forbidden(_))
        ));
    }
}
