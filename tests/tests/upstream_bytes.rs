//! What an upstream's bytes cannot do to a client: an upstream that echoes the credential it
//! was given, in every field of its errors and in error frames in the middle of its streams
//! (split across reads), never gets it to the client; invalid UTF-8 reaches the client as
//! U+FFFD, relayed or translated, never as bytes its parser chokes on and never dropped.
//! OpenAI and Anthropic upstreams, streamed and not, with the client in either API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Value};
use tollgate_tests::harness::{Harness, UPSTREAM_KEY};
use tollgate_tests::mock_upstream::{MockOptions, MockUpstream};

/// The credential as the upstream received it (either header).
fn credential(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .or_else(|| headers.get("x-api-key"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// A streamed body sent in `parts`, a short pause between them (so that they arrive as
/// separate reads).
fn in_parts(parts: Vec<String>) -> Body {
    let stream = futures_util::stream::unfold(parts.into_iter(), |mut it| async move {
        let next = it.next()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
        Some((Ok::<_, std::io::Error>(Bytes::from(next)), it))
    });
    Body::from_stream(stream)
}

/// `text` cut in the middle of the first occurrence of the key, as two reads.
fn split_in_key(text: String) -> Vec<String> {
    let at = text.find(UPSTREAM_KEY).expect("the key is echoed") + UPSTREAM_KEY.len() / 2;
    vec![text[..at].to_string(), text[at..].to_string()]
}

/// `café` with its last byte cut off, then more text: invalid UTF-8 in a content delta.
const BAD_UTF8: &[u8] = b"caf\xc3 au lait";

async fn openai(headers: HeaderMap, body: String) -> axum::response::Response {
    let key = credential(&headers);
    let request: Value = serde_json::from_str(&body).unwrap_or_default();
    if request["model"] == "bad-utf8" {
        let mut text = b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"".to_vec();
        text.extend_from_slice(BAD_UTF8);
        text.extend_from_slice(b"\"}}]}\n\ndata: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n");
        return axum::response::Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from(text))
            .unwrap();
    }
    let error = json!({"error": {"message": format!("Incorrect API key provided: {key}"),
        "type": format!("invalid_request_error {key}"), "param": key, "code": key,
        "nested": {"echo": key}}});
    if request["stream"] != true {
        return axum::response::Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .header("content-type", "application/json")
            .body(Body::from(error.to_string()))
            .unwrap();
    }
    let chunk = json!({"id": "c", "object": "chat.completion.chunk", "created": 1,
        "model": "m", "choices": [{"index": 0, "delta": {"content": "Hi"}}]});
    let text = format!("data: {chunk}\n\ndata: {error}\n\n");
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(in_parts(split_in_key(text)))
        .unwrap()
}

async fn anthropic(headers: HeaderMap, body: String) -> axum::response::Response {
    let key = credential(&headers);
    let request: Value = serde_json::from_str(&body).unwrap_or_default();
    let error = json!({"type": "error", "error": {"type": "invalid_request_error",
        "message": format!("invalid x-api-key {key}")}});
    if request["stream"] != true {
        return axum::response::Response::builder()
            .status(StatusCode::BAD_REQUEST)
            .header("content-type", "application/json")
            .body(Body::from(error.to_string()))
            .unwrap();
    }
    let start = json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
        "role": "assistant", "model": "m", "content": [], "stop_reason": null,
        "stop_sequence": null, "usage": {"input_tokens": 5, "output_tokens": 1}}});
    let block = json!({"type": "content_block_start", "index": 0,
        "content_block": {"type": "text", "text": ""}});
    let delta = json!({"type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": "Hi"}});
    let text = format!(
        "event: message_start\ndata: {start}\n\nevent: content_block_start\ndata: {block}\n\n\
         event: content_block_delta\ndata: {delta}\n\nevent: error\ndata: {error}\n\n"
    );
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(in_parts(split_in_key(text)))
        .unwrap()
}

async fn echo_upstream() -> String {
    let app = Router::new()
        .route("/v1/chat/completions", post(openai))
        .route("/v1/messages", post(anthropic));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A gateway whose `echo-oa/*` and `echo-an/*` aliases reach the echoing upstream.
async fn gateway() -> Harness {
    let echo = echo_upstream().await;
    let extra = format!(
        r#"
[[deployments]]
type = "openai"
name = "echo-oa"
model = "*"
base_url = "{echo}/v1"
api_key_env = "{env}"

[[deployments]]
type = "anthropic"
name = "echo-an"
model = "*"
base_url = "{echo}"
api_key_env = "{env}"

[[models]]
name = "echo-oa/*"
deployments = ["echo-oa"]

[[models]]
name = "echo-an/*"
deployments = ["echo-an"]
"#,
        env = tollgate_tests::harness::UPSTREAM_KEY_ENV
    );
    let upstream = MockUpstream::start(MockOptions::default()).await.unwrap();
    let config = tollgate_tests::harness::mock_config(&upstream.base_url(), &extra);
    Harness::start_with_config(upstream, &config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_echoed_credential_never_reaches_the_client() {
    let h = gateway().await;
    let mut redacted = 0;
    for model in ["echo-oa/m", "echo-an/m"] {
        for stream in [false, true] {
            for path in ["/v1/chat/completions", "/v1/messages"] {
                let body = json!({"model": model, "max_tokens": 16, "stream": stream,
                    "messages": [{"role": "user", "content": "hello"}]});
                let resp = h.post(path, &body).await;
                let status = resp.status();
                let headers = format!("{:?}", resp.headers());
                let text = resp.text().await.unwrap();
                let case = format!("{model} {path} stream={stream}: {status} {text}");
                assert!(!text.contains(UPSTREAM_KEY), "{case}");
                assert!(!headers.contains(UPSTREAM_KEY), "{case}");
                // No recognisable half of it either (a cut in the wrong place).
                assert!(
                    !text.contains(&UPSTREAM_KEY[..UPSTREAM_KEY.len() / 2 + 2]),
                    "{case}"
                );
                assert!(
                    !text.contains(&UPSTREAM_KEY[UPSTREAM_KEY.len() / 2 - 2..]),
                    "{case}"
                );
                if stream {
                    assert!(text.contains("Hi"), "{case}");
                }
                redacted += usize::from(text.contains("[REDACTED]"));
            }
        }
    }
    assert!(
        redacted >= 6,
        "the echoes reached the client redacted ({redacted})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_from_an_upstream_reaches_the_client_as_replacement_characters() {
    let h = gateway().await;
    for path in ["/v1/chat/completions", "/v1/messages"] {
        let body = json!({"model": "echo-oa/bad-utf8", "max_tokens": 16, "stream": true,
            "messages": [{"role": "user", "content": "hello"}]});
        let resp = h.post(path, &body).await;
        assert_eq!(resp.status(), 200, "{path}");
        let bytes = resp.bytes().await.unwrap();
        let text = std::str::from_utf8(&bytes).expect("the client gets valid UTF-8");
        assert!(text.contains("caf\u{fffd} au lait"), "{path}: {text}");
    }
}
