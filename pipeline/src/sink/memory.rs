//! Live balances in process memory: the embedded [`BalanceStore`], read in process by the
//! gateway's budget checks when no Redis is configured.
//!
//! The rule is the one of every balance store: a balance replaces the stored one only if its
//! `version` (the ledger commit's sequence number) is strictly newer, so a late or replayed
//! publish never moves a balance backwards.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;

use super::{Balance, BalanceStore, SinkError};

/// (tenant_id, period, currency).
type BalanceKey = (String, String, String);

/// Balances in a shared map; clones share the same map.
#[derive(Debug, Clone, Default)]
pub struct MemoryBalances {
    inner: Arc<RwLock<HashMap<BalanceKey, Balance>>>,
}

impl MemoryBalances {
    /// An empty store.
    pub fn new() -> MemoryBalances {
        MemoryBalances::default()
    }

    /// Every stored balance, ordered by tenant, period and currency.
    pub fn snapshot(&self) -> Vec<Balance> {
        let mut all: Vec<Balance> = self.inner.read().values().cloned().collect();
        all.sort_by(|a, b| {
            (&a.tenant_id, &a.period, &a.currency).cmp(&(&b.tenant_id, &b.period, &b.currency))
        });
        all
    }

    /// The stored balance of a tenant's period in `currency`, without awaiting.
    pub fn get_now(&self, tenant_id: &str, period: &str, currency: &str) -> Option<Balance> {
        let key = (
            tenant_id.to_string(),
            period.to_string(),
            currency.to_string(),
        );
        self.inner.read().get(&key).cloned()
    }

    /// Stores each balance that is newer than the stored one; returns how many were stored.
    pub fn publish_now(&self, balances: &[Balance]) -> usize {
        let mut map = self.inner.write();
        let mut stored = 0;
        for b in balances {
            let key = (b.tenant_id.clone(), b.period.clone(), b.currency.clone());
            match map.get(&key) {
                Some(current) if current.version >= b.version => {}
                _ => {
                    map.insert(key, b.clone());
                    stored += 1;
                }
            }
        }
        stored
    }
}

#[async_trait::async_trait]
impl BalanceStore for MemoryBalances {
    async fn publish(&self, balances: &[Balance]) -> Result<(), SinkError> {
        self.publish_now(balances);
        Ok(())
    }

    async fn get(
        &self,
        tenant_id: &str,
        period: &str,
        currency: &str,
    ) -> Result<Option<Balance>, SinkError> {
        Ok(self.get_now(tenant_id, period, currency))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::str::FromStr;

    use rust_decimal::Decimal;

    use super::*;

    fn balance(tenant: &str, spend: &str, requests: i64, version: u64) -> Balance {
        Balance {
            tenant_id: tenant.into(),
            period: "2026-03".into(),
            currency: "USD".into(),
            spend: Decimal::from_str(spend).unwrap(),
            requests,
            input_tokens: requests * 10,
            cached_input_tokens: requests,
            output_tokens: requests * 2,
            version,
        }
    }

    #[tokio::test]
    async fn newer_version_wins_and_older_or_equal_is_ignored() {
        let store = MemoryBalances::new();
        assert_eq!(store.get("t1", "2026-03", "USD").await.unwrap(), None);

        store.publish(&[balance("t1", "1.5", 3, 5)]).await.unwrap();
        // Older: ignored.
        store.publish(&[balance("t1", "0.5", 1, 4)]).await.unwrap();
        // Equal: ignored, even with different figures.
        store.publish(&[balance("t1", "9", 9, 5)]).await.unwrap();
        assert_eq!(
            store.get("t1", "2026-03", "USD").await.unwrap(),
            Some(balance("t1", "1.5", 3, 5))
        );

        store
            .publish(&[balance("t1", "123456789.123456789012345678", 4, 6)])
            .await
            .unwrap();
        let got = store.get_now("t1", "2026-03", "USD").unwrap();
        assert_eq!(got.version, 6);
        assert_eq!(got.spend.to_string(), "123456789.123456789012345678");
        assert_eq!(store.get_now("t1", "2026-03", "EUR"), None);
    }

    #[tokio::test]
    async fn clones_share_state_and_snapshot_is_ordered() {
        let store = MemoryBalances::default();
        let reader = store.clone();
        store
            .publish(&[
                balance("t2", "0.000000000000000001", 1, 1),
                balance("t1", "2", 2, 1),
            ])
            .await
            .unwrap();
        let snap = reader.snapshot();
        assert_eq!(snap.len(), 2);
        assert_eq!(snap[0].tenant_id, "t1");
        assert_eq!(snap[1].spend.to_string(), "0.000000000000000001");
    }
}
