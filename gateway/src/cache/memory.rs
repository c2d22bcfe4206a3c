//! The in-process cache store of the embedded default: bounded by bytes, least recently used
//! entries evicted first, each entry expiring after the TTL.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;

use super::{CacheKey, CacheStore, Entry, Stored};

struct Slot {
    entry: Entry,
    tenant: String,
    stored_at: Instant,
    /// Its place in the recency order.
    tick: u64,
}

#[derive(Default)]
struct Inner {
    slots: HashMap<CacheKey, Slot>,
    /// tick → key, oldest first.
    order: BTreeMap<u64, CacheKey>,
    next_tick: u64,
    bytes: usize,
    tenant_bytes: HashMap<String, usize>,
    evictions: u64,
}

impl Inner {
    fn remove(&mut self, key: &CacheKey) -> Option<Slot> {
        let slot = self.slots.remove(key)?;
        self.order.remove(&slot.tick);
        let size = slot.entry.size();
        self.bytes -= size;
        if let Some(t) = self.tenant_bytes.get_mut(&slot.tenant) {
            *t = t.saturating_sub(size);
            if *t == 0 {
                self.tenant_bytes.remove(&slot.tenant);
            }
        }
        Some(slot)
    }
}

/// Bounded LRU store.
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_bytes: usize,
    tenant_max_bytes: usize,
    ttl: Duration,
}

impl MemoryStore {
    pub fn new(max_bytes: usize, tenant_max_bytes: usize, ttl: Duration) -> MemoryStore {
        MemoryStore {
            inner: Mutex::default(),
            max_bytes,
            tenant_max_bytes,
            ttl,
        }
    }
}

#[async_trait]
impl CacheStore for MemoryStore {
    async fn get(&self, _tenant: &str, key: &CacheKey) -> Result<Option<Entry>, String> {
        let mut inner = self.inner.lock();
        let expired = match inner.slots.get(key) {
            None => return Ok(None),
            Some(slot) => slot.stored_at.elapsed() >= self.ttl,
        };
        if expired {
            inner.remove(key);
            return Ok(None);
        }
        let tick = inner.next_tick;
        inner.next_tick += 1;
        let Some(slot) = inner.slots.get_mut(key) else {
            return Ok(None);
        };
        let old = std::mem::replace(&mut slot.tick, tick);
        let entry = slot.entry.clone();
        inner.order.remove(&old);
        inner.order.insert(tick, key.clone());
        Ok(Some(entry))
    }

    async fn put(&self, tenant: &str, key: &CacheKey, entry: Entry) -> Result<Stored, String> {
        let size = entry.size();
        if size > self.max_bytes || size > self.tenant_max_bytes {
            return Ok(Stored::TooLarge);
        }
        let mut inner = self.inner.lock();
        inner.remove(key);
        if inner.tenant_bytes.get(tenant).copied().unwrap_or(0) + size > self.tenant_max_bytes {
            // The tenant's oldest entries make room, never another tenant's.
            let oldest: Vec<CacheKey> = inner
                .order
                .values()
                .filter(|k| inner.slots.get(*k).is_some_and(|s| s.tenant == tenant))
                .cloned()
                .collect();
            for k in oldest {
                if inner.tenant_bytes.get(tenant).copied().unwrap_or(0) + size
                    <= self.tenant_max_bytes
                {
                    break;
                }
                inner.remove(&k);
                inner.evictions += 1;
            }
        }
        while inner.bytes + size > self.max_bytes {
            let Some(oldest) = inner.order.values().next().cloned() else {
                break;
            };
            inner.remove(&oldest);
            inner.evictions += 1;
        }
        let tick = inner.next_tick;
        inner.next_tick += 1;
        inner.bytes += size;
        *inner.tenant_bytes.entry(tenant.to_string()).or_default() += size;
        inner.order.insert(tick, key.clone());
        inner.slots.insert(
            key.clone(),
            Slot {
                entry,
                tenant: tenant.to_string(),
                stored_at: Instant::now(),
                tick,
            },
        );
        Ok(Stored::Yes)
    }

    fn bytes(&self) -> u64 {
        self.inner.lock().bytes as u64
    }

    fn evictions(&self) -> u64 {
        self.inner.lock().evictions
    }

    fn label(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize) -> Entry {
        Entry {
            body: bytes::Bytes::from(vec![b'x'; n]),
            ..Entry::default()
        }
    }

    fn k(s: &str) -> CacheKey {
        CacheKey(s.to_string())
    }

    #[tokio::test]
    async fn least_recently_used_entries_go_first_and_bytes_stay_bounded() {
        let overhead = entry(0).size();
        let s = MemoryStore::new(3 * (100 + overhead), usize::MAX, Duration::from_secs(60));
        for name in ["a", "b", "c"] {
            s.put("t", &k(name), entry(100)).await.unwrap();
        }
        // `a` is used, so `b` is the least recently used when `d` arrives.
        assert!(s.get("t", &k("a")).await.unwrap().is_some());
        s.put("t", &k("d"), entry(100)).await.unwrap();
        assert!(s.get("t", &k("b")).await.unwrap().is_none());
        for name in ["a", "c", "d"] {
            assert!(s.get("t", &k(name)).await.unwrap().is_some(), "{name}");
        }
        assert!(s.bytes() <= (3 * (100 + overhead)) as u64);
        assert_eq!(s.evictions(), 1);
        assert_eq!(
            s.put("t", &k("huge"), entry(10_000)).await.unwrap(),
            Stored::TooLarge
        );
    }

    #[tokio::test]
    async fn a_tenant_over_its_budget_evicts_its_own_entries_only() {
        let overhead = entry(0).size();
        let s = MemoryStore::new(usize::MAX, 2 * (100 + overhead), Duration::from_secs(60));
        s.put("other", &k("o"), entry(100)).await.unwrap();
        for name in ["a", "b", "c"] {
            s.put("t", &k(name), entry(100)).await.unwrap();
        }
        assert!(s.get("t", &k("a")).await.unwrap().is_none());
        assert!(s.get("t", &k("o")).await.unwrap().is_some());
        assert!(s.get("t", &k("c")).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn entries_expire() {
        let s = MemoryStore::new(usize::MAX, usize::MAX, Duration::ZERO);
        s.put("t", &k("a"), entry(1)).await.unwrap();
        assert!(s.get("t", &k("a")).await.unwrap().is_none());
        assert_eq!(s.bytes(), 0);
    }
}
