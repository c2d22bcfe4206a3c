//! Routing and resilience end to end: the real gateway on a loopback socket in front of
//! fault-injecting mock upstreams (one server per deployment), one test per behaviour:
//! retries, `retry-after`, no retry of client errors, the deadline, resets, hangs, drops
//! mid-stream, breakers, cross-provider fallback, pins, strategies, hedging, context-window
//! fallback and rate-limit steering; and the faults routing must ride out (unreachable and
//! half-failing deployments, dead deployments ahead of a live one, every breaker open).
//!
//! Timings here are orderings ("took at least the retry-after"), never thresholds.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_gateway::relay::Outcome;
use tollgate_tests::harness::{sse_events, Harness, ADMIN_TOKEN};
use tollgate_tests::mock_upstream::{
    Fault, Faults, MockOptions, MockUpstream, RateLimitHeaders, CHUNKS_BEFORE_FAILURE,
};
use tollgate_tests::routes_config::{alias, dep, dep_at, gateway, unreachable, upstream};

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream,
        "messages": [{"role": "user", "content": "Tell me about the weather in Paris today."}]})
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Sends a non-streaming chat request; returns (status, deployment, route, body).
async fn ask(h: &Harness, model: &str, headers: &[(&str, &str)]) -> (u16, String, String, Value) {
    let resp = h
        .post_with("/v1/chat/completions", &chat(model, false), headers)
        .await;
    let status = resp.status().as_u16();
    let deployment = header(&resp, "x-tollgate-deployment");
    let route = header(&resp, "x-tollgate-route");
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    (status, deployment, route, body)
}

/// The chunks of an OpenAI stream (JSON objects; `[DONE]` excluded) and whether it ended
/// with `[DONE]`.
fn openai_stream(text: &str) -> (Vec<Value>, bool) {
    let events = sse_events(text);
    let done = events.last().is_some_and(|(_, d)| d == "[DONE]");
    let chunks = events
        .into_iter()
        .filter(|(_, d)| d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(&d).expect("every data event is JSON"))
        .collect();
    (chunks, done)
}

#[tokio::test]
async fn a_5xx_is_retried_on_the_same_deployment_until_it_succeeds() {
    let a = upstream().await;
    a.set_faults(Faults::next_n(Fault::Status(503), 2));
    let h = gateway(
        "",
        &format!(
            "{}{}",
            dep("openai", "a", &a, "gpt", ""),
            alias("m", &["a"], "")
        ),
    )
    .await;
    let resp = h.post("/v1/chat/completions", &chat("m", false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-tollgate-attempts"), "3");
    assert_eq!(header(&resp, "x-tollgate-route"), "a:503,a:503,a:ok");
    assert_eq!(a.request_count(), 3);
    let rec = h.completions(1).await.pop().unwrap();
    assert_eq!(rec.outcome, Outcome::Completed);
    let route = rec.route_log.expect("route log");
    assert_eq!((route.retries(), route.fallbacks()), (2, 0));
}

#[tokio::test]
async fn retry_after_is_honoured_when_there_is_nowhere_else_to_go() {
    let a = upstream().await;
    a.push_fault(Fault::RateLimited(Duration::from_millis(1000)));
    let h = gateway(
        "",
        &format!(
            "{}{}",
            dep("openai", "a", &a, "gpt", ""),
            alias("m", &["a"], "")
        ),
    )
    .await;
    let started = Instant::now();
    let (status, _, route, _) = ask(&h, "m", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(route, "a:429,a:ok");
    let reqs = a.requests();
    assert_eq!(reqs.len(), 2);
    let gap = reqs[1].received_at.duration_since(reqs[0].received_at);
    assert!(gap >= Duration::from_millis(1000), "retried after {gap:?}");
    assert!(started.elapsed() >= Duration::from_millis(1000));
}

#[tokio::test]
async fn a_429_moves_to_the_next_deployment_at_once() {
    let (a, b) = (upstream().await, upstream().await);
    a.push_fault(Fault::RateLimited(Duration::from_secs(30)));
    let h = gateway(
        "",
        &format!(
            "{}{}{}",
            dep("openai", "a", &a, "gpt", ""),
            dep("openai", "b", &b, "gpt", ""),
            alias("m", &["a", "b"], "strategy = \"ordered\"")
        ),
    )
    .await;
    let (status, deployment, route, _) = ask(&h, "m", &[]).await;
    assert_eq!((status, deployment.as_str()), (200, "b"));
    assert_eq!(route, "a:429,b:ok");
    // `a` stays exhausted until its retry-after: the next request goes straight to `b`.
    let (_, deployment, route, _) = ask(&h, "m", &[]).await;
    assert_eq!((deployment.as_str(), route.as_str()), ("b", "b:ok"));
    assert_eq!(a.request_count(), 1);
}

#[tokio::test]
async fn a_client_error_is_never_retried_or_sent_elsewhere() {
    let (a, b) = (upstream().await, upstream().await);
    let h = gateway(
        "",
        &format!(
            "{}{}{}",
            dep("openai", "a", &a, "bad-request", ""),
            dep("openai", "b", &b, "bad-request", ""),
            alias("m", &["a", "b"], "strategy = \"ordered\"")
        ),
    )
    .await;
    let (status, _, _, body) = ask(&h, "m", &[]).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "temperature");
    assert_eq!((a.request_count(), b.request_count()), (1, 0));
}

#[tokio::test]
async fn retries_stop_at_the_deadline() {
    let a = upstream().await;
    a.set_faults(Faults::always(Fault::Status(503)).with_latency(Duration::from_millis(50)));
    let h = gateway(
        "deadline_ms = 400\nmax_retries = 1000\nmax_attempts = 1000",
        &format!(
            "{}{}",
            dep("openai", "a", &a, "gpt", ""),
            alias("m", &["a"], "")
        ),
    )
    .await;
    let started = Instant::now();
    let (status, _, _, body) = ask(&h, "m", &[]).await;
    let took = started.elapsed();
    assert_eq!(status, 503, "{body}");
    // 50 ms per attempt and a 400 ms deadline: a handful of attempts, not a thousand.
    let n = a.request_count();
    assert!((2..=10).contains(&n), "{n} attempts");
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test]
async fn a_connection_reset_is_retried() {
    let a = upstream().await;
    a.push_fault(Fault::Reset);
    let h = gateway(
        "",
        &format!(
            "{}{}",
            dep("openai", "a", &a, "gpt", ""),
            alias("m", &["a"], "")
        ),
    )
    .await;
    let (status, _, route, _) = ask(&h, "m", &[]).await;
    assert_eq!(status, 200);
    assert_eq!(route, "a:unreachable,a:ok");
}

#[tokio::test]
async fn a_hang_times_out_on_first_byte_and_falls_back() {
    let (a, b) = (upstream().await, upstream().await);
    a.set_faults(Faults::always(Fault::Hang));
    let h = gateway(
        "",
        &format!(
            "{}{}{}",
            dep("openai", "a", &a, "gpt", "first_byte_timeout_ms = 300"),
            dep("openai", "b", &b, "gpt", ""),
            alias("m", &["a", "b"], "strategy = \"ordered\"")
        ),
    )
    .await;
    let resp = h.post("/v1/chat/completions", &chat("m", true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-tollgate-route"), "a:timeout,b:ok");
    let (chunks, done) = openai_stream(&resp.text().await.unwrap());
    assert!(done);
    assert!(chunks.len() > 3);
}

#[tokio::test]
async fn a_drop_mid_stream_ends_with_an_error_event_and_is_not_retried() {
    let (a, b) = (upstream().await, upstream().await);
    a.push_fault(Fault::DropMidstream);
    let h = gateway(
        "",
        &format!(
            "{}{}{}",
            dep("openai", "a", &a, "gpt", ""),
            dep("openai", "b", &b, "gpt", ""),
            alias("m", &["a", "b"], "strategy = \"ordered\"")
        ),
    )
    .await;
    let resp = h.post("/v1/chat/completions", &chat("m", true)).await;
    assert_eq!(resp.status(), 200);
    let (chunks, done) = openai_stream(&resp.text().await.unwrap());
    assert!(!done, "a failed stream must not claim [DONE]");
    let last = chunks.last().unwrap();
    assert!(last["error"]["message"].is_string(), "{last}");
    let content = chunks
        .iter()
        .filter(|c| {
            c.pointer("/choices/0/delta/content")
                .is_some_and(|v| v != "")
        })
        .count();
    assert_eq!(content, CHUNKS_BEFORE_FAILURE);
    assert_eq!((a.request_count(), b.request_count()), (1, 0));
    let rec = h.completions(1).await.pop().unwrap();
    assert!(matches!(rec.outcome, Outcome::UpstreamError(_)));
}

#[tokio::test]
async fn a_breaker_opens_then_a_half_open_probe_closes_it() {
    let (a, b) = (upstream().await, upstream().await);
    a.set_faults(Faults::always(Fault::Status(500)));
    let h = gateway(
        "max_retries = 0\n[routing.breaker]\nconsecutive_failures = 2\nopen_ms = 300",
        &format!(
            "{}{}{}",
            dep("openai", "a", &a, "gpt", ""),
            dep("openai", "b", &b, "gpt", ""),
            alias("m", &["a", "b"], "strategy = \"ordered\"")
        ),
    )
    .await;
    for _ in 0..2 {
        let (status, _, route, _) = ask(&h, "m", &[]).await;
        assert_eq!((status, route.as_str()), (200, "a:500,b:ok"));
    }
    // Open: `a` is skipped without a request.
    let (_, _, route, _) = ask(&h, "m", &[]).await;
    assert_eq!(route, "b:ok");
    assert_eq!(a.request_count(), 2);
    let states = deployment_states(&h).await;
    assert_eq!(states["a"], "open");
    let metrics = reqwest::get(format!("{}/metrics", h.base_url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_deployment_breaker_state{deployment=\"a\"} 1"),
        "{metrics}"
    );

    // `a` recovers; after open_ms one probe goes through and closes the breaker.
    a.set_faults(Faults::none());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_, deployment, route, _) = ask(&h, "m", &[]).await;
    assert_eq!((deployment.as_str(), route.as_str()), ("a", "a:ok"));
    assert_eq!(deployment_states(&h).await["a"], "closed");
}

async fn deployment_states(h: &Harness) -> serde_json::Map<String, Value> {
    let v: Value = reqwest::Client::new()
        .get(format!("{}/admin/v1/deployments", h.base_url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["breaker"].clone(),
            )
        })
        .collect()
}

#[tokio::test]
async fn an_openai_client_falls_back_to_anthropic_and_still_gets_an_openai_stream() {
    let (a, b) = (upstream().await, upstream().await);
    a.set_faults(Faults::always(Fault::Status(503)));
    let h = gateway(
        "max_retries = 0",
        &format!(
            "{}{}{}",
            dep("openai", "oa", &a, "gpt-4o", ""),
            dep("anthropic", "an", &b, "claude-sonnet", ""),
            alias("gpt-4o", &["oa", "an"], "strategy = \"ordered\"")
        ),
    )
    .await;
    let resp = h.post("/v1/chat/completions", &chat("gpt-4o", true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-tollgate-route"), "oa:503,an:ok");
    assert_eq!(header(&resp, "x-tollgate-provider"), "anthropic");
    let (chunks, done) = openai_stream(&resp.text().await.unwrap());
    assert!(done, "OpenAI streams end with [DONE]");
    let text: String = chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect();
    assert!(!text.is_empty());
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(
        chunks
            .iter()
            .filter_map(|c| c
                .pointer("/choices/0/finish_reason")
                .and_then(Value::as_str))
            .collect::<Vec<_>>(),
        vec!["stop"]
    );
    // The Anthropic deployment got an Anthropic request.
    let sent = b.requests();
    assert_eq!(sent[0].path, "/v1/messages");
    assert_eq!(sent[0].body["model"], "claude-sonnet");
    assert!(sent[0].body["max_tokens"].is_u64());
    let rec = h.completions(1).await.pop().unwrap();
    assert_eq!(rec.deployment, "an");
    assert_eq!(rec.route_log.unwrap().fallbacks(), 1);
}

#[tokio::test]
async fn pins_choose_the_deployment_or_provider_and_unknown_pins_are_refused() {
    let (a, b) = (upstream().await, upstream().await);
    let h = gateway(
        "",
        &format!(
            "{}{}{}",
            dep("openai", "a", &a, "gpt", ""),
            dep("anthropic", "b", &b, "claude", ""),
            alias("m", &["a", "b"], "strategy = \"ordered\"")
        ),
    )
    .await;
    let (status, deployment, _, _) = ask(&h, "m", &[("x-tollgate-deployment", "b")]).await;
    assert_eq!((status, deployment.as_str()), (200, "b"));
    let (status, deployment, _, _) = ask(&h, "m", &[("x-tollgate-provider", "anthropic")]).await;
    assert_eq!((status, deployment.as_str()), (200, "b"));
    let (status, _, _, body) = ask(&h, "m", &[("x-tollgate-deployment", "nope")]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("nope"));
    let (status, _, _, _) = ask(&h, "m", &[("x-tollgate-provider", "vllm")]).await;
    assert_eq!(status, 400);
    assert_eq!(a.request_count(), 0);
    let rec = h.completions(2).await;
    assert_eq!(rec[0].route_log.as_ref().unwrap().reason, Some("pinned"));
}

#[tokio::test]
async fn least_in_flight_avoids_the_busy_deployment() {
    let slow = MockUpstream::start(MockOptions {
        chunk_delay: Duration::from_millis(100),
        ..MockOptions::default()
    })
    .await
    .unwrap();
    let b = upstream().await;
    let h = gateway(
        "",
        &format!(
            "{}{}{}",
            dep("openai", "a", &slow, "gpt", ""),
            dep("openai", "b", &b, "gpt", ""),
            alias("m", &["a", "b"], "strategy = \"least_in_flight\"")
        ),
    )
    .await;
    // Both idle: the tie goes to the first. Keep its stream open.
    let held = h.post("/v1/chat/completions", &chat("m", true)).await;
    assert_eq!(header(&held, "x-tollgate-deployment"), "a");
    let (_, deployment, _, _) = ask(&h, "m", &[]).await;
    assert_eq!(deployment, "b");
    drop(held);
}

#[tokio::test]
async fn lowest_latency_prefers_the_fast_deployment() {
    let (a, b) = (upstream().await, upstream().await);
    a.set_faults(Faults::none().with_latency(Duration::from_millis(150)));
    let h = gateway(
        "",
        &format!(
            "{}{}{}",
            dep("openai", "a", &a, "gpt", ""),
            dep("openai", "b", &b, "gpt", ""),
            alias("m", &["a", "b"], "strategy = \"lowest_latency\"")
        ),
    )
    .await;
    let mut served = Vec::new();
    for _ in 0..14 {
        served.push(ask(&h, "m", &[]).await.1);
    }
    // Both get measured first, then the fast one wins (a few picks explore at random).
    let late_b = served[4..].iter().filter(|d| *d == "b").count();
    assert!(late_b >= 7, "{served:?}");
}

#[tokio::test]
async fn lowest_cost_prefers_the_cheap_deployment() {
    let (a, b) = (upstream().await, upstream().await);
    let h = gateway(
        "",
        &format!(
            "{}{}{}",
            dep(
                "openai",
                "a",
                &a,
                "gpt",
                "price = { input_per_mtok = \"5.00\", output_per_mtok = \"15.00\" }"
            ),
            dep(
                "openai",
                "b",
                &b,
                "gpt",
                "price = { input_per_mtok = \"0.15\", output_per_mtok = \"0.60\" }"
            ),
            alias("m", &["a", "b"], "strategy = \"lowest_cost\"")
        ),
    )
    .await;
    for _ in 0..5 {
        assert_eq!(ask(&h, "m", &[]).await.1, "b");
    }
    assert_eq!(a.request_count(), 0);
}

#[tokio::test]
async fn commit_aware_uses_committed_spend_first_then_the_cheapest() {
    let (a, b) = (upstream().await, upstream().await);
    let h = gateway(
        "",
        &format!(
            "{}{}{}",
            dep(
                "openai",
                "cheap",
                &a,
                "gpt",
                "price = { input_per_mtok = \"0.10\", output_per_mtok = \"0.10\" }"
            ),
            dep(
                "openai",
                "committed",
                &b,
                "gpt",
                "price = { input_per_mtok = \"10\", output_per_mtok = \"10\" }\nmonthly_commit = \"0.0001\""
            ),
            alias("m", &["cheap", "committed"], "strategy = \"commit_aware\"")
        ),
    )
    .await;
    // One request at the committed deployment's price (> 20 tokens × $10/Mtok) uses up the
    // commit; the rest go to the cheapest.
    assert_eq!(ask(&h, "m", &[]).await.1, "committed");
    for _ in 0..3 {
        assert_eq!(ask(&h, "m", &[]).await.1, "cheap");
    }
}

#[tokio::test]
async fn a_high_priority_request_is_hedged_and_the_loser_is_recorded_not_billed() {
    let (a, b) = (upstream().await, upstream().await);
    a.set_faults(Faults::none().with_latency(Duration::from_secs(2)));
    let h = gateway(
        "[routing.hedge]\ndelay_ms = 100",
        &format!(
            "{}{}{}",
            dep(
                "openai",
                "slow",
                &a,
                "gpt",
                "price = { input_per_mtok = \"2\", output_per_mtok = \"8\" }"
            ),
            dep("openai", "fast", &b, "gpt", ""),
            alias("m", &["slow", "fast"], "strategy = \"ordered\"")
        ),
    )
    .await;
    let resp = h
        .post_with(
            "/v1/chat/completions",
            &chat("m", true),
            &[("x-tollgate-priority", "high")],
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-tollgate-deployment"), "fast");
    assert_eq!(
        header(&resp, "x-tollgate-route"),
        "slow:hedge_cancelled,fast:ok"
    );
    let (_, done) = openai_stream(&resp.text().await.unwrap());
    assert!(done);
    let rec = h.completions(1).await.pop().unwrap();
    assert_eq!(rec.deployment, "fast");
    let route = rec.route_log.clone().unwrap();
    let loser = route
        .hedge_loser
        .as_ref()
        .expect("the cancelled hedge is recorded");
    assert_eq!(loser.deployment.name, "slow");
    assert!(loser.usage.input_tokens > 0 && loser.usage.output_tokens == 0);
    assert!(loser.cost.is_some_and(|c| c > rust_decimal::Decimal::ZERO));
    // The published event carries the loser in a field billing ignores; the billed usage is
    // the winner's.
    let wire = tollgate_gateway::events::wire::Record::Completion(Box::new(rec.clone()))
        .to_wire()
        .unwrap();
    let event: Value = serde_json::from_slice(&wire.payload).unwrap();
    assert_eq!(event["deployment"], "fast");
    assert_eq!(event["hedge_cancelled"]["deployment"], "slow");
    assert_eq!(event["attempts"][0]["outcome"], "hedge_cancelled");
    assert_eq!(event["usage"]["output_tokens"], 20);
    // The billing pipeline reads it as an ordinary completion of the winner.
    let fact = tollgate_pipeline::fact::Completion::parse(
        &tollgate_pipeline::fact::SourceRecord {
            payload: wire.payload.clone(),
            ..Default::default()
        },
        true,
    )
    .unwrap();
    assert_eq!(fact.details.as_ref().unwrap().deployment, "fast");
    assert_eq!(fact.output_tokens, 20);
    // Without the priority header there is no hedge.
    let (_, deployment, _, _) = ask(&h, "m", &[]).await;
    assert_eq!(deployment, "slow");
}

#[tokio::test]
async fn a_context_window_error_falls_back_to_the_larger_model() {
    let (a, b) = (upstream().await, upstream().await);
    let h = gateway(
        "",
        &format!(
            "{}{}{}{}",
            dep("openai", "small", &a, "context-length-exceeded", ""),
            dep("anthropic", "large", &b, "claude-long", ""),
            alias("m", &["small"], "context_window_fallback = \"m-long\""),
            alias("m-long", &["large"], "")
        ),
    )
    .await;
    let (status, deployment, route, body) = ask(&h, "m", &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (deployment.as_str(), route.as_str()),
        ("large", "small:400,large:ok")
    );
    assert_eq!(body["object"], "chat.completion");
    let rec = h.completions(1).await.pop().unwrap();
    assert_eq!(
        rec.route_log.unwrap().reason,
        Some("context_window_fallback")
    );
    // Without a fallback the client gets the upstream's error, code included.
    let h2 = gateway(
        "",
        &format!(
            "{}{}",
            dep("openai", "small", &a, "context-length-exceeded", ""),
            alias("m", &["small"], "")
        ),
    )
    .await;
    let (status, _, _, body) = ask(&h2, "m", &[]).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "context_length_exceeded");
}

#[tokio::test]
async fn upstream_rate_limit_headers_steer_load_away() {
    let (a, b) = (upstream().await, upstream().await);
    a.set_faults(Faults {
        rate_limit_headers: Some(RateLimitHeaders {
            remaining_requests: 0,
            remaining_tokens: 100_000,
            reset: Duration::from_secs(30),
        }),
        ..Faults::default()
    });
    let h = gateway(
        "",
        &format!(
            "{}{}{}",
            dep("openai", "a", &a, "gpt", ""),
            dep("anthropic", "b", &b, "claude", ""),
            alias("m", &["a", "b"], "strategy = \"ordered\"")
        ),
    )
    .await;
    assert_eq!(ask(&h, "m", &[]).await.1, "a");
    // `a` said it has no requests left until its reset: no 429 needed to move on.
    for _ in 0..3 {
        let (status, deployment, route, _) = ask(&h, "m", &[]).await;
        assert_eq!(
            (status, deployment.as_str(), route.as_str()),
            (200, "b", "b:ok")
        );
    }
    assert_eq!(a.request_count(), 1);
}

#[tokio::test]
async fn local_rpm_limits_steer_load_away() {
    let (a, b) = (upstream().await, upstream().await);
    let h = gateway(
        "",
        &format!(
            "{}{}{}",
            dep("openai", "a", &a, "gpt", "limits = { rpm = 2 }"),
            dep("openai", "b", &b, "gpt", ""),
            alias("m", &["a", "b"], "strategy = \"ordered\"")
        ),
    )
    .await;
    let served: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(ask(&h, "m", &[]).await.1);
        }
        v
    };
    assert_eq!(served, ["a", "a", "b", "b"]);
}

#[tokio::test]
async fn an_unreachable_first_and_a_flaky_second_serve_every_request() {
    // `b` answers 503 to every other request: each request succeeds on its first retry.
    let b = upstream().await;
    b.set_faults(Faults::ratio(Fault::Status(503), 0.5));
    let dead = unreachable(1);
    let h = gateway(
        "[routing.breaker]\nopen_ms = 600000",
        &format!(
            "{}{}{}",
            dep_at("openai", "a", &dead[0], "gpt", ""),
            dep("openai", "b", &b, "gpt", ""),
            alias("m", &["a", "b"], "strategy = \"ordered\"")
        ),
    )
    .await;
    let mut failed = Vec::new();
    for i in 0..200 {
        let (status, deployment, route, _) = ask(&h, "m", &[]).await;
        if (status, deployment.as_str()) != (200, "b") {
            failed.push((i, status, route));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 200 failed: {failed:?}",
        failed.len()
    );
    // Every 503 of `b` was recovered by the same request's retry: not counted by its breaker.
    // `a` lost every request it was sent: its breaker opened.
    let states = deployment_states(&h).await;
    assert_eq!(
        (states["a"].as_str(), states["b"].as_str()),
        (Some("open"), Some("closed"))
    );
    // The 503s alternate with successes, so after the first request every first try hits one.
    assert_eq!(b.request_count(), 399);
}

#[tokio::test]
async fn the_third_deployment_serves_the_first_request_when_the_first_two_are_down() {
    let c = upstream().await;
    let dead = unreachable(2);
    let h = gateway(
        "",
        &format!(
            "{}{}{}{}",
            dep_at("openai", "dead", &dead[0], "gpt", ""),
            dep_at("openai", "dead2", &dead[1], "gpt", ""),
            dep("openai", "third", &c, "gpt", ""),
            alias("m", &["dead", "dead2", "third"], "strategy = \"ordered\"")
        ),
    )
    .await;
    let (status, deployment, route, body) = ask(&h, "m", &[]).await;
    assert_eq!(
        (status, deployment.as_str()),
        (200, "third"),
        "{route} {body}"
    );
    // The default 6 attempts: retries of the first two leave one for the third.
    assert_eq!(
        route,
        "dead:unreachable,dead:unreachable,dead:unreachable,\
         dead2:unreachable,dead2:unreachable,third:ok"
    );
}

#[tokio::test]
async fn when_every_breaker_is_open_they_are_tried_most_recent_success_first() {
    let (a, b) = (upstream().await, upstream().await);
    a.set_faults(Faults::always(Fault::Status(500)));
    let h = gateway(
        "max_retries = 0\n[routing.breaker]\nconsecutive_failures = 2\nopen_ms = 600000",
        &format!(
            "{}{}{}",
            dep("openai", "a", &a, "gpt", ""),
            dep("openai", "b", &b, "gpt", ""),
            alias("m", &["a", "b"], "strategy = \"ordered\"")
        ),
    )
    .await;
    // `a` fails until its breaker opens; `b` serves.
    for _ in 0..2 {
        let (status, _, route, _) = ask(&h, "m", &[]).await;
        assert_eq!((status, route.as_str()), (200, "a:500,b:ok"));
    }
    // `b` fails too. `a`, though its breaker is open, is still tried before the request fails.
    b.set_faults(Faults::always(Fault::Status(500)));
    for _ in 0..2 {
        assert_ne!(ask(&h, "m", &[]).await.0, 200);
    }
    let failed: Vec<String> = h
        .completions(4)
        .await
        .iter()
        .filter(|r| r.outcome != Outcome::Completed)
        .map(|r| r.route_log.as_ref().unwrap().trace())
        .collect();
    assert_eq!(failed, ["b:500,a:500", "b:500,a:500"]);
    let states = deployment_states(&h).await;
    assert_eq!(
        (states["a"].as_str(), states["b"].as_str()),
        (Some("open"), Some("open"))
    );
    // `a` recovers. Every breaker is open: `b`, whose last success is the more recent, goes
    // first, then `a` serves — not one probe and a 502.
    a.set_faults(Faults::none());
    let (status, deployment, route, _) = ask(&h, "m", &[]).await;
    assert_eq!((status, deployment.as_str()), (200, "a"), "{route}");
    assert_eq!(route, "b:500,a:ok");
    assert_eq!(deployment_states(&h).await["a"], "closed");
}
