//! End to end against a real Kafka broker: thousands of streamed requests from several tenants
//! go through the gateway (Kafka event sink) to the mock upstream, then all three topics are
//! consumed and checked against what the clients received.
//!
//! Needs Kafka: `scripts/services.sh up kafka` and `TOLLGATE_KAFKA_BOOTSTRAP=127.0.0.1:9092`.
//! Without that variable every test here prints why and passes without doing anything, except
//! under CI, where it fails.
//!
//! The fault test stops the broker with `scripts/services.sh down kafka` in the middle of the
//! load and starts it again with `scripts/services.sh up kafka`: a real stop (connections are
//! refused, as when a broker dies), unlike freezing the process, which only looks like a slow
//! network. So it needs a broker that script started.
//!
//! The tests share the broker and run one at a time.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr
)] // test code: failing loudly and printing the numbers is the point

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{json, Value};
use tollgate_tests::harness::{sse_events, Harness};
use tollgate_tests::mock_upstream::MockOptions;

const TOPICS: [&str; 3] = ["llm.requests", "llm.chunks", "llm.completions"];
const TENANTS: usize = 5;
const REQUESTS: usize = 3000;
const CONCURRENCY: usize = 32;

/// The tests share one broker: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn bootstrap() -> Option<String> {
    match std::env::var("TOLLGATE_KAFKA_BOOTSTRAP") {
        Ok(b) if !b.trim().is_empty() => Some(b),
        _ => {
            tollgate_tests::service_missing(
                "kafka_events",
                "TOLLGATE_KAFKA_BOOTSTRAP is not set. These tests need Kafka: run \
                 `scripts/services.sh up kafka` and set TOLLGATE_KAFKA_BOOTSTRAP=127.0.0.1:9092.",
            );
            None
        }
    }
}

fn events_section(bootstrap: &str, spool: &str) -> String {
    format!(
        r#"type = "kafka"
bootstrap_servers = "{bootstrap}"
linger_ms = 5
spool_dir = "{spool}"
shutdown_timeout_ms = 60000
"#
    )
}

/// What one client saw.
#[derive(Debug, Clone)]
struct Seen {
    request_id: String,
    tenant_id: String,
    /// SSE events with data, `[DONE]` included (what the gateway reports as chunks).
    data_events: u64,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    started: Instant,
    ttft: Duration,
    total: Duration,
}

async fn one_request(
    client: &reqwest::Client,
    base: &str,
    tenant: &(String, String),
    i: usize,
) -> Result<Seen, String> {
    let scenario = if i.is_multiple_of(3) {
        "cached"
    } else {
        "normal"
    };
    let body = json!({
        "model": format!("oa/{scenario}"),
        "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": format!("Request {i}: tell me about Paris.")}],
    });
    let started = Instant::now();
    let resp = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&tenant.1)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("request {i}: {e}"))?;
    if resp.status() != 200 {
        let status = resp.status();
        return Err(format!(
            "request {i}: status {status}: {}",
            resp.text().await.unwrap_or_default()
        ));
    }
    let request_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| format!("request {i}: no x-request-id"))?
        .to_string();
    let mut stream = resp.bytes_stream();
    let mut text = Vec::new();
    let mut ttft = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("request {i}: body: {e}"))?;
        ttft.get_or_insert_with(|| started.elapsed());
        text.extend_from_slice(&chunk);
    }
    let total = started.elapsed();
    let text = String::from_utf8(text).map_err(|e| e.to_string())?;
    let events = sse_events(&text);
    if events.last().map(|(_, d)| d.as_str()) != Some("[DONE]") {
        return Err(format!(
            "request {i}: stream did not end with [DONE]: {text}"
        ));
    }
    let usage = events
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
        .ok_or_else(|| format!("request {i}: no usage chunk"))?;
    let n = |p: &str| usage.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    Ok(Seen {
        request_id,
        tenant_id: tenant.0.clone(),
        data_events: events.len() as u64,
        prompt_tokens: n("/prompt_tokens"),
        cached_tokens: n("/prompt_tokens_details/cached_tokens"),
        completion_tokens: n("/completion_tokens"),
        started,
        ttft: ttft.unwrap_or(total),
        total,
    })
}

/// Sends `REQUESTS` requests, `CONCURRENCY` at a time, round-robin over the tenants; with
/// `pace`, request i starts no earlier than i × pace after the first.
async fn run_load(
    h: &Harness,
    tenants: &[(String, String)],
    pace: Option<Duration>,
) -> Vec<Result<Seen, String>> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    let t0 = tokio::time::Instant::now();
    futures_util::stream::iter(0..REQUESTS)
        .map(|i| {
            let client = &client;
            let tenant = &tenants[i % tenants.len()];
            async move {
                if let Some(p) = pace {
                    tokio::time::sleep_until(t0 + p * i as u32).await;
                }
                one_request(client, &h.base_url, tenant, i).await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await
}

async fn tenants(h: &Harness, run: &str) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for t in 0..TENANTS {
        v.push(h.add_tenant(&format!("{run}-tenant-{t}")).await);
    }
    v
}

/// One consumed message.
#[derive(Debug, Clone)]
struct Msg {
    topic: String,
    partition: i32,
    key: String,
    event: Value,
}

impl Msg {
    fn event_id(&self) -> &str {
        self.event["event_id"].as_str().unwrap_or("")
    }
    fn request_id(&self) -> &str {
        self.event["request_id"].as_str().unwrap_or("")
    }
}

/// (topic, partition) → offset.
type Offsets = HashMap<(String, i32), i64>;

fn consumer(bootstrap: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("tollgate-test-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer")
}

/// The current end of every partition of the three topics.
fn high_watermarks(bootstrap: &str) -> Offsets {
    let c = consumer(bootstrap);
    let mut out = HashMap::new();
    for topic in TOPICS {
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(20))
            .expect("metadata");
        let partitions = md.topics()[0].partitions().len() as i32;
        assert!(
            partitions > 0,
            "topic {topic} missing: start Kafka with scripts/services.sh"
        );
        for p in 0..partitions {
            // A partition can be between leaders for a moment (a broker that just started,
            // another client creating topics): that is retried, anything else fails.
            let mut tries = 0;
            let high = loop {
                match c.fetch_watermarks(topic, p, Duration::from_secs(20)) {
                    Ok((_, high)) => break high,
                    Err(e) if tries < 40 && e.to_string().contains("leader") => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(250));
                    }
                    Err(e) => panic!("watermarks: {e}"),
                }
            };
            out.insert((topic.to_string(), p), high);
        }
    }
    out
}

/// Every message between `from` and `to`, per partition in offset order.
fn consume_range(bootstrap: &str, from: &Offsets, to: &Offsets) -> Vec<Msg> {
    let c = consumer(bootstrap);
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    for ((topic, p), start) in from {
        let end = to[&(topic.clone(), *p)];
        if end > *start {
            remaining += end - start;
            tpl.add_partition_offset(topic, *p, Offset::Offset(*start))
                .unwrap();
        }
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::with_capacity(remaining as usize);
    let deadline = Instant::now() + Duration::from_secs(90);
    while remaining > 0 {
        assert!(
            Instant::now() < deadline,
            "consuming: {remaining} messages still missing"
        );
        let Some(m) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        let m = m.expect("consume");
        let end = to[&(m.topic().to_string(), m.partition())];
        if m.offset() >= end {
            continue;
        }
        remaining -= 1;
        out.push(Msg {
            topic: m.topic().to_string(),
            partition: m.partition(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            event: serde_json::from_slice(m.payload().unwrap_or_default()).expect("JSON event"),
        });
    }
    out
}

/// What was found in Kafka for our requests.
#[derive(Debug, Default)]
struct Report {
    messages: usize,
    duplicates: HashMap<String, usize>,
}

/// Checks the consumed messages against what the clients saw.
fn verify(seen: &[Seen], messages: &[Msg]) -> Report {
    let ours: HashMap<&str, &Seen> = seen.iter().map(|s| (s.request_id.as_str(), s)).collect();
    let mut report = Report::default();
    let mut first_seen: HashSet<String> = HashSet::new();
    // Per (topic, partition): event ids of first occurrences must increase (the gateway's
    // ids are monotonic in publish order, so this is publish order, hence tenant order).
    let mut last_id: HashMap<(String, i32), String> = HashMap::new();
    let mut requests: HashMap<String, Vec<Value>> = HashMap::new();
    let mut chunks: HashMap<String, Vec<u64>> = HashMap::new();
    let mut completions: HashMap<String, Vec<Value>> = HashMap::new();
    for m in messages {
        let Some(s) = ours.get(m.request_id()) else {
            continue;
        };
        report.messages += 1;
        assert_eq!(m.key, s.tenant_id, "message key is the tenant id");
        assert_eq!(m.event["tenant_id"], s.tenant_id.as_str());
        assert_eq!(m.event["schema_version"], 1);
        if !first_seen.insert(m.event_id().to_string()) {
            *report.duplicates.entry(m.topic.clone()).or_default() += 1;
            continue;
        }
        let k = (m.topic.clone(), m.partition);
        if let Some(prev) = last_id.get(&k) {
            assert!(
                prev.as_str() < m.event_id(),
                "{}/{}: event {} after {} (publish order broken)",
                m.topic,
                m.partition,
                m.event_id(),
                prev
            );
        }
        last_id.insert(k, m.event_id().to_string());
        let rid = m.request_id().to_string();
        match m.topic.as_str() {
            "llm.requests" => requests.entry(rid).or_default().push(m.event.clone()),
            "llm.chunks" => chunks
                .entry(rid)
                .or_default()
                .push(m.event["sequence"].as_u64().unwrap()),
            "llm.completions" => completions.entry(rid).or_default().push(m.event.clone()),
            other => panic!("unexpected topic {other}"),
        }
    }
    for s in seen {
        let rid = &s.request_id;
        let r = requests.get(rid).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(r.len(), 1, "{rid}: request events {r:?}");
        assert_eq!(r[0]["stream"], true);
        let c = chunks.get(rid).cloned().unwrap_or_default();
        assert_eq!(
            c,
            (0..s.data_events).collect::<Vec<_>>(),
            "{rid}: one chunk event per SSE event the client received, in order"
        );
        let done = completions.get(rid).map(Vec::as_slice).unwrap_or_default();
        assert_eq!(done.len(), 1, "{rid}: completion events {done:?}");
        let d = &done[0];
        assert_eq!(d["status"], "completed", "{d}");
        assert_eq!(d["usage"]["source"], "provider");
        assert_eq!(d["usage"]["input_tokens"], s.prompt_tokens, "{rid}");
        assert_eq!(d["usage"]["cached_input_tokens"], s.cached_tokens, "{rid}");
        assert_eq!(d["usage"]["output_tokens"], s.completion_tokens, "{rid}");
        assert_eq!(d["chunks"].as_u64(), Some(s.data_events), "{rid}");
    }
    report
}

fn events_metrics(h: &Harness) -> String {
    h.state
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("tollgate_events_") && !l.contains("_bucket"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn metric(h: &Harness, name_and_labels: &str) -> f64 {
    h.state
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(name_and_labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn percentiles(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "-".to_string();
    }
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    format!(
        "p50 {:.1} ms, p99 {:.1} ms (n={})",
        p(0.5),
        p(0.99),
        v.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_every_request_chunk_and_completion_is_published_exactly_once() {
    let Some(bootstrap) = bootstrap() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let spool = tempfile::tempdir().unwrap();
    let h = Harness::start_with_events(
        MockOptions::default(),
        "",
        &events_section(&bootstrap, &spool.path().display().to_string()),
    )
    .await;
    let tenants = tenants(&h, "happy").await;
    let from = tokio::task::spawn_blocking({
        let b = bootstrap.clone();
        move || high_watermarks(&b)
    })
    .await
    .unwrap();

    let t = Instant::now();
    let results = run_load(&h, &tenants, None).await;
    let load_s = t.elapsed().as_secs_f64();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        errors.is_empty(),
        "{} client errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let seen: Vec<Seen> = results.into_iter().map(Result::unwrap).collect();

    let t = Instant::now();
    h.events.shutdown().await;
    let flush_ms = t.elapsed().as_millis();
    let messages = tokio::task::spawn_blocking({
        let b = bootstrap.clone();
        move || {
            let to = high_watermarks(&b);
            consume_range(&b, &from, &to)
        }
    })
    .await
    .unwrap();
    let report = verify(&seen, &messages);
    let chunks: u64 = seen.iter().map(|s| s.data_events).sum();
    println!(
        "{REQUESTS} requests ({TENANTS} tenants, concurrency {CONCURRENCY}) in {load_s:.1} s; \
         {} events in Kafka ({chunks} chunk events); flush at shutdown {flush_ms} ms; \
         duplicates {:?}\n{}",
        report.messages,
        report.duplicates,
        events_metrics(&h)
    );
    assert_eq!(report.messages as u64, 2 * REQUESTS as u64 + chunks);
    assert!(
        report.duplicates.is_empty(),
        "the idempotent producer sends no duplicates when Kafka is healthy: {:?}",
        report.duplicates
    );
    assert_eq!(metric(&h, "tollgate_events_dropped_total"), 0.0);
    assert_eq!(metric(&h, "tollgate_events_spool_events"), 0.0);
}

/// Restarts the broker if a test stopped it and did not get to start it again.
struct BrokerGuard {
    stopped: bool,
}

fn services(args: &[&str]) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("services.sh");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .expect("run scripts/services.sh");
    assert!(
        out.status.success(),
        "scripts/services.sh {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn broker_answers(bootstrap: &str) -> bool {
    bootstrap.split(',').any(|addr| {
        addr.trim()
            .parse()
            .ok()
            .and_then(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).ok())
            .is_some()
    })
}

impl Drop for BrokerGuard {
    fn drop(&mut self) {
        if self.stopped {
            services(&["up", "kafka"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_broker_stopped_mid_load_loses_nothing_and_clients_see_no_errors() {
    let Some(bootstrap) = bootstrap() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let spool = tempfile::tempdir().unwrap();
    let h = Arc::new(
        Harness::start_with_events(
            MockOptions {
                chunk_delay: Duration::from_millis(1),
                ..MockOptions::default()
            },
            "",
            &events_section(&bootstrap, &spool.path().display().to_string()),
        )
        .await,
    );
    let tenants = tenants(&h, "fault").await;
    let from = tokio::task::spawn_blocking({
        let b = bootstrap.clone();
        move || high_watermarks(&b)
    })
    .await
    .unwrap();

    // 3000 requests paced over ~21 s; the broker is down from ~3 s until it answers again.
    let load = tokio::spawn({
        let h = h.clone();
        let tenants = tenants.clone();
        async move { run_load(&h, &tenants, Some(Duration::from_millis(7))).await }
    });
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut guard = BrokerGuard { stopped: true };
    let down_at = Instant::now();
    tokio::task::spawn_blocking(|| services(&["down", "kafka"]))
        .await
        .unwrap();
    let b = bootstrap.clone();
    let still_up = tokio::task::spawn_blocking(move || broker_answers(&b))
        .await
        .unwrap();
    assert!(
        !still_up,
        "the broker still answers after `scripts/services.sh down kafka`: this test needs a broker started by that script"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restart_at = Instant::now();
    tokio::task::spawn_blocking(|| services(&["up", "kafka"]))
        .await
        .unwrap();
    guard.stopped = false;
    let up_at = Instant::now();
    println!(
        "broker down from {:.1} s, restarted from {:.1} s, answering at {:.1} s after the load started",
        (down_at - t0).as_secs_f64(),
        (restart_at - t0).as_secs_f64(),
        (up_at - t0).as_secs_f64()
    );

    let results = load.await.unwrap();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        errors.is_empty(),
        "{} client errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let seen: Vec<Seen> = results.into_iter().map(Result::unwrap).collect();
    let load_s = t0.elapsed().as_secs_f64();

    let t = Instant::now();
    h.events.shutdown().await;
    let flush_ms = t.elapsed().as_millis();
    let metrics = events_metrics(&h);
    let messages = tokio::task::spawn_blocking({
        let b = bootstrap.clone();
        move || {
            let to = high_watermarks(&b);
            consume_range(&b, &from, &to)
        }
    })
    .await
    .unwrap();
    // Kafka answers again before the shutdown: it delivers the spool rather than leaving it
    // for the next run.
    assert_eq!(metric(&h, "tollgate_events_spool_events"), 0.0, "{metrics}");
    assert_eq!(
        metric(&h, "tollgate_events_dropped_total"),
        0.0,
        "{metrics}"
    );
    let report = verify(&seen, &messages);
    let chunks: u64 = seen.iter().map(|s| s.data_events).sum();

    // Phases: before the outage; broker down; broker restarting (its JVM competes for the
    // same cores); after.
    let phase = |s: &Seen| {
        if s.started < down_at {
            0
        } else if s.started < restart_at {
            1
        } else if s.started < up_at {
            2
        } else {
            3
        }
    };
    let mut ttft: [Vec<Duration>; 4] = Default::default();
    let mut total: [Vec<Duration>; 4] = Default::default();
    for s in &seen {
        ttft[phase(s)].push(s.ttft);
        total[phase(s)].push(s.total);
    }
    println!(
        "{REQUESTS} requests in {load_s:.1} s, 0 client errors; shutdown flush {flush_ms} ms\n\
         client latency before the outage:      TTFT {}, total {}\n\
         client latency while the broker is down: TTFT {}, total {}\n\
         client latency while it restarts:       TTFT {}, total {}\n\
         client latency after the outage:       TTFT {}, total {}\n\
         {} events in Kafka for these requests ({chunks} chunk events), none missing, per-partition order kept; \
         duplicates (same event_id) by topic: {:?}\n{metrics}",
        percentiles(ttft[0].clone()),
        percentiles(total[0].clone()),
        percentiles(ttft[1].clone()),
        percentiles(total[1].clone()),
        percentiles(ttft[2].clone()),
        percentiles(total[2].clone()),
        percentiles(ttft[3].clone()),
        percentiles(total[3].clone()),
        report.messages - report.duplicates.values().sum::<usize>(),
        report.duplicates,
    );
    assert_eq!(
        (report.messages - report.duplicates.values().sum::<usize>()) as u64,
        2 * REQUESTS as u64 + chunks
    );
    assert!(
        metric(&h, "tollgate_events_spooled_total") > 0.0,
        "the outage was not noticed: nothing was spooled"
    );
}

/// One streamed request to the real binary: its request id and the usage the client saw, or
/// `None` if the response did not end with `[DONE]`.
async fn stream_to_the_end(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    i: usize,
) -> (String, Option<(u64, u64)>) {
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({
            "model": "mock/fast",
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": 4 + i % 9,
            "messages": [{"role": "user", "content": format!("Request {i}: tell me about Paris.")}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let text = r.text().await.unwrap();
    let events = sse_events(&text);
    if events.last().map(|e| e.1.as_str()) != Some("[DONE]") {
        return (id, None);
    }
    let usage = events
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .find(|v| v["usage"].is_object())
        .map(|v| {
            let n = |k: &str| v["usage"][k].as_u64().unwrap_or(0);
            (n("prompt_tokens"), n("completion_tokens"))
        });
    (id, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_a_gateway_killed_the_moment_its_streams_ended_has_published_every_completion() {
    use tollgate_tests::process::{tollgate, GatewayProcess};
    let Some(bootstrap) = bootstrap() else {
        return;
    };
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = tollgate(args, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let name = format!("killed-{}-{nanos}", std::process::id());
    let tenant = run(&["--data-dir", &data, "tenants", "create", &name]);
    let key = run(&["--data-dir", &data, "keys", "create", "--tenant", &tenant]);
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[events]\n{}",
            events_section(&bootstrap, &dir.path().join("spool").display().to_string())
        ),
    )
    .unwrap();
    let from = tokio::task::spawn_blocking({
        let b = bootstrap.clone();
        move || high_watermarks(&b)
    })
    .await
    .unwrap();

    let client = reqwest::Client::new();
    let mut received: HashMap<String, (u64, u64)> = HashMap::new();
    for round in 0..5 {
        let mut gw = GatewayProcess::start(
            &["--data-dir", &data],
            &[("TOLLGATE_CONFIG", config.to_str().unwrap())],
            dir.path().join(format!("gw{round}.log")),
        )
        .await;
        let results = futures_util::future::join_all(
            (0..24).map(|i| stream_to_the_end(&client, &gw.base_url, &key, round * 100 + i)),
        )
        .await;
        // SIGKILL the moment the last client has read its `[DONE]`.
        gw.child.kill().unwrap();
        let _ = gw.child.wait();
        for (id, usage) in results {
            received.insert(id, usage.expect("every stream ends with [DONE] and usage"));
        }
    }
    let messages = tokio::task::spawn_blocking({
        let b = bootstrap.clone();
        move || {
            let to = high_watermarks(&b);
            consume_range(&b, &from, &to)
        }
    })
    .await
    .unwrap();
    let mut published: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for m in messages.iter().filter(|m| m.topic == "llm.completions") {
        if m.event["tenant_id"] != tenant.as_str() {
            continue;
        }
        let u = &m.event["usage"];
        published
            .entry(m.event["request_id"].as_str().unwrap().to_string())
            .or_default()
            .push((
                u["input_tokens"].as_u64().unwrap(),
                u["output_tokens"].as_u64().unwrap(),
            ));
    }
    let missing: Vec<&String> = received
        .keys()
        .filter(|id| !published.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} completed responses have no completion event in Kafka: {:?}",
        missing.len(),
        received.len(),
        &missing[..missing.len().min(5)]
    );
    for (id, usage) in &received {
        let events = &published[id];
        assert_eq!(events.len(), 1, "{id}: {events:?}");
        assert_eq!(
            events[0], *usage,
            "{id}: billed usage differs from what the client saw"
        );
    }
    assert_eq!(received.len(), 120);
}
