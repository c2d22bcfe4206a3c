//! The embedded default bills in process: the real `tollgate` binary, a fresh data directory
//! and no service at all. The billing pipeline runs inside the gateway over its local event
//! log and writes the ledger into `tollgate.db`; `GET /v1/usage` shows every request at the
//! exact cost of the usage each response reported; a killed gateway resumes its ledger without
//! counting anything twice; a gateway killed the moment its responses ended has billed every
//! one of them (the durability barrier); a hand-off queue too small for the load spills to
//! disk and loses nothing; a graceful stop (SIGTERM) commits everything before exiting, and
//! a stream still running when the shutdown grace period ends is cut and recorded.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)] // test code: failing loudly is the point

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use rust_decimal::Decimal;
use serde_json::{json, Value};
use tollgate_tests::harness::{read_events, sse_events};
use tollgate_tests::process::{tollgate_ok, usage, GatewayProcess};

/// The built-in simulated model; its completions carry `upstream_model = "mock/fast"` (the
/// built-in deployment's model), which is what the price book is keyed by.
const MODEL: &str = "mock/fast";
/// Prices per million tokens, with enough digits that any rounding would show.
const INPUT_PER_MTOK: &str = "1.234567";
const CACHED_PER_MTOK: &str = "0.3";
const OUTPUT_PER_MTOK: &str = "9.87654321";

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Tokens one response reported.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    prompt: i64,
    cached: i64,
    completion: i64,
}

impl Usage {
    fn cost(&self) -> Decimal {
        (Decimal::from(self.prompt - self.cached) * dec(INPUT_PER_MTOK)
            + Decimal::from(self.cached) * dec(CACHED_PER_MTOK)
            + Decimal::from(self.completion) * dec(OUTPUT_PER_MTOK))
            / Decimal::from(1_000_000)
    }
}

/// What the test sent and expects the ledger to hold.
#[derive(Debug, Default)]
struct Expected {
    requests: i64,
    input_tokens: i64,
    output_tokens: i64,
    cost: Decimal,
}

impl Expected {
    fn add(&mut self, u: Usage) {
        self.requests += 1;
        self.input_tokens += u.prompt;
        self.output_tokens += u.completion;
        self.cost += u.cost();
    }
}

/// Creates a tenant, its key and the model's price with the CLI; returns (tenant id, key).
fn provision(data_dir: &Path) -> (String, String) {
    let data = data_dir.to_str().unwrap();
    let tenant = tollgate_ok(&["--data-dir", data, "tenants", "create", "acme"]);
    let key = tollgate_ok(&["--data-dir", data, "keys", "create", "--tenant", &tenant]);
    tollgate_ok(&[
        "--data-dir",
        data,
        "prices",
        "set",
        "--model",
        MODEL,
        "--input",
        INPUT_PER_MTOK,
        "--cached-input",
        CACHED_PER_MTOK,
        "--output",
        OUTPUT_PER_MTOK,
        "--effective-from",
        "2020-01-01T00:00:00Z",
    ]);
    (tenant, key)
}

async fn start(data_dir: &Path, log: &str) -> GatewayProcess {
    GatewayProcess::start(
        &["--data-dir", data_dir.to_str().unwrap()],
        &[],
        data_dir.join(log),
    )
    .await
}

fn usage_of(v: &Value) -> Usage {
    let n = |p: &str| v.pointer(p).and_then(Value::as_i64).unwrap_or(0);
    Usage {
        prompt: n("/prompt_tokens"),
        cached: n("/prompt_tokens_details/cached_tokens"),
        completion: n("/completion_tokens"),
    }
}

/// Sends request `i` (every third one streaming, with `include_usage`) and returns the usage
/// the response reported.
async fn complete(client: &reqwest::Client, base: &str, key: &str, i: usize) -> Usage {
    complete_as(client, base, key, i, i % 3 == 2).await
}

/// Sends request `i`, streamed (with `include_usage`) or not, reads the whole response and
/// returns the usage it reported.
async fn complete_as(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    i: usize,
    stream: bool,
) -> Usage {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": format!("request {i}:{}", " tell me more".repeat(i))}],
        "max_tokens": 3 + i % 11,
        "stream": stream,
    });
    if stream {
        body["stream_options"] = json!({"include_usage": true});
    }
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let usage = if stream {
        let events = sse_events(&text);
        assert_eq!(
            events.last().map(|e| e.1.as_str()),
            Some("[DONE]"),
            "{text}"
        );
        let with_usage: Vec<Value> = events
            .iter()
            .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
            .filter(|v| v["usage"].is_object())
            .collect();
        assert_eq!(with_usage.len(), 1, "{text}");
        usage_of(&with_usage[0]["usage"])
    } else {
        let v: Value = serde_json::from_str(&text).unwrap();
        usage_of(&v["usage"])
    };
    assert!(usage.prompt > 0 && usage.completion > 0, "{text}");
    usage
}

/// Sends requests `range` (a few at a time) and adds what they reported to `expected`.
async fn send(base: &str, key: &str, range: std::ops::Range<usize>, expected: &mut Expected) {
    let client = reqwest::Client::new();
    let ids: Vec<usize> = range.collect();
    for batch in ids.chunks(4) {
        let usages =
            futures_util::future::join_all(batch.iter().map(|&i| complete(&client, base, key, i)))
                .await;
        for u in usages {
            expected.add(u);
        }
    }
}

/// Polls `/v1/usage` (≤ 20 s) until it shows `want.requests`, and returns it.
async fn wait_for_usage(base: &str, key: &str, want: &Expected) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = usage(base, key).await;
        if v["total"]["requests"].as_i64() >= Some(want.requests) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the ledger did not reach {} requests in 20 s: {v}",
            want.requests
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_totals(v: &Value, want: &Expected) {
    let total = &v["total"];
    assert_eq!(total["requests"].as_i64(), Some(want.requests), "{v}");
    assert_eq!(
        total["input_tokens"].as_i64(),
        Some(want.input_tokens),
        "{v}"
    );
    assert_eq!(
        total["output_tokens"].as_i64(),
        Some(want.output_tokens),
        "{v}"
    );
    assert_eq!(dec(total["cost"].as_str().unwrap()), want.cost, "{v}");
    assert_eq!(v["by_model"][0]["model"], MODEL, "{v}");
    assert_eq!(v["currency"], "USD", "{v}");
}

async fn metrics(base: &str) -> String {
    reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn sqlite(path: &Path) -> sqlx::SqlitePool {
    sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display()))
        .await
        .unwrap()
}

/// Completion events in the local event log.
async fn logged_completions(data_dir: &Path) -> i64 {
    let pool = sqlite(&data_dir.join("events.sqlite")).await;
    let n = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE topic = 'llm.completions'")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

#[tokio::test]
async fn a_fresh_data_dir_bills_every_completion_at_the_exact_price() {
    let dir = tempfile::tempdir().unwrap();
    let (tenant, key) = provision(dir.path());
    let gw = start(dir.path(), "gw.log").await;
    let mut want = Expected::default();
    send(&gw.base_url, &key, 0..20, &mut want).await;

    let v = wait_for_usage(&gw.base_url, &key, &want).await;
    assert_totals(&v, &want);
    assert_eq!(v["tenant_id"], tenant.as_str());
    let m = metrics(&gw.base_url).await;
    assert!(m.contains("tollgate_billing_pipeline_up 1"), "{m}");
    assert!(
        m.contains("tollgate_billing_pipeline_failures_total 0"),
        "{m}"
    );
    assert!(
        gw.log_text().contains("embedded billing pipeline started"),
        "{}",
        gw.log_text()
    );
}

#[tokio::test]
async fn a_killed_gateway_resumes_its_ledger_without_double_counting() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = provision(dir.path());
    let mut want = Expected::default();

    // Killed (SIGKILL) as soon as its completions are in the log, whether or not the ledger
    // has committed them yet.
    let gw = start(dir.path(), "gw1.log").await;
    send(&gw.base_url, &key, 0..12, &mut want).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while logged_completions(dir.path()).await < want.requests {
        assert!(
            Instant::now() < deadline,
            "completions never reached the log"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(gw);

    // Killed again after its ledger has caught up: the restart replays the log's recent past
    // (to rebuild the duplicate filter) and must count none of it again.
    let gw = start(dir.path(), "gw2.log").await;
    let v = wait_for_usage(&gw.base_url, &key, &want).await;
    assert_totals(&v, &want);
    send(&gw.base_url, &key, 12..18, &mut want).await;
    assert_totals(&wait_for_usage(&gw.base_url, &key, &want).await, &want);
    drop(gw);

    let gw = start(dir.path(), "gw3.log").await;
    send(&gw.base_url, &key, 18..25, &mut want).await;
    let v = wait_for_usage(&gw.base_url, &key, &want).await;
    assert_totals(&v, &want);
    // A few more epochs change nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_totals(&usage(&gw.base_url, &key).await, &want);
    assert_eq!(logged_completions(dir.path()).await, want.requests);
}

/// The sum of the metric samples named `name` (any labels).
fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_gateway_killed_the_moment_its_streams_ended_has_billed_every_one_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = provision(dir.path());
    let mut want = Expected::default();
    let client = reqwest::Client::new();
    let mut next = 0;
    for round in 0..5 {
        let mut gw = start(dir.path(), &format!("gw{round}.log")).await;
        // Twenty concurrent streams (and a few plain responses); the moment the last client
        // has read its `[DONE]`, SIGKILL: every response a client received whole must be
        // billed, whatever was still in the gateway's memory.
        let usages = futures_util::future::join_all(
            (next..next + 24).map(|i| complete_as(&client, &gw.base_url, &key, i, i % 6 != 0)),
        )
        .await;
        gw.child.kill().unwrap();
        let _ = gw.child.wait();
        for u in usages {
            want.add(u);
        }
        next += 24;
        drop(gw);
    }
    let gw = start(dir.path(), "last.log").await;
    assert_totals(&wait_for_usage(&gw.base_url, &key, &want).await, &want);
    // Nothing is counted twice either, however long it runs on.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_totals(&usage(&gw.base_url, &key).await, &want);
    assert_eq!(logged_completions(dir.path()).await, want.requests);
    let m = metrics(&gw.base_url).await;
    assert_eq!(
        metric_sum(&m, "tollgate_completions_not_durable_total"),
        0.0,
        "{m}"
    );
}

#[tokio::test]
async fn a_hand_off_queue_too_small_for_the_load_spills_to_disk_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = provision(dir.path());
    let env = [
        ("TOLLGATE__EVENTS__TYPE", "local"),
        ("TOLLGATE__EVENTS__MAX_QUEUE_EVENTS", "1"),
    ];
    let gw = GatewayProcess::start(
        &["--data-dir", dir.path().to_str().unwrap()],
        &env,
        dir.path().join("gw.log"),
    )
    .await;
    let mut want = Expected::default();
    send(&gw.base_url, &key, 0..40, &mut want).await;
    assert_totals(&wait_for_usage(&gw.base_url, &key, &want).await, &want);
    let m = metrics(&gw.base_url).await;
    assert!(
        metric_sum(&m, "tollgate_events_overflowed_total") > 0.0,
        "a one-record queue never overflowed: {m}"
    );
    assert_eq!(metric_sum(&m, "tollgate_events_dropped_total"), 0.0, "{m}");
    assert_eq!(
        metric_sum(&m, "tollgate_events_lost_tokens_total"),
        0.0,
        "{m}"
    );
    // Every request's events are in the log exactly once, in order per request.
    let events = sqlite(&dir.path().join("events.sqlite")).await;
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT topic, payload FROM event_log ORDER BY log_offset")
            .fetch_all(&events)
            .await
            .unwrap();
    let mut seen = std::collections::HashMap::<String, Vec<(String, Value)>>::new();
    for (topic, payload) in &rows {
        let v: Value = serde_json::from_str(payload).unwrap();
        let id = v["request_id"].as_str().unwrap().to_string();
        seen.entry(id).or_default().push((topic.clone(), v));
    }
    assert_eq!(seen.len() as i64, want.requests);
    for (id, events) in &seen {
        let topics: Vec<&str> = events.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(topics.first(), Some(&"llm.requests"), "{id}: {topics:?}");
        let completions: Vec<&Value> = events
            .iter()
            .filter(|(t, _)| t == "llm.completions")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(completions.len(), 1, "{id}: {topics:?}");
        // Chunks in order (those of the last burst follow the completion they waited on),
        // as many as the completion says.
        let sequences: Vec<u64> = events
            .iter()
            .filter(|(t, _)| t == "llm.chunks")
            .map(|(_, v)| v["sequence"].as_u64().unwrap())
            .collect();
        assert_eq!(
            sequences,
            (0..sequences.len() as u64).collect::<Vec<_>>(),
            "{id}: {topics:?}"
        );
        assert_eq!(
            completions[0]["chunks"].as_u64(),
            Some(sequences.len() as u64),
            "{id}"
        );
    }
}

#[tokio::test]
async fn a_graceful_stop_commits_everything_before_exiting() {
    let dir = tempfile::tempdir().unwrap();
    let (tenant, key) = provision(dir.path());
    // One-minute epochs (set through the environment overlay): nothing is committed before
    // the stop, so whatever the ledger holds afterwards, the graceful stop committed.
    let mut gw = GatewayProcess::start(
        &["--data-dir", dir.path().to_str().unwrap()],
        &[("TOLLGATE__BILLING__EPOCH_MS", "60000")],
        dir.path().join("gw.log"),
    )
    .await;
    let mut want = Expected::default();
    send(&gw.base_url, &key, 0..16, &mut want).await;
    let before = usage(&gw.base_url, &key).await;
    assert_eq!(before["total"]["requests"], 0, "{before}");

    // SIGTERM right after the last response: the open epoch is still to be committed.
    stop_gracefully(&mut gw).await;

    let pool = sqlite(&dir.path().join("tollgate.db")).await;
    let rows: Vec<(String, i64, i64, i64, String)> = sqlx::query_as(
        "SELECT period, requests, input_tokens, output_tokens, cost FROM usage_periods WHERE tenant_id = ?",
    )
    .bind(&tenant)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 1, "one billing period: {rows:?}");
    let (_, requests, input, output, cost) = &rows[0];
    assert_eq!(*requests, want.requests);
    assert_eq!(*input, want.input_tokens);
    assert_eq!(*output, want.output_tokens);
    assert_eq!(dec(cost), want.cost);
    // The committed position is past the last completion in the log.
    let next: i64 = sqlx::query_scalar("SELECT next_offset FROM pipeline_positions")
        .fetch_one(&pool)
        .await
        .unwrap();
    let events = sqlite(&dir.path().join("events.sqlite")).await;
    let last: i64 =
        sqlx::query_scalar("SELECT max(log_offset) FROM event_log WHERE topic = 'llm.completions'")
            .fetch_one(&events)
            .await
            .unwrap();
    assert_eq!(next, last + 1);
    assert_eq!(logged_completions(dir.path()).await, want.requests);
    assert!(
        gw.log_text().contains("embedded billing pipeline stopped"),
        "{}",
        gw.log_text()
    );
}

/// Sends SIGTERM to `gw` and waits (bounded) for it to exit successfully.
async fn stop_gracefully(gw: &mut GatewayProcess) {
    let pid = gw.child.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = gw.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the gateway did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}: {}", gw.log_text());
}

#[tokio::test]
async fn a_stream_still_running_at_shutdown_is_cut_after_the_grace_period_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = provision(dir.path());
    let mut gw = GatewayProcess::start(
        &["--data-dir", dir.path().to_str().unwrap()],
        &[("TOLLGATE__SERVER__SHUTDOWN_GRACE_MS", "300")],
        dir.path().join("gw.log"),
    )
    .await;
    // mock/realistic: 40 chunks 25 ms apart after 250 ms, about 1.25 s in all.
    let mut resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.base_url))
        .bearer_auth(&key)
        .json(&json!({"model": "mock/realistic", "stream": true,
            "messages": [{"role": "user", "content": "Tell me a long story."}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut received = read_events(&mut resp, 4).await;
    let stopping = Instant::now();
    let stop = stop_gracefully(&mut gw);
    let read_rest = async {
        // The stream ends early, cut: no `[DONE]`.
        while let Ok(Some(chunk)) = resp.chunk().await {
            received.push_str(&String::from_utf8_lossy(&chunk));
        }
    };
    tokio::join!(stop, read_rest);
    println!("stopped {:?} after SIGTERM", stopping.elapsed());
    assert!(!received.contains("[DONE]"), "the stream was not cut");
    let delivered = sse_events(&received).len() as u64;

    // Its completion was written before the process exited, with what the client got.
    let events = sqlite(&dir.path().join("events.sqlite")).await;
    let payloads: Vec<String> =
        sqlx::query_scalar("SELECT payload FROM event_log WHERE topic = 'llm.completions'")
            .fetch_all(&events)
            .await
            .unwrap();
    assert_eq!(payloads.len(), 1);
    let completion: Value = serde_json::from_str(&payloads[0]).unwrap();
    assert_eq!(completion["status"], "client_disconnected", "{completion}");
    let output = completion["usage"]["output_tokens"].as_u64().unwrap();
    // Billed for what was delivered (about a token per event), not for the whole story.
    assert!(
        (3..40).contains(&output) && output <= delivered + 2,
        "{output} tokens for {delivered} events"
    );
}

/// Response cache hits billed at a quarter of the original answer's price: the ledger, the
/// usage API and the invoice count them and what they saved apart, to the last decimal.
#[tokio::test]
async fn cache_hits_are_billed_at_their_fraction_and_their_savings_shown_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (_, key) = provision(dir.path());
    let gw = GatewayProcess::start(
        &["--data-dir", dir.path().to_str().unwrap()],
        &[
            ("TOLLGATE__CACHE__ENABLED", "true"),
            ("TOLLGATE__CACHE__BILL_HITS", "0.25"),
        ],
        dir.path().join("gw.log"),
    )
    .await;
    let client = reqwest::Client::new();
    let fraction = dec("0.25");
    let (mut want, mut hit_list) = (Expected::default(), Decimal::ZERO);
    let mut hits = 0;
    for i in 0..6 {
        // The first answer is a miss; the same request again is a hit (non-streamed and
        // streamed ones alike), whose replayed answer reports the original usage.
        want.add(complete(&client, &gw.base_url, &key, i).await);
        for _ in 0..2 {
            let u = complete(&client, &gw.base_url, &key, i).await;
            hit_list += u.cost();
            hits += 1;
        }
    }
    want.requests += hits;
    want.cost += hit_list * fraction;
    let v = wait_for_usage(&gw.base_url, &key, &want).await;
    assert_totals(&v, &want);
    let total = &v["total"];
    assert_eq!(total["cache_hits"].as_i64(), Some(hits), "{v}");
    assert_eq!(
        dec(total["cache_savings"].as_str().unwrap()),
        hit_list - hit_list * fraction,
        "{v}"
    );

    // The draft invoice of this month: one usage line, its hits and savings on it.
    let out = dir.path().join("invoices");
    let period = v["period"].as_str().unwrap().to_string();
    tollgate_ok(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "invoices",
        "export",
        "--period",
        &period,
        "--format",
        "json",
        "--out",
        out.to_str().unwrap(),
    ]);
    let file = std::fs::read_dir(&out).unwrap().next().unwrap().unwrap();
    let invoice: Value = serde_json::from_slice(&std::fs::read(file.path()).unwrap()).unwrap();
    let line = &invoice["lines"][0];
    assert_eq!(
        line["quantities"]["cache_hits"].as_i64(),
        Some(hits),
        "{invoice}"
    );
    let cents = |d: Decimal| {
        d.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero)
    };
    assert_eq!(
        dec(line["amount"].as_str().unwrap()),
        cents(want.cost),
        "{invoice}"
    );
    assert_eq!(
        dec(invoice["cache_savings"].as_str().unwrap()),
        cents(hit_list - hit_list * fraction),
        "{invoice}"
    );
}
