//! `GET /v1/models`: the aliases the caller may use, in OpenAI's list shape, or Anthropic's
//! when the client sends `anthropic-version` (as Anthropic's SDKs do). A key restricted to
//! some models sees only those: the exact aliases it may use, and the exact names on its
//! list that a wildcard alias serves.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::api::WireFormat;
use crate::app::AppState;
use crate::error::{ApiError, InFormat};

pub async fn list(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let format = if headers.contains_key("anthropic-version") {
        WireFormat::Anthropic
    } else {
        WireFormat::OpenAi
    };
    let caller = state.auth.authenticate(&headers).await.in_format(format)?;
    let names = visible_models(&state, &caller);
    let body = match format {
        WireFormat::OpenAi => json!({
            "object": "list",
            "data": names.iter().map(|n| json!({"id": n, "object": "model", "created": 0, "owned_by": "tollgate"})).collect::<Vec<_>>(),
        }),
        WireFormat::Anthropic => json!({
            "data": names.iter().map(|n| json!({"type": "model", "id": n, "display_name": n, "created_at": "1970-01-01T00:00:00Z"})).collect::<Vec<_>>(),
            "has_more": false,
            "first_id": names.first(),
            "last_id": names.last(),
        }),
    };
    Ok(Json(body).into_response())
}

/// The model names `caller` may use, sorted.
fn visible_models(state: &AppState, caller: &crate::auth::Caller) -> Vec<String> {
    let mut names = state.router.model_names();
    let Some(allowed) = &caller.allowed_models else {
        return names;
    };
    names.retain(|n| caller.ensure_model_allowed(n).is_ok());
    for name in allowed {
        if !name.ends_with('*') && state.router.serves(name) && !names.contains(name) {
            names.push(name.clone());
        }
    }
    names.sort();
    names
}
