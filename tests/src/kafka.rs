//! Kafka helpers shared by the tests that produce their own topics.

// Test support: failing loudly is the point.
#![allow(clippy::expect_used)]

use std::time::{Duration, SystemTime};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

/// A suffix for topic, table and database names that no other run uses.
pub fn unique_suffix() -> String {
    let n = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}_{:x}", std::process::id(), n % 0xffff_ffff)
}

/// Creates `topic` with `partitions` partitions (replication 1).
pub async fn create_topic(bootstrap: &str, topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
        )
        .await
        .expect("create topics");
    for r in results {
        r.expect("topic created");
    }
}
