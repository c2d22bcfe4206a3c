//! Hostile input end to end: the real gateway in front of the mock upstream's hostile
//! scenarios (`huge-line`, `keepalive-only`, `stall-midstream`, `huge-usage`,
//! `giant-no-space`) and clients sending prompts without spaces. Every test asserts an
//! outcome (an answer, an error event in the client's dialect, a completion billed as the
//! rules say), never a timing.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

use serde_json::{json, Value};
use tollgate_gateway::relay::Outcome;
use tollgate_schemas::UsageSource;
use tollgate_tests::harness::{mock_config, sse_events, Harness, UPSTREAM_KEY_ENV};
use tollgate_tests::mock_upstream::{MockOptions, MockUpstream, CHUNKS_BEFORE_FAILURE};

/// The idle timeout of the `idle/*` deployment, short so that the tests do not wait long.
const TEST_IDLE_TIMEOUT_MS: u64 = 300;

/// The standard harness config with room for megabyte prompts, plus `idle/<scenario>`: the
/// mock's OpenAI API behind a deployment with a short idle timeout.
async fn start() -> Harness {
    let upstream = MockUpstream::start(MockOptions::default())
        .await
        .expect("mock upstream starts");
    let base = upstream.base_url();
    let extra = format!(
        r#"
[[deployments]]
type = "openai"
name = "idle"
model = "*"
base_url = "{base}/v1"
api_key_env = "{UPSTREAM_KEY_ENV}"
idle_timeout_ms = {TEST_IDLE_TIMEOUT_MS}

[[models]]
name = "idle/*"
deployments = ["idle"]
"#
    );
    let config =
        mock_config(&base, &extra).replace("max_body_bytes = 65536", "max_body_bytes = 4194304");
    Harness::start_with_config(upstream, &config).await
}

fn chat(model: &str, content: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 5, "stream": stream,
        "messages": [{"role": "user", "content": content}]})
}

/// Reads a whole response body as text.
async fn text(resp: reqwest::Response) -> String {
    String::from_utf8_lossy(&resp.bytes().await.expect("body readable")).into_owned()
}

#[tokio::test]
async fn a_long_prompt_without_spaces_is_answered_and_so_is_a_small_one_beside_it() {
    let h = start().await;
    let long = "x".repeat(400_000);
    let (big_body, embedding_body, small_body) = (
        chat("oa/normal", &long, false),
        json!({"model": "oa/text-embedding-3-small", "input": long}),
        chat("oa/normal", "Hello there.", false),
    );
    let big = h.post("/v1/chat/completions", &big_body);
    let big_embedding = h.post("/v1/embeddings", &embedding_body);
    let small = h.post("/v1/chat/completions", &small_body);
    let (big, big_embedding, small) = tokio::join!(big, big_embedding, small);
    assert_eq!(small.status(), 200);
    assert_eq!(big.status(), 200, "{}", text(big).await);
    assert_eq!(big_embedding.status(), 200, "{}", text(big_embedding).await);
    // The in-process mock counts the prompt itself (on the blocking pool for large ones).
    let echo = h
        .post("/v1/chat/completions", &chat("mock/echo", &long, false))
        .await;
    assert_eq!(echo.status(), 200);
    let embed = h
        .post(
            "/v1/embeddings",
            &json!({"model": "mock/embed", "input": long}),
        )
        .await;
    assert_eq!(embed.status(), 200, "{}", text(embed).await);
}

#[tokio::test]
async fn a_megabyte_run_without_spaces_is_no_500() {
    // tiktoken panicked on this (its regex gives up on a 1 MB piece): a 500 showing a panic.
    let h = start().await;
    let run = "x".repeat(1 << 20);
    for (model, stream) in [
        ("oa/normal", false),
        ("oa/normal", true),
        ("mock/echo", true),
    ] {
        let resp = h
            .post("/v1/chat/completions", &chat(model, &run, stream))
            .await;
        let status = resp.status();
        let body = text(resp).await;
        assert_eq!(
            status,
            200,
            "{model} stream={stream}: {}",
            &body[..body.len().min(300)]
        );
        if stream {
            assert!(body.contains("[DONE]"), "{model}: the stream did not end");
        }
    }
    let anthropic = h
        .post(
            "/v1/messages",
            &json!({"model": "an/normal", "max_tokens": 5,
                "messages": [{"role": "user", "content": run}]}),
        )
        .await;
    assert_eq!(anthropic.status(), 200);
}

#[tokio::test]
async fn a_giant_streamed_reply_without_spaces_ends_with_done_and_is_billed() {
    // 5 MB of output without a space and no usage: counted by the gateway at the end of the
    // stream, where tiktoken panicked and cut the stream (no `[DONE]`, no completion).
    let h = start().await;
    let requests = (0..4).map(|_| async {
        let resp = h
            .post(
                "/v1/chat/completions",
                &chat("oa/giant-no-space", "Go.", true),
            )
            .await;
        assert_eq!(resp.status(), 200);
        text(resp).await
    });
    for body in futures_util::future::join_all(requests).await {
        let events = sse_events(&body);
        assert_eq!(
            events.last().map(|(_, d)| d.as_str()),
            Some("[DONE]"),
            "the stream was cut"
        );
    }
    let records = h.completions(4).await;
    assert_eq!(records.len(), 4, "every request is billed");
    for r in records {
        assert_eq!(r.outcome, Outcome::Completed);
        assert_eq!(r.usage.source, UsageSource::Counted);
        // 5 MB of `x`: far more than one token per chunk.
        assert!(r.usage.output_tokens > 1_000, "{:?}", r.usage);
    }
}

/// The `error` event's message in an OpenAI-dialect stream, and whether `[DONE]` came.
fn openai_error(body: &str) -> (Option<String>, bool) {
    let events = sse_events(body);
    let done = events.iter().any(|(_, d)| d == "[DONE]");
    let error = events.iter().find_map(|(_, d)| {
        let v: Value = serde_json::from_str(d).ok()?;
        v.pointer("/error/message")?.as_str().map(str::to_string)
    });
    (error, done)
}

#[tokio::test]
async fn an_endless_upstream_line_ends_the_stream_with_an_error_event() {
    let h = start().await;
    let resp = h
        .post("/v1/chat/completions", &chat("oa/huge-line", "Go.", true))
        .await;
    assert_eq!(resp.status(), 200);
    let body = text(resp).await;
    let (error, done) = openai_error(&body);
    let error = error.expect("an error event");
    assert!(error.contains("max_upstream_event_bytes"), "{error}");
    assert!(!done);
    let record = h.completions(1).await.pop().unwrap();
    assert!(
        matches!(&record.outcome, Outcome::UpstreamError(e) if e.contains("max_upstream_event_bytes")),
        "{:?}",
        record.outcome
    );
    // Billed for what was delivered.
    assert_eq!(record.usage.source, UsageSource::Counted);
    assert!(record.usage.output_tokens >= CHUNKS_BEFORE_FAILURE as u64);

    // An Anthropic client gets Anthropic's error event.
    let resp = h
        .post(
            "/v1/messages",
            &json!({"model": "oa/huge-line", "max_tokens": 50, "stream": true,
                "messages": [{"role": "user", "content": "Go."}]}),
        )
        .await;
    let body = text(resp).await;
    let events = sse_events(&body);
    let (name, data) = events.last().expect("events");
    assert_eq!(name, "error", "{body}");
    assert!(data.contains("max_upstream_event_bytes"), "{data}");
}

#[tokio::test]
async fn an_upstream_sending_only_keepalives_or_nothing_is_cut_after_the_idle_timeout() {
    let h = start().await;
    for scenario in ["keepalive-only", "stall-midstream"] {
        let resp = h
            .post(
                "/v1/chat/completions",
                &chat(&format!("idle/{scenario}"), "Go.", true),
            )
            .await;
        assert_eq!(resp.status(), 200);
        let body = text(resp).await;
        let (error, done) = openai_error(&body);
        let error = error.unwrap_or_else(|| panic!("{scenario}: no error event in {body}"));
        assert!(error.contains("idle_timeout_ms"), "{scenario}: {error}");
        assert!(!done);
    }
    let records = h.completions(2).await;
    assert_eq!(records.len(), 2);
    for r in records {
        assert!(
            matches!(&r.outcome, Outcome::UpstreamError(e) if e.contains("idle_timeout_ms")),
            "{:?}",
            r.outcome
        );
        assert!(r.usage.output_tokens >= CHUNKS_BEFORE_FAILURE as u64);
    }
    // The default applies to deployments that do not set it.
    assert_eq!(
        h.state
            .config
            .deployments
            .iter()
            .find(|d| d.name() == "oa")
            .map(|d| match d {
                tollgate_gateway::config::DeploymentConfig::Openai(c) => c.idle_timeout_ms,
                _ => 0,
            }),
        Some(120_000)
    );
}

#[tokio::test]
async fn usage_numbers_out_of_range_are_not_billed() {
    let h = start().await;
    let stream = h
        .post(
            "/v1/chat/completions",
            &chat("oa/huge-usage", "Hello there.", true),
        )
        .await;
    assert!(text(stream).await.contains("[DONE]"));
    let whole = h
        .post(
            "/v1/chat/completions",
            &chat("oa/huge-usage", "Hello there.", false),
        )
        .await;
    assert_eq!(whole.status(), 200);
    // Translated for an Anthropic client too.
    let anthropic = h
        .post(
            "/v1/messages",
            &json!({"model": "oa/huge-usage", "max_tokens": 5,
                "messages": [{"role": "user", "content": "Hello there."}]}),
        )
        .await;
    assert_eq!(anthropic.status(), 200);
    let records = h.completions(3).await;
    assert_eq!(records.len(), 3);
    for r in &records {
        assert_eq!(r.outcome, Outcome::Completed);
        assert_eq!(r.usage.source, UsageSource::Counted, "{:?}", r.usage);
        assert!(
            r.usage.input_tokens > 0 && r.usage.input_tokens < 1_000,
            "{:?}",
            r.usage
        );
        assert!(i64::try_from(r.usage.total_tokens()).is_ok());
    }
    let metrics = h.state.metrics.render();
    let rejected: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("tollgate_upstream_usage_rejected_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(rejected, 3.0, "{metrics}");
}
