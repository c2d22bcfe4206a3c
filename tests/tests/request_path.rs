//! The one request path of chat completions, messages and embeddings, end to end (the real
//! gateway on a loopback socket before mock upstreams): every response carries its request id
//! and route, tenants get clean errors that name the model and the request id (the upstream's
//! details go to the completion record), responses name the alias the client asked for,
//! embeddings are retried and fall back like chat, and every request record is matched by
//! exactly one completion record whichever way the request ends.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_gateway::relay::Outcome;
use tollgate_schemas::UsageSource;
use tollgate_tests::harness::{sse_events, Harness};
use tollgate_tests::routes_config::{alias, dep, dep_at, gateway, upstream};

/// An address nobody listens on: connections are refused.
const NOWHERE: &str = "http://127.0.0.1:1";

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": 64,
        "messages": [{"role": "user", "content": "Tell me about the sea."}]})
}

/// Completion records of `request_id` (waiting a little for the last one).
async fn completions_of(
    h: &Harness,
    request_id: &str,
) -> Vec<tollgate_gateway::relay::CompletionRecord> {
    for _ in 0..100 {
        let found: Vec<_> = h
            .sink
            .records()
            .into_iter()
            .filter(|r| r.request_id == request_id)
            .collect();
        if !found.is_empty() {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Vec::new()
}

#[tokio::test]
async fn every_response_carries_its_request_id_and_route_and_errors_keep_upstream_details_out() {
    let up = upstream().await;
    let config = [
        dep("openai", "good", &up, "gpt-up", ""),
        dep_at("openai", "dead", NOWHERE, "gpt-dead", ""),
        dep_at("anthropic", "dead-an", NOWHERE, "claude-dead", ""),
        alias("smart", &["good"], ""),
        alias("broken", &["dead", "dead-an"], ""),
    ]
    .concat();
    let h = gateway("", &config).await;
    let client = reqwest::Client::new();

    // Refused before routing: an id, and the route says so.
    let resp = client
        .post(format!("{}/v1/chat/completions", h.base_url))
        .json(&chat("smart", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(header(&resp, "x-request-id").starts_with("req_"));
    assert_eq!(header(&resp, "x-tollgate-route"), "none");
    let resp = h
        .post("/v1/chat/completions", &chat("no-such-model", false))
        .await;
    assert_eq!(resp.status(), 404);
    assert!(header(&resp, "x-request-id").starts_with("req_"));
    assert_eq!(header(&resp, "x-tollgate-route"), "none");
    // Other endpoints carry an id too.
    let resp = client
        .get(format!("{}/healthz", h.base_url))
        .send()
        .await
        .unwrap();
    assert!(header(&resp, "x-request-id").starts_with("req_"));

    // Served: the id is the one of its records.
    let resp = h.post("/v1/chat/completions", &chat("smart", false)).await;
    assert_eq!(resp.status(), 200);
    let id = header(&resp, "x-request-id");
    assert_eq!(header(&resp, "x-tollgate-route"), "good:ok");
    assert_eq!(completions_of(&h, &id).await.len(), 1);

    // Nothing could serve it: a clean message in each API's shape, the details recorded.
    for (path, anthropic) in [("/v1/chat/completions", false), ("/v1/messages", true)] {
        let resp = h.post(path, &chat("broken", false)).await;
        assert_eq!(resp.status(), 502, "{path}");
        let id = header(&resp, "x-request-id");
        let route = header(&resp, "x-tollgate-route");
        assert!(
            route.contains("dead:unreachable") && route.contains("dead-an:unreachable"),
            "every deployment was tried: {route}"
        );
        let body: Value = resp.json().await.unwrap();
        let message = if anthropic {
            assert_eq!(body["type"], "error");
            body["error"]["message"].as_str().unwrap().to_string()
        } else {
            assert_eq!(body["error"]["type"], "server_error");
            body["error"]["message"].as_str().unwrap().to_string()
        };
        assert!(
            message.contains("`broken`") && message.contains(&id),
            "{message}"
        );
        for internal in ["127.0.0.1", "error sending", "dead", "connect", "url"] {
            assert!(!message.contains(internal), "{internal:?} in {message}");
        }
        let records = completions_of(&h, &id).await;
        assert_eq!(records.len(), 1, "{id}");
        let Outcome::UpstreamError(detail) = &records[0].outcome else {
            panic!("{:?}", records[0].outcome)
        };
        assert!(
            detail.contains("unreachable"),
            "the record keeps the details: {detail}"
        );
    }
}

#[tokio::test]
async fn responses_name_the_alias_the_client_asked_for() {
    let up = upstream().await;
    let config = [
        dep("openai", "oa", &up, "gpt-up", ""),
        dep("anthropic", "an", &up, "claude-up", ""),
        alias("oa-alias", &["oa"], ""),
        alias("an-alias", &["an"], ""),
    ]
    .concat();
    let h = gateway("", &config).await;
    for model in ["oa-alias", "an-alias"] {
        let upstream_model = if model == "oa-alias" {
            "gpt-up"
        } else {
            "claude-up"
        };
        for (path, anthropic_client) in [("/v1/chat/completions", false), ("/v1/messages", true)] {
            for stream in [false, true] {
                let what = format!("{model} via {path}, stream {stream}");
                let resp = h.post(path, &chat(model, stream)).await;
                assert_eq!(resp.status(), 200, "{what}");
                assert_eq!(
                    header(&resp, "x-tollgate-upstream-model"),
                    upstream_model,
                    "{what}"
                );
                let text = resp.text().await.unwrap();
                let named: Vec<Value> = if stream {
                    sse_events(&text)
                        .into_iter()
                        .filter_map(|(_, d)| serde_json::from_str::<Value>(&d).ok())
                        .filter_map(|v| {
                            if anthropic_client {
                                v.pointer("/message/model").cloned()
                            } else {
                                v.get("model").cloned()
                            }
                        })
                        .collect()
                } else {
                    let v: Value = serde_json::from_str(&text).unwrap();
                    vec![v["model"].clone()]
                };
                assert!(!named.is_empty(), "{what}: no model named in {text}");
                assert!(
                    named.iter().all(|m| m == model),
                    "{what}: {named:?} in {text}"
                );
            }
        }
    }
    // The records keep the upstream model.
    let records = h.completions(8).await;
    assert!(records
        .iter()
        .all(|r| r.upstream_model == "gpt-up" || r.upstream_model == "claude-up"));
}

#[tokio::test]
async fn embeddings_take_the_same_path_retried_fallen_back_and_billed() {
    let up = upstream().await;
    let config = [
        dep(
            "openai",
            "emb-down",
            &up,
            "overloaded",
            "embeddings = true\n",
        ),
        dep_at("openai", "emb-nowhere", NOWHERE, "x", "embeddings = true\n"),
        dep("openai", "emb-ok", &up, "no-usage", "embeddings = true\n"),
        alias(
            "embed",
            &["emb-down", "emb-nowhere", "emb-ok"],
            "strategy = \"ordered\"\n",
        ),
    ]
    .concat();
    let h = gateway("", &config).await;
    let resp = h
        .post(
            "/v1/embeddings",
            &json!({"model": "embed", "input": ["the quick brown fox", "jumps over"]}),
        )
        .await;
    let route = header(&resp, "x-tollgate-route");
    assert_eq!(resp.status(), 200, "{route}");
    assert!(
        route.starts_with("emb-down:503") && route.ends_with("emb-ok:ok"),
        "{route}"
    );
    assert!(route.contains("emb-nowhere:unreachable"), "{route}");
    let id = header(&resp, "x-request-id");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["model"], "embed");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(2));
    // The upstream reported no usage: the input is counted, not billed as zero.
    let records = completions_of(&h, &id).await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].route, "embeddings");
    assert_eq!(records[0].usage.source, UsageSource::Counted);
    assert!(records[0].usage.input_tokens >= 6, "{:?}", records[0].usage);
    assert_eq!(records[0].usage.output_tokens, 0);

    // Bad input is the client's error, in OpenAI's shape, never sent upstream.
    let resp = h
        .post("/v1/embeddings", &json!({"model": "embed", "input": []}))
        .await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["param"], "input");
}

/// xorshift64: a reproducible sequence from the printed seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test]
async fn every_request_record_has_exactly_one_completion_whatever_happens() {
    // One alias per upstream behaviour; requests pick one at random, stream or not, and
    // some clients give up early.
    let up = upstream().await;
    let scenarios = [
        "normal",
        "error-midstream",
        "drop-midstream",
        "server-error",
        "bad-request",
        "rate-limited",
        "stall-midstream",
        "hang",
        "context-length-exceeded",
    ];
    let mut config = String::new();
    for s in scenarios {
        config.push_str(&dep(
            "openai",
            &format!("oa-{s}"),
            &up,
            s,
            "first_byte_timeout_ms = 400\n",
        ));
        config.push_str(&dep(
            "anthropic",
            &format!("an-{s}"),
            &up,
            s,
            "first_byte_timeout_ms = 400\n",
        ));
        config.push_str(&alias(&format!("oa-{s}"), &[&format!("oa-{s}")], ""));
        config.push_str(&alias(&format!("an-{s}"), &[&format!("an-{s}")], ""));
    }
    config.push_str(&dep_at("openai", "nowhere", NOWHERE, "x", ""));
    config.push_str(&alias("nowhere", &["nowhere"], ""));
    let h = gateway("max_retry_after_ms = 0\ndeadline_ms = 1500\n", &config).await;
    let seed = tollgate_tests::seed("TOLLGATE_PATH_SEED");
    let mut rng = Rng(seed);
    let mut plans = Vec::new();
    for _ in 0..48 {
        let s = scenarios[rng.below(scenarios.len() as u64) as usize];
        let model = match rng.below(10) {
            0 => "nowhere".to_string(),
            1 => "no-such-model".to_string(),
            n if n % 2 == 0 => format!("oa-{s}"),
            _ => format!("an-{s}"),
        };
        let path = if rng.below(2) == 0 {
            "/v1/chat/completions"
        } else {
            "/v1/messages"
        };
        let stream = rng.below(2) == 0;
        // A client that gives up after a moment (mid-stream, or while a whole answer is
        // awaited).
        // A stalled answer ends only that way.
        let give_up = (rng.below(3) == 0 || s == "stall-midstream")
            .then(|| Duration::from_millis(50 + rng.below(300)));
        plans.push((model, path, stream, give_up));
    }
    let client = reqwest::Client::new();
    let tasks: Vec<_> = plans
        .into_iter()
        .map(|(model, path, stream, give_up)| {
            let (client, base, key) = (client.clone(), h.base_url.clone(), h.key.clone());
            tokio::spawn(async move {
                let send = async {
                    let resp = client
                        .post(format!("{base}{path}"))
                        .bearer_auth(&key)
                        .header("anthropic-version", "2023-06-01")
                        .json(&chat(&model, stream))
                        .send()
                        .await
                        .expect("sent");
                    let id = header(&resp, "x-request-id");
                    assert!(id.starts_with("req_"), "{model} {path}: no request id");
                    assert!(
                        !header(&resp, "x-tollgate-route").is_empty(),
                        "{model} {path}: no route: {} {:?}",
                        resp.status(),
                        resp.headers()
                    );
                    let _ = resp.bytes().await;
                };
                match give_up {
                    Some(after) => {
                        let _ = tokio::time::timeout(after, send).await;
                    }
                    None => send.await,
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
    // Cut streams and abandoned answers are recorded when the gateway notices; wait until
    // the records stop changing.
    let mut last = (usize::MAX, usize::MAX);
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = (h.sink.requests().len(), h.sink.records().len());
        if now == last && now.0 == now.1 {
            break;
        }
        last = now;
    }
    let requests = h.sink.requests();
    let mut completions: HashMap<String, usize> = HashMap::new();
    for r in h.sink.records() {
        *completions.entry(r.request_id).or_default() += 1;
    }
    assert!(!requests.is_empty(), "nothing was routed");
    for r in &requests {
        assert_eq!(
            completions.remove(&r.request_id),
            Some(1),
            "{} ({}, stream {}): one completion per request record (seed {seed})",
            r.request_id,
            r.requested_model,
            r.stream
        );
    }
    assert!(
        completions.is_empty(),
        "completions without a request record: {completions:?} (seed {seed})"
    );
}

/// The refusals the application answers on its own, through `app()` directly (no socket):
/// each in its API's shape, with a request id and `x-tollgate-route: none`.
#[tokio::test]
async fn the_app_refuses_bad_requests_in_each_apis_shape() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    let h = gateway("", &dep("openai", "oa", &upstream().await, "gpt-up", "")).await;
    let app = || tollgate_gateway::app::app(h.state.clone());
    let call = |path: &str, key: Option<&str>, body: Body| {
        let mut r = Request::post(path).header("content-type", "application/json");
        if let Some(k) = key {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        r.body(body).unwrap()
    };
    let read = |resp: axum::response::Response| async move {
        let (parts, body) = resp.into_parts();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        let header = |n: &str| {
            parts
                .headers
                .get(n)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        assert!(header("x-request-id").starts_with("req_"));
        (
            parts.status.as_u16(),
            header("x-tollgate-route"),
            header("www-authenticate"),
            serde_json::from_slice::<Value>(&bytes).unwrap(),
        )
    };
    let key = Some(h.key.as_str());

    let (status, route, auth, body) = read(
        app()
            .oneshot(call("/v1/chat/completions", None, Body::from("{}")))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, route.as_str(), auth.as_str()),
        (401, "none", "Bearer")
    );
    assert_eq!(body["error"]["code"], "invalid_api_key");

    let (status, route, _, body) = read(
        app()
            .oneshot(call("/v1/messages", None, Body::from("{}")))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, route.as_str()), (401, "none"));
    assert_eq!(body["error"]["type"], "authentication_error");

    let (status, _, _, body) = read(
        app()
            .oneshot(call(
                "/v1/chat/completions",
                key,
                Body::from("{\"model\": "),
            ))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error");

    let (status, _, _, body) = read(
        app()
            .oneshot(call(
                "/v1/chat/completions",
                key,
                Body::from(r#"{"model":"oa","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#),
            ))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], "temperature");

    let big = vec![b' '; h.state.config.server.max_body_bytes + 1];
    let (status, _, _, body) = read(
        app()
            .oneshot(call("/v1/embeddings", key, Body::from(big)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 413);
    assert_eq!(body["error"]["code"], "request_too_large");

    let (status, _, _, body) = read(
        app()
            .oneshot(call("/v1/nothing-here", key, Body::empty()))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 404);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/nothing-here"));
    // Nothing of it reached the upstream.
    assert!(h.upstream.requests().is_empty());
}

/// Two gateway instances sharing one provider key (`limits = { rpm = 10 }`) through Redis
/// stay under its limit together: what one sent counts against the other once synced.
#[tokio::test]
async fn two_gateways_share_a_deployments_requests_per_minute_through_redis() {
    let Ok(redis) = std::env::var("TOLLGATE_REDIS_URL") else {
        tollgate_tests::service_missing(
            "two_gateways_share_a_deployments_requests_per_minute_through_redis",
            "needs TOLLGATE_REDIS_URL (scripts/services.sh up redis)",
        );
        return;
    };
    // A fresh deployment name: Redis keeps a name's counters for three minutes.
    let name = format!("shared-{}", std::process::id() ^ rand_tail());
    let routing = format!(
        "max_retry_after_ms = 0\n\n[routing.rate_limits]\nshared_redis_url = \"{redis}\"\n\
         shared_sync_ms = 50\n"
    );
    let start = || async {
        let up = upstream().await;
        let body = [
            dep("openai", &name, &up, "gpt-up", "limits = { rpm = 10 }\n"),
            alias("limited", &[&name], ""),
        ]
        .concat();
        // The upstream lives as long as its gateway.
        (gateway(&routing, &body).await, up)
    };
    let ((a, _up_a), (b, _up_b)) = (start().await, start().await);
    let served = |h: &Harness, n: usize| {
        let h_base = h.base_url.clone();
        let key = h.key.clone();
        async move {
            let client = reqwest::Client::new();
            let mut ok = 0;
            for _ in 0..n {
                let resp = client
                    .post(format!("{h_base}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&chat("limited", false))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status();
                let route = header(&resp, "x-tollgate-route");
                assert!(
                    status == 200 || status == 429,
                    "{status} {route}: {}",
                    resp.text().await.unwrap_or_default()
                );
                ok += usize::from(status == 200);
            }
            ok
        }
    };
    assert_eq!(served(&a, 6).await, 6);
    // A few sync rounds: b has learnt of a's six.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served(&b, 10).await,
        4,
        "b may send only what a left of the 10"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        served(&a, 3).await,
        0,
        "the key's minute is used up on both"
    );
}

/// Some bits that differ between runs of the test binary.
fn rand_tail() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}
