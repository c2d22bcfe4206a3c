//! `GET /v1/models`: the aliases the caller may use, in OpenAI's list shape, or Anthropic's
//! when the client sends `anthropic-version` (as Anthropic's SDKs do).

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
    state.auth.authenticate(&headers).await.in_format(format)?;
    let names = state.router.model_names();
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
