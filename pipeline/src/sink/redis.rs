//! TEMPORARY stub (replaced by the real implementation).
use super::{Balance, BalanceStore, SinkError};
pub struct RedisBalances;
impl RedisBalances { pub async fn connect(_url: &str, _prefix: &str) -> Result<Self, SinkError> { Ok(RedisBalances) } }
#[async_trait::async_trait]
impl BalanceStore for RedisBalances {
    async fn publish(&self, _b: &[Balance]) -> Result<(), SinkError> { Ok(()) }
    async fn get(&self, _t: &str, _p: &str, _c: &str) -> Result<Option<Balance>, SinkError> { Ok(None) }
}
