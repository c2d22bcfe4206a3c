//! The exact response cache end to end (the real gateway before the mock upstream): what hits
//! and what never does, replays that are the original bytes, interrupted streams never
//! stored, per-request control, the Redis store shared by two gateways, and hits recorded
//! with what they saved.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

use std::time::Duration;

use serde_json::{json, Value};
use tollgate_gateway::relay::Outcome;
use tollgate_tests::harness::Harness;
use tollgate_tests::mock_upstream::MockOptions;

const CACHE_ON: &str = "\n[cache]\nenabled = true\n";

/// POSTs `body` to `path` with `key`; returns (x-tollgate-cache, status, body bytes).
async fn ask(
    h: &Harness,
    key: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> (String, u16, String) {
    let mut r = reqwest::Client::new()
        .post(format!("{}{path}", h.base_url))
        .bearer_auth(key)
        .header("anthropic-version", "2023-06-01")
        .json(body);
    for (n, v) in headers {
        r = r.header(*n, *v);
    }
    let resp = r.send().await.unwrap();
    let cache = resp
        .headers()
        .get("x-tollgate-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let status = resp.status().as_u16();
    (cache, status, resp.text().await.unwrap())
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"model": "oa/normal", "temperature": 0.7,
        "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// Repeats `body` until it hits (answers are stored just after they are sent, so a repeat
/// sent before that misses and stores its own); returns the hit's body and every answer the
/// misses got, the first one's included.
async fn until_hit(
    h: &Harness,
    key: &str,
    path: &str,
    body: &Value,
    first: String,
) -> (String, Vec<String>) {
    let mut answers = vec![first];
    for _ in 0..50 {
        let (c, s, replay) = ask(h, key, path, body, &[]).await;
        assert_eq!(s, 200);
        if c == "hit" {
            return (replay, answers);
        }
        answers.push(replay);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("a repeat never hit: {body}");
}

/// Requests the upstream has served so far.
fn upstream_calls(h: &Harness) -> usize {
    h.upstream.requests().len()
}

#[tokio::test]
async fn what_hits_and_what_never_does() {
    let h = Harness::start_with(MockOptions::default(), CACHE_ON).await;
    let key = h.key.clone();
    let base = chat("What is the capital of France?", json!({}));
    let (c, s, first) = ask(&h, &key, "/v1/chat/completions", &base, &[]).await;
    assert_eq!((c.as_str(), s), ("miss", 200));
    let calls = upstream_calls(&h);
    let (replayed, answers) = until_hit(&h, &key, "/v1/chat/completions", &base, first).await;
    assert!(
        answers.contains(&replayed),
        "a hit replays an answer as it was sent"
    );
    let calls_after_hit = upstream_calls(&h);

    // Member order and whitespace do not matter; end-user ids neither.
    let reordered = r#"{ "messages": [ {"content": "What is the capital of France?", "role": "user"} ],
        "temperature": 0.70, "user": "someone-else", "model": "oa/normal" }"#;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", h.base_url))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(reordered)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-tollgate-cache"], "hit");

    // Anything that changes the answer misses.
    let tools =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    for changed in [
        chat(
            "What is the capital of France?",
            json!({"temperature": 0.2}),
        ),
        chat("What is the capital of France?", json!({"tools": tools})),
        chat(
            "What is the capital of France?",
            json!({"response_format": {"type": "json_object"}}),
        ),
        chat("What is the capital of France?", json!({"max_tokens": 3})),
        chat("What is the capital of Spain?", json!({})),
        chat("What is the capital of France?", json!({"stream": true})),
    ] {
        let (c, s, _) = ask(&h, &key, "/v1/chat/completions", &changed, &[]).await;
        assert_eq!((c.as_str(), s), ("miss", 200), "{changed}");
    }
    // Another tenant, same request: its own miss.
    let (_, other_key) = h.add_tenant("other").await;
    let (c, _, _) = ask(&h, &other_key, "/v1/chat/completions", &base, &[]).await;
    assert_eq!(c, "miss", "tenants never share entries");
    // Per-request control.
    let (c, _, _) = ask(
        &h,
        &key,
        "/v1/chat/completions",
        &base,
        &[("cache-control", "no-store")],
    )
    .await;
    assert_eq!(c, "bypass");
    let (c, _, _) = ask(
        &h,
        &key,
        "/v1/chat/completions",
        &base,
        &[("x-tollgate-cache", "refresh")],
    )
    .await;
    assert_eq!(c, "refresh");
    assert!(upstream_calls(&h) > calls_after_hit);
    assert!(calls_after_hit >= calls, "{calls_after_hit} {calls}");

    // The hits are recorded: cache_hit, nothing billed, the saved usage kept.
    let records = h.sink.records();
    let hits: Vec<_> = records.iter().filter(|r| r.cache_hit.is_some()).collect();
    assert!(hits.len() >= 2, "{} hits recorded", hits.len());
    for r in &hits {
        assert_eq!(r.outcome, Outcome::Completed);
        assert_eq!(r.provider, "cache");
        assert_eq!(r.usage.input_tokens + r.usage.output_tokens, 0);
        let hit = r.cache_hit.unwrap();
        assert!(hit.fraction.is_zero(), "free by default");
        let saved = hit.saved;
        assert!(
            saved.input_tokens > 0 && saved.output_tokens > 0,
            "{saved:?}"
        );
    }
}

#[tokio::test]
async fn streams_replay_their_bytes_and_interrupted_ones_are_never_stored() {
    let h = Harness::start_with(MockOptions::default(), CACHE_ON).await;
    let key = h.key.clone();
    for (path, body) in [
        (
            "/v1/chat/completions",
            chat(
                "Tell me a story.",
                json!({"stream": true, "stream_options": {"include_usage": true}}),
            ),
        ),
        (
            "/v1/messages",
            json!({"model": "an/normal", "max_tokens": 64, "stream": true,
                "messages": [{"role": "user", "content": "Tell me a story."}]}),
        ),
    ] {
        let (c, _, first) = ask(&h, &key, path, &body, &[]).await;
        assert_eq!(c, "miss");
        let (replayed, answers) = until_hit(&h, &key, path, &body, first).await;
        assert!(
            answers.contains(&replayed),
            "{path}: the stream's bytes as they were sent"
        );
    }

    // Cut mid-stream (the upstream drops the connection): never stored.
    let cut = json!({"model": "oa/drop-midstream", "stream": true,
        "messages": [{"role": "user", "content": "x"}]});
    for _ in 0..3 {
        let (c, s, _) = ask(&h, &key, "/v1/chat/completions", &cut, &[]).await;
        assert_eq!((c.as_str(), s), ("miss", 200));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // An upstream error in the stream: never stored.
    let failed = json!({"model": "oa/error-midstream", "stream": true,
        "messages": [{"role": "user", "content": "x"}]});
    for _ in 0..3 {
        let (c, _, _) = ask(&h, &key, "/v1/chat/completions", &failed, &[]).await;
        assert_eq!(c, "miss");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With `backend = "redis"` the entries are in Redis (so every gateway sharing it serves
/// them): a hit disappears when its key is deleted there, and the tenant's byte budget is
/// counted there.
#[tokio::test]
async fn entries_live_in_redis_under_the_tenants_hash_tag() {
    let Ok(redis_url) = std::env::var("TOLLGATE_REDIS_URL") else {
        tollgate_tests::service_missing(
            "entries_live_in_redis_under_the_tenants_hash_tag",
            "needs TOLLGATE_REDIS_URL (scripts/services.sh up redis)",
        );
        return;
    };
    let config =
        format!("\n[cache]\nenabled = true\nbackend = \"redis\"\nredis_url = \"{redis_url}\"\n");
    let h = Harness::start_with(MockOptions::default(), &config).await;
    let (tenant, key) = h.add_tenant("redis-cache").await;
    let body = chat("Is this cached in Redis?", json!({}));
    let (c, _, first) = ask(&h, &key, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(c, "miss");
    let (replayed, answers) = until_hit(&h, &key, "/v1/chat/completions", &body, first).await;
    assert!(answers.contains(&replayed));
    let first = replayed;
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("{{tollgate:cache:{tenant}}}:*");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    let entries: Vec<&String> = keys.iter().filter(|k| !k.ends_with(":bytes")).collect();
    assert_eq!(entries.len(), 1, "{keys:?}");
    let budget: u64 = redis::cmd("GET")
        .arg(format!("{{tollgate:cache:{tenant}}}:bytes"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(budget > first.len() as u64, "{budget}");
    let _: () = redis::cmd("DEL")
        .arg(entries[0])
        .query_async(&mut conn)
        .await
        .unwrap();
    let (c, _, _) = ask(&h, &key, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(c, "miss", "the hit came from Redis");
}

/// Per alias: `cache = false` keeps an alias out of the cache, `cache_bill_hits` sets what
/// its hits cost; other aliases keep `[cache] bill_hits`.
#[tokio::test]
async fn aliases_can_stay_out_of_the_cache_or_price_their_hits() {
    let config = r#"
[cache]
enabled = true
bill_hits = "0.25"

[[models]]
name = "never-cached"
deployments = ["oa"]
cache = false

[[models]]
name = "half-price"
deployments = ["oa"]
cache_bill_hits = "0.5"
"#;
    let h = Harness::start_with(MockOptions::default(), config).await;
    let key = h.key.clone();
    let body = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "Same question."}]});
    for _ in 0..3 {
        let (c, s, _) = ask(&h, &key, "/v1/chat/completions", &body("never-cached"), &[]).await;
        assert_eq!((c.as_str(), s), ("bypass", 200));
    }
    for (model, fraction) in [("half-price", "0.5"), ("oa/normal", "0.25")] {
        let (c, _, first) = ask(&h, &key, "/v1/chat/completions", &body(model), &[]).await;
        assert_eq!(c, "miss", "{model}");
        until_hit(&h, &key, "/v1/chat/completions", &body(model), first).await;
        let records = h.sink.records();
        let hit = records
            .iter()
            .filter(|r| r.requested_model == model)
            .find_map(|r| r.cache_hit)
            .unwrap_or_else(|| panic!("{model}: no hit recorded"));
        assert_eq!(hit.fraction.to_string(), fraction, "{model}");
    }
    let m = h.state.metrics.render();
    assert!(
        m.contains("tollgate_cache_bypasses_total{reason=\"excluded\"} 3"),
        "{m}"
    );
}
