//! Audit events from Kafka: a consumer in its own group (`<group>-audit`), offsets committed
//! to Kafka synchronously, and only after ClickHouse acknowledged the batch they cover.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Message};

use super::{AuditError, AuditSource};

pub struct KafkaAudit {
    consumer: BaseConsumer,
    /// Messages returned since the last commit.
    pending: bool,
}

impl KafkaAudit {
    /// Joins `group` on `topic` at `bootstrap`; a new group starts at the topic's beginning.
    pub fn open(bootstrap: &str, group: &str, topic: &str) -> Result<KafkaAudit, AuditError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "false")
            .create()?;
        consumer.subscribe(&[topic])?;
        Ok(KafkaAudit {
            consumer,
            pending: false,
        })
    }
}

impl AuditSource for KafkaAudit {
    fn poll(&mut self, max: usize, wait: Duration) -> Result<Vec<Vec<u8>>, AuditError> {
        let mut out = Vec::new();
        let mut timeout = wait;
        while out.len() < max {
            let Some(message) = self.consumer.poll(timeout) else {
                break;
            };
            timeout = Duration::ZERO;
            let m = message?;
            self.pending = true;
            out.push(m.payload().map(<[u8]>::to_vec).unwrap_or_default());
        }
        Ok(out)
    }

    fn commit(&mut self) -> Result<(), AuditError> {
        if !self.pending {
            return Ok(());
        }
        // The consumer's position: after every message `poll` returned.
        self.consumer.commit_consumer_state(CommitMode::Sync)?;
        self.pending = false;
        Ok(())
    }
}

/// Runs the audit consumer over Kafka until `stop` is set.
pub fn run(
    bootstrap: &str,
    group: &str,
    topic: &str,
    options: &super::AuditOptions,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<(), AuditError> {
    let mut source = KafkaAudit::open(bootstrap, group, topic)?;
    super::run(&mut source, options, stop)
}
