//! OpenTelemetry traces of the real binary, sent to an OTLP/HTTP receiver in the test: one
//! trace per inference request with its spans (authenticate, parse, admit, route, one attempt
//! per deployment tried, the upstream's first byte, the relay), parented to the client's
//! `traceparent`, continued to the upstream in its `traceparent`, and flushed at shutdown.
//! With tracing off (the default), nothing is forwarded upstream.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use serde_json::json;
use tollgate_tests::harness::{Harness, ADMIN_TOKEN, UPSTREAM_KEY, UPSTREAM_KEY_ENV};
use tollgate_tests::mock_upstream::Fault;
use tollgate_tests::otlp::{OtlpReceiver, ReceivedSpan};
use tollgate_tests::process::{admin_tenant_key, GatewayProcess};
use tollgate_tests::routes_config::{alias, dep, upstream};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const ROOT: &str = "POST /v1/chat/completions";

/// Sends a chat request and reads its whole body; returns (status, request id, route).
async fn chat(
    base: &str,
    key: &str,
    stream: bool,
    traceparent: Option<&str>,
) -> (u16, String, String) {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "oa/gpt-test", "stream": stream,
            "messages": [{"role": "user", "content": "hello"}]}));
    if let Some(tp) = traceparent {
        r = r.header("traceparent", tp);
    }
    let resp = r.send().await.unwrap();
    let header = |name: &str| resp.headers()[name].to_str().unwrap().to_string();
    let (id, route) = (header("x-request-id"), header("x-tollgate-route"));
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    assert!(!body.is_empty());
    (status, id, route)
}

/// SIGTERM, and waits for the process to exit (its exporter flushes on the way out).
async fn terminate(gw: &mut GatewayProcess) {
    let pid = gw.child.id().to_string();
    // The shell's own `kill`: no procps needed.
    let sent = std::process::Command::new("sh")
        .args(["-c", &format!("kill -TERM {pid}")])
        .status()
        .unwrap();
    assert!(sent.success());
    for _ in 0..600 {
        if let Some(status) = gw.child.try_wait().unwrap() {
            assert!(status.success(), "exit: {status}\n{}", gw.log_text());
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the gateway did not exit on SIGTERM:\n{}", gw.log_text());
}

fn one<'a>(spans: &'a [&'a ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one `{name}` span: {spans:#?}");
    found[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_one_trace_parented_to_the_client_and_continued_upstream() {
    let receiver = OtlpReceiver::start().await;
    let up = upstream().await;
    // The first chat request fails with a 503 and is retried: two attempts in its trace.
    up.push_fault(Fault::Status(503));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nmock_models = false\nenv_providers = false\n\n\
             [routing.retry]\nbase_backoff_ms = 5\nmax_backoff_ms = 20\n\n\
             [tracing]\notlp_endpoint = \"{}\"\nservice_name = \"tollgate-test\"\n{}{}",
            receiver.endpoint(),
            dep("openai", "oa", &up, "*", ""),
            alias("oa/*", &["oa"], ""),
        ),
    )
    .unwrap();
    let mut gw = GatewayProcess::start(
        &["--data-dir", dir.path().to_str().unwrap()],
        &[
            ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("TOLLGATE_CONFIG", config.to_str().unwrap()),
            (UPSTREAM_KEY_ENV, UPSTREAM_KEY),
        ],
        dir.path().join("gw.log"),
    )
    .await;
    let (key, tenant) = admin_tenant_key(&gw.base_url, "otel").await;

    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    let (status, streamed_id, route) = chat(&gw.base_url, &key, true, Some(&traceparent)).await;
    assert_eq!((status, route.as_str()), (200, "oa:503,oa:ok"));
    let (status, whole_id, _) = chat(&gw.base_url, &key, false, None).await;
    assert_eq!(status, 200);
    terminate(&mut gw).await;

    let spans = receiver.spans();
    let mut traces: BTreeMap<&str, Vec<&ReceivedSpan>> = BTreeMap::new();
    for s in &spans {
        traces.entry(s.trace_id.as_str()).or_default().push(s);
    }
    // One trace per request, each with one request span; nothing else was traced (the admin
    // calls, /readyz).
    assert_eq!(traces.len(), 2, "{spans:#?}");
    let streamed = &traces[CLIENT_TRACE];
    let root = one(streamed, ROOT);
    assert_eq!(root.parent_span_id, CLIENT_SPAN);
    assert_eq!(root.kind, 2, "a server span");
    assert_eq!(root.service_name.as_deref(), Some("tollgate-test"));
    assert_eq!(root.attr("request_id"), Some(streamed_id.as_str()));
    assert_eq!(root.attr("tenant"), Some(tenant.as_str()));
    assert_eq!(root.attr("model"), Some("oa/gpt-test"));
    assert_eq!(root.attr("http.response.status_code"), Some("200"));
    assert_eq!(root.attr("route"), Some("oa:503,oa:ok"));

    for step in ["authenticate", "parse", "admit", "route", "relay"] {
        assert_eq!(one(streamed, step).parent_span_id, root.span_id, "{step}");
    }
    let relay = one(streamed, "relay");
    assert_eq!(relay.attr("stream"), Some("true"));
    // Time spent working in the relay vs waiting for the upstream.
    assert!(relay.attr("busy_ns").is_some() && relay.attr("idle_ns").is_some());
    // The request span lasts until the relay's last byte.
    assert!(root.end_unix_nano >= relay.end_unix_nano);

    let route_span = one(streamed, "route");
    let attempts: Vec<_> = streamed.iter().filter(|s| s.name == "attempt").collect();
    assert_eq!(attempts.len(), 2, "{streamed:#?}");
    let mut outcomes: Vec<_> = attempts
        .iter()
        .map(|a| {
            assert_eq!(a.parent_span_id, route_span.span_id);
            assert_eq!(a.attr("deployment"), Some("oa"));
            assert_eq!(a.attr("provider"), Some("openai"));
            assert_eq!(a.attr("upstream_model"), Some("gpt-test"));
            a.attr("outcome").unwrap()
        })
        .collect();
    outcomes.sort_unstable();
    assert_eq!(outcomes, ["ok", "upstream_5xx"]);
    let attempt_ids: HashSet<&str> = attempts.iter().map(|a| a.span_id.as_str()).collect();
    let first_bytes: Vec<_> = streamed
        .iter()
        .filter(|s| s.name == "upstream.first_byte")
        .collect();
    assert_eq!(first_bytes.len(), 2);
    for f in &first_bytes {
        assert!(attempt_ids.contains(f.parent_span_id.as_str()));
        assert_eq!(f.kind, 3, "a client span");
    }
    assert_eq!(streamed.len(), 10, "{streamed:#?}");

    // Each upstream request carried its own `upstream.first_byte` span as parent, in the
    // client's trace.
    let upstream_chats: Vec<_> = up
        .requests()
        .into_iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .collect();
    assert_eq!(upstream_chats.len(), 3);
    let sent: HashSet<String> = upstream_chats[..2]
        .iter()
        .map(|r| {
            r.header("traceparent")
                .expect("a traceparent upstream")
                .to_string()
        })
        .collect();
    let expected: HashSet<String> = first_bytes
        .iter()
        .map(|f| format!("00-{CLIENT_TRACE}-{}-01", f.span_id))
        .collect();
    assert_eq!(sent, expected);

    // The request without a traceparent starts a trace of its own.
    let (whole_trace, whole) = traces.iter().find(|(t, _)| **t != CLIENT_TRACE).unwrap();
    let whole_root = one(whole, ROOT);
    assert_eq!(whole_root.parent_span_id, "");
    assert_eq!(whole_root.attr("request_id"), Some(whole_id.as_str()));
    assert_eq!(one(whole, "relay").attr("stream"), Some("false"));
    assert_eq!(one(whole, "attempt").attr("outcome"), Some("ok"));
    let upstream_tp = upstream_chats[2].header("traceparent").unwrap();
    assert!(
        upstream_tp.starts_with(&format!("00-{whole_trace}-")),
        "{upstream_tp}"
    );
}

/// Tracing is off by default: the client's `traceparent` is not forwarded and nothing else
/// about the upstream request changes.
#[tokio::test]
async fn with_tracing_off_no_trace_context_goes_upstream() {
    let h = Harness::start().await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", h.base_url))
        .bearer_auth(&h.key)
        .header("traceparent", format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
        .json(&json!({"model": "oa/gpt-test",
            "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let requests = h.upstream.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].header("traceparent"), None);
    assert_eq!(requests[0].header("tracestate"), None);
}
