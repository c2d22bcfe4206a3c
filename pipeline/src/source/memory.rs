//! Records held in memory, split over workers by partition: for tests and the dataflow
//! benchmark, which measure the dataflow without a broker.

use std::sync::Arc;
use std::time::Duration;

use super::{Source, SourceError};
use crate::fact::SourceRecord;
use crate::sink::Position;

pub struct MemorySource {
    records: Vec<SourceRecord>,
    next: usize,
}

impl MemorySource {
    /// This worker's share of `records` (by partition). Records before a committed position
    /// are replayed (`replay_only`) when they lie within the deduplication horizon, and
    /// skipped otherwise, as the other sources do.
    pub fn new(
        records: &Arc<Vec<SourceRecord>>,
        index: usize,
        peers: usize,
        positions: &[Position],
        dedup_horizon_ms: i64,
    ) -> MemorySource {
        let records = records
            .iter()
            .filter(|r| usize::try_from(r.partition).unwrap_or(0) % peers.max(1) == index)
            .filter_map(|r| match super::committed(positions, r.partition) {
                Some(p) if r.offset < p.next_offset => (r.timestamp_ms
                    >= p.max_event_ms.saturating_sub(dedup_horizon_ms))
                .then(|| SourceRecord {
                    replay_only: true,
                    ..r.clone()
                }),
                _ => Some(r.clone()),
            })
            .collect();
        MemorySource { records, next: 0 }
    }
}

impl Source for MemorySource {
    fn name(&self) -> &str {
        "memory"
    }

    fn poll(
        &mut self,
        max: usize,
        _wait: Duration,
        out: &mut Vec<SourceRecord>,
    ) -> Result<(), SourceError> {
        let end = (self.next + max).min(self.records.len());
        // Each record is handed out once: move it rather than copy it.
        out.extend(self.records[self.next..end].iter_mut().map(std::mem::take));
        self.next = end;
        Ok(())
    }

    fn exhausted(&self) -> bool {
        self.next >= self.records.len()
    }
}
