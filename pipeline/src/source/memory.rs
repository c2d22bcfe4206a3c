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
    /// This worker's share of `records` (by partition), skipping what `positions` says is
    /// already committed.
    pub fn new(
        records: &Arc<Vec<SourceRecord>>,
        index: usize,
        peers: usize,
        positions: &[Position],
    ) -> MemorySource {
        let records = records
            .iter()
            .filter(|r| usize::try_from(r.partition).unwrap_or(0) % peers.max(1) == index)
            .filter(|r| {
                super::committed(positions, r.partition)
                    .map(|p| r.offset >= p.next_offset)
                    .unwrap_or(true)
            })
            .cloned()
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
        out.extend(self.records[self.next..end].iter().cloned());
        self.next = end;
        Ok(())
    }

    fn exhausted(&self) -> bool {
        self.next >= self.records.len()
    }
}
