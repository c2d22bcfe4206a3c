//! Authentication: API key format, and the cache in front of the metadata store.
//!
//! A request's key is read from `Authorization: Bearer KEY` or `x-api-key: KEY`, checked for
//! format and checksum, hashed, and looked up in the cache and then the store. Validation never
//! fails open: a store error is a 500, not a pass.

pub mod keys;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use parking_lot::RwLock;

use crate::error::GatewayError;
use crate::store::{KeyRecord, MetaStore};

/// Who is calling: attached to every authenticated request.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant_id: String,
    pub tenant_name: String,
    pub key_id: String,
}

/// Authenticates keys with an in-memory cache in front of the store.
pub struct Authenticator {
    store: Arc<dyn MetaStore>,
    ttl: Duration,
    cache: RwLock<std::collections::HashMap<String, (Caller, Instant)>>,
}

impl Authenticator {
    pub fn new(store: Arc<dyn MetaStore>, ttl: Duration) -> Self {
        Authenticator {
            store,
            ttl,
            cache: RwLock::new(std::collections::HashMap::new()),
        }
    }

    /// Authenticates the key in `headers`.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, GatewayError> {
        let secret = key_from_headers(headers).ok_or_else(|| {
            GatewayError::Unauthorized(
                "You didn't provide an API key. Send it as `Authorization: Bearer KEY` or `x-api-key: KEY`."
                    .to_string(),
            )
        })?;
        if !keys::is_well_formed(secret) {
            return Err(GatewayError::Unauthorized(
                "Incorrect API key provided: it is not a Tollgate key (bad format or checksum)."
                    .to_string(),
            ));
        }
        let hash = keys::hash(secret);
        if let Some((caller, at)) = self.cache.read().get(&hash) {
            if at.elapsed() < self.ttl {
                return Ok(caller.clone());
            }
        }
        let record = self
            .store
            .key_by_hash(&hash)
            .await
            .map_err(|e| GatewayError::Internal(format!("key store unavailable: {e}")))?;
        let caller = check_record(record)?;
        self.cache
            .write()
            .insert(hash, (caller.clone(), Instant::now()));
        Ok(caller)
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
    if let Some(expires) = record.expires_at {
        if expires <= time::OffsetDateTime::now_utc() {
            return Err(GatewayError::Unauthorized(
                "This API key has expired.".to_string(),
            ));
        }
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
    })
}

/// The key a client sent, if any.
pub fn key_from_headers(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().ok()?.trim();
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))?;
        return Some(token.trim());
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}
