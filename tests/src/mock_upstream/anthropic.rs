//! The Anthropic Messages wire format: `POST /v1/messages` streamed as `event:`/`data:`
//! frames (`message_start`, `content_block_start`, `ping`, `content_block_delta`,
//! `content_block_stop`, `message_delta`, `message_stop`, `error`) or answered with a
//! `message` object, and the error bodies `{"type":"error","error":{"type","message"}}`.

use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use hyper::{HeaderMap, Response, StatusCode};
use serde_json::Value;

use super::body::MockBody;
use super::ids;
use super::scenario::Scenario;
use super::server::{self, MockRequest, JSON};
use super::sse::{SseFrame, SseWriter};
use super::text::{self, json_str, prompt_tokens_for, TOOL_CALL_ARGUMENTS, TOOL_PREAMBLE};
use super::{Shared, CHUNKS_BEFORE_FAILURE, INVALID_KEY_MARKER};

const PATH: &str = "/v1/messages";

/// In `anthropic-usage-split`, how many more input tokens `message_delta` reports than
/// `message_start` did (as when server-side tools ran during the turn): the final numbers
/// are the `message_delta` ones, so a gateway that keeps the `message_start` count is caught.
pub const SPLIT_EXTRA_INPUT_TOKENS: u64 = 10;

/// The in-stream error Anthropic sends when it gives up mid-response.
const STREAM_ERROR: &str =
    r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;

/// Text-delta frames rendered once when the server starts.
pub(crate) struct Prerendered {
    /// The JSON of text delta `i`.
    delta_json: Vec<String>,
    /// The whole LF-terminated frame of text delta `i`, shared by every response.
    delta_frames: Vec<Bytes>,
}

impl Prerendered {
    pub(crate) fn new(chunks: usize) -> Prerendered {
        let delta_json: Vec<String> = (0..chunks)
            .map(|i| text_delta_json(0, text::reply_piece(i)))
            .collect();
        let delta_frames = delta_json
            .iter()
            .map(|json| Bytes::from(format!("event: content_block_delta\ndata: {json}\n\n")))
            .collect();
        Prerendered {
            delta_json,
            delta_frames,
        }
    }
}

fn text_delta_json(index: usize, text: &str) -> String {
    format!(
        r#"{{"type":"content_block_delta","index":{index},"delta":{{"type":"text_delta","text":{}}}}}"#,
        json_str(text)
    )
}

fn success_headers(request_id: String) -> Vec<(&'static str, String)> {
    vec![
        ("request-id", request_id),
        ("anthropic-ratelimit-requests-limit", "4000".to_owned()),
        ("anthropic-ratelimit-requests-remaining", "3999".to_owned()),
    ]
}

/// An Anthropic error response: `{"type":"error","error":{"type","message"},"request_id"}`.
pub(crate) fn error(
    status: StatusCode,
    request_id: String,
    kind: &str,
    message: &str,
    mut headers: Vec<(&'static str, String)>,
) -> Response<MockBody> {
    let body = format!(
        r#"{{"type":"error","error":{{"type":{},"message":{}}},"request_id":"{request_id}"}}"#,
        json_str(kind),
        json_str(message)
    );
    headers.push(("request-id", request_id));
    server::full(status, JSON, headers, body)
}

/// 401 without an acceptable `x-api-key`; 400 without `anthropic-version`.
fn check_headers(headers: &HeaderMap, request_id: &str) -> Option<Response<MockBody>> {
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|k| !k.is_empty());
    match key {
        None => {
            return Some(error(
                StatusCode::UNAUTHORIZED,
                request_id.to_owned(),
                "authentication_error",
                "x-api-key header is required",
                Vec::new(),
            ))
        }
        Some(key) if key.contains(INVALID_KEY_MARKER) => {
            return Some(error(
                StatusCode::UNAUTHORIZED,
                request_id.to_owned(),
                "authentication_error",
                "invalid x-api-key",
                Vec::new(),
            ))
        }
        Some(_) => {}
    }
    if !headers.contains_key("anthropic-version") {
        return Some(error(
            StatusCode::BAD_REQUEST,
            request_id.to_owned(),
            "invalid_request_error",
            "anthropic-version: header is required",
            Vec::new(),
        ));
    }
    None
}

fn scenario_error(scenario: Scenario, request_id: &str) -> Option<Response<MockBody>> {
    let rid = request_id.to_owned();
    match scenario {
        Scenario::RateLimited => Some(error(
            StatusCode::TOO_MANY_REQUESTS,
            rid,
            "rate_limit_error",
            "This request would exceed the rate limit for your organization of 50 requests per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. You can see the response headers for current usage. Please reduce the prompt length or the maximum tokens requested, or try again later.",
            vec![
                ("retry-after", "1".to_owned()),
                ("x-should-retry", "true".to_owned()),
                ("anthropic-ratelimit-requests-limit", "50".to_owned()),
                ("anthropic-ratelimit-requests-remaining", "0".to_owned()),
                (
                    "anthropic-ratelimit-requests-reset",
                    ids::rfc3339(ids::unix_now() + 1),
                ),
            ],
        )),
        Scenario::ServerError => Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            rid,
            "api_error",
            "Internal server error",
            vec![("x-should-retry", "true".to_owned())],
        )),
        Scenario::Overloaded => Some(overloaded(rid)),
        Scenario::BadRequest => Some(error(
            StatusCode::BAD_REQUEST,
            rid,
            "invalid_request_error",
            "messages: roles must alternate between \"user\" and \"assistant\", but found multiple \"user\" roles in a row",
            Vec::new(),
        )),
        Scenario::ContextLengthExceeded => Some(error(
            StatusCode::BAD_REQUEST,
            rid,
            "invalid_request_error",
            "prompt is too long: 208476 tokens > 200000 maximum",
            Vec::new(),
        )),
        _ => None,
    }
}

pub(crate) fn overloaded(request_id: String) -> Response<MockBody> {
    let status = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    error(
        status,
        request_id,
        "overloaded_error",
        "Overloaded",
        vec![("x-should-retry", "true".to_owned())],
    )
}

/// 404 for an unknown path on a request that looks like an Anthropic one.
pub(crate) fn not_found() -> Response<MockBody> {
    error(
        StatusCode::NOT_FOUND,
        ids::anthropic_request_id(),
        "not_found_error",
        "Not Found",
        Vec::new(),
    )
}

/// What a messages request will be answered with.
struct Plan {
    pieces: usize,
    stop_reason: &'static str,
    /// `input_tokens` as `message_start` (and a non-streamed message) reports it.
    input_tokens: u64,
    cache_read_input_tokens: u64,
    /// Input tokens the final usage adds to `input_tokens` (`anthropic-usage-split` only).
    extra_final_input_tokens: u64,
    output_tokens: u64,
    tools: Option<[String; 2]>,
}

impl Plan {
    fn new(shared: &Shared, body: &Value, scenario: Scenario, max_tokens: u64) -> Plan {
        let prompt = prompt_tokens_for(body);
        let cache_read_input_tokens = if scenario == Scenario::Cached {
            prompt / 2
        } else {
            0
        };
        let input_tokens = prompt - cache_read_input_tokens;
        let extra_final_input_tokens = if scenario == Scenario::AnthropicUsageSplit {
            SPLIT_EXTRA_INPUT_TOKENS
        } else {
            0
        };
        if scenario == Scenario::Tools {
            return Plan {
                pieces: 0,
                stop_reason: "tool_use",
                input_tokens,
                cache_read_input_tokens,
                extra_final_input_tokens,
                output_tokens: text::tool_output_tokens(true),
                tools: Some(tool_names(body)),
            };
        }
        let chunks = shared.opts.chunks;
        let max = usize::try_from(max_tokens).unwrap_or(usize::MAX);
        let (mut pieces, stop_reason) = if max < chunks {
            (max, "max_tokens")
        } else {
            (chunks, "end_turn")
        };
        if matches!(
            scenario,
            Scenario::ErrorMidstream | Scenario::DropMidstream | Scenario::StallMidstream
        ) {
            pieces = pieces.min(CHUNKS_BEFORE_FAILURE);
        }
        Plan {
            pieces,
            stop_reason,
            input_tokens,
            cache_read_input_tokens,
            extra_final_input_tokens,
            output_tokens: pieces as u64,
            tools: None,
        }
    }

    /// The usage object of `message_start` (`output_tokens` 1, as the real API reports it
    /// before generating) or of a non-streamed message (`complete`: the final numbers).
    fn usage_json(&self, complete: bool) -> String {
        let (input, output) = if complete {
            (
                self.input_tokens + self.extra_final_input_tokens,
                self.output_tokens,
            )
        } else {
            (self.input_tokens, 1)
        };
        format!(
            r#"{{"input_tokens":{input},"cache_creation_input_tokens":0,"cache_read_input_tokens":{},"output_tokens":{output},"service_tier":"standard"}}"#,
            self.cache_read_input_tokens
        )
    }
}

/// The first two `tools[].name`s (the first repeated if there is only one), or `get_weather`.
fn tool_names(body: &Value) -> [String; 2] {
    let names: Vec<&str> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| t.get("name").and_then(Value::as_str))
                .take(2)
                .collect()
        })
        .unwrap_or_default();
    let first = names.first().copied().unwrap_or("get_weather");
    let second = names.get(1).copied().unwrap_or(first);
    [first.to_owned(), second.to_owned()]
}

/// `POST /v1/messages`.
pub(crate) async fn messages(shared: Arc<Shared>, request: MockRequest) -> Response<MockBody> {
    let request_id = ids::anthropic_request_id();
    if let Some(denied) = check_headers(&request.headers, &request_id) {
        return denied;
    }
    let Some(body) = request.body.filter(|b| !b.is_null()) else {
        return error(
            StatusCode::BAD_REQUEST,
            request_id,
            "invalid_request_error",
            "There was an issue with the formatting or parsing of your request's JSON body. Please check that it is valid JSON.",
            Vec::new(),
        );
    };
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return field_required(request_id, "model");
    };
    if !body.get("messages").is_some_and(Value::is_array) {
        return field_required(request_id, "messages");
    }
    // Required by the real API: a gateway translating from OpenAI must always supply it.
    let Some(max_tokens) = body.get("max_tokens").and_then(Value::as_u64) else {
        return field_required(request_id, "max_tokens");
    };
    let scenario = match request
        .scenario
        .unwrap_or_else(|| Scenario::from_model(model))
    {
        Scenario::UsageInLastChoiceChunk => Scenario::Normal,
        other => other,
    };
    if let Some(failed) = scenario_error(scenario, &request_id) {
        return failed;
    }
    let plan = Plan::new(&shared, &body, scenario, max_tokens);
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    if !stream && scenario == Scenario::ErrorMidstream {
        return overloaded(request_id);
    }
    let headers = success_headers(request_id);
    if stream {
        let frames = render_stream(&shared, &plan, scenario, model);
        server::stream_response(&shared, PATH, model, scenario, headers, frames)
    } else {
        let body = render_message(&plan, model);
        server::json_after_generation(
            &shared,
            PATH,
            model,
            scenario,
            plan.pieces.max(1),
            headers,
            body.into_bytes(),
        )
        .await
    }
}

fn field_required(request_id: String, field: &str) -> Response<MockBody> {
    error(
        StatusCode::BAD_REQUEST,
        request_id,
        "invalid_request_error",
        &format!("{field}: Field required"),
        Vec::new(),
    )
}

/// The frames of a streamed message, as `scenario` shapes them.
fn render_stream(shared: &Shared, plan: &Plan, scenario: Scenario, model: &str) -> Vec<SseFrame> {
    let crlf = scenario == Scenario::SplitFrames;
    let pre = &shared.anthropic_prerendered;
    let mut w = SseWriter::new(crlf, 1024 + plan.pieces * 16);
    let mut frames = Vec::with_capacity(plan.pieces + 8);

    let start = format!(
        r#"{{"type":"message_start","message":{{"id":"{}","type":"message","role":"assistant","model":{},"content":[],"stop_reason":null,"stop_sequence":null,"usage":{}}}}}"#,
        ids::msg_id(),
        json_str(model),
        plan.usage_json(false)
    );
    frames.push(SseFrame::meta(w.event("message_start", &[&start])));
    frames.push(SseFrame::meta(w.event(
        "content_block_start",
        &[r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#],
    )));
    // The real API writes this one with a space after the colon.
    frames.push(SseFrame::meta(w.event("ping", &[r#"{"type": "ping"}"#])));

    if let Some(names) = &plan.tools {
        for piece in TOOL_PREAMBLE {
            frames.push(SseFrame::content(
                w.event("content_block_delta", &[&text_delta_json(0, piece)]),
            ));
        }
        frames.push(SseFrame::meta(w.event(
            "content_block_stop",
            &[r#"{"type":"content_block_stop","index":0}"#],
        )));
        for (i, (name, arguments)) in names.iter().zip(TOOL_CALL_ARGUMENTS).enumerate() {
            let index = i + 1;
            let block_start = format!(
                r#"{{"type":"content_block_start","index":{index},"content_block":{{"type":"tool_use","id":"{}","name":{},"input":{{}}}}}}"#,
                ids::toolu_id(),
                json_str(name)
            );
            frames.push(SseFrame::meta(
                w.event("content_block_start", &[&block_start]),
            ));
            // The first input_json_delta is empty, as the real API sends it.
            let fragments = std::iter::once("").chain(text::tool_fragments(arguments));
            for (n, fragment) in fragments.enumerate() {
                let delta = format!(
                    r#"{{"type":"content_block_delta","index":{index},"delta":{{"type":"input_json_delta","partial_json":{}}}}}"#,
                    json_str(fragment)
                );
                let frame = w.event("content_block_delta", &[&delta]);
                frames.push(if n == 0 {
                    SseFrame::meta(frame)
                } else {
                    SseFrame::content(frame)
                });
            }
            let stop = format!(r#"{{"type":"content_block_stop","index":{index}}}"#);
            frames.push(SseFrame::meta(w.event("content_block_stop", &[&stop])));
        }
    } else {
        for i in 0..plan.pieces {
            let frame = if crlf {
                w.event("content_block_delta", &[&pre.delta_json[i]])
            } else {
                pre.delta_frames[i].clone()
            };
            frames.push(SseFrame::content(frame));
        }
    }

    match scenario {
        Scenario::ErrorMidstream => {
            frames.push(SseFrame::meta(w.event("error", &[STREAM_ERROR])));
            return frames;
        }
        Scenario::DropMidstream | Scenario::StallMidstream => return frames,
        _ => {}
    }

    if plan.tools.is_none() {
        frames.push(SseFrame::meta(w.event(
            "content_block_stop",
            &[r#"{"type":"content_block_stop","index":0}"#],
        )));
    }
    let usage = if scenario == Scenario::AnthropicUsageSplit {
        format!(
            r#"{{"input_tokens":{},"cache_creation_input_tokens":0,"cache_read_input_tokens":{},"output_tokens":{}}}"#,
            plan.input_tokens + plan.extra_final_input_tokens,
            plan.cache_read_input_tokens,
            plan.output_tokens
        )
    } else {
        format!(r#"{{"output_tokens":{}}}"#, plan.output_tokens)
    };
    let delta = format!(
        r#"{{"type":"message_delta","delta":{{"stop_reason":"{}","stop_sequence":null}},"usage":{usage}}}"#,
        plan.stop_reason
    );
    frames.push(SseFrame::meta(w.event("message_delta", &[&delta])));
    frames.push(SseFrame::meta(
        w.event("message_stop", &[r#"{"type":"message_stop"}"#]),
    ));
    frames
}

/// A non-streamed `message` object.
fn render_message(plan: &Plan, model: &str) -> String {
    let mut content = String::new();
    match &plan.tools {
        Some(names) => {
            let _ = write!(
                content,
                r#"{{"type":"text","text":{}}}"#,
                json_str(&TOOL_PREAMBLE.concat())
            );
            for (name, arguments) in names.iter().zip(TOOL_CALL_ARGUMENTS) {
                let _ = write!(
                    content,
                    r#",{{"type":"tool_use","id":"{}","name":{},"input":{arguments}}}"#,
                    ids::toolu_id(),
                    json_str(name)
                );
            }
        }
        None => {
            let _ = write!(
                content,
                r#"{{"type":"text","text":{}}}"#,
                json_str(&text::reply_text(plan.pieces))
            );
        }
    }
    format!(
        r#"{{"id":"{}","type":"message","role":"assistant","model":{},"content":[{content}],"stop_reason":"{}","stop_sequence":null,"usage":{}}}"#,
        ids::msg_id(),
        json_str(model),
        plan.stop_reason,
        plan.usage_json(true)
    )
}
