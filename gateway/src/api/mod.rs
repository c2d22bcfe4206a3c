//! The two client-facing API dialects, as typed Rust values.
//!
//! | file | owns |
//! |---|---|
//! | `openai.rs` | OpenAI Chat Completions: request, response, stream chunk, usage |
//! | `anthropic.rs` | Anthropic Messages: request, response, stream events, usage |
//! | `body.rs` | [`RequestBody`]: a request as sent, validated once, forwarded member by member |
//!
//! Requests are validated by deserializing into these types (so a wrong field type is a 400
//! naming the field) but forwarded to a same-dialect upstream from the original JSON, so that
//! fields these types do not know are passed through, not dropped.

pub mod anthropic;
pub mod body;
pub mod openai;

use serde::de::DeserializeOwned;

pub use body::RequestBody;

use crate::error::GatewayError;

/// Which API dialect a client or an upstream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WireFormat {
    OpenAi,
    Anthropic,
}

impl WireFormat {
    /// Bounded label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            WireFormat::OpenAi => "openai",
            WireFormat::Anthropic => "anthropic",
        }
    }
}

/// Seconds since the Unix epoch (the `created` field of OpenAI objects).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a request body into JSON, then into `T`, naming the offending field on error.
pub fn parse_body<T: DeserializeOwned>(
    body: &[u8],
) -> Result<(serde_json::Value, T), GatewayError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        GatewayError::bad_request(format!(
            "We could not parse the JSON body of your request: {e}"
        ))
    })?;
    if !value.is_object() {
        return Err(GatewayError::bad_request(
            "The request body must be a JSON object.",
        ));
    }
    let typed = typed_from_value(&value)?;
    Ok((value, typed))
}

/// Deserializes `T` from an already-parsed value, naming the offending field on error.
pub fn typed_from_value<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, GatewayError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            GatewayError::bad_request(format!("Invalid request: {inner}"))
        } else {
            GatewayError::bad_param(format!("Invalid value for `{path}`: {inner}"), path)
        }
    })
}
