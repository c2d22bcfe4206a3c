//! Liveness, readiness and metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::app::AppState;

/// Alive as long as the process answers.
pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

/// Readiness, with a JSON body naming each check:
///
/// ```json
/// {"status": "ready", "checks": {"store": {"status": "ok"},
///   "events": {"status": "ok"}, "limiter": {"status": "ok", "backend": "redis"}}}
/// ```
///
/// - `store`: `ok` or `unreachable` (keys cannot be validated: unready, 503);
/// - `events`: `ok`, `overflowing` (the sink's writer is behind; records go to the overflow
///   spool), `spooling` (Kafka does not acknowledge; records go to the disk spool) or
///   `not_durable` (the spool is full: records are being lost; unready, 503);
/// - `limiter`: `ok`, `degraded` (Redis was unreachable: limits are enforced per instance)
///   or `unreachable` (Redis does not answer now; the next request will degrade).
///
/// `status` is `unavailable` (503) when a check makes the gateway unready, else `degraded`
/// (200: serving, with a check not `ok`) or `ready` (200).
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let store_ok = state.store.ping().await.is_ok();
    let events = state.sink.state();
    let (backend, limiter) = state.limiter.state().await;
    let unready = !store_ok || events == crate::events::SinkState::NotDurable;
    let degraded = events != crate::events::SinkState::Ok || limiter != "ok";
    let status = if unready {
        "unavailable"
    } else if degraded {
        "degraded"
    } else {
        "ready"
    };
    let body = Json(json!({
        "status": status,
        "checks": {
            "store": {"status": if store_ok { "ok" } else { "unreachable" }},
            "events": {"status": events.label()},
            "limiter": {"status": limiter, "backend": backend},
        },
    }));
    if unready {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    } else {
        body.into_response()
    }
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.router.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
