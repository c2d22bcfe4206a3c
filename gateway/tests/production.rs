//! Production defaults (`server.production = true`): no free `mock/...` models and no
//! `openai/*` / `anthropic/*` routes on the operator's environment keys unless the config
//! enables them, and `/metrics` off the public API port (served on `server.metrics_listen`).
//! Driven through `app()` / `metrics_app()` with `oneshot`, no sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failing loudly is the point

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use tollgate_gateway::app::{self, AppState};
use tollgate_gateway::auth::keys;
use tollgate_gateway::config::Config;
use tollgate_gateway::events::MemorySink;
use tollgate_gateway::store::sqlite::SqliteStore;
use tollgate_gateway::store::{MetaStore, NewKey};

/// A gateway state over a fresh SQLite store with one tenant key; returns it with the key.
async fn gateway(config: &str) -> (Arc<AppState>, String, tempfile::TempDir) {
    let config = Config::from_toml(config).expect("config");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(SqliteStore::open(dir.path()).await.expect("store"));
    let tenant = store.create_tenant("acme", None).await.expect("tenant");
    let key = keys::generate();
    let spec = NewKey {
        tenant_id: tenant.id.clone(),
        name: "test".to_string(),
        ..Default::default()
    };
    store
        .create_key(&spec, &key.hash, &key.display_prefix)
        .await
        .expect("key");
    let state = AppState::start(config, store, Arc::new(MemorySink::default()), None, None)
        .await
        .expect("state");
    (state, key.secret, dir)
}

async fn get(router: Router, path: &str, key: Option<&str>) -> (StatusCode, String) {
    let mut request = Request::get(path);
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = router
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The model ids `GET /v1/models` lists to `key`.
async fn models(state: &Arc<AppState>, key: &str) -> Vec<String> {
    let (status, body) = get(app::app(state.clone()), "/v1/models", Some(key)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn production_serves_no_mock_models_unless_the_config_enables_them() {
    let (state, key, _dir) = gateway("[server]\nproduction = true").await;
    let listed = models(&state, &key).await;
    assert!(!listed.iter().any(|m| m.starts_with("mock/")), "{listed:?}");

    let (state, key, _dir) = gateway("[server]\nproduction = true\nmock_models = true").await;
    assert!(models(&state, &key)
        .await
        .contains(&"mock/fast".to_string()));

    // Outside production they stay on by default: the first command of the README uses them.
    let (state, key, _dir) = gateway("").await;
    assert!(models(&state, &key)
        .await
        .contains(&"mock/fast".to_string()));
}

#[tokio::test]
async fn production_answers_metrics_on_the_api_port_with_a_404_in_the_openai_shape() {
    let (state, _key, _dir) = gateway("[server]\nproduction = true").await;
    let (status, body) = get(app::app(state.clone()), "/metrics", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("/metrics"),
        "{v}"
    );
    // The metrics port has them.
    let (status, body) = get(app::metrics_app(state), "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("tollgate_"), "{body}");
}

#[tokio::test]
async fn a_metrics_listener_moves_metrics_off_the_api_port_outside_production_too() {
    let (state, _key, _dir) = gateway("").await;
    let (status, body) = get(app::app(state), "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("tollgate_"), "{body}");

    let (state, key, _dir) = gateway("[server]\nmetrics_listen = \"127.0.0.1:0\"").await;
    let (status, _) = get(app::app(state.clone()), "/metrics", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = get(app::metrics_app(state.clone()), "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    // The metrics port serves nothing else.
    let (status, _) = get(app::metrics_app(state), "/v1/models", Some(&key)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
