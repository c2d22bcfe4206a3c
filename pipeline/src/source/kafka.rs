//! Kafka: each worker is assigned (not subscribed to) its share of the topic's partitions,
//! reads with `isolation.level = read_committed` and never commits offsets to Kafka: the
//! ledger holds them, committed with the rows they produced.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use super::{assigned_partitions, committed, Source, SourceError};
use crate::fact::SourceRecord;
use crate::sink::Position;

const METADATA_TIMEOUT: Duration = Duration::from_secs(30);

pub struct KafkaSource {
    name: String,
    consumer: BaseConsumer,
    /// Per partition: offsets below this were billed before the restart (re-read only to
    /// remember their event ids).
    replay_until: HashMap<i32, i64>,
}

impl KafkaSource {
    /// Opens worker `index` of `peers`'s share of `topic`.
    pub fn open(
        bootstrap: &str,
        topic: &str,
        group: &str,
        index: usize,
        peers: usize,
        positions: &[Position],
        dedup_horizon_ms: i64,
    ) -> Result<KafkaSource, SourceError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("fetch.wait.max.ms", "10")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .map(|t| t.partitions().len())
            .unwrap_or(0);
        if partitions == 0 {
            return Err(SourceError::Invalid(format!(
                "topic {topic} has no partitions (does it exist?)"
            )));
        }
        let mine = assigned_partitions(u32::try_from(partitions).unwrap_or(0), index, peers);

        // Where the warm-up starts: the first message within the horizon before the
        // committed position.
        let mut by_time = TopicPartitionList::new();
        for p in &mine {
            if let Some(c) = committed(positions, *p) {
                by_time.add_partition_offset(
                    topic,
                    to_i32(*p),
                    Offset::Offset(c.max_event_ms.saturating_sub(dedup_horizon_ms).max(0)),
                )?;
            }
        }
        let warm_start: HashMap<i32, i64> = if by_time.count() > 0 {
            consumer
                .offsets_for_times(by_time, METADATA_TIMEOUT)?
                .elements()
                .iter()
                .filter_map(|e| match e.offset() {
                    Offset::Offset(o) => Some((e.partition(), o)),
                    _ => None,
                })
                .collect()
        } else {
            HashMap::new()
        };

        let mut assignment = TopicPartitionList::new();
        let mut replay_until = HashMap::new();
        for p in &mine {
            let p32 = to_i32(*p);
            let offset = match committed(positions, *p) {
                Some(c) => {
                    replay_until.insert(p32, c.next_offset);
                    let start = warm_start
                        .get(&p32)
                        .copied()
                        .map_or(c.next_offset, |w| w.min(c.next_offset));
                    Offset::Offset(start)
                }
                None => Offset::Beginning,
            };
            assignment.add_partition_offset(topic, p32, offset)?;
        }
        consumer.assign(&assignment)?;
        Ok(KafkaSource {
            name: format!("kafka:{topic}"),
            consumer,
            replay_until,
        })
    }
}

fn to_i32(p: u32) -> i32 {
    i32::try_from(p).unwrap_or(i32::MAX)
}

impl Source for KafkaSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn poll(
        &mut self,
        max: usize,
        wait: Duration,
        out: &mut Vec<SourceRecord>,
    ) -> Result<(), SourceError> {
        let mut timeout = wait;
        for _ in 0..max {
            let Some(message) = self.consumer.poll(timeout) else {
                break;
            };
            timeout = Duration::ZERO;
            let m = message?;
            let partition = m.partition();
            out.push(SourceRecord {
                partition: u32::try_from(partition).unwrap_or(0),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                replay_only: self
                    .replay_until
                    .get(&partition)
                    .is_some_and(|until| m.offset() < *until),
            });
        }
        Ok(())
    }
}
