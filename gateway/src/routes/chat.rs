//! `POST /v1/chat/completions` and `POST /v1/messages`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use super::inference;
use crate::api::WireFormat;
use crate::app::AppState;
use crate::error::ApiError;

/// OpenAI Chat Completions.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    inference::serve(state, headers, body, WireFormat::OpenAi, "chat").await
}

/// Anthropic Messages.
pub async fn messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    inference::serve(state, headers, body, WireFormat::Anthropic, "messages").await
}
