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
use tollgate_tests::process::{tollgate_ok, usage, GatewayProcess};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_clients_through_five_kills_are_each_billed_once_for_what_they_received() {
    use tollgate_tests::chaos;

    let dir = tempfile::tempdir().unwrap();
    let key = provision(dir.path(), "mock/realistic");
    let data = dir.path().to_str().unwrap().to_string();
    set_price(&data, "mock/fast");
    let env = [("TOLLGATE__BILLING__ORPHAN_TIMEOUT_MS", "1500")];
    let start = |round: usize| {
        let (data, log) = (data.clone(), dir.path().join(format!("gw{round}.log")));
        async move { GatewayProcess::start(&["--data-dir", &data], &env, log).await }
    };
    // Five SIGKILLs at random moments, each followed by a restart.
    let pauses = chaos::kill_schedule(5);
    let (received, gw) =
        chaos::clients_through_kills(start(0).await, &key, 32, &pauses, start).await;

    // Wait for the orphan timeout and the pipeline: the ledger stops changing.
    // Unchanged over two intervals in a row: one quiet interval can be a pipeline held up
    // by a busy machine.
    let mut last = Value::Null;
    let mut quiet = 0;
    let deadline = Instant::now() + Duration::from_secs(90);
    while quiet < 2 {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let v = usage(&gw.base_url, &key).await;
        if v["total"] == last["total"] && !v["total"].is_null() {
            quiet += 1;
        } else {
            quiet = 0;
        }
        assert!(Instant::now() < deadline, "the ledger never settled: {v}");
        last = v;
    }
    let logged = events(dir.path()).await;
    let (completions, estimates) = chaos::index_events(logged.iter().map(|(_, e)| e));
    let want = chaos::check(&received, &completions, &estimates);
    println!("{want:?}");
    // Nothing else was billed, and nothing twice: the ledger is exactly what the clients got.
    let total = &last["total"];
    assert_eq!(
        total["requests"].as_i64(),
        Some(want.requests),
        "{last}\n{want:?}"
    );
    assert_eq!(
        total["input_tokens"].as_u64(),
        Some(want.input_tokens),
        "{last}\n{want:?}"
    );
    assert_eq!(
        total["output_tokens"].as_u64(),
        Some(want.output_tokens),
        "{last}\n{want:?}"
    );
    let want_cost = (Decimal::from(want.input_tokens) * dec(INPUT_PER_MTOK)
        + Decimal::from(want.output_tokens) * dec(OUTPUT_PER_MTOK))
        / Decimal::from(1_000_000);
    assert_eq!(dec(total["cost"].as_str().unwrap()), want_cost, "{last}");
}
