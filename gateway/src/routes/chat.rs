//! `POST /v1/chat/completions`, `POST /v1/messages` and `POST /v1/embeddings`: one handler
//! each, all on the shared inference path (`inference/`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;

use super::inference::{self, Api};
use crate::app::AppState;

/// OpenAI Chat Completions.
pub async fn chat_completions(State(state): State<Arc<AppState>>, request: Request) -> Response {
    inference::serve(state, request, Api::ChatCompletions).await
}

/// Anthropic Messages.
pub async fn messages(State(state): State<Arc<AppState>>, request: Request) -> Response {
    inference::serve(state, request, Api::Messages).await
}

/// OpenAI Embeddings.
pub async fn embeddings(State(state): State<Arc<AppState>>, request: Request) -> Response {
    inference::serve(state, request, Api::Embeddings).await
}
