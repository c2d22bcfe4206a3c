//! `GET /v1/realtime/chat`: chat completions over a WebSocket, several at once on one socket.
//!
//! The key is checked when the socket opens (a bad one gets the HTTP 401, no upgrade). The
//! client then sends text frames:
//!
//! ```text
//! {"type": "request", "id": "a1", "body": {...a chat completions request...}}
//! {"type": "cancel", "id": "a1"}
//! ```
//!
//! and receives, per request id, the same chunk objects an SSE stream carries:
//!
//! ```text
//! {"type": "chunk", "id": "a1", "request_id": "req_…", "chunk": {...chat.completion.chunk...}}
//! {"type": "done", "id": "a1", "request_id": "req_…"}
//! {"type": "error", "id": "a1", "request_id": "req_…", "status": 429, "error": {...}}
//! {"type": "cancelled", "id": "a1"}
//! ```
//!
//! Every request goes the HTTP path's whole way (`inference::serve`: authentication,
//! quotas — a hard limit crossed mid-stream ends it with an error frame —, the cache,
//! routing, events and billing), as a streamed chat completion with the socket's headers, so
//! it is billed exactly as the same request over HTTP. Cancelling a request drops its stream:
//! the upstream call is cancelled and what was sent is billed, as when an HTTP client leaves.
//!
//! Caps (`[realtime]`): requests in flight per socket (more get an error frame), frame size
//! (close 1009), idle time without a frame either way (close 1000), socket lifetime
//! (close 1001). A key revoked while its socket is open gets 401 error frames and the socket
//! is closed with 1008 (policy).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::inference::{self, Api};
use super::request_id::RequestId;
use crate::api::WireFormat;
use crate::app::AppState;
use crate::error::GatewayError;
use crate::relay::SseParser;

/// `[realtime]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RealtimeConfig {
    pub enabled: bool,
    /// Requests in flight on one socket.
    pub max_in_flight: usize,
    /// Largest frame a client may send.
    pub max_frame_bytes: usize,
    /// A socket with no frame either way for this long is closed.
    pub idle_timeout_s: u64,
    /// A socket is closed after this long whatever it does.
    pub max_lifetime_s: u64,
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        RealtimeConfig {
            enabled: true,
            max_in_flight: 8,
            max_frame_bytes: 1024 * 1024,
            idle_timeout_s: 300,
            max_lifetime_s: 3600,
        }
    }
}

/// Close codes (RFC 6455).
const CLOSE_NORMAL: u16 = 1000;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_UNSUPPORTED: u16 = 1003;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_TOO_BIG: u16 = 1009;

/// A client frame.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientFrame {
    Request { id: String, body: Value },
    Cancel { id: String },
}

pub async fn chat(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let (mut parts, _) = request.into_parts();
    let config = state.config.realtime.clone();
    if !config.enabled {
        return GatewayError::NotFound("Unknown request URL: /v1/realtime/chat".to_string())
            .into_response_for(WireFormat::OpenAi);
    }
    // The key first: a socket is only opened for a valid one.
    if let Err(e) = state.auth.authenticate(&parts.headers).await {
        return e.into_response_for(WireFormat::OpenAi);
    }
    let upgrade =
        match <WebSocketUpgrade as axum::extract::FromRequestParts<_>>::from_request_parts(
            &mut parts, &state,
        )
        .await
        {
            Ok(u) => u,
            Err(rejection) => {
                return GatewayError::bad_request(format!(
                    "This URL takes a WebSocket: {rejection}"
                ))
                .into_response_for(WireFormat::OpenAi)
            }
        };
    let headers = parts.headers;
    upgrade
        .max_message_size(config.max_frame_bytes)
        .max_frame_size(config.max_frame_bytes)
        .on_upgrade(move |socket| session(state, headers, socket))
}

/// What a request task tells the session.
enum Event {
    Frame(Value),
    /// The request ended; `revoked`: its key was refused.
    Ended {
        id: String,
        revoked: bool,
    },
}

async fn session(state: Arc<AppState>, headers: HeaderMap, socket: WebSocket) {
    let config = state.config.realtime.clone();
    let (mut sink, mut incoming) = socket.split();
    let (events_tx, mut events) = mpsc::channel::<Event>(256);
    let mut in_flight: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    let lifetime = tokio::time::sleep(Duration::from_secs(config.max_lifetime_s));
    tokio::pin!(lifetime);
    let idle = Duration::from_secs(config.idle_timeout_s.max(1));
    let close = |code: u16, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        }))
    };
    let send = |v: Value| Message::Text(Utf8Bytes::from(v.to_string()));
    let ending = loop {
        tokio::select! {
            _ = &mut lifetime => break close(CLOSE_GOING_AWAY, "socket lifetime reached"),
            _ = tokio::time::sleep(idle) => break close(CLOSE_NORMAL, "idle"),
            event = events.recv() => match event {
                Some(Event::Frame(v)) => {
                    if sink.send(send(v)).await.is_err() {
                        break Message::Close(None);
                    }
                }
                Some(Event::Ended { id, revoked }) => {
                    in_flight.remove(&id);
                    if revoked {
                        break close(CLOSE_POLICY, "the API key was refused");
                    }
                }
                None => break Message::Close(None),
            },
            frame = incoming.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    match serde_json::from_str::<ClientFrame>(&text) {
                        Ok(ClientFrame::Request { id, body }) => {
                            if in_flight.contains_key(&id) {
                                let e = GatewayError::bad_param(format!("Request `{id}` is already in flight on this socket."), "id");
                                let _ = sink.send(send(error_frame(&id, None, &e))).await;
                            } else if in_flight.len() >= config.max_in_flight {
                                let e = GatewayError::RateLimited {
                                    message: format!("At most {} requests may be in flight on one socket.", config.max_in_flight),
                                    limit: "socket_in_flight".to_string(),
                                    quota: false,
                                    retry_after_s: 1,
                                    headers: Vec::new(),
                                };
                                let _ = sink.send(send(error_frame(&id, None, &e))).await;
                            } else {
                                let task = tokio::spawn(run_one(
                                    state.clone(),
                                    headers.clone(),
                                    id.clone(),
                                    body,
                                    events_tx.clone(),
                                ));
                                in_flight.insert(id, task.abort_handle());
                            }
                        }
                        Ok(ClientFrame::Cancel { id }) => {
                            if let Some(task) = in_flight.remove(&id) {
                                // Dropping the stream cancels the upstream call; what was
                                // sent is billed.
                                task.abort();
                                let _ = sink.send(send(json!({"type": "cancelled", "id": id}))).await;
                            }
                        }
                        Err(e) => {
                            let e = GatewayError::bad_request(format!(
                                "A frame is {{\"type\": \"request\", \"id\", \"body\"}} or {{\"type\": \"cancel\", \"id\"}}: {e}"
                            ));
                            let _ = sink.send(send(error_frame("", None, &e))).await;
                        }
                    }
                }
                Some(Ok(Message::Binary(_))) => break close(CLOSE_UNSUPPORTED, "text frames only"),
                Some(Ok(Message::Close(_))) | None => break Message::Close(None),
                Some(Ok(_)) => {} // ping/pong: answered by the library
                Some(Err(e)) => {
                    let too_big = e.to_string().to_ascii_lowercase().contains("too long")
                        || e.to_string().to_ascii_lowercase().contains("too big");
                    break if too_big {
                        close(CLOSE_TOO_BIG, "frame too large")
                    } else {
                        Message::Close(None)
                    };
                }
            },
        }
    };
    for (_, task) in in_flight.drain() {
        task.abort();
    }
    let _ = sink.send(ending).await;
    let _ = sink.close().await;
}

/// The frame of a request that failed before or while streaming.
fn error_frame(id: &str, request_id: Option<&str>, e: &GatewayError) -> Value {
    json!({"type": "error", "id": id, "request_id": request_id, "status": e.status().as_u16(),
        "error": e.body(WireFormat::OpenAi)["error"]})
}

/// Runs one request through the HTTP path and turns its SSE stream into frames.
async fn run_one(
    state: Arc<AppState>,
    headers: HeaderMap,
    id: String,
    mut body: Value,
    events: mpsc::Sender<Event>,
) {
    let frame = |v: Value| Event::Frame(v);
    if let Some(obj) = body.as_object_mut() {
        obj.insert("stream".to_string(), Value::Bool(true));
    }
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    let mut request = Request::new(Body::from(bytes));
    *request.method_mut() = axum::http::Method::POST;
    *request.headers_mut() = headers;
    request
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    request.headers_mut().remove("content-length");
    let request_id = RequestId::new();
    request.extensions_mut().insert(request_id.clone());
    let response = inference::serve(state, request, Api::ChatCompletions).await;
    let request_id = Some(request_id.0.to_string());
    let status = response.status().as_u16();
    if status != 200 {
        let bytes = axum::body::to_bytes(response.into_body(), 1024 * 1024)
            .await
            .unwrap_or_default();
        let error = serde_json::from_slice::<Value>(&bytes)
            .map(|v| v["error"].clone())
            .unwrap_or(Value::Null);
        let _ = events
            .send(frame(
                json!({"type": "error", "id": id, "request_id": request_id,
                "status": status, "error": error}),
            ))
            .await;
        let _ = events
            .send(Event::Ended {
                id,
                revoked: status == 401,
            })
            .await;
        return;
    }
    let mut stream = response.into_body().into_data_stream();
    let mut parser = SseParser::new();
    let mut ended = false;
    while let Some(Ok(chunk)) = stream.next().await {
        parser.push(&chunk);
        while let Some(event) = parser.next_frame() {
            let Some(data) = event.data else { continue };
            let data = data.trim_ascii();
            let v = if data == b"[DONE]" {
                ended = true;
                json!({"type": "done", "id": id, "request_id": request_id})
            } else {
                match serde_json::from_slice::<Value>(data) {
                    Ok(chunk) if chunk.get("error").is_some() => {
                        ended = true;
                        json!({"type": "error", "id": id, "request_id": request_id,
                            "status": 200, "error": chunk["error"]})
                    }
                    Ok(chunk) => json!({"type": "chunk", "id": id, "request_id": request_id,
                        "chunk": chunk}),
                    Err(_) => continue,
                }
            };
            if events.send(frame(v)).await.is_err() {
                return;
            }
        }
        if parser.overflowed() {
            // An event past the bound: the rest cannot be read safely.
            break;
        }
    }
    if !ended {
        let _ = events
            .send(frame(
                json!({"type": "error", "id": id, "request_id": request_id,
                "status": 502, "error": {"message": "the stream ended before it was complete",
                "type": "server_error", "param": null, "code": "upstream_error"}}),
            ))
            .await;
    }
    let _ = events.send(Event::Ended { id, revoked: false }).await;
}
