//! `POST /v1/embeddings`: passed through to an embedding-capable deployment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use serde_json::Value;

use super::inference::{admit, collect_upstream};
use crate::api::{openai, parse_body, WireFormat};
use crate::app::AppState;
use crate::error::{ApiError, GatewayError, InFormat};
use crate::limits::Estimate;
use crate::providers::{Endpoint, Forwarded};
use crate::relay::exchange::Routed;
use crate::relay::{Exchange, Outcome};
use crate::tokens;

pub async fn embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let result = serve(&state, headers, body).await;
    if let Err(e) = &result {
        state
            .metrics
            .observe_error("embeddings", e.label(), e.status().as_u16());
    }
    result.in_format(WireFormat::OpenAi)
}

async fn serve(
    state: &Arc<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, GatewayError> {
    let received_at = Instant::now();
    let (caller, bytes) = admit(state, &headers, body).await?;
    let (mut value, req) = parse_body::<openai::EmbeddingsRequest>(&bytes)?;
    caller.ensure_model_allowed(&req.model)?;
    let target = state.router.pick(&req.model, true)?;
    // Quotas: the input's tokens are reserved (an embedding has no output), settled with what
    // the upstream reports.
    let admission = state
        .limiter
        .admit(&caller, &req.model, || Estimate {
            prompt_tokens: input_tokens(&req.input, &target.upstream_model),
            max_output_tokens: 0,
            output_capped: true,
            models: vec![target.upstream_model.clone()],
        })
        .await?;
    let (reservation, rate_headers) = admission.map(|a| (a.reservation, a.headers)).unzip();
    value["model"] = Value::from(target.upstream_model.as_str());
    let upstream_body =
        serde_json::to_vec(&value).map_err(|e| GatewayError::Internal(e.to_string()))?;
    let routed = Routed {
        route: "embeddings",
        client_format: WireFormat::OpenAi,
        target: &target,
        requested_model: &req.model,
        stream: false,
        prompt_estimate: 0,
        route_log: None,
        lease: None,
    };
    let exchange = Exchange::begin(state, caller, routed, received_at);
    exchange.record_request();
    let result = async {
        let upstream = target
            .deployment
            .provider
            .send(
                Endpoint::Embeddings,
                upstream_body.into(),
                &Forwarded::default(),
            )
            .await?;
        collect_upstream(upstream.body, state.config.server.max_upstream_body_bytes).await
    }
    .await;
    let raw = match result {
        Ok(raw) => raw,
        Err(e) => {
            exchange.fail(&e);
            return Err(e);
        }
    };
    let parsed: Value = serde_json::from_slice(&raw)
        .map_err(|e| GatewayError::UpstreamProtocol(format!("unexpected embeddings body: {e}")))?;
    let input_tokens = parsed
        .pointer("/usage/prompt_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let usage = tollgate_schemas::TokenUsage {
        input_tokens,
        ..Default::default()
    };
    if let Some(r) = reservation {
        r.settle(&usage);
    }
    // The body leaves only once its completion record is durable.
    exchange
        .finish(
            Outcome::Completed,
            usage,
            None,
            0,
            Some(Instant::now()),
            Duration::ZERO,
        )
        .await;
    let mut r = Response::new(Body::from(raw));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if let Some(rate) = &rate_headers {
        rate.apply(r.headers_mut());
    }
    Ok(r)
}

/// Tokens of an embeddings input (token arrays count as given).
fn input_tokens(input: &openai::EmbeddingsInput, model: &str) -> u64 {
    match input {
        openai::EmbeddingsInput::One(s) => tokens::count_text(model, s),
        openai::EmbeddingsInput::Many(v) => v.iter().map(|s| tokens::count_text(model, s)).sum(),
        openai::EmbeddingsInput::Tokens(t) => t.len() as u64,
        openai::EmbeddingsInput::TokenBatches(b) => b.iter().map(|t| t.len() as u64).sum(),
    }
}
