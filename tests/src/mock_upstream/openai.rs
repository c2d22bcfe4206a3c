//! The OpenAI wire format: `POST /v1/chat/completions` (streamed `chat.completion.chunk`s and
//! `chat.completion` objects), `POST /v1/embeddings`, `GET /v1/models`, and the error bodies
//! `{"error":{"message","type","param","code"}}` with their headers.
//!
//! Bodies are written by hand rather than through `serde_json::json!` so that field order
//! matches the real API and the hot path renders each chunk with a few buffer copies.

use std::fmt::Write as _;
use std::sync::Arc;

use hyper::header::AUTHORIZATION;
use hyper::{HeaderMap, Method, Response, StatusCode};
use serde_json::Value;

use super::body::MockBody;
use super::ids::{self, SYSTEM_FINGERPRINT};
use super::scenario::Scenario;
use super::server::{self, MockRequest, JSON};
use super::sse::{SseFrame, SseWriter};
use super::text::{self, json_str, prompt_tokens_for, TOOL_CALL_ARGUMENTS};
use super::{Shared, CHUNKS_BEFORE_FAILURE, INVALID_KEY_MARKER};

const CHAT_PATH: &str = "/v1/chat/completions";
const EMBEDDINGS_PATH: &str = "/v1/embeddings";

/// The data line OpenAI sends when a stream fails after it started (no `[DONE]` follows).
pub(crate) const STREAM_ERROR: &str = r#"{"error":{"message":"The server had an error while processing your request.","type":"server_error","param":null,"code":null}}"#;

const ROLE_CHOICE: &str = r#"{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}"#;

/// Bytes of `x` in each content chunk of the `giant-no-space` scenario.
const GIANT_CHUNK_BYTES: usize = 5_000;

/// Characters the `obfuscation` field pads with.
const OBFUSCATION_ALPHABET: &str = "qT7xKp2LmZ9vRb4NcW8sHd3GfJ6yA5eU";

/// Per-piece JSON rendered once when the server starts.
pub(crate) struct Prerendered {
    /// The `choices[0]` object of content chunk `i`.
    content_choices: Vec<String>,
    /// `,"obfuscation":"…"` for content chunk `i`: pads each chunk towards a constant size,
    /// as the real API does unless `stream_options.include_obfuscation` is false.
    obfuscations: Vec<String>,
}

impl Prerendered {
    pub(crate) fn new(chunks: usize) -> Prerendered {
        let content_choices = (0..chunks)
            .map(|i| {
                format!(
                    r#"{{"index":0,"delta":{{"content":{}}},"logprobs":null,"finish_reason":null}}"#,
                    json_str(text::reply_piece(i))
                )
            })
            .collect();
        let obfuscations = (0..chunks)
            .map(|i| {
                let pad = 16usize.saturating_sub(text::reply_piece(i).len()).max(2);
                let start = i % (OBFUSCATION_ALPHABET.len() - 16);
                format!(
                    r#","obfuscation":"{}""#,
                    &OBFUSCATION_ALPHABET[start..start + pad]
                )
            })
            .collect();
        Prerendered {
            content_choices,
            obfuscations,
        }
    }
}

/// Headers every successful OpenAI response carries.
fn success_headers(request_id: String) -> Vec<(&'static str, String)> {
    vec![
        ("x-request-id", request_id),
        ("openai-version", "2020-10-01".to_owned()),
        ("openai-processing-ms", "12".to_owned()),
        ("x-ratelimit-limit-requests", "10000".to_owned()),
        ("x-ratelimit-remaining-requests", "9999".to_owned()),
        ("x-ratelimit-reset-requests", "6ms".to_owned()),
    ]
}

/// An OpenAI error response: `{"error":{"message","type","param","code"}}`.
pub(crate) fn error(
    status: StatusCode,
    request_id: String,
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
    mut headers: Vec<(&'static str, String)>,
) -> Response<MockBody> {
    let body = error_json(message, kind, param, code);
    headers.push(("x-request-id", request_id));
    server::full(status, JSON, headers, body)
}

fn error_json(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> String {
    let opt = |v: Option<&str>| v.map_or_else(|| "null".to_owned(), json_str);
    format!(
        r#"{{"error":{{"message":{},"type":{},"param":{},"code":{}}}}}"#,
        json_str(message),
        json_str(kind),
        opt(param),
        opt(code)
    )
}

/// 401 unless the request carries `Authorization: Bearer <key>` with an acceptable key.
fn check_auth(headers: &HeaderMap, request_id: &str) -> Option<Response<MockBody>> {
    let key = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.split_at_checked(7)?;
            scheme.eq_ignore_ascii_case("bearer ").then_some(key.trim())
        })
        .filter(|k| !k.is_empty());
    match key {
        None => Some(error(
            StatusCode::UNAUTHORIZED,
            request_id.to_owned(),
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank username) if you're accessing the API from your browser and are prompted for a username and password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            None,
            None,
            Vec::new(),
        )),
        Some(key) if key.contains(INVALID_KEY_MARKER) => Some(error(
            StatusCode::UNAUTHORIZED,
            request_id.to_owned(),
            &format!(
                "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                redact(key)
            ),
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
            Vec::new(),
        )),
        Some(_) => None,
    }
}

/// `sk-abc…wxyz` → `sk-ab*****wxyz`, as OpenAI echoes a rejected key.
fn redact(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "*".repeat(chars.len());
    }
    let head: String = chars[..5].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}*****{tail}")
}

fn invalid_json(request_id: String) -> Response<MockBody> {
    error(
        StatusCode::BAD_REQUEST,
        request_id,
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)",
        "invalid_request_error",
        None,
        None,
        Vec::new(),
    )
}

/// The response for the scenarios that fail before generating anything.
fn scenario_error(scenario: Scenario, model: &str, request_id: &str) -> Option<Response<MockBody>> {
    let rid = request_id.to_owned();
    match scenario {
        Scenario::RateLimited => Some(error(
            StatusCode::TOO_MANY_REQUESTS,
            rid,
            &format!("Rate limit reached for {model} in organization org-mockupstream on requests per min (RPM): Limit 500, Used 500, Requested 1. Please try again in 1s. Visit https://platform.openai.com/account/rate-limits to learn more."),
            "requests",
            None,
            Some("rate_limit_exceeded"),
            vec![
                ("retry-after", "1".to_owned()),
                ("retry-after-ms", "1000".to_owned()),
                ("x-ratelimit-limit-requests", "500".to_owned()),
                ("x-ratelimit-remaining-requests", "0".to_owned()),
                ("x-ratelimit-reset-requests", "1s".to_owned()),
            ],
        )),
        Scenario::ServerError => Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            rid,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
            Vec::new(),
        )),
        Scenario::Overloaded => Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            rid,
            "The engine is currently overloaded, please try again later.",
            "server_error",
            None,
            None,
            Vec::new(),
        )),
        Scenario::BadRequest => Some(error(
            StatusCode::BAD_REQUEST,
            rid,
            "Invalid value for 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead.",
            "invalid_request_error",
            Some("temperature"),
            Some("decimal_above_max_value"),
            Vec::new(),
        )),
        Scenario::ContextLengthExceeded => Some(error(
            StatusCode::BAD_REQUEST,
            rid,
            &format!("This model's maximum context length is 128000 tokens. However, your messages resulted in 131072 tokens. Please reduce the length of the messages. ({model})"),
            "invalid_request_error",
            Some("messages"),
            Some("context_length_exceeded"),
            Vec::new(),
        )),
        _ => None,
    }
}

/// What a chat request will be answered with.
struct Plan {
    /// Text content chunks to send (after `max_tokens` truncation and failure cut-off).
    pieces: usize,
    finish_reason: &'static str,
    prompt_tokens: u64,
    cached_tokens: u64,
    completion_tokens: u64,
    /// Names of the two tool calls, in the `tools` scenario.
    tools: Option<[String; 2]>,
    /// `huge-usage`: report u64::MAX prompt tokens.
    huge_usage: bool,
}

impl Plan {
    fn new(shared: &Shared, body: &Value, scenario: Scenario) -> Plan {
        let prompt_tokens = prompt_tokens_for(body);
        let cached_tokens = if scenario == Scenario::Cached {
            prompt_tokens / 2
        } else {
            0
        };
        if scenario == Scenario::Tools {
            return Plan {
                pieces: 0,
                finish_reason: "tool_calls",
                prompt_tokens,
                cached_tokens,
                completion_tokens: text::tool_output_tokens(false),
                tools: Some(tool_names(body)),
                huge_usage: false,
            };
        }
        let chunks = shared.opts.chunks;
        let max = body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
            .and_then(Value::as_u64)
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        let (mut pieces, finish_reason) = if max < chunks {
            (max, "length")
        } else {
            (chunks, "stop")
        };
        if matches!(
            scenario,
            Scenario::ErrorMidstream
                | Scenario::DropMidstream
                | Scenario::StallMidstream
                | Scenario::HugeLine
                | Scenario::KeepaliveOnly
        ) {
            pieces = pieces.min(CHUNKS_BEFORE_FAILURE);
        }
        Plan {
            pieces,
            finish_reason,
            prompt_tokens,
            cached_tokens,
            completion_tokens: pieces as u64,
            tools: None,
            huge_usage: scenario == Scenario::HugeUsage,
        }
    }

    fn usage_json(&self) -> String {
        if self.huge_usage {
            // What a buggy upstream sent a tester: a wrapped total.
            let prompt = super::HUGE_PROMPT_TOKENS;
            return format!(
                r#"{{"prompt_tokens":{prompt},"completion_tokens":{},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}}}}"#,
                self.completion_tokens,
                prompt.wrapping_add(self.completion_tokens)
            );
        }
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{},"total_tokens":{},"prompt_tokens_details":{{"cached_tokens":{},"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}"#,
            self.prompt_tokens,
            self.completion_tokens,
            self.prompt_tokens + self.completion_tokens,
            self.cached_tokens
        )
    }
}

/// The first two `tools[].function.name`s of the request (the first repeated if there is
/// only one), or `get_weather`.
fn tool_names(body: &Value) -> [String; 2] {
    let names: Vec<&str> = body
        .get("tools")
        .and_then(Value::as_array)
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
                .take(2)
                .collect()
        })
        .unwrap_or_default();
    let first = names.first().copied().unwrap_or("get_weather");
    let second = names.get(1).copied().unwrap_or(first);
    [first.to_owned(), second.to_owned()]
}

fn stream_option(body: &Value, name: &str) -> Option<bool> {
    body.get("stream_options")
        .and_then(|o| o.get(name))
        .and_then(Value::as_bool)
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat(shared: Arc<Shared>, request: MockRequest) -> Response<MockBody> {
    let request_id = ids::openai_request_id();
    if let Some(denied) = check_auth(&request.headers, &request_id) {
        return denied;
    }
    let Some(body) = request.body.filter(|b| !b.is_null()) else {
        return invalid_json(request_id);
    };
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return error(
            StatusCode::BAD_REQUEST,
            request_id,
            "you must provide a model parameter",
            "invalid_request_error",
            None,
            None,
            Vec::new(),
        );
    };
    if !body.get("messages").is_some_and(Value::is_array) {
        return error(
            StatusCode::BAD_REQUEST,
            request_id,
            "Missing required parameter: 'messages'.",
            "invalid_request_error",
            Some("messages"),
            Some("missing_required_parameter"),
            Vec::new(),
        );
    }
    let scenario = match request
        .scenario
        .unwrap_or_else(|| Scenario::from_model(model))
    {
        Scenario::AnthropicUsageSplit => Scenario::Normal,
        other => other,
    };
    if let Some(failed) = scenario_error(scenario, model, &request_id) {
        return failed;
    }
    let plan = Plan::new(&shared, &body, scenario);
    let stream = body.get("stream").and_then(Value::as_bool) == Some(true);
    if !stream && scenario == Scenario::ErrorMidstream {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            request_id,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
            None,
            Vec::new(),
        );
    }
    let headers = success_headers(request_id);
    if stream {
        let include_usage = stream_option(&body, "include_usage") == Some(true);
        let obfuscate = stream_option(&body, "include_obfuscation") != Some(false);
        let frames = render_stream(&shared, &plan, scenario, model, include_usage, obfuscate);
        server::stream_response(&shared, CHAT_PATH, model, scenario, headers, frames)
    } else {
        let body = render_completion(&plan, model);
        server::json_after_generation(
            &shared,
            CHAT_PATH,
            model,
            scenario,
            plan.pieces.max(1),
            headers,
            body.into_bytes(),
        )
        .await
    }
}

/// The frames of a streamed chat completion, as `scenario` shapes them.
fn render_stream(
    shared: &Shared,
    plan: &Plan,
    scenario: Scenario,
    model: &str,
    include_usage: bool,
    obfuscate: bool,
) -> Vec<SseFrame> {
    let head = format!(
        r#"{{"id":"{}","object":"chat.completion.chunk","created":{},"model":{},"service_tier":"default","system_fingerprint":"{}","choices":["#,
        ids::chatcmpl_id(),
        ids::unix_now(),
        json_str(model),
        SYSTEM_FINGERPRINT
    );
    let pre = &shared.prerendered;
    let usage_null = if include_usage {
        r#","usage":null"#
    } else {
        ""
    };
    let mut w = SseWriter::new(
        scenario == Scenario::SplitFrames,
        (plan.pieces + 4) * (head.len() + 160),
    );
    let mut frames = Vec::with_capacity(plan.pieces + 4);

    if let Some(names) = &plan.tools {
        for (index, (name, arguments)) in names.iter().zip(TOOL_CALL_ARGUMENTS).enumerate() {
            let opening = format!(
                r#"{{"index":0,"delta":{{{}"tool_calls":[{{"index":{index},"id":"{}","type":"function","function":{{"name":{},"arguments":""}}}}]{}}},"logprobs":null,"finish_reason":null}}"#,
                if index == 0 {
                    r#""role":"assistant","content":null,"#
                } else {
                    ""
                },
                ids::call_id(),
                json_str(name),
                if index == 0 { r#","refusal":null"# } else { "" },
            );
            frames.push(SseFrame::meta(
                w.data(&[&head, &opening, "]", usage_null, "}"]),
            ));
            for fragment in text::tool_fragments(arguments) {
                let choice = format!(
                    r#"{{"index":0,"delta":{{"tool_calls":[{{"index":{index},"function":{{"arguments":{}}}}}]}},"logprobs":null,"finish_reason":null}}"#,
                    json_str(fragment)
                );
                frames.push(SseFrame::content(
                    w.data(&[&head, &choice, "]", usage_null, "}"]),
                ));
            }
        }
    } else {
        frames.push(SseFrame::meta(w.data(&[
            &head,
            ROLE_CHOICE,
            "]",
            usage_null,
            "}",
        ])));
        for i in 0..plan.pieces {
            let obfuscation = if obfuscate {
                pre.obfuscations[i].as_str()
            } else {
                ""
            };
            frames.push(SseFrame::content(w.data(&[
                &head,
                &pre.content_choices[i],
                "]",
                usage_null,
                obfuscation,
                "}",
            ])));
        }
    }

    match scenario {
        Scenario::ErrorMidstream => {
            frames.push(SseFrame::meta(w.data(&[STREAM_ERROR])));
            return frames;
        }
        Scenario::DropMidstream
        | Scenario::StallMidstream
        | Scenario::HugeLine
        | Scenario::KeepaliveOnly => return frames,
        Scenario::GiantNoSpace => {
            // Megabytes of output without a space, and no usage whatever was asked.
            let piece = format!(
                r#"{{"index":0,"delta":{{"content":"{}"}},"logprobs":null,"finish_reason":null}}"#,
                "x".repeat(GIANT_CHUNK_BYTES)
            );
            for _ in 0..super::GIANT_REPLY_BYTES / GIANT_CHUNK_BYTES {
                frames.push(SseFrame::content(
                    w.data(&[&head, &piece, "]", usage_null, "}"]),
                ));
            }
            let finish = r#"{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}"#;
            frames.push(SseFrame::meta(
                w.data(&[&head, finish, "]", usage_null, "}"]),
            ));
            frames.push(SseFrame::meta(w.data(&["[DONE]"])));
            return frames;
        }
        _ => {}
    }

    let finish = format!(
        r#"{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{}"}}"#,
        plan.finish_reason
    );
    if scenario == Scenario::UsageInLastChoiceChunk {
        let usage = format!(r#","usage":{}"#, plan.usage_json());
        frames.push(SseFrame::meta(w.data(&[&head, &finish, "]", &usage, "}"])));
    } else {
        frames.push(SseFrame::meta(
            w.data(&[&head, &finish, "]", usage_null, "}"]),
        ));
        if include_usage || plan.huge_usage {
            let usage = format!(r#","usage":{}"#, plan.usage_json());
            frames.push(SseFrame::meta(w.data(&[&head, "]", &usage, "}"])));
        }
    }
    frames.push(SseFrame::meta(w.data(&["[DONE]"])));
    frames
}

/// A non-streamed `chat.completion` object.
fn render_completion(plan: &Plan, model: &str) -> String {
    let message = match &plan.tools {
        Some(names) => {
            let mut calls = String::new();
            for (i, (name, arguments)) in names.iter().zip(TOOL_CALL_ARGUMENTS).enumerate() {
                if i > 0 {
                    calls.push(',');
                }
                let _ = write!(
                    calls,
                    r#"{{"id":"{}","type":"function","function":{{"name":{},"arguments":{}}}}}"#,
                    ids::call_id(),
                    json_str(name),
                    json_str(arguments)
                );
            }
            format!(
                r#"{{"role":"assistant","content":null,"tool_calls":[{calls}],"refusal":null,"annotations":[]}}"#
            )
        }
        None => format!(
            r#"{{"role":"assistant","content":{},"refusal":null,"annotations":[]}}"#,
            json_str(&text::reply_text(plan.pieces))
        ),
    };
    format!(
        r#"{{"id":"{}","object":"chat.completion","created":{},"model":{},"choices":[{{"index":0,"message":{},"logprobs":null,"finish_reason":"{}"}}],"usage":{},"service_tier":"default","system_fingerprint":"{}"}}"#,
        ids::chatcmpl_id(),
        ids::unix_now(),
        json_str(model),
        message,
        plan.finish_reason,
        plan.usage_json(),
        SYSTEM_FINGERPRINT
    )
}

/// Dimension of the vectors `POST /v1/embeddings` returns unless `dimensions` asks otherwise.
pub const EMBEDDING_DIMENSIONS: usize = 8;

/// `POST /v1/embeddings`: one deterministic unit vector per input, derived from its text
/// (or token ids); `encoding_format: "base64"` is honoured as the real API does it
/// (little-endian f32s, base64).
pub(crate) async fn embeddings(shared: Arc<Shared>, request: MockRequest) -> Response<MockBody> {
    let request_id = ids::openai_request_id();
    if let Some(denied) = check_auth(&request.headers, &request_id) {
        return denied;
    }
    let Some(body) = request.body.filter(|b| !b.is_null()) else {
        return invalid_json(request_id);
    };
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return error(
            StatusCode::BAD_REQUEST,
            request_id,
            "you must provide a model parameter",
            "invalid_request_error",
            None,
            None,
            Vec::new(),
        );
    };
    let inputs: Vec<&Value> = match body.get("input") {
        Some(Value::Array(items)) if !items.is_empty() && !items.iter().all(Value::is_number) => {
            items.iter().collect()
        }
        Some(input @ (Value::String(_) | Value::Array(_))) => vec![input],
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                request_id,
                "Missing required parameter: 'input'.",
                "invalid_request_error",
                Some("input"),
                Some("missing_required_parameter"),
                Vec::new(),
            )
        }
    };
    let scenario = Scenario::from_model(model);
    if let Some(failed) = scenario_error(scenario, model, &request_id) {
        return failed;
    }
    let dimensions = body
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(EMBEDDING_DIMENSIONS, |d| d.clamp(1, 4096) as usize);
    let base64 = body.get("encoding_format").and_then(Value::as_str) == Some("base64");
    let tokens = text::embedding_tokens_for(body.get("input").unwrap_or(&Value::Null));

    let mut data = String::new();
    for (index, input) in inputs.iter().enumerate() {
        if index > 0 {
            data.push(',');
        }
        let vector = embedding_vector(input, dimensions);
        let rendered = if base64 {
            let bytes: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
            json_str(&base64_encode(&bytes))
        } else {
            let parts: Vec<String> = vector.iter().map(|f| Value::from(*f).to_string()).collect();
            format!("[{}]", parts.join(","))
        };
        let _ = write!(
            data,
            r#"{{"object":"embedding","index":{index},"embedding":{rendered}}}"#
        );
    }
    let usage = if scenario == Scenario::NoUsage {
        String::new()
    } else {
        format!(r#","usage":{{"prompt_tokens":{tokens},"total_tokens":{tokens}}}"#)
    };
    let response = format!(
        r#"{{"object":"list","data":[{data}],"model":{}{usage}}}"#,
        json_str(model)
    );
    let headers = success_headers(request_id);
    if scenario == Scenario::Hang {
        return server::json_after_generation(
            &shared,
            EMBEDDINGS_PATH,
            model,
            scenario,
            1,
            headers,
            response.into_bytes(),
        )
        .await;
    }
    server::full(StatusCode::OK, JSON, headers, response)
}

/// A unit vector of `dimensions` f32s derived from the input's JSON text (FNV-1a, then
/// splitmix64 for each component).
fn embedding_vector(input: &Value, dimensions: usize) -> Vec<f32> {
    let seed = match input {
        Value::String(s) => fnv1a(s.as_bytes()),
        other => fnv1a(other.to_string().as_bytes()),
    };
    let mut state = seed;
    let raw: Vec<f64> = (0..dimensions)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        })
        .collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::EPSILON);
    raw.iter().map(|x| (x / norm) as f32).collect()
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `GET /v1/models`: every scenario name plus two ordinary model ids.
pub(crate) fn models(request: MockRequest) -> Response<MockBody> {
    let request_id = ids::openai_request_id();
    if let Some(denied) = check_auth(&request.headers, &request_id) {
        return denied;
    }
    let mut data = String::new();
    let names = Scenario::ALL
        .iter()
        .map(|s| s.model_name())
        .chain(["gpt-4o-mini", "text-embedding-3-small"]);
    for (i, name) in names.enumerate() {
        if i > 0 {
            data.push(',');
        }
        let _ = write!(
            data,
            r#"{{"id":"{name}","object":"model","created":1715367049,"owned_by":"system"}}"#
        );
    }
    server::full(
        StatusCode::OK,
        JSON,
        success_headers(request_id),
        format!(r#"{{"object":"list","data":[{data}]}}"#),
    )
}

/// 404 for any other path, as OpenAI words it.
pub(crate) fn not_found(method: &Method, path: &str) -> Response<MockBody> {
    error(
        StatusCode::NOT_FOUND,
        ids::openai_request_id(),
        &format!("Invalid URL ({method} {path})"),
        "invalid_request_error",
        None,
        None,
        Vec::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_known_vectors() {
        assert_eq!(base64_encode(b""), "");
        assert_eq!(base64_encode(b"f"), "Zg==");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_encode(b"foo"), "Zm9v");
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn vectors_are_deterministic_unit_vectors() {
        let a = embedding_vector(&Value::from("hello"), 8);
        assert_eq!(a, embedding_vector(&Value::from("hello"), 8));
        assert_ne!(a, embedding_vector(&Value::from("world"), 8));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }

    #[test]
    fn redacts_keys_like_openai() {
        assert_eq!(redact("sk-invalid-0123456789"), "sk-in*****6789");
    }
}
