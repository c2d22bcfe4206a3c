//! Query strings read into typed values; a malformed one (bad type, unknown or repeated
//! field) is a 400 in the API's own error shape, never axum's plain-text rejection.

use axum::extract::Query;
use axum::http::Uri;
use serde::de::DeserializeOwned;

use crate::error::GatewayError;

/// The query string of `uri` as a `T`.
pub fn parse<T: DeserializeOwned>(uri: &Uri) -> Result<T, GatewayError> {
    Query::<T>::try_from_uri(uri)
        .map(|Query(q)| q)
        .map_err(|e| GatewayError::bad_request(format!("Invalid query string: {}", e.body_text())))
}
