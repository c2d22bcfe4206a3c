//! Query strings read into typed values; a malformed one (bad type, unknown or repeated
//! field) is a 400 in the API's own error shape, never axum's plain-text rejection.

use axum::extract::Query;
use axum::http::request::Parts;
use axum::http::Uri;
use serde::de::DeserializeOwned;

use crate::api::WireFormat;
use crate::error::{ApiError, GatewayError, InFormat};

/// The query string of `uri` as a `T`.
pub fn parse<T: DeserializeOwned>(uri: &Uri) -> Result<T, GatewayError> {
    Query::<T>::try_from_uri(uri)
        .map(|Query(q)| q)
        .map_err(|e| GatewayError::bad_request(format!("Invalid query string: {}", e.body_text())))
}

/// The query string as a `T`, for the JSON routes that are not inference (`/v1/usage`,
/// `/v1/audit/requests`, the admin API): a malformed one is a 400 in OpenAI's error shape.
pub struct OpenAiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S> for OpenAiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        parse(&parts.uri)
            .map(OpenAiQuery)
            .in_format(WireFormat::OpenAi)
    }
}
