//! TEMPORARY stub (replaced by the real implementation).
use super::{Balance, BalanceStore, SinkError};
#[derive(Clone, Default)]
pub struct MemoryBalances;
impl MemoryBalances { pub fn new() -> Self { MemoryBalances } }
#[async_trait::async_trait]
impl BalanceStore for MemoryBalances {
    async fn publish(&self, _b: &[Balance]) -> Result<(), SinkError> { Ok(()) }
    async fn get(&self, _t: &str, _p: &str, _c: &str) -> Result<Option<Balance>, SinkError> { Ok(None) }
}
