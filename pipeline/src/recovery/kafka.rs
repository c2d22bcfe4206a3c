//! The recovery scanner over Kafka: one consumer assigned every partition of the three
//! topics (from the offsets of a time, found with `offsets_for_times`; no offsets are
//! committed anywhere: a restart re-reads its look-back window), and an idempotent producer
//! (`acks = all`) that writes recovered completions to the completions topic, keyed by tenant
//! id like the gateway's own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use tollgate_schemas::events::CompletionEvent;

use super::{EventLog, LogEvent, RecoveryError, Topic, Topics};

const METADATA_TIMEOUT: Duration = Duration::from_secs(30);
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Counts delivery reports, so that a publish can tell whether its message made it.
#[derive(Default)]
struct Deliveries {
    failed: Arc<AtomicU64>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "recovered completion not delivered");
        }
    }
}

pub struct KafkaEvents {
    consumer: BaseConsumer,
    producer: BaseProducer<Deliveries>,
    failed: Arc<AtomicU64>,
    topics: Topics,
}

impl KafkaEvents {
    /// Connects to `bootstrap`; reading starts at [`EventLog::seek`].
    pub fn open(
        bootstrap: &str,
        group: &str,
        topics: Topics,
    ) -> Result<KafkaEvents, RecoveryError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .create()?;
        let context = Deliveries::default();
        let failed = context.failed.clone();
        let producer: BaseProducer<Deliveries> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            // The gateway's partitioner: a recovered completion lands in the partition of its
            // tenant's other events, in order after them.
            .set("partitioner", "murmur2_random")
            .create_with_context(context)?;
        Ok(KafkaEvents {
            consumer,
            producer,
            failed,
            topics,
        })
    }

    fn topic(&self, name: &str) -> Option<Topic> {
        if name == self.topics.requests {
            Some(Topic::Requests)
        } else if name == self.topics.chunks {
            Some(Topic::Chunks)
        } else if name == self.topics.completions {
            Some(Topic::Completions)
        } else {
            None
        }
    }
}

impl EventLog for KafkaEvents {
    fn seek(&mut self, since_ms: i64) -> Result<(), RecoveryError> {
        let mut by_time = TopicPartitionList::new();
        for topic in [
            &self.topics.requests,
            &self.topics.chunks,
            &self.topics.completions,
        ] {
            let metadata = self
                .consumer
                .fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
            let partitions = metadata
                .topics()
                .iter()
                .find(|t| t.name() == topic.as_str())
                .map(|t| t.partitions().len())
                .unwrap_or(0);
            if partitions == 0 {
                return Err(RecoveryError::Invalid(format!(
                    "topic {topic} has no partitions (does it exist?)"
                )));
            }
            for p in 0..partitions {
                let p = i32::try_from(p).unwrap_or(i32::MAX);
                by_time.add_partition_offset(topic, p, Offset::Offset(since_ms.max(0)))?;
            }
        }
        let mut assignment = self.consumer.offsets_for_times(by_time, METADATA_TIMEOUT)?;
        // A partition with nothing as recent as `since_ms` starts at its end.
        let ends: Vec<(String, i32)> = assignment
            .elements()
            .iter()
            .filter(|e| !matches!(e.offset(), Offset::Offset(_)))
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        for (topic, p) in ends {
            assignment.set_partition_offset(&topic, p, Offset::End)?;
        }
        self.consumer.assign(&assignment)?;
        Ok(())
    }

    fn poll(
        &mut self,
        max: usize,
        wait: Duration,
        out: &mut Vec<LogEvent>,
    ) -> Result<(), RecoveryError> {
        let mut timeout = wait;
        for _ in 0..max {
            let Some(message) = self.consumer.poll(timeout) else {
                break;
            };
            timeout = Duration::ZERO;
            let m = message?;
            let Some(topic) = self.topic(m.topic()) else {
                continue;
            };
            out.push(LogEvent {
                topic,
                timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
                payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            });
        }
        Ok(())
    }

    fn publish(
        &mut self,
        completion: &CompletionEvent,
        timestamp_ms: i64,
    ) -> Result<(), RecoveryError> {
        let payload = serde_json::to_vec(completion)
            .map_err(|e| RecoveryError::Invalid(format!("serializing a completion: {e}")))?;
        let failed_before = self.failed.load(Ordering::Relaxed);
        self.producer
            .send(
                BaseRecord::to(&self.topics.completions)
                    .key(completion.tenant_id.as_bytes())
                    .payload(&payload)
                    .timestamp(timestamp_ms),
            )
            .map_err(|(e, _)| RecoveryError::Kafka(e))?;
        // Rare (one per lost request): wait for the broker's acknowledgement.
        self.producer.flush(DELIVERY_TIMEOUT)?;
        if self.failed.load(Ordering::Relaxed) != failed_before {
            return Err(RecoveryError::Invalid(
                "the broker did not acknowledge a recovered completion".to_string(),
            ));
        }
        Ok(())
    }
}

/// Runs the scanner over Kafka until `stop` is set.
pub fn run(
    bootstrap: &str,
    group: &str,
    options: &super::RecoveryOptions,
    counters: Arc<super::RecoveryCounters>,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), RecoveryError> {
    let mut log = KafkaEvents::open(bootstrap, group, options.topics.clone())?;
    super::run(&mut log, options, counters, stop, &super::wall_ms)
}
