//! PII masking end to end: what an external upstream receives is masked, what the client
//! receives is restored — OpenAI passthrough and OpenAI client → Anthropic upstream,
//! streamed (the upstream echoes in small pieces, so placeholders are split across deltas)
//! and not, content and tool-call arguments; `block` refuses naming the kinds; a vLLM
//! deployment is exempt; without a policy nothing changes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tollgate_tests::harness::{sse_events, Harness};
use tollgate_tests::mock_upstream::{MockOptions, MockUpstream};

const EMAIL: &str = "jane.doe@example.com";
const PHONE: &str = "+44 20 7946 0958";
const CARD: &str = "4111 1111 1111 1111";

fn prompt() -> String {
    format!("Write to {EMAIL} or call {PHONE}; the card is {CARD}.")
}

/// What the echo upstream received, in order.
type Received = Arc<Mutex<Vec<Value>>>;

/// The text of the last user message (a string, or text blocks).
fn last_user_text(request: &Value) -> String {
    let last = request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .cloned()
        .unwrap_or_default();
    match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// Pieces of `s`, `n` characters each.
fn pieces(s: &str, n: usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    chars.chunks(n).map(|c| c.iter().collect()).collect()
}

fn sse(events: Vec<String>) -> axum::response::Response {
    let stream = futures_util::stream::unfold(events.into_iter(), |mut it| async move {
        let next = it.next()?;
        tokio::time::sleep(Duration::from_millis(2)).await;
        Some((Ok::<_, std::io::Error>(Bytes::from(next)), it))
    });
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

fn json_response(v: Value) -> axum::response::Response {
    axum::response::Response::builder()
        .header("content-type", "application/json")
        .body(Body::from(v.to_string()))
        .unwrap()
}

/// Echoes the last user message as content and, when the request has tools, as the `to`
/// argument of a tool call.
async fn openai(State(received): State<Received>, body: String) -> axum::response::Response {
    let request: Value = serde_json::from_str(&body).unwrap_or_default();
    received.lock().push(request.clone());
    let text = last_user_text(&request);
    let args = json!({ "to": text }).to_string();
    let tools = request.get("tools").is_some();
    if request["stream"] != true {
        let mut message = json!({"role": "assistant", "content": text});
        if tools {
            message["tool_calls"] = json!([{"id": "call_1", "type": "function",
                "function": {"name": "send", "arguments": args}}]);
        }
        return json_response(json!({"id": "c", "object": "chat.completion", "created": 1,
            "model": "m", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}));
    }
    let chunk = |delta: Value| {
        let c = json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
            "model": "m", "choices": [{"index": 0, "delta": delta}]});
        format!("data: {c}\n\n")
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}))];
    events.extend(
        pieces(&text, 3)
            .into_iter()
            .map(|p| chunk(json!({"content": p}))),
    );
    if tools {
        events.push(chunk(json!({"tool_calls": [{"index": 0, "id": "call_1",
            "type": "function", "function": {"name": "send", "arguments": ""}}]})));
        events.extend(
            pieces(&args, 4).into_iter().map(|p| {
                chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}))
            }),
        );
    }
    let end = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
    let usage = json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}});
    events.push(format!("data: {end}\n\ndata: {usage}\n\ndata: [DONE]\n\n"));
    sse(events)
}

async fn anthropic(State(received): State<Received>, body: String) -> axum::response::Response {
    let request: Value = serde_json::from_str(&body).unwrap_or_default();
    received.lock().push(request.clone());
    let text = last_user_text(&request);
    let tools = request.get("tools").is_some();
    if request["stream"] != true {
        let mut content = vec![json!({"type": "text", "text": text})];
        if tools {
            content.push(json!({"type": "tool_use", "id": "toolu_1", "name": "send",
                "input": {"to": text}}));
        }
        return json_response(
            json!({"id": "msg_1", "type": "message", "role": "assistant",
            "model": "m", "content": content, "stop_reason": "end_turn", "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 5}}),
        );
    }
    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut events = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_1",
            "type": "message", "role": "assistant", "model": "m", "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}}),
        ),
    ];
    events.extend(pieces(&text, 3).into_iter().map(|p| {
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": p}}),
        )
    }));
    events.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    if tools {
        events.push(event(
            "content_block_start",
            json!({"type": "content_block_start",
            "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "send",
            "input": {}}}),
        ));
        let args = json!({ "to": text }).to_string();
        events.extend(pieces(&args, 4).into_iter().map(|p| {
            event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 1,
                "delta": {"type": "input_json_delta", "partial_json": p}}),
            )
        }));
        events.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 1}),
        ));
    }
    events.push(event(
        "message_delta",
        json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {"output_tokens": 5}}),
    ));
    events.push(event("message_stop", json!({"type": "message_stop"})));
    sse(events)
}

async fn echo_upstream() -> (String, Received) {
    let received = Received::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(openai))
        .route("/v1/messages", post(anthropic))
        .with_state(received.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), received)
}

/// A gateway in front of the echo upstream: `ext-oa` (openai), `ext-an` (anthropic) and
/// `self-vl` (vllm) deployments; aliases `masked-oa`, `masked-an`, `masked-vl` (mask),
/// `blocked` (block), `plain` (no policy of its own) and `fallback` (mask; an unreachable vLLM
/// deployment, then `ext-oa`); `privacy` is the `[privacy]` body.
async fn gateway(privacy: &str) -> (Harness, Received) {
    let (echo, received) = echo_upstream().await;
    let env = tollgate_tests::harness::UPSTREAM_KEY_ENV;
    let extra = format!(
        r#"
[[deployments]]
type = "openai"
name = "ext-oa"
model = "gpt"
base_url = "{echo}/v1"
api_key_env = "{env}"

[[deployments]]
type = "anthropic"
name = "ext-an"
model = "claude"
base_url = "{echo}"
api_key_env = "{env}"

[[deployments]]
type = "vllm"
name = "self-vl"
model = "llama"
base_url = "{echo}/v1"
api_key_env = "{env}"

[[models]]
name = "masked-oa"
deployments = ["ext-oa"]
pii = "mask"

[[models]]
name = "masked-an"
deployments = ["ext-an"]
pii = "mask"

[[models]]
name = "masked-vl"
deployments = ["self-vl"]
pii = "mask"

[[models]]
name = "blocked"
deployments = ["ext-oa"]
pii = "block"

[[models]]
name = "plain"
deployments = ["ext-oa"]

[[deployments]]
type = "vllm"
name = "self-vl-down"
model = "llama"
base_url = "http://127.0.0.1:9/v1"
api_key_env = "{env}"

[[models]]
name = "fallback"
deployments = ["self-vl-down", "ext-oa"]
strategy = "ordered"
pii = "mask"

[privacy]
placeholder_key = "test-placeholder-key-0123456789"
{privacy}
"#
    );
    let upstream = MockUpstream::start(MockOptions::default()).await.unwrap();
    let config = tollgate_tests::harness::mock_config(&upstream.base_url(), &extra);
    (
        Harness::start_with_config(upstream, &config).await,
        received,
    )
}

fn request(model: &str, stream: bool, tools: bool) -> Value {
    let mut body = json!({"model": model, "max_tokens": 64, "stream": stream,
        "messages": [
            {"role": "user", "content": format!("Earlier: my mail is {EMAIL}.")},
            {"role": "assistant", "content": "Noted."},
            {"role": "user", "content": prompt()}]});
    if tools {
        body["tools"] = json!([{"type": "function", "function": {"name": "send",
            "parameters": {"type": "object", "properties": {"to": {"type": "string"}}}}}]);
    }
    body
}

/// The content and the tool-call arguments the client received (OpenAI shape).
async fn client_view(resp: reqwest::Response, stream: bool) -> (String, String) {
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    if !stream {
        let v: Value = serde_json::from_str(&text).unwrap();
        let message = &v["choices"][0]["message"];
        return (
            message["content"].as_str().unwrap_or_default().to_string(),
            message["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    let (mut content, mut args) = (String::new(), String::new());
    for (_, data) in sse_events(&text) {
        let Ok(v) = serde_json::from_str::<Value>(&data) else {
            continue;
        };
        let delta = &v["choices"][0]["delta"];
        content.push_str(delta["content"].as_str().unwrap_or_default());
        for call in delta["tool_calls"].as_array().into_iter().flatten() {
            args.push_str(call["function"]["arguments"].as_str().unwrap_or_default());
        }
    }
    (content, args)
}

fn assert_masked(sent: &Value) {
    let sent = sent.to_string();
    for value in [EMAIL, PHONE, CARD] {
        assert!(
            !sent.contains(value),
            "{value} left for the provider: {sent}"
        );
    }
    assert!(sent.contains("[EMAIL_"), "{sent}");
    assert!(sent.contains("[PHONE_"), "{sent}");
    assert!(sent.contains("[CARD_"), "{sent}");
}

/// The e-mail's placeholders in what the upstream received: one, however many turns.
fn email_placeholders(sent: &Value) -> Vec<String> {
    let sent = sent.to_string();
    let mut found: Vec<String> = sent
        .match_indices("[EMAIL_")
        .map(|(i, _)| sent[i..i + 16].to_string())
        .collect();
    found.sort();
    found.dedup();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_providers_get_placeholders_and_clients_get_their_values_back() {
    let (h, received) = gateway("").await;
    for model in ["masked-oa", "masked-an"] {
        for stream in [false, true] {
            let case = format!("{model} stream={stream}");
            let resp = h
                .post("/v1/chat/completions", &request(model, stream, true))
                .await;
            let (content, args) = client_view(resp, stream).await;
            let sent = received.lock().last().cloned().unwrap();
            assert_masked(&sent);
            assert_eq!(email_placeholders(&sent).len(), 1, "{case}: {sent}");
            assert_eq!(content, prompt(), "{case}");
            let args: Value = serde_json::from_str(&args).expect(&case);
            assert_eq!(args["to"], prompt(), "{case}");
        }
    }
    // The same e-mail had the same placeholder in every request.
    let all: Vec<String> = received
        .lock()
        .iter()
        .flat_map(email_placeholders)
        .collect();
    assert!(all.windows(2).all(|w| w[0] == w[1]), "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_client_gets_its_values_back_too() {
    let (h, received) = gateway("").await;
    for stream in [false, true] {
        let resp = h
            .post("/v1/messages", &request("masked-an", stream, false))
            .await;
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert_masked(&received.lock().last().cloned().unwrap());
        let content: String = if stream {
            sse_events(&text)
                .into_iter()
                .filter_map(|(_, d)| serde_json::from_str::<Value>(&d).ok())
                .filter_map(|v| v["delta"]["text"].as_str().map(str::to_string))
                .collect()
        } else {
            let v: Value = serde_json::from_str(&text).unwrap();
            v["content"][0]["text"].as_str().unwrap().to_string()
        };
        assert_eq!(content, prompt(), "stream={stream}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_refuses_naming_the_kinds_never_the_values() {
    let (h, received) = gateway("").await;
    for (path, stream) in [("/v1/chat/completions", false), ("/v1/messages", true)] {
        let resp = h.post(path, &request("blocked", stream, false)).await;
        assert_eq!(resp.status(), 400, "{path}");
        let text = resp.text().await.unwrap();
        for kind in ["EMAIL", "PHONE", "CARD"] {
            assert!(text.contains(kind), "{text}");
        }
        for value in [EMAIL, PHONE, CARD] {
            assert!(!text.contains(value), "{text}");
        }
        let v: Value = serde_json::from_str(&text).unwrap();
        if path == "/v1/messages" {
            assert_eq!(v["type"], "error", "{text}");
        } else {
            assert!(v["error"]["message"].is_string(), "{text}");
        }
    }
    assert!(received.lock().is_empty(), "nothing left for the provider");
    // Without personal data the same alias serves.
    let body = json!({"model": "blocked", "max_tokens": 8,
        "messages": [{"role": "user", "content": "hello there"}]});
    assert_eq!(h.post("/v1/chat/completions", &body).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_hosted_and_unconfigured_aliases_send_the_text_as_it_is() {
    let (h, received) = gateway("").await;
    for model in ["masked-vl", "plain"] {
        let resp = h
            .post("/v1/chat/completions", &request(model, false, false))
            .await;
        let (content, _) = client_view(resp, false).await;
        assert_eq!(content, prompt(), "{model}");
        let sent = received.lock().last().cloned().unwrap().to_string();
        assert!(
            sent.contains(EMAIL) && sent.contains(CARD),
            "{model}: {sent}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_policy_applies_to_every_alias() {
    let (h, received) = gateway("[privacy.tenants]\nacme = \"mask\"\n").await;
    let resp = h
        .post("/v1/chat/completions", &request("plain", true, false))
        .await;
    let (content, _) = client_view(resp, true).await;
    assert_eq!(content, prompt());
    assert_masked(&received.lock().last().cloned().unwrap());
    let metrics = h.state.metrics.render();
    assert!(
        metrics.contains("tollgate_pii_entities_total{action=\"mask\",entity=\"EMAIL\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_from_an_exempt_deployment_to_an_external_one_is_masked() {
    let (h, received) = gateway("").await;
    for stream in [false, true] {
        let resp = h
            .post("/v1/chat/completions", &request("fallback", stream, true))
            .await;
        assert_eq!(
            resp.headers()["x-tollgate-deployment"],
            "ext-oa",
            "the vLLM deployment is down"
        );
        let (content, args) = client_view(resp, stream).await;
        assert_masked(&received.lock().last().cloned().unwrap());
        assert_eq!(content, prompt(), "stream={stream}");
        let args: Value = serde_json::from_str(&args).unwrap();
        assert_eq!(args["to"], prompt());
    }
}

/// The held-out PII test set (`tests/pii/holdout.jsonl`) through the gateway: what the
/// provider receives holds none of its structured values (names are only counted: the
/// gazetteer misses some), and every client gets its text back whole, streamed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_structured_value_of_the_test_set_reaches_the_provider() {
    let (h, received) = gateway("").await;
    let set =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/pii/holdout.jsonl")).unwrap();
    let (mut values, mut names, mut names_sent) = (0, 0, 0);
    for (i, line) in set.lines().step_by(5).enumerate() {
        let row: Value = serde_json::from_str(line).unwrap();
        let text = row["text"].as_str().unwrap();
        let stream = i % 2 == 0;
        let model = if i % 3 == 0 { "masked-an" } else { "masked-oa" };
        let body = json!({"model": model, "max_tokens": 64, "stream": stream,
            "messages": [{"role": "user", "content": text}]});
        let resp = h.post("/v1/chat/completions", &body).await;
        assert_eq!(resp.status(), 200, "{text}");
        let (content, _) = client_view(resp, stream).await;
        assert_eq!(
            content, text,
            "restored for the client ({model}, stream={stream})"
        );
        let sent = received.lock().last().cloned().unwrap().to_string();
        for e in row["entities"].as_array().unwrap() {
            // As the provider's JSON carries it.
            let value = serde_json::to_string(e["value"].as_str().unwrap()).unwrap();
            let value = value.trim_matches('"');
            if e["kind"] == "NAME" {
                names += 1;
                names_sent += usize::from(sent.contains(value));
            } else {
                values += 1;
                assert!(
                    !sent.contains(value),
                    "{value} reached the provider: {sent}"
                );
            }
        }
    }
    println!(
        "{values} structured values, none sent; {names_sent} of {names} names sent as they are"
    );
    assert!(values > 300, "{values}");
}
