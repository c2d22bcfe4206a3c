//! TEMPORARY stub (replaced by the real implementation).
use super::{Analytics, OutboxBatch, SinkError};
pub struct ClickHouseAnalytics;
impl ClickHouseAnalytics { pub fn new(_url: &str, _db: &str) -> Self { ClickHouseAnalytics } }
#[async_trait::async_trait]
impl Analytics for ClickHouseAnalytics {
    async fn prepare(&self) -> Result<(), SinkError> { Ok(()) }
    async fn write(&self, _b: &OutboxBatch) -> Result<(), SinkError> { Ok(()) }
}
