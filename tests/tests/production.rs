//! The real binary in production mode (`server.production = true`): no default tenant or
//! key, no built-in `mock/...` models unless enabled, and `/metrics` only on
//! `server.metrics_listen`, never on the API port.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test code: failing loudly is the point

use serde_json::{json, Value};
use tollgate_tests::harness::ADMIN_TOKEN;
use tollgate_tests::process::{admin_tenant_key, free_port, GatewayProcess};

/// Creates tenant `name` and a key through the admin API; returns the secret.

#[tokio::test]
async fn a_production_gateway_serves_metrics_on_its_own_port_and_no_mock_models() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let metrics = format!("127.0.0.1:{}", free_port());
    let gw = GatewayProcess::start(
        &["--data-dir", &data],
        &[
            ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN),
            ("TOLLGATE__SERVER__PRODUCTION", "true"),
            ("TOLLGATE__SERVER__METRICS_LISTEN", &metrics),
            // Even with provider keys in its environment, a production gateway does not
            // route `openai/*` on them unless the config says so.
            ("OPENAI_API_KEY", "sk-operator-key-never-used"),
        ],
        dir.path().join("gw.log"),
    )
    .await;
    let client = reqwest::Client::new();

    let on_api_port = client
        .get(format!("{}/metrics", gw.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(on_api_port.status().as_u16(), 404);
    let body: Value = on_api_port.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");

    let scraped = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(scraped.status().as_u16(), 200);
    assert!(scraped.text().await.unwrap().contains("tollgate_"));

    let (key, _) = admin_tenant_key(&gw.base_url, "acme").await;
    for model in ["mock/fast", "openai/gpt-4o-mini"] {
        let refused = client
            .post(format!("{}/v1/chat/completions", gw.base_url))
            .bearer_auth(&key)
            .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status().as_u16(), 404, "{model}");
        let body: Value = refused.json().await.unwrap();
        assert_eq!(body["error"]["code"], "model_not_found", "{model}: {body}");
    }
    assert!(
        gw.log_text().contains("metrics on http://"),
        "{}",
        gw.log_text()
    );
}
