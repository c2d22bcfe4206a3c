//! The real binary's logs: `--log-format json` writes one JSON object per line; text written to
//! a file has no terminal escape codes; every inference request leaves exactly one access-log
//! line (`tollgate::access`) with its request id, failures included, and a failure's line is a
//! warning that carries the detail the tenant's response leaves out.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: fail loudly

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};
use tollgate_tests::harness::ADMIN_TOKEN;
use tollgate_tests::process::{admin_tenant_key, GatewayProcess};

/// A deployment nobody listens to, aliased `broken`, beside the built-in mock models.
const CONFIG: &str = r#"
[[deployments]]
type = "openai"
name = "dead"
model = "gpt-dead"
base_url = "http://127.0.0.1:1/v1"
api_key_env = "TOLLGATE_TEST_DEAD_KEY"

[[models]]
name = "broken"
deployments = ["dead"]
"#;

async fn start(dir: &std::path::Path, format: &str) -> GatewayProcess {
    let config = dir.join("tollgate.toml");
    std::fs::write(&config, CONFIG).unwrap();
    GatewayProcess::start(
        &["--data-dir", dir.to_str().unwrap(), "--log-format", format],
        &[
            ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("TOLLGATE_CONFIG", config.to_str().unwrap()),
            ("TOLLGATE_TEST_DEAD_KEY", "sk-test-not-used"),
        ],
        dir.join("gw.log"),
    )
    .await
}

/// Sends the request; returns (status, request id).
async fn send(base: &str, key: Option<&str>, model: &str, stream: bool) -> (u16, String) {
    let mut r = reqwest::Client::new()
        .post(format!("{base}/v1/chat/completions"))
        .json(&json!({"model": model, "stream": stream,
            "messages": [{"role": "user", "content": "hello"}]}));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let resp = r.send().await.unwrap();
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let status = resp.status().as_u16();
    let _ = resp.bytes().await;
    (status, id)
}

#[tokio::test]
async fn json_logs_parse_and_every_request_has_one_access_line() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(dir.path(), "json").await;
    let (key, _) = admin_tenant_key(&gw.base_url, "logs").await;
    let sent = [
        send(&gw.base_url, Some(&key), "mock/fast", false).await,
        send(&gw.base_url, Some(&key), "mock/fast", true).await,
        send(&gw.base_url, None, "mock/fast", false).await,
        send(&gw.base_url, Some(&key), "no-such-model", false).await,
        send(&gw.base_url, Some(&key), "broken", false).await,
    ];
    let statuses: Vec<u16> = sent.iter().map(|s| s.0).collect();
    assert_eq!(statuses, [200, 200, 401, 404, 502]);
    // The stream's line is written when it ends, just after its last byte.
    let mut lines: HashMap<String, Vec<Value>> = HashMap::new();
    for _ in 0..100 {
        lines.clear();
        for line in gw.log_text().lines() {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            if v["target"] == "tollgate::access" {
                let id = v["request_id"].as_str().unwrap().to_string();
                lines.entry(id).or_default().push(v);
            }
        }
        if sent.iter().all(|(_, id)| lines.contains_key(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (status, id) in &sent {
        let found = lines.get(id).map_or(&[][..], Vec::as_slice);
        assert_eq!(found.len(), 1, "{id}: {found:?}");
        assert_eq!(
            found[0]["status"].as_u64(),
            Some(u64::from(*status)),
            "{id}"
        );
    }
    let ok = &lines[&sent[0].1][0];
    assert_eq!(ok["level"], "INFO");
    assert_eq!(ok["model"], "mock/fast");
    assert!(ok["output_tokens"].as_u64().unwrap() > 0, "{ok}");
    assert!(ok["tenant"].as_str().is_some_and(|t| !t.is_empty()));
    let failed = &lines[&sent[4].1][0];
    assert_eq!(failed["level"], "WARN", "{failed}");
    assert_eq!(failed["deployment"], "dead");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("unreachable"), "{error}");
    assert!(failed["route_trace"]
        .as_str()
        .unwrap()
        .contains("dead:unreachable"));
}

#[tokio::test]
async fn text_logs_written_to_a_file_have_no_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(dir.path(), "text").await;
    let (key, _) = admin_tenant_key(&gw.base_url, "logs").await;
    let (status, id) = send(&gw.base_url, Some(&key), "mock/fast", false).await;
    assert_eq!(status, 200);
    let mut log = String::new();
    for _ in 0..100 {
        log = gw.log_text();
        if log.contains(&id) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        log.contains(&id),
        "the access line names the request: {log}"
    );
    assert!(!log.contains('\u{1b}'), "escape codes in a log file: {log}");
}
