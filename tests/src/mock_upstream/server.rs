//! The HTTP/1.1 server: accept loop, per-request recording and routing, and the response
//! helpers both provider modules share (including the scenario-driven timing of bodies).
//!
//! It is a plain hyper server rather than an axum router: four routes do not need one, and
//! the benchmark server should spend as little CPU per request as possible.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use super::body::{MockBody, Step, StreamGuard};
use super::faults::{Fault, RateLimitHeaders};
use super::ids;
use super::scenario::Scenario;
use super::sse::{self, Pace, SseFrame};
use super::{anthropic, openai, RecordedRequest, Shared, SLOW_MIN_CHUNK_DELAY};

/// Accepts connections until the task is aborted; dropping the `JoinSet` then aborts every
/// connection still open.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    connections.spawn(serve_connection(stream, Arc::clone(&shared)));
                }
                Err(err) => {
                    // Typically EMFILE under load: back off briefly instead of spinning.
                    tracing::warn!(%err, "mock upstream: accept failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    // Without TCP_NODELAY every small SSE frame waits on Nagle and the peer's delayed ACK.
    if let Err(err) = stream.set_nodelay(true) {
        tracing::debug!(%err, "mock upstream: set_nodelay failed");
    }
    let service = service_fn(move |request| {
        let shared = Arc::clone(&shared);
        async move { handle(shared, request).await }
    });
    if let Err(err) = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%err, "mock upstream: connection ended with an error");
    }
}

/// The request as the provider modules see it.
pub(crate) struct MockRequest {
    pub(crate) headers: HeaderMap,
    /// `None` when the body was not valid JSON; `Some(Value::Null)` when it was empty.
    pub(crate) body: Option<Value>,
    /// A scenario an injected fault imposes, whatever the model says.
    pub(crate) scenario: Option<Scenario>,
}

/// The error a [`Fault::Reset`] answers with: hyper closes the connection without a response.
#[derive(Debug)]
pub(crate) struct InjectedReset;

impl std::fmt::Display for InjectedReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mock upstream: injected connection reset")
    }
}

impl std::error::Error for InjectedReset {}

async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<MockBody>, InjectedReset> {
    let (parts, body) = request.into_parts();
    let bytes = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(err) => {
            tracing::debug!(%err, "mock upstream: reading the request body failed");
            Bytes::new()
        }
    };
    let received_at = Instant::now();
    let parsed: Option<Value> = if bytes.is_empty() {
        Some(Value::Null)
    } else {
        serde_json::from_slice(&bytes).ok()
    };
    let path = parts.uri.path().to_owned();
    shared.record(|| RecordedRequest {
        path: path.clone(),
        headers: parts
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    String::from_utf8_lossy(value.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body: parsed.clone().unwrap_or(Value::Null),
        received_at,
    });

    let mut request = MockRequest {
        headers: parts.headers,
        body: parsed,
        scenario: None,
    };
    let chat = parts.method == Method::POST
        && matches!(path.as_str(), "/v1/chat/completions" | "/v1/messages");
    let anthropic_route = path == "/v1/messages";
    let mut success_headers = None;
    if chat {
        let (latency, fault, headers) = shared.next_fault();
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        success_headers = headers;
        if let Some(fault) = fault {
            match fault {
                Fault::Reset => return Err(InjectedReset),
                Fault::Hang => std::future::pending::<()>().await,
                Fault::Status(status) => return Ok(faults_answer(anthropic_route, status, None)),
                Fault::RateLimited(after) => {
                    return Ok(faults_answer(anthropic_route, 429, Some(after)))
                }
                Fault::DropMidstream | Fault::ContextLength => request.scenario = fault.scenario(),
            }
        }
    }
    let mut response = match (&parts.method, path.as_str()) {
        (&Method::POST, "/v1/chat/completions") => openai::chat(shared, request).await,
        (&Method::POST, "/v1/embeddings") => openai::embeddings(shared, request).await,
        (&Method::GET, "/v1/models") => openai::models(request),
        (&Method::POST, "/v1/messages") => anthropic::messages(shared, request).await,
        (method, path) => {
            if request.headers.contains_key("x-api-key")
                || request.headers.contains_key("anthropic-version")
            {
                anthropic::not_found()
            } else {
                openai::not_found(method, path)
            }
        }
    };
    if let Some(h) = success_headers.filter(|_| response.status().is_success()) {
        set_rate_limit_headers(&mut response, anthropic_route, h);
    }
    Ok(response)
}

/// The answer to an injected status fault, in the route's wire format.
fn faults_answer(
    anthropic_route: bool,
    status: u16,
    retry_after: Option<Duration>,
) -> Response<MockBody> {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut headers = Vec::new();
    if let Some(after) = retry_after {
        let ms = after.as_millis();
        headers.push(("retry-after", ms.div_ceil(1000).to_string()));
        headers.push(("retry-after-ms", ms.to_string()));
        if anthropic_route {
            headers.push(("anthropic-ratelimit-requests-remaining", "0".to_owned()));
            headers.push((
                "anthropic-ratelimit-requests-reset",
                ids::rfc3339(ids::unix_now() + after.as_secs().max(1)),
            ));
        } else {
            headers.push(("x-ratelimit-remaining-requests", "0".to_owned()));
            headers.push(("x-ratelimit-reset-requests", format!("{ms}ms")));
        }
    }
    match (anthropic_route, status) {
        (true, 429) => anthropic::error(
            code,
            ids::anthropic_request_id(),
            "rate_limit_error",
            "This request would exceed the rate limit for your organization. Please try again later.",
            headers,
        ),
        (true, 503 | 529) => anthropic::overloaded(ids::anthropic_request_id()),
        (true, _) => anthropic::error(
            code,
            ids::anthropic_request_id(),
            "api_error",
            "Internal server error",
            headers,
        ),
        (false, 429) => openai::error(
            code,
            ids::openai_request_id(),
            "Rate limit reached for requests per min (RPM). Please try again later.",
            "requests",
            None,
            Some("rate_limit_exceeded"),
            headers,
        ),
        (false, 503) => openai::error(
            code,
            ids::openai_request_id(),
            "The engine is currently overloaded, please try again later.",
            "server_error",
            None,
            None,
            headers,
        ),
        (false, _) => openai::error(
            code,
            ids::openai_request_id(),
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
            headers,
        ),
    }
}

/// Replaces the rate-limit headers of a successful answer.
fn set_rate_limit_headers(
    response: &mut Response<MockBody>,
    anthropic_route: bool,
    h: RateLimitHeaders,
) {
    let reset_ms = h.reset.as_millis();
    let pairs: Vec<(&'static str, String)> = if anthropic_route {
        let reset = ids::rfc3339(ids::unix_now() + h.reset.as_secs().max(1));
        vec![
            (
                "anthropic-ratelimit-requests-remaining",
                h.remaining_requests.to_string(),
            ),
            ("anthropic-ratelimit-requests-reset", reset.clone()),
            (
                "anthropic-ratelimit-tokens-remaining",
                h.remaining_tokens.to_string(),
            ),
            ("anthropic-ratelimit-tokens-reset", reset),
        ]
    } else {
        vec![
            (
                "x-ratelimit-remaining-requests",
                h.remaining_requests.to_string(),
            ),
            ("x-ratelimit-reset-requests", format!("{reset_ms}ms")),
            (
                "x-ratelimit-remaining-tokens",
                h.remaining_tokens.to_string(),
            ),
            ("x-ratelimit-reset-tokens", format!("{reset_ms}ms")),
        ]
    };
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::try_from(value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), v);
        }
    }
}

/// A response with a complete body.
pub(crate) fn full(
    status: StatusCode,
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: impl Into<Bytes>,
) -> Response<MockBody> {
    let mut response = Response::new(MockBody::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    add_headers(&mut response, headers);
    response
}

/// A response whose body is a script; `content_length` is announced when given.
pub(crate) fn scripted(
    content_type: &'static str,
    headers: Vec<(&'static str, String)>,
    body: MockBody,
    content_length: Option<usize>,
) -> Response<MockBody> {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(len) = content_length {
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(len));
    }
    add_headers(&mut response, headers);
    response
}

fn add_headers(response: &mut Response<MockBody>, headers: Vec<(&'static str, String)>) {
    for (name, value) in headers {
        match HeaderValue::try_from(value) {
            Ok(value) => {
                response
                    .headers_mut()
                    .append(HeaderName::from_static(name), value);
            }
            Err(err) => tracing::warn!(%err, header = name, "mock upstream: bad header value"),
        }
    }
}

pub(crate) const JSON: &str = "application/json";
pub(crate) const EVENT_STREAM: &str = "text/event-stream; charset=utf-8";

/// The pause between content chunks for `scenario`.
fn between(shared: &Shared, scenario: Scenario) -> Duration {
    if scenario == Scenario::Slow {
        shared.opts.chunk_delay.max(SLOW_MIN_CHUNK_DELAY)
    } else {
        shared.opts.chunk_delay
    }
}

/// Turns the rendered frames of a streamed reply into a response, timed and mangled as the
/// scenario asks: `split-frames` cuts the bytes ([`sse::split_frames`]), `drop-midstream`
/// aborts the connection after the frames (which the caller has already cut short),
/// `stall-midstream` holds it open after them, `hang` sends only the headers, everything else
/// is paced by the options.
pub(crate) fn stream_response(
    shared: &Arc<Shared>,
    path: &'static str,
    model: &str,
    scenario: Scenario,
    headers: Vec<(&'static str, String)>,
    frames: Vec<SseFrame>,
) -> Response<MockBody> {
    let first = shared.opts.first_chunk_delay;
    let steps = match scenario {
        Scenario::Hang => vec![Step::Hang],
        Scenario::SplitFrames => sse::split_frames(frames, first),
        _ => {
            let pace = Pace {
                first,
                between: between(shared, scenario),
            };
            let mut steps = sse::paced(frames, pace);
            match scenario {
                Scenario::DropMidstream => {
                    // Let hyper flush what was written, then kill the connection.
                    steps.push(Step::Sleep(Duration::from_millis(10)));
                    steps.push(Step::Abort);
                }
                Scenario::StallMidstream => steps.push(Step::Hang),
                Scenario::HugeLine => {
                    steps.extend(sse::huge_line(super::HUGE_LINE_BYTES));
                    steps.push(Step::Hang);
                }
                Scenario::KeepaliveOnly => {
                    steps.extend(sse::keepalives(super::KEEPALIVE_INTERVAL, 10_000));
                }
                _ => {}
            }
            steps
        }
    };
    let guard = StreamGuard::new(Arc::clone(shared), path, model);
    scripted(EVENT_STREAM, headers, MockBody::script(steps, guard), None)
}

/// Answers a non-streaming request with `body` (JSON), after the time generating `pieces`
/// chunks would take; `hang` never answers, `split-frames` writes the body in four pieces,
/// `drop-midstream` writes half of it and drops the connection, `stall-midstream` writes half
/// of it and then nothing. A client that goes away
/// while the mock is waiting is recorded as a cancelled stream.
pub(crate) async fn json_after_generation(
    shared: &Arc<Shared>,
    path: &'static str,
    model: &str,
    scenario: Scenario,
    pieces: usize,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
) -> Response<MockBody> {
    let mut guard = StreamGuard::new(Arc::clone(shared), path, model);
    if scenario == Scenario::Hang {
        std::future::pending::<()>().await;
    }
    let wait = shared.opts.first_chunk_delay
        + between(shared, scenario).saturating_mul(pieces.saturating_sub(1) as u32);
    if !wait.is_zero() {
        tokio::time::sleep(wait).await;
    }
    let body = Bytes::from(body);
    let len = body.len();
    match scenario {
        Scenario::SplitFrames => {
            let quarter = (len / 4).max(1);
            let mut steps = Vec::new();
            let mut from = 0;
            while from < len {
                let to = (from + quarter).min(len);
                if from > 0 {
                    steps.push(Step::Sleep(sse::SPLIT_PIECE_DELAY));
                }
                steps.push(Step::data(body.slice(from..to)));
                from = to;
            }
            scripted(JSON, headers, MockBody::script(steps, guard), Some(len))
        }
        Scenario::DropMidstream => {
            let steps = vec![
                Step::data(body.slice(..len / 2)),
                Step::Sleep(Duration::from_millis(10)),
                Step::Abort,
            ];
            scripted(JSON, headers, MockBody::script(steps, guard), Some(len))
        }
        Scenario::StallMidstream => {
            let steps = vec![Step::data(body.slice(..len / 2)), Step::Hang];
            scripted(JSON, headers, MockBody::script(steps, guard), Some(len))
        }
        _ => {
            guard.finish();
            full(StatusCode::OK, JSON, headers, body)
        }
    }
}
