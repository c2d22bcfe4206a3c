//! No usage lost when a gateway dies: the real `tollgate` binary in the embedded default,
//! SIGKILLed in the middle of a stream, so that the stream never gets its completion event.
//! After a restart, the recovery scanner publishes a recovered completion once the request
//! has been silent for `billing.orphan_timeout_ms`, and the embedded pipeline bills it: the
//! prompt estimate of its request event and the output tokens of its last chunk event, at the
//! exact price, once.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)] // test code: failing loudly is the point

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};
use tollgate_tests::harness::read_events;
use tollgate_tests::process::{tollgate_ok, GatewayProcess};

const INPUT_PER_MTOK: &str = "1.234567";
const OUTPUT_PER_MTOK: &str = "9.87654321";
const ENV: [(&str, &str); 1] = [("TOLLGATE__BILLING__ORPHAN_TIMEOUT_MS", "1000")];

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// The test's price for `model`, in force since 2020.
fn set_price(data: &str, model: &str) {
    tollgate_ok(&[
        "--data-dir",
        data,
        "prices",
        "set",
        "--model",
        model,
        "--input",
        INPUT_PER_MTOK,
        "--cached-input",
        "0",
        "--output",
        OUTPUT_PER_MTOK,
        "--effective-from",
        "2020-01-01T00:00:00Z",
    ]);
}

/// A tenant, its key, and a price for the streaming mock model; returns the key.
fn provision(data_dir: &Path, model: &str) -> String {
    let data = data_dir.to_str().unwrap();
    let tenant = tollgate_ok(&["--data-dir", data, "tenants", "create", "acme"]);
    let key = tollgate_ok(&["--data-dir", data, "keys", "create", "--tenant", &tenant]);
    set_price(data, model);
    key
}

async fn events(data_dir: &Path) -> Vec<(String, Value)> {
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}?mode=ro",
        data_dir.join("events.sqlite").display()
    ))
    .await
    .unwrap();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT topic, payload FROM event_log ORDER BY log_offset")
            .fetch_all(&pool)
            .await
            .unwrap();
    pool.close().await;
    rows.into_iter()
        .map(|(t, p)| (t, serde_json::from_str(&p).unwrap()))
        .collect()
}

async fn usage(base: &str, key: &str) -> Value {
    let r = reqwest::Client::new()
        .get(format!("{base}/v1/usage"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn a_stream_cut_by_a_killed_gateway_is_billed_from_its_request_and_chunks() {
    let dir = tempfile::tempdir().unwrap();
    // mock/realistic streams 40 chunks 25 ms apart; its completions carry this upstream model.
    let key = provision(dir.path(), "mock/realistic");
    let data = dir.path().to_str().unwrap();
    let gw = GatewayProcess::start(&["--data-dir", data], &ENV, dir.path().join("gw1.log")).await;
    let mut resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base_url))
        .bearer_auth(&key)
        .json(&json!({"model": "mock/realistic", "stream": true,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    read_events(&mut resp, 8).await;
    // Killed once some chunk events with their token counts are in the log.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counted = events(dir.path())
            .await
            .iter()
            .filter(|(t, e)| t == "llm.chunks" && e["tokens"].as_u64().is_some_and(|n| n > 0))
            .count();
        if counted >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "no chunk events in the log");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(gw); // SIGKILL
    drop(resp);

    let logged = events(dir.path()).await;
    assert!(
        logged.iter().all(|(t, _)| t != "llm.completions"),
        "the killed gateway wrote no completion"
    );
    let request = &logged
        .iter()
        .find(|(t, _)| t == "llm.requests")
        .expect("the request event")
        .1;
    let input = request["prompt_tokens_estimate"].as_u64().unwrap();
    let output = logged
        .iter()
        .filter(|(t, _)| t == "llm.chunks")
        .filter_map(|(_, e)| e["tokens"].as_u64())
        .max()
        .unwrap();
    assert!(input > 0 && output > 0);
    let want_cost = (Decimal::from(input) * dec(INPUT_PER_MTOK)
        + Decimal::from(output) * dec(OUTPUT_PER_MTOK))
        / Decimal::from(1_000_000);

    // The restarted gateway recovers it after the orphan timeout (1 s) and bills it.
    let gw = GatewayProcess::start(&["--data-dir", data], &ENV, dir.path().join("gw2.log")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let v = loop {
        let v = usage(&gw.base_url, &key).await;
        if v["total"]["requests"].as_i64() >= Some(1) {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "not billed in 30 s: {v}\n{}",
            gw.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // A few more checks of the scanner and epochs change nothing.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let v2 = usage(&gw.base_url, &key).await;
    assert_eq!(v["total"], v2["total"], "billed once");
    let total = &v2["total"];
    assert_eq!(total["requests"].as_i64(), Some(1), "{v2}");
    assert_eq!(total["input_tokens"].as_u64(), Some(input), "{v2}");
    assert_eq!(total["output_tokens"].as_u64(), Some(output), "{v2}");
    assert_eq!(dec(total["cost"].as_str().unwrap()), want_cost, "{v2}");

    let recovered: Vec<Value> = events(dir.path())
        .await
        .into_iter()
        .filter(|(t, _)| t == "llm.completions")
        .map(|(_, e)| e)
        .collect();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    let c = &recovered[0];
    assert_eq!(c["status"], "gateway_lost", "{c}");
    assert_eq!(c["usage"]["source"], "recovered", "{c}");
    assert_eq!(c["request_id"], request["request_id"], "{c}");
    let metrics = reqwest::get(format!("{}/metrics", gw.base_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_billing_recovered_total 1"),
        "{metrics}"
    );
    assert!(
        gw.log_text()
            .contains("recovered the completion of a request its gateway lost"),
        "{}",
        gw.log_text()
    );
}

/// What one client received from one request.
#[derive(Debug, Clone)]
struct Received {
    request_id: String,
    model: &'static str,
    /// `[DONE]` arrived: the response was received whole, with this usage (prompt, output).
    usage: Option<(u64, u64)>,
    /// The output text of every chunk received.
    text: String,
}

/// One streamed request; `None` when no response started (the gateway was down).
async fn stream_one(client: &reqwest::Client, base: &str, key: &str, i: usize) -> Option<Received> {
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
    let request_id = resp.headers()["x-request-id"].to_str().ok()?.to_string();
    let mut raw = String::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        raw.push_str(&String::from_utf8_lossy(&chunk));
    }
    let events = tollgate_tests::harness::sse_events(&raw);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_clients_through_five_kills_are_each_billed_once_for_what_they_received() {
    use std::sync::Arc;
    use tokio::sync::RwLock;

    let dir = tempfile::tempdir().unwrap();
    let key = provision(dir.path(), "mock/realistic");
    let data = dir.path().to_str().unwrap().to_string();
    set_price(&data, "mock/fast");
    let env = [("TOLLGATE__BILLING__ORPHAN_TIMEOUT_MS", "1500")];
    let gw = GatewayProcess::start(&["--data-dir", &data], &env, dir.path().join("gw0.log")).await;
    let base = Arc::new(RwLock::new(gw.base_url.clone()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..32)
        .map(|c| {
            let (base, stop, key) = (base.clone(), stop.clone(), key.clone());
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut got = Vec::new();
                let mut i = c * 10_000;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
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

    // Five SIGKILLs at moments spread over the streams' lives, each followed by a restart.
    let mut gw = gw;
    for (round, pause_ms) in [700u64, 1900, 450, 1300, 2600].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
        drop(gw);
        gw = GatewayProcess::start(
            &["--data-dir", &data],
            &env,
            dir.path().join(format!("gw{}.log", round + 1)),
        )
        .await;
        *base.write().await = gw.base_url.clone();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut received: Vec<Received> = Vec::new();
    for c in clients {
        received.extend(c.await.unwrap());
    }
    let whole = received.iter().filter(|r| r.usage.is_some()).count();
    let cut = received.len() - whole;
    assert!(
        whole > 50 && cut >= 5,
        "{whole} whole, {cut} cut: not the mix this test needs"
    );

    // Wait for the orphan timeout and the pipeline: the ledger stops changing.
    let mut last = Value::Null;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let v = usage(&gw.base_url, &key).await;
        if v["total"] == last["total"] && !v["total"].is_null() {
            break;
        }
        assert!(Instant::now() < deadline, "the ledger never settled: {v}");
        last = v;
    }

    // Completion events per request: every billed one is in the log.
    let logged = events(dir.path()).await;
    let mut completions = std::collections::HashMap::<String, Vec<Value>>::new();
    let mut estimates = std::collections::HashMap::<String, u64>::new();
    for (topic, e) in &logged {
        let id = e["request_id"].as_str().unwrap_or_default().to_string();
        match topic.as_str() {
            "llm.completions" => completions.entry(id).or_default().push(e.clone()),
            "llm.requests" => {
                estimates.insert(id, e["prompt_tokens_estimate"].as_u64().unwrap_or(0));
            }
            _ => {}
        }
    }
    let (mut input, mut output, mut requests) = (0u64, 0u64, 0i64);
    let (mut unbilled_cut, mut held_at_the_end, mut recovered) = (0, 0, 0);
    let mut unbilled_delivered = Vec::new();
    for r in &received {
        let events = completions.get(&r.request_id).cloned().unwrap_or_default();
        let distinct: std::collections::HashSet<&str> = events
            .iter()
            .filter_map(|e| e["event_id"].as_str())
            .collect();
        match r.usage {
            Some((prompt, completion)) => {
                // Received whole: billed once, with the upstream's usage, never recovered.
                assert_eq!(distinct.len(), 1, "{}: {events:?}", r.request_id);
                let e = &events[0];
                assert_eq!(e["status"], "completed", "{e}");
                assert_eq!(e["usage"]["input_tokens"].as_u64(), Some(prompt), "{e}");
                assert_eq!(
                    e["usage"]["output_tokens"].as_u64(),
                    Some(completion),
                    "{e}"
                );
                input += prompt;
                output += completion;
                requests += 1;
            }
            None => {
                // Cut by a kill: billed once (recovered) for at most what it delivered.
                if distinct.is_empty() {
                    // Nothing of it was durable: the gateway died before the request's first
                    // output had been written (its request event waits for that), so the
                    // client can have received only what left in the last moments.
                    let delivered = tollgate_gateway::tokens::count_text(r.model, &r.text);
                    unbilled_delivered.push(delivered);
                    unbilled_cut += 1;
                    continue;
                }
                assert_eq!(distinct.len(), 1, "{}: {events:?}", r.request_id);
                let e = &events[0];
                let delivered = tollgate_gateway::tokens::count_text(r.model, &r.text);
                let billed = e["usage"]["output_tokens"].as_u64().unwrap();
                if e["status"] == "completed" {
                    // The gateway died after the completion was durable and before the last
                    // write (held for it) reached the client: billed as the upstream
                    // reported, which covers what was delivered.
                    assert_eq!(e["usage"]["source"], "provider", "{e}");
                    assert!(
                        billed >= delivered,
                        "{}: {billed} < {delivered}",
                        r.request_id
                    );
                    held_at_the_end += 1;
                } else {
                    assert_eq!(e["usage"]["source"], "recovered", "{e}");
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
                    recovered += 1;
                }
                input += e["usage"]["input_tokens"].as_u64().unwrap();
                output += billed;
                requests += 1;
            }
        }
    }
    println!(
        "{whole} whole and {cut} cut responses: {recovered} recovered, {held_at_the_end} cut \
         while their last write waited for the barrier, {unbilled_cut} before any event of theirs \
         was durable (output tokens they had received: {unbilled_delivered:?})"
    );
    assert!(recovered > 0, "no stream was recovered");
    // Request and chunk records wait at most `batch_delay_ms` (5 ms) to be written: a stream
    // cut before any of its records was can have delivered a first chunk at most.
    assert!(
        unbilled_delivered.iter().all(|n| *n <= 3),
        "unbilled streams delivered {unbilled_delivered:?} output tokens"
    );
    // Nothing else was billed, and nothing twice: the ledger is exactly what the clients got.
    let total = &last["total"];
    assert_eq!(total["requests"].as_i64(), Some(requests), "{last}");
    assert_eq!(total["input_tokens"].as_u64(), Some(input), "{last}");
    assert_eq!(total["output_tokens"].as_u64(), Some(output), "{last}");
    let want_cost = (Decimal::from(input) * dec(INPUT_PER_MTOK)
        + Decimal::from(output) * dec(OUTPUT_PER_MTOK))
        / Decimal::from(1_000_000);
    assert_eq!(dec(total["cost"].as_str().unwrap()), want_cost, "{last}");
}
