//! Crash tests' shared parts: streaming clients that keep sending through gateway kills and
//! record what they received, and the check that what was billed is exactly what they got
//! (whole responses once, with the upstream's usage; cut ones once, for at most what they
//! delivered). The embedded default and Kafka + PostgreSQL run the same clients and the same
//! check; only where the events and the ledger are read differs.

// Test support: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::panic)]

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::RwLock;

use crate::process::GatewayProcess;

/// What one client received from one request.
#[derive(Debug, Clone)]
pub struct Received {
    pub request_id: String,
    pub model: &'static str,
    /// `[DONE]` arrived: the response was received whole, with this usage (prompt, output).
    pub usage: Option<(u64, u64)>,
    /// The output text of every chunk received.
    pub text: String,
}

/// One streamed request; `None` when no response started (the gateway was down).
pub async fn stream_one(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    i: usize,
) -> Option<Received> {
    // Two in three are long streams (40 chunks, 25 ms apart), the rest arrive at once.
    let model = if i.is_multiple_of(3) {
        "mock/fast"
    } else {
        "mock/realistic"
    };
    let mut resp = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": model, "stream": true,
            "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": format!("Story {i}: tell me about the sea.")}]}))
        .send()
        .await
        .ok()?;
    if resp.status() != 200 {
        return None;
    }
    let request_id = resp
        .headers()
        .get("x-request-id")?
        .to_str()
        .ok()?
        .to_string();
    let mut raw = String::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events = crate::harness::sse_events(&raw);
    let mut text = String::new();
    let mut usage = None;
    for (_, data) in &events {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(t) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            text.push_str(t);
        }
        if v["usage"].is_object() {
            let n = |k: &str| v["usage"][k].as_u64().unwrap_or(0);
            usage = Some((n("prompt_tokens"), n("completion_tokens")));
        }
    }
    let whole = events.last().map(|e| e.1.as_str()) == Some("[DONE]");
    Some(Received {
        request_id,
        model,
        usage: if whole { usage } else { None },
        text,
    })
}

/// `n` pauses between 300 ms and 2.8 s (spread over the lives of 1.25 s streams and of the
/// gaps between them), drawn from a seed taken from the clock and printed, so that a failing
/// schedule can be replayed with `TOLLGATE_CHAOS_SEED`.
pub fn kill_schedule(n: usize) -> Vec<Duration> {
    let mut seed = crate::seed("TOLLGATE_CHAOS_SEED");
    (0..n)
        .map(|_| {
            // xorshift64
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            Duration::from_millis(300 + seed % 2500)
        })
        .collect()
}

/// Runs `clients` streaming clients against `gw` while it is SIGKILLed after each of `pauses`
/// and replaced by `restart(round)`; returns everything the clients received, and the gateway
/// left running.
pub async fn clients_through_kills<F, Fut>(
    gw: GatewayProcess,
    key: &str,
    clients: usize,
    pauses: &[Duration],
    mut restart: F,
) -> (Vec<Received>, GatewayProcess)
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = GatewayProcess>,
{
    let base = Arc::new(RwLock::new(gw.base_url.clone()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (base, stop, key) = (base.clone(), stop.clone(), key.to_string());
            tokio::spawn(async move {
                // A bound on each request (streams take about two seconds): a request that
                // hangs ends as a cut stream instead of holding the test forever.
                let client = reqwest::Client::builder()
                    .timeout(Duration::from_secs(60))
                    .build()
                    .unwrap();
                let mut got = Vec::new();
                let mut i = c * 10_000;
                while !stop.load(Ordering::Relaxed) {
                    let url = base.read().await.clone();
                    match stream_one(&client, &url, &key, i).await {
                        Some(r) => got.push(r),
                        None => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                    i += 1;
                }
                got
            })
        })
        .collect();
    let mut gw = gw;
    for (round, pause) in pauses.iter().enumerate() {
        tokio::time::sleep(*pause).await;
        drop(gw); // SIGKILL
        gw = restart(round + 1).await;
        *base.write().await = gw.base_url.clone();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut received = Vec::new();
    for t in tasks {
        received.extend(t.await.unwrap());
    }
    (received, gw)
}

/// What the check found: the billing the clients' records call for.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Billed {
    pub requests: i64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub whole: usize,
    pub recovered: usize,
    /// Cut while their last write waited for the durability barrier (billed in full).
    pub held_at_the_end: usize,
    /// Cut before any event of theirs was durable, with the output tokens they had received.
    pub unbilled: Vec<u64>,
    /// Recovered completions published for requests that have a real one (the scanner
    /// decided before it had read the real one); the pipeline must not bill them.
    pub superseded: usize,
}

/// Checks every client record against the completion events (by request id) and the request
/// events' prompt estimates; returns what the ledger must hold.
pub fn check(
    received: &[Received],
    completions: &HashMap<String, Vec<Value>>,
    estimates: &HashMap<String, u64>,
) -> Billed {
    let mut b = Billed::default();
    for r in received {
        let events = completions.get(&r.request_id).cloned().unwrap_or_default();
        // A real completion wins over a recovered one (the pipeline replaces or drops the
        // recovered one): the ledger must hold the real one only.
        let (recovered, real): (Vec<&Value>, Vec<&Value>) = events
            .iter()
            .partition(|e| e["usage"]["source"] == "recovered");
        let distinct = |v: &[&Value]| {
            v.iter()
                .filter_map(|e| e["event_id"].as_str())
                .collect::<HashSet<&str>>()
                .len()
        };
        let delivered = tollgate_gateway::tokens::count_text(r.model, &r.text);
        if let Some((prompt, completion)) = r.usage {
            // Received whole: billed once, with the upstream's usage.
            assert_eq!(distinct(&real), 1, "{}: {events:?}", r.request_id);
            let e = real[0];
            assert_eq!(e["status"], "completed", "{e}");
            assert_eq!(e["usage"]["input_tokens"].as_u64(), Some(prompt), "{e}");
            assert_eq!(
                e["usage"]["output_tokens"].as_u64(),
                Some(completion),
                "{e}"
            );
            b.superseded += distinct(&recovered);
            b.input_tokens += prompt;
            b.output_tokens += completion;
            b.requests += 1;
            b.whole += 1;
            continue;
        }
        if events.is_empty() {
            // Nothing of it was durable: the gateway died before the request's first output
            // had been written (its request event waits for that).
            b.unbilled.push(delivered);
            continue;
        }
        // Cut by a kill: billed once, for at most what it delivered.
        let e = if real.is_empty() {
            assert_eq!(distinct(&recovered), 1, "{}: {events:?}", r.request_id);
            let e = recovered[0];
            let billed = e["usage"]["output_tokens"].as_u64().unwrap();
            assert!(
                billed <= delivered,
                "{}: billed {billed} output tokens, delivered {delivered}",
                r.request_id
            );
            assert_eq!(
                e["usage"]["input_tokens"].as_u64(),
                estimates.get(&r.request_id).copied(),
                "{e}"
            );
            b.recovered += 1;
            e
        } else {
            // The gateway died after the completion was durable and before the last write
            // (held for it) reached the client: billed as the upstream reported, which
            // covers what was delivered.
            assert_eq!(distinct(&real), 1, "{}: {events:?}", r.request_id);
            let e = real[0];
            assert_eq!(e["status"], "completed", "{e}");
            let billed = e["usage"]["output_tokens"].as_u64().unwrap();
            assert!(
                billed >= delivered,
                "{}: {billed} < {delivered}",
                r.request_id
            );
            b.superseded += distinct(&recovered);
            b.held_at_the_end += 1;
            e
        };
        b.input_tokens += e["usage"]["input_tokens"].as_u64().unwrap();
        b.output_tokens += e["usage"]["output_tokens"].as_u64().unwrap();
        b.requests += 1;
    }
    let cut = received.len() - b.whole;
    assert!(
        b.whole >= 20 && cut >= 5,
        "{} whole, {cut} cut: not the mix this test needs",
        b.whole
    );
    assert!(b.recovered > 0, "no stream was recovered");
    // Request and chunk records wait at most `batch_delay_ms` (5 ms) on the local log, or
    // the producer's linger on Kafka, to be written: a stream cut before any of its records
    // was can have delivered a first chunk at most.
    assert!(
        b.unbilled.iter().all(|n| *n <= 3),
        "unbilled streams delivered {:?} output tokens",
        b.unbilled
    );
    b
}

/// Completion events by request id, and request events' prompt estimates (chunk events are
/// passed over).
pub fn index_events<'a>(
    events: impl IntoIterator<Item = &'a Value>,
) -> (HashMap<String, Vec<Value>>, HashMap<String, u64>) {
    let mut completions = HashMap::<String, Vec<Value>>::new();
    let mut estimates = HashMap::<String, u64>::new();
    for e in events {
        let id = e["request_id"].as_str().unwrap_or_default().to_string();
        // Topic names are the deployment's; the events say what they are.
        if e.get("status").is_some() && e.get("usage").is_some() {
            completions.entry(id).or_default().push(e.clone());
        } else if let Some(n) = e.get("prompt_tokens_estimate").and_then(Value::as_u64) {
            estimates.insert(id, n);
        }
    }
    (completions, estimates)
}
