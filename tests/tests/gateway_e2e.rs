//! End-to-end: the real gateway on a loopback socket in front of the protocol-faithful mock
//! upstream (OpenAI and Anthropic wire formats), driven over HTTP.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers: failing loudly is the point

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_gateway::relay::Outcome;
use tollgate_schemas::UsageSource;
use tollgate_tests::harness::{read_events, sse_events, Harness, UPSTREAM_KEY};
use tollgate_tests::mock_upstream::{
    prompt_tokens_for, reply_text, tool_output_tokens, MockOptions, CHUNKS_BEFORE_FAILURE,
    SPLIT_EXTRA_INPUT_TOKENS, TOOL_CALL_ARGUMENTS,
};

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream,
        "messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Tell me about the weather in Paris today, please."}]})
}

fn messages(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": 256, "system": "You are terse.",
        "messages": [{"role": "user", "content": "Tell me about the weather in Paris today, please."}]})
}

/// Prompt tokens the mock computed for the last request it received.
fn upstream_prompt(h: &Harness) -> u64 {
    let reqs = h.upstream.requests();
    prompt_tokens_for(&reqs.last().expect("upstream saw a request").body)
}

fn openai_stream_content(body: &str) -> (String, Vec<Value>) {
    let mut text = String::new();
    let mut chunks = Vec::new();
    for (_, data) in sse_events(body) {
        if data == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(&data).expect("chunk is JSON");
        if let Some(c) = v
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            text.push_str(c);
        }
        chunks.push(v);
    }
    (text, chunks)
}

#[tokio::test]
async fn openai_usage_is_billed_exactly_as_upstream_reports_it() {
    let h = Harness::start().await;
    let mut n = 0;
    for scenario in ["normal", "cached", "usage-in-last-choice-chunk"] {
        for (stream, include_usage) in [(false, false), (true, false), (true, true)] {
            let mut body = chat(&format!("oa/{scenario}"), stream);
            if include_usage {
                body["stream_options"] = json!({"include_usage": true});
            }
            let resp = h.post("/v1/chat/completions", &body).await;
            assert_eq!(resp.status(), 200, "{scenario}");
            let text = resp.text().await.unwrap();
            n += 1;
            let rec = h.completions(n).await.pop().unwrap();
            let prompt = upstream_prompt(&h);
            let cached = if scenario == "cached" { prompt / 2 } else { 0 };
            assert_eq!(rec.outcome, Outcome::Completed, "{scenario} {text}");
            assert_eq!(rec.usage.source, UsageSource::Provider);
            assert_eq!(
                (
                    rec.usage.input_tokens,
                    rec.usage.cached_input_tokens,
                    rec.usage.output_tokens
                ),
                (prompt, cached, 20),
                "{scenario} stream={stream} include_usage={include_usage}"
            );
            if stream {
                assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
                let (content, chunks) = openai_stream_content(&text);
                assert_eq!(content, reply_text(20));
                let usage_objects: Vec<&Value> = chunks
                    .iter()
                    .filter_map(|c| c.get("usage"))
                    .filter(|u| u.is_object())
                    .collect();
                if include_usage {
                    assert_eq!(usage_objects.len(), 1, "{scenario}");
                    assert_eq!(usage_objects[0]["prompt_tokens"], prompt);
                    assert_eq!(usage_objects[0]["completion_tokens"], 20);
                } else {
                    assert!(
                        usage_objects.is_empty(),
                        "usage leaked to client: {scenario}"
                    );
                    // Every chunk the client gets still has its choices.
                    assert!(chunks
                        .iter()
                        .all(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty())));
                }
            } else {
                let v: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(v["usage"]["prompt_tokens"], prompt);
                assert_eq!(v["choices"][0]["message"]["content"], reply_text(20));
            }
        }
    }
    // The gateway always asked the upstream for usage on streams.
    for r in h
        .upstream
        .requests()
        .iter()
        .filter(|r| r.body["stream"] == true)
    {
        assert_eq!(r.body["stream_options"]["include_usage"], true);
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {UPSTREAM_KEY}").as_str())
        );
    }
}

#[tokio::test]
async fn anthropic_usage_is_billed_exactly_including_the_split_and_cache_reads() {
    let h = Harness::start().await;
    let mut n = 0;
    for scenario in ["normal", "cached", "anthropic-usage-split"] {
        for stream in [false, true] {
            let resp = h
                .post("/v1/messages", &messages(&format!("an/{scenario}"), stream))
                .await;
            assert_eq!(resp.status(), 200);
            let text = resp.text().await.unwrap();
            n += 1;
            let rec = h.completions(n).await.pop().unwrap();
            let prompt = upstream_prompt(&h);
            let extra = if scenario == "anthropic-usage-split" {
                SPLIT_EXTRA_INPUT_TOKENS
            } else {
                0
            };
            let cached = if scenario == "cached" { prompt / 2 } else { 0 };
            assert_eq!(rec.outcome, Outcome::Completed, "{text}");
            assert_eq!(
                (
                    rec.usage.input_tokens,
                    rec.usage.cached_input_tokens,
                    rec.usage.output_tokens
                ),
                (prompt + extra, cached, 20),
                "{scenario} stream={stream}"
            );
            if stream {
                // Same-dialect streams are forwarded byte for byte.
                let events = sse_events(&text);
                assert_eq!(events.first().unwrap().0, "message_start");
                assert_eq!(events.last().unwrap().0, "message_stop");
            }
        }
    }
    for r in h.upstream.requests() {
        assert_eq!(r.header("x-api-key"), Some(UPSTREAM_KEY));
        assert!(r.header("anthropic-version").is_some());
    }
}

#[tokio::test]
async fn openai_client_gets_anthropic_tool_calls_as_openai_stream_deltas() {
    let h = Harness::start().await;
    let mut body = chat("an/tools", true);
    body["tools"] = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"location": {"type": "string"}}}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]);
    body["stream_options"] = json!({"include_usage": true});
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let (_, chunks) = openai_stream_content(&text);
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    for c in &chunks {
        if let Some(f) = c
            .pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
        {
            finish = Some(f.to_string());
        }
        for tc in c
            .pointer("/choices/0/delta/tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let i = tc["index"].as_u64().unwrap() as usize;
            if calls.len() <= i {
                calls.resize(i + 1, Default::default());
            }
            if let Some(id) = tc["id"].as_str() {
                calls[i].0 = id.to_string();
            }
            if let Some(name) = tc.pointer("/function/name").and_then(Value::as_str) {
                calls[i].1.push_str(name);
            }
            if let Some(a) = tc.pointer("/function/arguments").and_then(Value::as_str) {
                calls[i].2.push_str(a);
            }
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    assert_eq!(calls.len(), 2, "{text}");
    for (i, call) in calls.iter().enumerate() {
        assert!(!call.0.is_empty());
        assert_eq!(call.2, TOOL_CALL_ARGUMENTS[i]);
    }
    // The Anthropic upstream got Anthropic-shaped tools.
    let sent = &h.upstream.requests()[0].body;
    assert_eq!(sent["tools"][0]["input_schema"]["type"], "object");
    assert_eq!(sent["system"], "You are terse.");
    let rec = h.completions(1).await.pop().unwrap();
    assert_eq!(rec.usage.output_tokens, tool_output_tokens(true));
    let usage = chunks
        .iter()
        .find_map(|c| c.get("usage").filter(|u| u.is_object()))
        .unwrap();
    assert_eq!(usage["completion_tokens"], tool_output_tokens(true));
}

#[tokio::test]
async fn anthropic_client_gets_openai_tool_calls_as_tool_use_blocks() {
    let h = Harness::start().await;
    let mut body = messages("oa/tools", true);
    body["tools"] = json!([{"name": "get_weather", "input_schema": {"type": "object"}},
                           {"name": "get_time", "input_schema": {"type": "object"}}]);
    let resp = h.post("/v1/messages", &body).await;
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    let events = sse_events(&text);
    let mut inputs: Vec<String> = Vec::new();
    let mut stop = None;
    let mut usage = Value::Null;
    for (name, data) in &events {
        let v: Value = serde_json::from_str(data).unwrap();
        assert_eq!(
            v["type"],
            name.as_str(),
            "event name matches its payload type"
        );
        match name.as_str() {
            "content_block_start" if v["content_block"]["type"] == "tool_use" => {
                inputs.push(String::new())
            }
            "content_block_delta" if v["delta"]["type"] == "input_json_delta" => inputs
                .last_mut()
                .unwrap()
                .push_str(v["delta"]["partial_json"].as_str().unwrap()),
            "message_delta" => {
                stop = v["delta"]["stop_reason"].as_str().map(str::to_string);
                usage = v["usage"].clone();
            }
            _ => {}
        }
    }
    assert_eq!(stop.as_deref(), Some("tool_use"));
    assert_eq!(
        inputs,
        TOOL_CALL_ARGUMENTS
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    );
    assert_eq!(usage["output_tokens"], tool_output_tokens(false));
    assert_eq!(events.last().unwrap().0, "message_stop");
    // The OpenAI upstream got OpenAI-shaped tools and an injected include_usage.
    let sent = &h.upstream.requests()[0].body;
    assert_eq!(sent["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(sent["messages"][0]["role"], "system");
    assert_eq!(sent["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn non_streaming_translation_both_ways() {
    let h = Harness::start().await;
    let v: Value = h
        .post("/v1/chat/completions", &chat("an/normal", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], reply_text(20));
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let v: Value = h
        .post("/v1/messages", &messages("oa/normal", false))
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], reply_text(20));
    assert_eq!(v["stop_reason"], "end_turn");
    assert_eq!(v["usage"]["output_tokens"], 20);
}

#[tokio::test]
async fn frames_split_across_reads_with_comments_relay_intact() {
    let h = Harness::start().await;
    let text = h
        .post("/v1/chat/completions", &chat("oa/split-frames", true))
        .await
        .text()
        .await
        .unwrap();
    let (content, _) = openai_stream_content(&text);
    assert_eq!(content, reply_text(20));
    assert!(text.contains("data: [DONE]"));
    let text = h
        .post("/v1/chat/completions", &chat("an/split-frames", true))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(openai_stream_content(&text).0, reply_text(20));
    let text = h
        .post("/v1/messages", &messages("an/split-frames", true))
        .await
        .text()
        .await
        .unwrap();
    let deltas: String = sse_events(&text)
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            serde_json::from_str::<Value>(d).unwrap()["delta"]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(deltas, reply_text(20));
    let recs = h.completions(3).await;
    assert!(recs
        .iter()
        .all(|r| r.outcome == Outcome::Completed && r.usage.output_tokens == 20));
}

#[tokio::test]
async fn upstream_errors_mid_stream_end_the_stream_with_an_error_event() {
    let h = Harness::start().await;
    // OpenAI upstream error event, OpenAI client: forwarded as is.
    let text = h
        .post("/v1/chat/completions", &chat("oa/error-midstream", true))
        .await
        .text()
        .await
        .unwrap();
    let last: Value = serde_json::from_str(&sse_events(&text).last().unwrap().1).unwrap();
    assert!(last["error"]["message"].is_string(), "{text}");
    // Anthropic error event, OpenAI client: translated.
    let text = h
        .post("/v1/chat/completions", &chat("an/error-midstream", true))
        .await
        .text()
        .await
        .unwrap();
    let last: Value = serde_json::from_str(&sse_events(&text).last().unwrap().1).unwrap();
    assert_eq!(last["error"]["type"], "overloaded_error", "{text}");
    // Dropped connection, Anthropic client of an OpenAI upstream: the gateway ends it.
    let text = h
        .post("/v1/messages", &messages("oa/drop-midstream", true))
        .await
        .text()
        .await
        .unwrap();
    let (name, data) = sse_events(&text).last().unwrap().clone();
    assert_eq!(name, "error", "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&data).unwrap()["type"],
        "error"
    );
    // Dropped connection, OpenAI client: error chunk, no [DONE].
    let text = h
        .post("/v1/chat/completions", &chat("oa/drop-midstream", true))
        .await
        .text()
        .await
        .unwrap();
    assert!(!text.contains("[DONE]"));
    assert!(sse_events(&text).last().unwrap().1.contains("\"error\""));
    let recs = h.completions(4).await;
    assert_eq!(recs.len(), 4);
    for r in &recs {
        assert!(
            matches!(r.outcome, Outcome::UpstreamError(_)),
            "{:?}",
            r.outcome
        );
        // Billed for what was generated before the failure (3 chunks), counted locally.
        assert_eq!(r.usage.source, UsageSource::Counted);
        assert!(r.usage.output_tokens >= 3, "{:?}", r.usage);
    }
}

#[tokio::test]
async fn upstream_error_statuses_map_to_each_api_shape() {
    let h = Harness::start().await;
    let resp = h
        .post("/v1/chat/completions", &chat("oa/rate-limited", false))
        .await;
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let resp = h
        .post("/v1/messages", &messages("an/rate-limited", true))
        .await;
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    let resp = h
        .post("/v1/chat/completions", &chat("oa/server-error", true))
        .await;
    assert_eq!(resp.status(), 502);
    let resp = h
        .post("/v1/messages", &messages("an/overloaded", false))
        .await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "overloaded_error"
    );
    let resp = h
        .post("/v1/chat/completions", &chat("oa/bad-request", false))
        .await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["error"]["param"], "temperature",
        "the upstream's param is passed on: {v}"
    );
    let started = Instant::now();
    let resp = h
        .post("/v1/chat/completions", &chat("oa/hang", false))
        .await;
    assert_eq!(resp.status(), 504);
    assert!(started.elapsed() < Duration::from_secs(10));
    let body = resp.text().await.unwrap();
    assert!(!body.contains(UPSTREAM_KEY));
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_and_is_billed_for_what_it_got() {
    let h = Harness::start().await;
    // The upstream sends its role chunk and three content chunks, then nothing until its
    // client leaves: the stream can only end by the gateway closing the upstream connection,
    // however slow this machine is, and the gateway must notice the client's disconnect
    // without a write to fail (nothing flows after the client has left).
    let mut resp = h
        .post("/v1/chat/completions", &chat("oa/stall-midstream", true))
        .await;
    assert_eq!(resp.status(), 200);
    read_events(&mut resp, 1 + CHUNKS_BEFORE_FAILURE).await;
    let dropped_at = Instant::now();
    drop(resp);
    let mut cancelled = Vec::new();
    for _ in 0..500 {
        cancelled = h.upstream.cancelled_streams();
        if !cancelled.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(cancelled.len(), 1, "upstream never saw the cancellation");
    let delay = cancelled[0]
        .noticed_at
        .saturating_duration_since(dropped_at);
    println!("upstream noticed the client's disconnect {delay:?} after it happened");
    assert_eq!(cancelled[0].chunks_sent, CHUNKS_BEFORE_FAILURE);
    let rec = h.completions(1).await.pop().unwrap();
    assert_eq!(rec.outcome, Outcome::ClientDisconnected);
    assert_eq!(rec.usage.source, UsageSource::Counted);
    assert!(
        rec.usage.output_tokens >= CHUNKS_BEFORE_FAILURE as u64,
        "{:?}",
        rec.usage
    );
    assert!(rec.usage.input_tokens > 0, "{:?}", rec.usage);
}

#[tokio::test]
async fn authentication_failures_are_401_in_each_shape() {
    let h = Harness::start().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", h.base_url);
    let resp = client
        .post(&url)
        .json(&chat("oa/normal", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_api_key"
    );
    // A typo fails the checksum.
    let mut typo = h.key.clone().into_bytes();
    typo[5] = if typo[5] == b'a' { b'b' } else { b'a' };
    let resp = client
        .post(&url)
        .bearer_auth(String::from_utf8(typo).unwrap())
        .json(&chat("oa/normal", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Well-formed but unknown.
    let other = tollgate_gateway::auth::keys::generate().secret;
    let resp = client
        .post(&url)
        .bearer_auth(other)
        .json(&chat("oa/normal", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Anthropic shape on /v1/messages; x-api-key accepted.
    let murl = format!("{}/v1/messages", h.base_url);
    let resp = client
        .post(&murl)
        .header("x-api-key", "nope")
        .json(&messages("an/normal", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "authentication_error"
    );
    let resp = client
        .post(&murl)
        .header("x-api-key", &h.key)
        .header("anthropic-version", "2023-06-01")
        .json(&messages("an/normal", false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        h.upstream.request_count(),
        1,
        "failed auth never reaches upstream"
    );
}

#[tokio::test]
async fn bad_input_gets_clear_errors_and_never_reaches_upstream() {
    let h = Harness::start().await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", h.base_url);
    let send = |body: Vec<u8>| {
        client
            .post(&url)
            .bearer_auth(&h.key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let resp = send(b"{not json".to_vec()).await.unwrap();
    assert_eq!(resp.status(), 400);
    let resp = send(serde_json::to_vec(&json!({"model": "oa/normal", "messages": [{"role": "user", "content": "x"}], "max_tokens": -3})).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["param"],
        "max_tokens"
    );
    let resp = send(
        serde_json::to_vec(
            &json!({"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        )
        .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "model_not_found"
    );
    let big = json!({"model": "oa/normal", "messages": [{"role": "user", "content": "x".repeat(70_000)}]});
    let resp = send(serde_json::to_vec(&big).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 413);
    // A pile of odd inputs: always a 4xx JSON error, never a panic or a 5xx.
    let odd: Vec<&[u8]> = vec![
        b"", b"null", b"[]", b"\"str\"", b"{}", b"{\"model\":1}", b"{\"model\":\"oa/x\",\"messages\":{}}",
        b"{\"model\":\"oa/x\",\"messages\":[]}", b"{\"model\":\"oa/x\",\"messages\":[{\"role\":\"wizard\",\"content\":\"x\"}]}",
        b"{\"model\":\"oa/x\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\"}]}]}",
        b"{\"model\":\"oa/x\",\"messages\":[{\"role\":\"user\"}]}", b"\xff\xfe\x00", b"{\"model\":\"\\ud800\"}",
    ];
    for body in odd {
        let resp = send(body.to_vec()).await.unwrap();
        let status = resp.status();
        let v: Value = resp.json().await.unwrap();
        assert!(
            status.is_client_error(),
            "{status} for {:?}",
            String::from_utf8_lossy(body)
        );
        assert!(v["error"]["message"].is_string());
    }
    let resp = client
        .post(format!("{}/v1/messages", h.base_url))
        .header("x-api-key", &h.key)
        .body(r#"{"model":"an/normal","messages":[{"role":"user","content":"x"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    assert_eq!(h.upstream.request_count(), 0);
}

/// Bodies from 16 KiB on are parsed and counted on the blocking pool: the answer, the
/// request record's estimate and the errors are the same as on the serving thread.
#[tokio::test]
async fn large_requests_are_served_counted_and_refused_like_small_ones() {
    let h = Harness::start().await;
    let words: Vec<String> = (0..6_000).map(|i| format!("word{}", i % 977)).collect();
    let prompt = words.join(" ");
    let mut body = chat("oa/normal", true);
    body["messages"][1]["content"] = json!(prompt);
    assert!(serde_json::to_vec(&body).unwrap().len() > 32 * 1024);
    // Counted exactly first: this also loads the encoding, which the gateway's estimate
    // never waits for (until it is loaded, estimates count by bytes).
    let typed: tollgate_gateway::api::openai::ChatRequest =
        serde_json::from_value(body.clone()).unwrap();
    let expected = tollgate_gateway::tokens::count_openai_prompt(&typed);
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let request_id = resp
        .headers()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let (text, _) = openai_stream_content(&resp.text().await.unwrap());
    assert!(!text.is_empty());
    assert!(expected > 6_000, "{expected}");
    let record = h
        .sink
        .requests()
        .into_iter()
        .find(|r| r.request_id == request_id)
        .expect("request record");
    assert_eq!(record.prompt_estimate, expected);

    // A wrong type deep in a large body is still a 400 naming the field.
    body["temperature"] = json!("hot");
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["param"],
        "temperature"
    );
    // And in Anthropic's shape on /v1/messages.
    let mut body = messages("an/normal", false);
    body["messages"][0]["content"] = json!(prompt);
    body["max_tokens"] = json!("many");
    let resp = h.post("/v1/messages", &body).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    assert_eq!(h.upstream.request_count(), 1);
}

#[tokio::test]
async fn unknown_fields_reach_openai_style_upstreams_untouched() {
    let h = Harness::start().await;
    let mut body = chat("oa/normal", false);
    body["top_k"] = json!(40);
    body["guided_json"] = json!({"type": "object"});
    body["messages"][1]["x_vendor"] = json!("kept");
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    let sent = &h.upstream.requests()[0].body;
    assert_eq!(sent["top_k"], 40);
    assert_eq!(sent["guided_json"]["type"], "object");
    assert_eq!(sent["messages"][1]["x_vendor"], "kept");
    assert_eq!(sent["model"], "normal");
}

#[tokio::test]
async fn models_embeddings_health_and_metrics() {
    let h = Harness::start_with(MockOptions::default(), "").await;
    let client = reqwest::Client::new();
    let v: Value = client
        .get(format!("{}/v1/models", h.base_url))
        .bearer_auth(&h.key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"mock/fast"), "{ids:?}");
    let v: Value = client
        .get(format!("{}/v1/models", h.base_url))
        .header("x-api-key", &h.key)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"][0]["type"], "model");
    let v: Value = h
        .post(
            "/v1/embeddings",
            &json!({"model": "oa/embed", "input": ["a", "b"]}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let v: Value = h
        .post(
            "/v1/embeddings",
            &json!({"model": "mock/embed", "input": "hello"}),
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
    let resp = h
        .post(
            "/v1/embeddings",
            &json!({"model": "an/x", "input": "hello"}),
        )
        .await;
    assert_eq!(resp.status(), 400);
    assert_eq!(
        client
            .get(format!("{}/healthz", h.base_url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(format!("{}/readyz", h.base_url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let _ = h
        .post("/v1/chat/completions", &chat("mock/fast", true))
        .await
        .text()
        .await;
    h.completions(3).await;
    let m = client
        .get(format!("{}/metrics", h.base_url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "tollgate_requests_total",
        "tollgate_time_to_first_token_seconds",
        "tollgate_gateway_overhead_seconds",
        "tollgate_tokens_total",
    ] {
        assert!(m.contains(name), "{name} missing");
    }
    assert!(m.contains("model=\"mock/fast\""));
    assert!(!m.contains(&h.key) && !m.contains(UPSTREAM_KEY));
    let resp = client
        .get(format!("{}/v1/nothing", h.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let resp = client
        .get(format!("{}/v1/chat/completions", h.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
}

#[tokio::test]
async fn vllm_and_openai_compatible_deployments_pass_extra_sampling_parameters() {
    let h = Harness::start().await;
    let mut body = chat("vl/normal", true);
    for (k, v) in [
        ("top_k", json!(20)),
        ("min_p", json!(0.05)),
        ("repetition_penalty", json!(1.1)),
        ("guided_json", json!({"type": "object"})),
        ("best_of", json!(1)),
    ] {
        body[k] = v;
    }
    let resp = h.post("/v1/chat/completions", &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-tollgate-provider"], "vllm");
    let (content, _) = openai_stream_content(&resp.text().await.unwrap());
    assert_eq!(content, reply_text(20));
    let sent = &h.upstream.requests()[0].body;
    for k in [
        "top_k",
        "min_p",
        "repetition_penalty",
        "guided_json",
        "best_of",
    ] {
        assert_eq!(sent[k], body[k], "{k} passed through");
    }
    // An Anthropic client over an OpenAI-compatible server, with tools.
    let mut m = messages("oc/tools", false);
    m["tools"] = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
    let resp = h.post("/v1/messages", &m).await;
    assert_eq!(resp.headers()["x-tollgate-provider"], "openai_compatible");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["stop_reason"], "tool_use");
    assert_eq!(
        v["content"][0]["input"],
        serde_json::from_str::<Value>(TOOL_CALL_ARGUMENTS[0]).unwrap()
    );
}
