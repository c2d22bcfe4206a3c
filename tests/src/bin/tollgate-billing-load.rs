//! `tollgate-billing-load`: load for the billing pipeline, through Kafka.
//!
//! * `backlog`: creates the topic if it is missing and produces N synthetic completion events
//!   as fast as the producer takes them (key = tenant id, message timestamp = event time),
//!   then prints the produce rate. With `--events 0` it only creates the topic.
//! * `steady`: produces R events per second for S seconds (event time = now) for many
//!   tenants, plus one event every 50 ms for the probe tenant `ten_probe`, and polls that
//!   tenant's balance in Redis every 2 ms. Each time the balance's `requests` reaches k, the
//!   freshness of the k-th probe event is now − its event time. Prints the freshness
//!   percentiles and the rate achieved. The pipeline runs separately
//!   (`scripts/bench-pipeline.sh` starts it).
//! * `delete-topic`: removes a topic (clean-up after a benchmark).
//!
//! The events are those of `tollgate_pipeline::testkit::Synthetic`; the producer is set up as
//! the gateway's Kafka event sink is (idempotent, acks=all, lz4, murmur2 partitioner,
//! linger 20 ms by default).

// A command-line tool: printing its results and errors is what it is for.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use clap::{Args as ClapArgs, Parser, Subcommand};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, ClientContext};
use tollgate_pipeline::fact::billing_period;
use tollgate_pipeline::sink::redis::RedisBalances;
use tollgate_pipeline::sink::BalanceStore;
use tollgate_pipeline::testkit::{Rng, Synthetic};

/// The tenant whose balance `steady` watches.
const PROBE_TENANT: &str = "ten_probe";
const PROBE_MODEL: &str = "model-0";
/// The currency of the probe's balance (unpriced completions are counted in USD).
const PROBE_CURRENCY: &str = "USD";

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Load for the billing pipeline: a Kafka backlog, or a steady rate with balance freshness.
#[derive(Debug, Parser)]
#[command(name = "tollgate-billing-load", version)]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Create the topic if missing and produce N events as fast as possible.
    Backlog(BacklogArgs),
    /// Produce at a fixed rate and measure how fresh a probe tenant's Redis balance is.
    Steady(SteadyArgs),
    /// Delete a topic.
    DeleteTopic(KafkaArgs),
}

#[derive(Debug, Clone, ClapArgs)]
struct KafkaArgs {
    /// The completions topic to write to.
    #[arg(long)]
    topic: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:9092")]
    bootstrap: String,
}

#[derive(Debug, Clone, ClapArgs)]
struct ProduceArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// Partitions of the topic when this tool creates it.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Tenants the events are spread over (`ten_0` ...).
    #[arg(long, default_value_t = 200)]
    tenants: u64,
    /// Models the events are spread over (`model-0` ...).
    #[arg(long, default_value_t = 20)]
    models: u64,
    /// The producer's `linger.ms` (the gateway's default is 20).
    #[arg(long, default_value_t = 20)]
    linger_ms: u64,
    /// Seed of the synthetic events.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, ClapArgs)]
struct BacklogArgs {
    #[command(flatten)]
    produce: ProduceArgs,
    /// Events to produce (0: only create the topic).
    #[arg(long)]
    events: u64,
    /// Event times are spread evenly over this many seconds, ending now.
    #[arg(long, default_value_t = 600)]
    span_seconds: u64,
}

#[derive(Debug, ClapArgs)]
struct SteadyArgs {
    #[command(flatten)]
    produce: ProduceArgs,
    /// Events per second (probe events not included).
    #[arg(long)]
    rate: f64,
    /// How long to produce.
    #[arg(long)]
    seconds: f64,
    /// Probe events sent in the first this-many seconds are not measured (the pipeline may
    /// still be starting).
    #[arg(long, default_value_t = 2.0)]
    warmup_seconds: f64,
    /// One probe event every this many milliseconds.
    #[arg(long, default_value_t = 50)]
    probe_interval_ms: u64,
    /// How often the probe's balance is read.
    #[arg(long, default_value_t = 2)]
    poll_ms: u64,
    /// After producing, how long to wait for the last probes to reach the balance.
    #[arg(long, default_value_t = 30.0)]
    drain_seconds: f64,
    /// Redis holding the balances.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis: String,
    /// The pipeline's `--redis-prefix`.
    #[arg(long, default_value = "tollgate:")]
    redis_prefix: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = match args.mode {
        Mode::Backlog(a) => backlog(&a),
        Mode::Steady(a) => steady(&a),
        Mode::DeleteTopic(a) => delete_topic(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tollgate-billing-load: {e}");
            ExitCode::FAILURE
        }
    }
}

fn now_ms() -> i64 {
    tollgate_schemas::events::unix_ms(SystemTime::now())
}

/// Microseconds since the Unix epoch.
fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

// ------------------------------------------------------------------------------- Kafka

/// Counts delivery reports, so that a run whose events did not all arrive says so.
#[derive(Default)]
struct Deliveries {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _opaque: ()) {
        match result {
            Ok(_) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Err((e, _)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                self.first_error.lock().get_or_insert_with(|| e.to_string());
            }
        }
    }
}

type Kafka = BaseProducer<Deliveries>;

fn producer(a: &ProduceArgs) -> Result<Kafka, Error> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &a.kafka.bootstrap)
        .set("client.id", "tollgate-billing-load")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", a.linger_ms.to_string())
        .set("compression.codec", "lz4")
        .set("partitioner", "murmur2_random")
        .set("queue.buffering.max.messages", "1000000")
        .create_with_context(Deliveries::default())?)
}

/// Hands one record to the producer, waiting while its queue is full.
fn send(p: &Kafka, topic: &str, key: &str, ts: i64, payload: &[u8]) -> Result<(), Error> {
    let mut record = BaseRecord::to(topic)
        .key(key)
        .payload(payload)
        .timestamp(ts);
    loop {
        match p.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                p.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// Flushes and checks that every event was acknowledged.
fn finish(p: &Kafka, expected: u64) -> Result<(), Error> {
    p.flush(Duration::from_secs(120))?;
    let ctx = p.context();
    let ok = ctx.ok.load(Ordering::Relaxed);
    let failed = ctx.failed.load(Ordering::Relaxed);
    if failed > 0 || ok != expected {
        let first = ctx.first_error.lock().clone().unwrap_or_default();
        return Err(format!(
            "{ok} of {expected} events acknowledged, {failed} failed (first error: {first})"
        )
        .into());
    }
    Ok(())
}

fn admin(bootstrap: &str) -> Result<AdminClient<DefaultClientContext>, Error> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?)
}

/// Creates `topic` unless it exists, then waits until its partitions are visible.
fn ensure_topic(a: &ProduceArgs, p: &Kafka) -> Result<usize, Error> {
    let k = &a.kafka;
    let admin = admin(&k.bootstrap)?;
    let results = runtime()?.block_on(admin.create_topics(
        &[NewTopic::new(
            &k.topic,
            a.partitions,
            TopicReplication::Fixed(1),
        )],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
    ))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(format!("creating topic {name}: {code}").into()),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metadata = p
            .client()
            .fetch_metadata(Some(&k.topic), Duration::from_secs(10))?;
        let partitions = metadata
            .topics()
            .iter()
            .find(|t| t.name() == k.topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if partitions > 0 {
            return Ok(partitions);
        }
        if Instant::now() >= deadline {
            return Err(format!("topic {} has no partitions after 30 s", k.topic).into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn delete_topic(k: &KafkaArgs) -> Result<(), Error> {
    let admin = admin(&k.bootstrap)?;
    let results = runtime()?.block_on(admin.delete_topics(
        &[k.topic.as_str()],
        &AdminOptions::new().operation_timeout(Some(Duration::from_secs(20))),
    ))?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
            Err((name, code)) => return Err(format!("deleting topic {name}: {code}").into()),
        }
    }
    Ok(())
}

// ------------------------------------------------------------------------------- backlog

fn backlog(a: &BacklogArgs) -> Result<(), Error> {
    let pa = &a.produce;
    let p = producer(pa)?;
    let partitions = ensure_topic(pa, &p)?;
    if a.events == 0 {
        println!(
            "backlog: topic {} ready ({partitions} partitions)",
            pa.kafka.topic
        );
        return Ok(());
    }
    let mut rng = Rng::new(pa.seed);
    let span_ms = i64::try_from(a.span_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
    let n = i64::try_from(a.events).unwrap_or(i64::MAX);
    let start_ms = now_ms() - span_ms;
    let started = Instant::now();
    let mut bytes = 0u64;
    for i in 0..n {
        let at = start_ms + i.saturating_mul(span_ms) / n;
        let s = Synthetic::random(&mut rng, pa.tenants, pa.models, at);
        let payload = s.payload();
        bytes += payload.len() as u64;
        send(&p, &pa.kafka.topic, &s.tenant_id, at, &payload)?;
        p.poll(Duration::ZERO);
    }
    let handed = started.elapsed().as_secs_f64();
    finish(&p, a.events)?;
    let total = started.elapsed().as_secs_f64();
    println!(
        "backlog: produced {} events to {} ({partitions} partitions) in {total:.2} s: {:.0} events/s \
         acknowledged ({:.0} events/s handed to the producer; mean payload {} bytes)",
        a.events,
        pa.kafka.topic,
        a.events as f64 / total.max(1e-9),
        a.events as f64 / handed.max(1e-9),
        bytes / a.events,
    );
    Ok(())
}

// ------------------------------------------------------------------------------- steady

/// The probe events sent so far: event time (ms) and whether the probe is measured.
type Probes = Arc<Mutex<Vec<(i64, bool)>>>;

/// What the balance watcher saw.
struct Watched {
    /// Freshness of the measured probes, µs.
    freshness: Histogram<u64>,
    /// Probe events that reached the balance.
    seen: usize,
    /// Redis reads that failed.
    errors: u64,
}

/// Polls the probe's balance until `stop` is set and every sent probe was seen, or until
/// `drain` has passed after `stop`. Sends the starting `requests` count on `ready` first.
fn watch(
    a: &SteadyArgs,
    probes: Probes,
    stop: Arc<AtomicBool>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) -> Result<Watched, Error> {
    let rt = runtime()?;
    rt.block_on(async move {
        let store = match RedisBalances::connect(&a.redis, &a.redis_prefix).await {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(format!("redis {}: {e}", a.redis)));
                return Err(e.into());
            }
        };
        let balance = |store: RedisBalances| async move {
            store
                .get(PROBE_TENANT, &billing_period(now_ms()), PROBE_CURRENCY)
                .await
                .map(|b| b.map_or(0, |b| b.requests))
        };
        // A balance left from an earlier run counts from where it stands.
        let baseline = match balance(store.clone()).await {
            Ok(v) => v,
            Err(e) => {
                let _ = ready.send(Err(format!("redis {}: {e}", a.redis)));
                return Err(e.into());
            }
        };
        let _ = ready.send(Ok(()));
        let mut watched = Watched {
            freshness: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
            seen: 0,
            errors: 0,
        };
        let poll = Duration::from_millis(a.poll_ms.max(1));
        let mut stopped_at: Option<Instant> = None;
        loop {
            match balance(store.clone()).await {
                Ok(requests) => {
                    let now = now_us();
                    let k = usize::try_from(requests - baseline).unwrap_or(0);
                    let sent = probes.lock();
                    while watched.seen < k.min(sent.len()) {
                        let (event_ms, measured) = sent[watched.seen];
                        if measured {
                            let age = (now - event_ms * 1000).max(1);
                            watched
                                .freshness
                                .saturating_record(u64::try_from(age).unwrap_or(1));
                        }
                        watched.seen += 1;
                    }
                }
                Err(e) => {
                    if watched.errors == 0 {
                        eprintln!("steady: reading the probe balance: {e}");
                    }
                    watched.errors += 1;
                }
            }
            if stop.load(Ordering::Acquire) {
                let at = *stopped_at.get_or_insert_with(Instant::now);
                let all = watched.seen >= probes.lock().len();
                if all || at.elapsed().as_secs_f64() >= a.drain_seconds {
                    return Ok(watched);
                }
            }
            tokio::time::sleep(poll).await;
        }
    })
}

fn steady(a: &SteadyArgs) -> Result<(), Error> {
    let pa = &a.produce;
    if !(a.rate > 0.0 && a.seconds > 0.0) {
        return Err("--rate and --seconds must be above 0".into());
    }
    let p = producer(pa)?;
    ensure_topic(pa, &p)?;

    let probes: Probes = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let watcher = std::thread::scope(|scope| -> Result<(Watched, u64, u64, f64), Error> {
        let handle = {
            let probes = Arc::clone(&probes);
            let stop = Arc::clone(&stop);
            scope.spawn(move || watch(a, probes, stop, ready_tx))
        };
        let produced = match ready_rx.recv() {
            Ok(Ok(())) => produce_steady(a, &p, &probes),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err("the balance watcher stopped before it was ready".into()),
        };
        stop.store(true, Ordering::Release);
        let watched = handle
            .join()
            .map_err(|_| "the balance watcher panicked")??;
        let (events, sent_probes, elapsed) = produced?;
        Ok((watched, events, sent_probes, elapsed))
    });
    let (watched, events, sent_probes, elapsed) = watcher?;

    let measured = probes.lock().iter().filter(|(_, m)| *m).count();
    let h = &watched.freshness;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "steady: target {:.0} events/s for {:.0} s, achieved {:.0} events/s ({events} events + \
         {sent_probes} probes in {elapsed:.1} s, all acknowledged)",
        a.rate,
        a.seconds,
        (events + sent_probes) as f64 / elapsed.max(1e-9),
    );
    if h.is_empty() {
        return Err(format!(
            "no measured probe reached the balance of {PROBE_TENANT} ({} of {sent_probes} \
             probes seen; is the pipeline running with --redis-prefix {}?)",
            watched.seen, a.redis_prefix
        )
        .into());
    }
    println!(
        "freshness: p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms over {} probes \
         (1 per {} ms after a {:.0} s warm-up; Redis polled every {} ms); not seen: {}; \
         Redis errors: {}",
        ms(0.50),
        ms(0.90),
        ms(0.99),
        h.max() as f64 / 1000.0,
        h.len(),
        a.probe_interval_ms,
        a.warmup_seconds,
        a.poll_ms,
        sent_probes.saturating_sub(watched.seen as u64),
        watched.errors,
    );
    if (h.len() as usize) < measured {
        return Err(format!(
            "only {} of {measured} measured probes reached the balance within {:.0} s",
            h.len(),
            a.drain_seconds
        )
        .into());
    }
    Ok(())
}

/// Produces at `a.rate` for `a.seconds`, with a probe every `a.probe_interval_ms`; returns
/// (events, probes, seconds taken), after every event was acknowledged.
fn produce_steady(a: &SteadyArgs, p: &Kafka, probes: &Probes) -> Result<(u64, u64, f64), Error> {
    let pa = &a.produce;
    let topic = &pa.kafka.topic;
    let mut rng = Rng::new(pa.seed);
    let mut probe_rng = Rng::new(pa.seed.wrapping_add(1));
    let interval = Duration::from_millis(a.probe_interval_ms.max(1));
    let started = Instant::now();
    let end = started + Duration::from_secs_f64(a.seconds);
    let warmup_end = started + Duration::from_secs_f64(a.warmup_seconds.max(0.0));
    let mut events = 0u64;
    let mut sent_probes = 0u64;
    let mut next_probe = started;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = (now - started).as_secs_f64() * a.rate;
        while (events as f64) < due {
            let at = now_ms();
            let s = Synthetic::random(&mut rng, pa.tenants, pa.models, at);
            send(p, topic, &s.tenant_id, at, &s.payload())?;
            events += 1;
        }
        if now >= next_probe {
            let at = now_ms();
            let mut s = Synthetic::random(&mut probe_rng, 1, 1, at);
            s.tenant_id = PROBE_TENANT.to_string();
            s.model = PROBE_MODEL.to_string();
            // Recorded before it is sent: the watcher may see it committed right after.
            probes.lock().push((at, now >= warmup_end));
            send(p, topic, PROBE_TENANT, at, &s.payload())?;
            sent_probes += 1;
            next_probe += interval;
        }
        p.poll(Duration::ZERO);
        std::thread::sleep(Duration::from_millis(1));
    }
    let elapsed = started.elapsed().as_secs_f64();
    finish(p, events + sent_probes)?;
    Ok((events, sent_probes, elapsed))
}
