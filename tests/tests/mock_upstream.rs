//! Tests of the mock upstreams themselves: wire shapes, scenarios, recording and
//! cancellation detection, over real sockets with an ordinary HTTP client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use tollgate_tests::mock_upstream::{
    prompt_tokens_for, reply_text, tool_output_tokens, MockOptions, MockUpstream,
    CHUNKS_BEFORE_FAILURE, SPLIT_EXTRA_INPUT_TOKENS, TOOL_CALL_ARGUMENTS,
};

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    event: Option<String>,
    data: String,
}

/// A small SSE parser (LF, CRLF or CR line endings; comment lines counted, not dispatched).
fn parse_sse(text: &str) -> (Vec<Event>, usize) {
    let normalized = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut events = Vec::new();
    let mut comments = 0;
    let mut event = None;
    let mut data: Vec<String> = Vec::new();
    for line in normalized.split('\n') {
        if line.is_empty() {
            if data.is_empty() {
                event = None;
            } else {
                events.push(Event {
                    event: event.take(),
                    data: data.join("\n"),
                });
                data.clear();
            }
        } else if line.starts_with(':') {
            comments += 1;
        } else {
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event = Some(value.to_owned()),
                "data" => data.push(value.to_owned()),
                _ => {}
            }
        }
    }
    (events, comments)
}

fn json_events(events: &[Event]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e.data != "[DONE]")
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect()
}

async fn start() -> MockUpstream {
    MockUpstream::start(MockOptions::default()).await.unwrap()
}

fn chat_body(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "stream": stream,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hello to the whole wide world, please."}
        ]
    })
}

fn messages_body(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "stream": stream,
        "max_tokens": 1024,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Say hello to the whole wide world, please."}]
    })
}

async fn post_openai(mock: &MockUpstream, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}{path}", mock.base_url()))
        .bearer_auth("sk-test-key")
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn post_anthropic(mock: &MockUpstream, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/messages", mock.base_url()))
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// The body as the separate reads the client saw.
async fn read_pieces(response: reqwest::Response) -> Vec<Vec<u8>> {
    let mut pieces = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(piece) = stream.next().await {
        pieces.push(piece.unwrap().to_vec());
    }
    pieces
}

async fn wait_for_cancellation(
    mock: &MockUpstream,
) -> tollgate_tests::mock_upstream::CancelledStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(cancelled) = mock.cancelled_streams().into_iter().next() {
            return cancelled;
        }
        assert!(
            Instant::now() < deadline,
            "the mock never noticed the client left"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn openai_text(chunks: &[Value]) -> String {
    chunks
        .iter()
        .filter_map(|c| {
            c.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .collect()
}

#[tokio::test]
async fn openai_stream_without_include_usage() {
    let mock = start().await;
    let response = post_openai(
        &mock,
        "/v1/chat/completions",
        &chat_body("gpt-4o-mini", true),
    )
    .await;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(content_type.starts_with("text/event-stream"));
    assert!(response.headers().contains_key("x-request-id"));
    let text = response.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    let (events, comments) = parse_sse(&text);
    assert_eq!(comments, 0);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks = json_events(&events);
    // role chunk + 20 content chunks + finish chunk
    assert_eq!(chunks.len(), 22);
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-"));
    for chunk in &chunks {
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["model"], "gpt-4o-mini");
        assert!(chunk["created"].as_u64().unwrap() > 1_700_000_000);
        assert!(chunk["system_fingerprint"].is_string());
        assert!(
            chunk.get("usage").is_none(),
            "no usage key without include_usage"
        );
    }
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": "", "refusal": null})
    );
    assert!(chunks[1]["obfuscation"].is_string());
    assert_eq!(openai_text(&chunks), reply_text(20));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"][0]["delta"], json!({}));
}

#[tokio::test]
async fn openai_stream_with_include_usage() {
    let mock = start().await;
    let mut body = chat_body("cached", true);
    body["stream_options"] = json!({"include_usage": true, "include_obfuscation": false});
    let text = post_openai(&mock, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let (events, _) = parse_sse(&text);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks = json_events(&events);
    assert_eq!(chunks.len(), 23);
    for chunk in &chunks[..chunks.len() - 1] {
        assert_eq!(chunk["usage"], Value::Null);
        assert!(chunk.get("usage").is_some());
        assert!(chunk.get("obfuscation").is_none());
    }
    assert_eq!(chunks[21]["choices"][0]["finish_reason"], "stop");
    let usage_chunk = &chunks[22];
    assert_eq!(usage_chunk["choices"], json!([]));
    let prompt = prompt_tokens_for(&body);
    assert_eq!(usage_chunk["usage"]["prompt_tokens"], prompt);
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 20);
    assert_eq!(usage_chunk["usage"]["total_tokens"], prompt + 20);
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt / 2
    );
    assert_eq!(
        usage_chunk["usage"]["completion_tokens_details"]["reasoning_tokens"],
        0
    );
}

#[tokio::test]
async fn openai_max_tokens_truncates_with_length() {
    let mock = start().await;
    let mut body = chat_body("normal", true);
    body["max_completion_tokens"] = json!(5);
    let text = post_openai(&mock, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let chunks = json_events(&parse_sse(&text).0);
    assert_eq!(openai_text(&chunks), reply_text(5));
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
}

#[tokio::test]
async fn openai_usage_in_last_choice_chunk() {
    let mock = start().await;
    let mut body = chat_body("usage-in-last-choice-chunk", true);
    body["stream_options"] = json!({"include_usage": true});
    let text = post_openai(&mock, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let chunks = json_events(&parse_sse(&text).0);
    assert!(chunks.iter().all(|c| c["choices"] != json!([])));
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["usage"]["completion_tokens"], 20);
    assert_eq!(last["usage"]["prompt_tokens"], prompt_tokens_for(&body));
}

#[tokio::test]
async fn openai_non_streaming_completion() {
    let mock = start().await;
    let body = chat_body("cached", false);
    let response = post_openai(&mock, "/v1/chat/completions", &body).await;
    assert_eq!(response.status(), 200);
    let completion: Value = response.json().await.unwrap();
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        reply_text(20)
    );
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");
    let prompt = prompt_tokens_for(&body);
    assert_eq!(completion["usage"]["prompt_tokens"], prompt);
    assert_eq!(completion["usage"]["completion_tokens"], 20);
    assert_eq!(
        completion["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt / 2
    );
}

#[tokio::test]
async fn openai_streamed_parallel_tool_calls() {
    let mock = start().await;
    let mut body = chat_body("tools", true);
    body["tools"] = json!([
        {"type": "function", "function": {"name": "lookup", "parameters": {}}},
        {"type": "function", "function": {"name": "forecast", "parameters": {}}}
    ]);
    body["stream_options"] = json!({"include_usage": true});
    let text = post_openai(&mock, "/v1/chat/completions", &body)
        .await
        .text()
        .await
        .unwrap();
    let chunks = json_events(&parse_sse(&text).0);
    let mut ids = [None, None];
    let mut names = [String::new(), String::new()];
    let mut arguments = [String::new(), String::new()];
    let mut fragments = 0;
    for chunk in &chunks {
        let Some(calls) = chunk
            .pointer("/choices/0/delta/tool_calls")
            .and_then(Value::as_array)
        else {
            continue;
        };
        for call in calls {
            let index = call["index"].as_u64().unwrap() as usize;
            if let Some(id) = call.get("id") {
                assert!(ids[index].is_none(), "id sent once per call");
                assert!(id.as_str().unwrap().starts_with("call_"));
                assert_eq!(call["type"], "function");
                assert_eq!(call["function"]["arguments"], "");
                ids[index] = Some(id.clone());
                names[index] = call["function"]["name"].as_str().unwrap().to_owned();
            } else {
                fragments += 1;
                arguments[index].push_str(call["function"]["arguments"].as_str().unwrap());
            }
        }
    }
    assert_eq!(names, ["lookup", "forecast"]);
    assert_eq!(arguments, TOOL_CALL_ARGUMENTS);
    assert!(fragments >= 6, "arguments come in several fragments");
    let finish = chunks
        .iter()
        .find_map(|c| {
            c.pointer("/choices/0/finish_reason")
                .filter(|f| !f.is_null())
        })
        .unwrap();
    assert_eq!(finish, "tool_calls");
    assert_eq!(
        chunks.last().unwrap()["usage"]["completion_tokens"],
        tool_output_tokens(false)
    );
}

#[tokio::test]
async fn split_frames_reassemble_into_the_same_events() {
    let mock = start().await;
    let mut normal_body = chat_body("normal", true);
    normal_body["stream_options"] = json!({"include_usage": true});
    let mut split_body = normal_body.clone();
    split_body["model"] = json!("split-frames");

    let normal = post_openai(&mock, "/v1/chat/completions", &normal_body)
        .await
        .text()
        .await
        .unwrap();
    let pieces = read_pieces(post_openai(&mock, "/v1/chat/completions", &split_body).await).await;
    let split: Vec<u8> = pieces.concat();
    let split = String::from_utf8(split).unwrap();

    let (normal_events, _) = parse_sse(&normal);
    let (split_events, comments) = parse_sse(&split);
    assert!(comments >= 2, "keep-alive comments are interleaved");
    assert!(split.contains(": OPENROUTER PROCESSING\r\n"));
    assert!(split.contains("data: [DONE]\r\n\r\n"));
    assert!(
        pieces.len() > 2 * normal_events.len(),
        "frames arrive in many reads"
    );
    assert!(
        pieces.iter().any(|p| p.ends_with(b"\r")),
        "a read ends between \\r and \\n"
    );

    let strip = |events: Vec<Event>| -> Vec<Value> {
        json_events(&events)
            .into_iter()
            .map(|mut v| {
                v["id"] = Value::Null;
                v["created"] = Value::Null;
                v["model"] = Value::Null;
                v
            })
            .collect()
    };
    assert_eq!(strip(split_events.clone()), strip(normal_events.clone()));
    assert_eq!(split_events.last().unwrap().data, "[DONE]");
}

#[tokio::test]
async fn anthropic_split_frames_use_crlf_and_reassemble() {
    let mock = start().await;
    let response = post_anthropic(&mock, &messages_body("split-frames", true)).await;
    let pieces = read_pieces(response).await;
    let text = String::from_utf8(pieces.concat()).unwrap();
    assert!(text.contains("event: message_start\r\ndata: {"));
    assert!(pieces.iter().any(|p| p.starts_with(b"\n")));
    let (events, _) = parse_sse(&text);
    let names: Vec<_> = events.iter().map(|e| e.event.clone().unwrap()).collect();
    assert_eq!(names.first().unwrap(), "message_start");
    assert_eq!(names.last().unwrap(), "message_stop");
    let text_out: String = json_events(&events)
        .iter()
        .filter_map(|e| e.pointer("/delta/text").and_then(Value::as_str))
        .collect();
    assert_eq!(text_out, reply_text(20));
}

#[tokio::test]
async fn openai_error_midstream() {
    let mock = start().await;
    let text = post_openai(
        &mock,
        "/v1/chat/completions",
        &chat_body("error-midstream", true),
    )
    .await
    .text()
    .await
    .unwrap();
    let (events, _) = parse_sse(&text);
    assert!(!text.contains("[DONE]"));
    let chunks = json_events(&events);
    assert_eq!(openai_text(&chunks), reply_text(CHUNKS_BEFORE_FAILURE));
    assert_eq!(
        chunks.last().unwrap(),
        &json!({"error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error", "param": null, "code": null}})
    );
}

#[tokio::test]
async fn anthropic_error_midstream() {
    let mock = start().await;
    let text = post_anthropic(&mock, &messages_body("error-midstream", true))
        .await
        .text()
        .await
        .unwrap();
    let (events, _) = parse_sse(&text);
    let last = events.last().unwrap();
    assert_eq!(last.event.as_deref(), Some("error"));
    let error: Value = serde_json::from_str(&last.data).unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "overloaded_error");
    assert!(!events
        .iter()
        .any(|e| e.event.as_deref() == Some("message_stop")));
}

#[tokio::test]
async fn drop_midstream_breaks_the_body() {
    let mock = start().await;
    for response in [
        post_openai(
            &mock,
            "/v1/chat/completions",
            &chat_body("drop-midstream", true),
        )
        .await,
        post_anthropic(&mock, &messages_body("drop-midstream", true)).await,
        post_openai(
            &mock,
            "/v1/chat/completions",
            &chat_body("drop-midstream", false),
        )
        .await,
    ] {
        assert_eq!(response.status(), 200);
        let mut stream = response.bytes_stream();
        let mut received = Vec::new();
        let mut failed = false;
        while let Some(piece) = stream.next().await {
            match piece {
                Ok(bytes) => received.extend_from_slice(&bytes),
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        assert!(failed, "the body must end in an error, not cleanly");
        assert!(!received.is_empty());
        assert!(!String::from_utf8_lossy(&received).contains("[DONE]"));
    }
    assert!(
        mock.cancelled_streams().is_empty(),
        "a planned drop is not a cancellation"
    );
}

#[tokio::test]
async fn error_statuses_have_provider_shapes_and_headers() {
    let mock = start().await;
    let r = post_openai(
        &mock,
        "/v1/chat/completions",
        &chat_body("rate-limited", true),
    )
    .await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["retry-after-ms"], "1000");
    assert_eq!(r.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(r.headers()["x-ratelimit-reset-requests"], "1s");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["param"], Value::Null);

    let r = post_openai(
        &mock,
        "/v1/chat/completions",
        &chat_body("server-error", false),
    )
    .await;
    assert_eq!(r.status(), 500);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "server_error"
    );

    let r = post_openai(
        &mock,
        "/v1/chat/completions",
        &chat_body("bad-request", false),
    )
    .await;
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], "temperature");

    let r = post_anthropic(&mock, &messages_body("rate-limited", true)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(r.headers().contains_key("request-id"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");

    let r = post_anthropic(&mock, &messages_body("overloaded", false)).await;
    assert_eq!(r.status().as_u16(), 529);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "overloaded_error"
    );

    let r = post_anthropic(&mock, &messages_body("server-error", false)).await;
    assert_eq!(r.status(), 500);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "api_error"
    );
}

#[tokio::test]
async fn credentials_are_checked_and_recorded() {
    let mock = start().await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/chat/completions", mock.base_url()))
        .json(&chat_body("normal", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "invalid_request_error"
    );

    let r = client
        .post(format!("{}/v1/messages", mock.base_url()))
        .header("anthropic-version", "2023-06-01")
        .json(&messages_body("normal", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "authentication_error"
    );

    let r = client
        .post(format!("{}/v1/messages", mock.base_url()))
        .header("x-api-key", "sk-ant-upstream-key")
        .json(&messages_body("normal", false))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["message"],
        "anthropic-version: header is required"
    );

    post_openai(&mock, "/v1/chat/completions", &chat_body("normal", false)).await;
    let requests = mock.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(mock.request_count(), 4);
    assert_eq!(requests[0].header("authorization"), None);
    assert_eq!(requests[2].header("x-api-key"), Some("sk-ant-upstream-key"));
    assert_eq!(
        requests[3].header("Authorization"),
        Some("Bearer sk-test-key")
    );
    assert_eq!(requests[3].path, "/v1/chat/completions");
    assert_eq!(requests[3].body["model"], "normal");
    assert!(requests[2].received_at <= requests[3].received_at);
}

#[tokio::test]
async fn anthropic_stream_event_sequence() {
    let mock = start().await;
    let body = messages_body("claude-sonnet-4-5", true);
    let response = post_anthropic(&mock, &body).await;
    assert_eq!(response.status(), 200);
    assert!(response.headers().contains_key("request-id"));
    let text = response.text().await.unwrap();
    let (events, _) = parse_sse(&text);
    let names: Vec<&str> = events.iter().map(|e| e.event.as_deref().unwrap()).collect();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", 20));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    let data = json_events(&events);
    for (event, value) in events.iter().zip(&data) {
        assert_eq!(event.event.as_deref(), value["type"].as_str());
    }
    let start = &data[0]["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["usage"]["input_tokens"], prompt_tokens_for(&body));
    assert_eq!(start["usage"]["cache_read_input_tokens"], 0);
    assert_eq!(start["usage"]["cache_creation_input_tokens"], 0);
    assert_eq!(start["usage"]["output_tokens"], 1);
    let text_out: String = data
        .iter()
        .filter_map(|e| e.pointer("/delta/text").and_then(Value::as_str))
        .collect();
    assert_eq!(text_out, reply_text(20));
    let delta = &data[data.len() - 2];
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["delta"]["stop_sequence"], Value::Null);
    assert_eq!(delta["usage"], json!({"output_tokens": 20}));
}

#[tokio::test]
async fn anthropic_cached_and_split_usage() {
    let mock = start().await;
    let body = messages_body("cached", true);
    let prompt = prompt_tokens_for(&body);
    let text = post_anthropic(&mock, &body).await.text().await.unwrap();
    let data = json_events(&parse_sse(&text).0);
    let usage = &data[0]["message"]["usage"];
    assert_eq!(usage["cache_read_input_tokens"], prompt / 2);
    assert_eq!(usage["input_tokens"], prompt - prompt / 2);
    assert_eq!(usage["cache_creation_input_tokens"], 0);

    let mut body = messages_body("anthropic-usage-split", true);
    body["max_tokens"] = json!(7);
    let text = post_anthropic(&mock, &body).await.text().await.unwrap();
    let data = json_events(&parse_sse(&text).0);
    assert_eq!(data[0]["message"]["usage"]["input_tokens"], prompt);
    assert_eq!(data[0]["message"]["usage"]["output_tokens"], 1);
    let delta = data.iter().find(|d| d["type"] == "message_delta").unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["output_tokens"], 7);
    assert_eq!(
        delta["usage"]["input_tokens"],
        prompt + SPLIT_EXTRA_INPUT_TOKENS
    );
    assert_eq!(delta["usage"]["cache_read_input_tokens"], 0);
}

#[tokio::test]
async fn anthropic_streamed_tool_use() {
    let mock = start().await;
    let mut body = messages_body("tools", true);
    body["tools"] = json!([{"name": "get_time", "input_schema": {"type": "object"}}]);
    let text = post_anthropic(&mock, &body).await.text().await.unwrap();
    let data = json_events(&parse_sse(&text).0);
    let mut blocks: Vec<(Value, String)> = Vec::new();
    for event in &data {
        match event["type"].as_str().unwrap() {
            "content_block_start" => {
                assert_eq!(event["index"], blocks.len());
                blocks.push((event["content_block"].clone(), String::new()));
            }
            "content_block_delta" => {
                let index = event["index"].as_u64().unwrap() as usize;
                let delta = &event["delta"];
                let piece = match delta["type"].as_str().unwrap() {
                    "text_delta" => delta["text"].as_str().unwrap(),
                    "input_json_delta" => delta["partial_json"].as_str().unwrap(),
                    other => panic!("unexpected delta {other}"),
                };
                blocks[index].1.push_str(piece);
            }
            _ => {}
        }
    }
    assert_eq!(blocks.len(), 3);
    assert_eq!(blocks[0].0["type"], "text");
    for (i, (block, json_text)) in blocks[1..].iter().enumerate() {
        assert_eq!(block["type"], "tool_use");
        assert_eq!(block["name"], "get_time");
        assert!(block["id"].as_str().unwrap().starts_with("toolu_"));
        assert_eq!(json_text, TOOL_CALL_ARGUMENTS[i]);
    }
    let delta = data.iter().find(|d| d["type"] == "message_delta").unwrap();
    assert_eq!(delta["delta"]["stop_reason"], "tool_use");
    assert_eq!(delta["usage"]["output_tokens"], tool_output_tokens(true));

    // Non-streaming equivalent.
    body["stream"] = json!(false);
    let message: Value = post_anthropic(&mock, &body).await.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["stop_reason"], "tool_use");
    let input: Value = serde_json::from_str(TOOL_CALL_ARGUMENTS[1]).unwrap();
    assert_eq!(message["content"][2]["input"], input);
}

#[tokio::test]
async fn anthropic_non_streaming_message() {
    let mock = start().await;
    let body = messages_body("normal", false);
    let message: Value = post_anthropic(&mock, &body).await.json().await.unwrap();
    assert_eq!(message["type"], "message");
    assert_eq!(message["role"], "assistant");
    assert_eq!(message["content"][0]["text"], reply_text(20));
    assert_eq!(message["stop_reason"], "end_turn");
    assert_eq!(message["usage"]["input_tokens"], prompt_tokens_for(&body));
    assert_eq!(message["usage"]["output_tokens"], 20);
}

#[tokio::test]
async fn client_disconnect_is_noticed_during_slow_stream() {
    let mock = start().await;
    let response = post_openai(&mock, "/v1/chat/completions", &chat_body("slow", true)).await;
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    while !text.contains("\"content\":\"Hello\"") {
        text.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    let dropped_at = Instant::now();
    drop(stream);
    let cancelled = wait_for_cancellation(&mock).await;
    assert_eq!(cancelled.path, "/v1/chat/completions");
    assert_eq!(cancelled.model, "slow");
    assert!(cancelled.chunks_sent >= 1 && cancelled.chunks_sent < 20);
    assert!(cancelled.noticed_at >= dropped_at);
}

#[tokio::test]
async fn client_disconnect_is_noticed_while_hanging() {
    let mock = start().await;
    // Streaming: headers arrive, the body never does.
    let response = post_anthropic(&mock, &messages_body("hang", true)).await;
    assert_eq!(response.status(), 200);
    drop(response);
    let cancelled = wait_for_cancellation(&mock).await;
    assert_eq!(cancelled.path, "/v1/messages");
    assert_eq!(cancelled.chunks_sent, 0);

    // Non-streaming: nothing at all arrives.
    let result = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mock.base_url()))
        .bearer_auth("sk-test")
        .timeout(Duration::from_millis(100))
        .json(&chat_body("hang", false))
        .send()
        .await;
    assert!(result.unwrap_err().is_timeout());
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.cancelled_streams().len() < 2 {
        assert!(Instant::now() < deadline, "non-streaming hang not noticed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(mock.cancelled_streams()[1].path, "/v1/chat/completions");
}

#[tokio::test]
async fn a_stalled_stream_ends_only_when_the_client_leaves() {
    let mock = start().await;
    let response = post_openai(
        &mock,
        "/v1/chat/completions",
        &chat_body("stall-midstream", true),
    )
    .await;
    let mut stream = response.bytes_stream();
    let mut text = String::new();
    while parse_sse(&text).0.len() < 1 + CHUNKS_BEFORE_FAILURE {
        text.push_str(&String::from_utf8_lossy(
            &stream.next().await.unwrap().unwrap(),
        ));
    }
    // Nothing more comes: no finish chunk, no [DONE], and the connection stays open.
    let more = tokio::time::timeout(Duration::from_millis(200), stream.next()).await;
    assert!(more.is_err(), "the stalled stream went on: {more:?}");
    let chunks = json_events(&parse_sse(&text).0);
    assert_eq!(openai_text(&chunks), reply_text(CHUNKS_BEFORE_FAILURE));
    assert!(!text.contains("[DONE]") && !text.contains("finish_reason\":\"stop"));
    assert!(mock.cancelled_streams().is_empty());
    drop(stream);
    let cancelled = wait_for_cancellation(&mock).await;
    assert_eq!(cancelled.model, "stall-midstream");
    assert_eq!(cancelled.chunks_sent, CHUNKS_BEFORE_FAILURE);
}

#[tokio::test]
async fn embeddings_and_models() {
    let mock = start().await;
    let body =
        json!({"model": "text-embedding-3-small", "input": ["hello there", "general kenobi"]});
    let response: Value = post_openai(&mock, "/v1/embeddings", &body)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(response["object"], "list");
    assert_eq!(response["data"].as_array().unwrap().len(), 2);
    assert_eq!(response["data"][1]["index"], 1);
    assert_eq!(
        response["data"][0]["embedding"].as_array().unwrap().len(),
        8
    );
    assert_eq!(response["usage"]["prompt_tokens"], 2 + 3);
    assert_eq!(response["usage"]["total_tokens"], 5);

    let single: Value = post_openai(
        &mock,
        "/v1/embeddings",
        &json!({"model": "m", "input": "hello there", "encoding_format": "base64"}),
    )
    .await
    .json()
    .await
    .unwrap();
    // 8 little-endian f32s = 32 bytes = 44 base64 characters.
    assert_eq!(single["data"][0]["embedding"].as_str().unwrap().len(), 44);

    let models: Value = reqwest::Client::new()
        .get(format!("{}/v1/models", mock.base_url()))
        .bearer_auth("sk-test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models["object"], "list");
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == "split-frames" && m["object"] == "model"));
}

#[tokio::test]
async fn chunk_delays_pace_the_stream() {
    let mock = MockUpstream::start(MockOptions {
        chunks: 3,
        chunk_delay: Duration::from_millis(20),
        first_chunk_delay: Duration::from_millis(30),
    })
    .await
    .unwrap();
    let response = post_openai(&mock, "/v1/chat/completions", &chat_body("normal", true)).await;
    let pieces = read_pieces(response).await;
    // With pauses between content chunks, they cannot all arrive in one read.
    assert!(pieces.len() >= 3);
    let text = String::from_utf8(pieces.concat()).unwrap();
    assert_eq!(
        openai_text(&json_events(&parse_sse(&text).0)),
        reply_text(3)
    );
}
