//! The event sinks: what handing one record over costs the request path, and how many events
//! per second each sink sustains end to end (handed over → acknowledged by Kafka, or committed
//! to the local SQLite log).
//!
//! Run: `cargo bench -p tollgate-gateway --bench events`. The Kafka cases run when
//! `TOLLGATE_KAFKA_BOOTSTRAP` is set (`scripts/services.sh up kafka`); they publish to the
//! topics `tollgate-bench.{requests,chunks,completions}` (created by the broker on first use),
//! not to the real ones. `EVENTS_BENCH_N` sets the events per throughput case (default 300000).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::print_stdout,
    clippy::print_stderr
)] // a benchmark's output is its product

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tollgate_gateway::events::internal_events::EventMetrics;
use tollgate_gateway::events::wire::Record;
use tollgate_gateway::events::{
    EventSink, KafkaConfig, KafkaSink, LocalConfig, LocalSink, LogSink,
};
use tollgate_gateway::relay::{ChunkRecord, StreamInfo};

fn stream(i: u64) -> Arc<StreamInfo> {
    Arc::new(StreamInfo {
        request_id: format!("req_01a21a91{i:024x}"),
        tenant_id: format!("ten_{:08}", i % 50),
        received_at: Instant::now(),
        received_wall: SystemTime::now(),
        upstream_model: "gpt-4o-mini".to_string(),
        client_format: tollgate_gateway::api::WireFormat::OpenAi,
    })
}

/// A typical content chunk as the client receives it (182 bytes).
const CHUNK_EVENT: &[u8] = b"data: {\"id\":\"chatcmpl-9f8e7d6c5b4a\",\"object\":\"chat.completion.chunk\",\"created\":1718000000,\"model\":\"gpt-4o-mini\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" tokens\"}}]}\n\n";

fn chunk(s: &Arc<StreamInfo>, sequence: u64) -> ChunkRecord {
    ChunkRecord {
        stream: s.clone(),
        sequence,
        offset: Duration::from_micros(1200 + sequence * 250),
        bytes: CHUNK_EVENT.len() as u64,
        tokens: None,
        after_completion: false,
        data: bytes::Bytes::from_static(CHUNK_EVENT),
    }
}

/// A durable sink under test: its records queue and its counters.
struct Durable<'a> {
    sink: &'a dyn EventSink,
    queued: &'a dyn Fn() -> usize,
    m: &'a EventMetrics,
}

impl Durable<'_> {
    fn published(&self) -> u64 {
        self.m.published.with_label_values(&["chunks"]).get()
    }

    fn dropped(&self) -> u64 {
        ["handoff_full", "spool_full", "spool_write"]
            .iter()
            .map(|r| self.m.dropped.with_label_values(&[r]).get())
            .sum()
    }

    /// Waits until everything handed over so far is published or dropped.
    fn settle(&self, handed: u64) {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.published() + self.dropped() < handed && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Mean cost of one `record_chunk` call, measured in blocks of 1000 calls, with pauses (not
/// measured) that keep the sink's queue from filling. Returns the records handed over.
fn handoff_cost(label: &str, sink: &dyn EventSink, queued: Option<&dyn Fn() -> usize>) -> u64 {
    let streams: Vec<_> = (0..64).map(stream).collect();
    let mut per_block = Vec::new();
    for block in 0..200u64 {
        let s = &streams[(block % 64) as usize];
        let t = Instant::now();
        for i in 0..1000 {
            sink.record_chunk(chunk(s, i));
        }
        per_block.push(t.elapsed().as_nanos() as f64 / 1000.0);
        if let Some(q) = queued {
            while q() > 10_000 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    per_block.sort_by(f64::total_cmp);
    println!(
        "hand-off cost, {label:<6} record_chunk: median {:>5.0} ns/call, p90 {:>5.0} ns/call",
        per_block[per_block.len() / 2],
        per_block[per_block.len() * 9 / 10]
    );
    200_000
}

/// Hands `n` chunk records over as fast as the sink takes them (never letting its queue
/// overflow) and waits until all are published; prints events/s.
fn throughput(label: &str, d: &Durable<'_>, n: u64, queue_cap: usize) {
    let published0 = d.published();
    let dropped0 = d.dropped();
    let streams: Vec<_> = (0..1000).map(stream).collect();
    let t = Instant::now();
    let mut sent = 0;
    while sent < n {
        while (d.queued)() > queue_cap / 2 {
            std::thread::sleep(Duration::from_micros(200));
        }
        for _ in 0..1000.min(n - sent) {
            let s = &streams[(sent / 25 % 1000) as usize];
            d.sink.record_chunk(chunk(s, sent % 25));
            sent += 1;
        }
    }
    let handed = t.elapsed();
    let deadline = Instant::now() + Duration::from_secs(300);
    while d.published() - published0 + d.dropped() - dropped0 < n {
        if Instant::now() > deadline {
            println!("throughput, {label:<30} gave up after 300 s");
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let total = t.elapsed();
    let lat = d.m.produce_latency.with_label_values(&["chunks"]);
    println!(
        "throughput, {label:<30} {n} events in {:>6.2} s = {:>7.0} events/s (handed over in {:.2} s; mean hand-over→ack {:.1} ms; dropped {})",
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64(),
        handed.as_secs_f64(),
        lat.get_sample_sum() / lat.get_sample_count().max(1) as f64 * 1e3,
        d.dropped() - dropped0,
    );
}

fn main() {
    let n: u64 = std::env::var("EVENTS_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let dir = tempfile::tempdir().unwrap();
    let size = Record::Chunk(chunk(&stream(0), 7))
        .to_wire()
        .unwrap()
        .payload
        .len();
    println!(
        "{} cores; chunk events of {size} bytes of JSON",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );

    handoff_cost("log", &LogSink, None);

    let local_cfg = LocalConfig::default();
    let local = rt
        .block_on(LocalSink::start(&local_cfg, dir.path()))
        .unwrap();
    let queued = || local.queued_events();
    let d = Durable {
        sink: &local,
        queued: &queued,
        m: local.metrics(),
    };
    let handed = handoff_cost("local", &local, Some(&queued));
    d.settle(handed);
    throughput("local (SQLite, WAL)", &d, n, local_cfg.max_queue_events);
    rt.block_on(local.shutdown());

    let Ok(bootstrap) = std::env::var("TOLLGATE_KAFKA_BOOTSTRAP") else {
        println!("Kafka cases skipped: TOLLGATE_KAFKA_BOOTSTRAP is not set");
        return;
    };
    let kafka_cfg = KafkaConfig {
        bootstrap_servers: bootstrap,
        requests_topic: "tollgate-bench.requests".to_string(),
        chunks_topic: "tollgate-bench.chunks".to_string(),
        completions_topic: "tollgate-bench.completions".to_string(),
        ..KafkaConfig::default()
    };
    let kafka = KafkaSink::start(&kafka_cfg, dir.path()).unwrap();
    let queued = || kafka.queued_events();
    let d = Durable {
        sink: &kafka,
        queued: &queued,
        m: kafka.metrics(),
    };
    // Warm up: topic creation and metadata.
    throughput("kafka (warm-up)", &d, 10_000, kafka_cfg.max_queue_events);
    let handed = handoff_cost("kafka", &kafka, Some(&queued));
    d.settle(10_000 + handed);
    throughput(
        "kafka (lz4, acks=all, idempotent)",
        &d,
        n,
        kafka_cfg.max_queue_events,
    );
    rt.block_on(kafka.shutdown());
    let m = kafka.metrics();
    let spooled: u64 = ["queue_full", "behind_spool", "brokers_down", "undelivered"]
        .iter()
        .map(|r| m.spooled.with_label_values(&[r]).get())
        .sum();
    println!("kafka: {spooled} events went through the spool (a healthy broker needs none)");
}
