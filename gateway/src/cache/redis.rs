//! The production cache store: entries in Redis under `{tollgate:cache:TENANT}:KEY` with the
//! TTL, each tenant's bytes written within a TTL counted against its budget (one script call
//! per write: `put.lua`). The budget is approximate: bytes count until the tenant has written
//! nothing for a TTL, even when entries expired earlier, so a tenant may be held below its
//! budget, never above it.

use std::time::Duration;

use async_trait::async_trait;

use super::{CacheKey, CacheStore, Entry, Stored};
use crate::limits::resp::{Pool, Reply, Target};

const PUT_LUA: &str = include_str!("put.lua");

pub struct RedisStore {
    pool: Pool,
    ttl_ms: String,
    tenant_max_bytes: String,
    put_sha: String,
}

impl RedisStore {
    pub fn new(url: &str, ttl: Duration, tenant_max_bytes: usize) -> Result<RedisStore, String> {
        Ok(RedisStore {
            pool: Pool::new(Target::parse(url)?),
            ttl_ms: ttl.as_millis().max(1).to_string(),
            tenant_max_bytes: tenant_max_bytes.to_string(),
            put_sha: ::redis::Script::new(PUT_LUA).get_hash().to_string(),
        })
    }
}

/// An entry's key and its tenant's byte counter share a hash tag: one node of a cluster.
fn keys(tenant: &str, key: &CacheKey) -> (String, String) {
    (
        format!("{{tollgate:cache:{tenant}}}:{}", key.0),
        format!("{{tollgate:cache:{tenant}}}:bytes"),
    )
}

#[async_trait]
impl CacheStore for RedisStore {
    async fn get(&self, tenant: &str, key: &CacheKey) -> Result<Option<Entry>, String> {
        let (k, _) = keys(tenant, key);
        match self
            .pool
            .call(&[b"GET", k.as_bytes()])
            .await
            .map_err(|e| e.0)?
        {
            Reply::Bulk(Some(bytes)) => Ok(Entry::decode(&bytes)),
            Reply::Bulk(None) => Ok(None),
            other => Err(format!("unexpected reply {other:?}")),
        }
    }

    async fn put(&self, tenant: &str, key: &CacheKey, entry: Entry) -> Result<Stored, String> {
        let value = entry.encode();
        let size = value.len().to_string();
        let (k, budget_key) = keys(tenant, key);
        let reply = self
            .pool
            .eval(
                &self.put_sha,
                PUT_LUA,
                &[k.as_bytes(), budget_key.as_bytes()],
                &[
                    &value,
                    size.as_bytes(),
                    self.ttl_ms.as_bytes(),
                    self.tenant_max_bytes.as_bytes(),
                ],
            )
            .await
            .map_err(|e| e.0)?;
        match reply {
            Reply::Int(1) => Ok(Stored::Yes),
            Reply::Int(0) => Ok(Stored::OverBudget),
            other => Err(format!("unexpected reply {other:?}")),
        }
    }

    fn bytes(&self) -> u64 {
        0
    }

    fn evictions(&self) -> u64 {
        0
    }

    fn label(&self) -> &'static str {
        "redis"
    }
}
