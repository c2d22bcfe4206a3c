//! `POST /v1/chat/completions` and `POST /v1/messages`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;

use super::inference;
use crate::api::WireFormat;
use crate::app::AppState;
use crate::error::ApiError;

/// OpenAI Chat Completions.
pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    // The request is taken whole: a `HeaderMap` extractor would copy the headers.
    let (parts, body) = request.into_parts();
    inference::serve(state, parts.headers, body, WireFormat::OpenAi, "chat").await
}

/// Anthropic Messages.
pub async fn messages(
    State(state): State<Arc<AppState>>,
    request: Request,
) -> Result<Response, ApiError> {
    let (parts, body) = request.into_parts();
    inference::serve(
        state,
        parts.headers,
        body,
        WireFormat::Anthropic,
        "messages",
    )
    .await
}
