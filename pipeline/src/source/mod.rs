//! Reading completion events, partition by partition.
//!
//! | file | owns |
//! |---|---|
//! | `mod.rs` | the [`Source`] seam and how partitions are spread over workers |
//! | `kafka.rs` | Kafka: assigned partitions, `read_committed`, start at committed positions |
//! | `local_log.rs` | the gateway's local SQLite event log (embedded default), one partition |
//! | `memory.rs` | records held in memory (tests and the dataflow benchmark) |
//!
//! Every source starts each partition at the ledger's committed position. To remember which
//! events were billed just before that position (so that a duplicate arriving after a restart
//! is still recognised), it first re-reads the messages whose event time lies within the
//! deduplication horizon before the committed position and marks them `replay_only`.

pub mod kafka;
pub mod local_log;
pub mod memory;

use crate::fact::SourceRecord;
use crate::sink::Position;

/// Errors of any source.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("local event log: {0}")]
    Sqlite(#[from] sqlx::Error),
    #[error("{0}")]
    Invalid(String),
}

/// Where one worker reads.
pub trait Source {
    /// Identifies the stream in the ledger's positions (e.g. `kafka:llm.completions`).
    fn name(&self) -> &str;
    /// Appends up to `max` records to `out`, waiting at most `wait` for the first.
    fn poll(
        &mut self,
        max: usize,
        wait: std::time::Duration,
        out: &mut Vec<SourceRecord>,
    ) -> Result<(), SourceError>;
    /// Makes the next poll read the source even if it has just been found idle (before a
    /// graceful stop, which must see everything written until then).
    fn wake(&mut self) {}
    /// Whether a bounded source has nothing left (never true for Kafka or the local log).
    fn exhausted(&self) -> bool {
        false
    }
}

/// The partitions of `0..partitions` that worker `index` of `peers` reads: every
/// `peers`-th one, so all workers of all processes share the partitions evenly.
pub fn assigned_partitions(partitions: u32, index: usize, peers: usize) -> Vec<u32> {
    (0..partitions)
        .filter(|p| {
            usize::try_from(*p)
                .map(|p| p % peers.max(1) == index)
                .unwrap_or(false)
        })
        .collect()
}

/// The committed position of `partition`, if any.
pub fn committed(positions: &[Position], partition: u32) -> Option<&Position> {
    positions.iter().find(|p| p.partition == partition)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_spread_over_all_workers() {
        let mut all: Vec<u32> = (0..4).flat_map(|w| assigned_partitions(6, w, 4)).collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(assigned_partitions(6, 1, 4), vec![1, 5]);
        assert!(assigned_partitions(1, 1, 2).is_empty());
    }
}
