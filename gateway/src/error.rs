//! The gateway's one error type: every failure a client can see, with its HTTP status, its
//! OpenAI and Anthropic wire shapes, whether a retry could help, and a bounded metric label.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::api::WireFormat;

/// Every error the gateway answers a client with.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum GatewayError {
    /// The request is malformed; `param` names the offending field when known.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
    },
    /// No API key, or one that is malformed, unknown, revoked or expired.
    #[error("{0}")]
    Unauthorized(String),
    /// The key is valid but may not do this (suspended tenant, model not allowed).
    #[error("{0}")]
    Forbidden(String),
    /// The request conflicts with the current state (a duplicate name, an already revoked key).
    #[error("{0}")]
    Conflict(String),
    /// The requested model is neither an alias nor served by any deployment.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),
    /// No route at this path, or no such object.
    #[error("{0}")]
    NotFound(String),
    /// The request body is over the configured limit.
    #[error("Request body is larger than the limit of {limit_bytes} bytes.")]
    PayloadTooLarge { limit_bytes: usize },
    /// The request body did not arrive in time (`server.body_read_timeout_ms`).
    #[error("The request body did not arrive within {limit_ms} ms.")]
    RequestTimeout { limit_ms: u64 },
    /// The upstream provider answered with an error status before streaming began.
    #[error("{message}")]
    Upstream {
        /// The status the provider sent.
        status: u16,
        /// The provider's message, with the deployment's credential redacted.
        message: String,
        /// The provider's `retry-after`, in seconds, when it sent one.
        retry_after_s: Option<u64>,
        /// The provider's `param` and `code`, passed on for errors that are the client's
        /// (clients branch on codes such as `context_length_exceeded`).
        param: Option<String>,
        code: Option<String>,
    },
    /// The provider could not be reached (connection refused, reset, DNS, TLS).
    #[error("Upstream provider unreachable: {0}")]
    UpstreamUnavailable(String),
    /// The provider did not answer in time.
    #[error("Upstream provider timed out: {0}")]
    UpstreamTimeout(String),
    /// The provider answered with something that is not its documented wire format.
    #[error("Upstream provider sent an invalid response: {0}")]
    UpstreamProtocol(String),
    /// A quota or rate limit of the caller refused the request (429).
    #[error("{message}")]
    RateLimited {
        message: String,
        /// Which limit (`tenant_tokens_per_minute`...): the error's `param`.
        limit: String,
        /// A spend budget (OpenAI's `insufficient_quota`) rather than a rate.
        quota: bool,
        retry_after_s: u64,
        /// `x-ratelimit-*` headers.
        headers: Vec<(&'static str, String)>,
    },
    /// A bug or an unavailable internal dependency (the key store, for example).
    #[error("Internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// Shorthand for a 400 that names the field at fault.
    pub fn bad_param(message: impl Into<String>, param: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// Shorthand for a 400 without a field.
    pub fn bad_request(message: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    /// The HTTP status the client receives.
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            GatewayError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            GatewayError::Forbidden(_) => StatusCode::FORBIDDEN,
            GatewayError::Conflict(_) => StatusCode::CONFLICT,
            GatewayError::ModelNotFound(_) | GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Upstream { status, .. } => match *status {
                // The client's request was at fault: say so with the same status.
                400 | 404 | 409 | 413 | 422 => {
                    StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST)
                }
                429 => StatusCode::TOO_MANY_REQUESTS,
                // Anthropic's "overloaded" and any unavailable upstream.
                503 | 529 => StatusCode::SERVICE_UNAVAILABLE,
                504 => StatusCode::GATEWAY_TIMEOUT,
                // 401/403 from upstream mean the gateway's credential is wrong, not the
                // client's: that is a bad gateway, never a 401 to the client.
                _ => StatusCode::BAD_GATEWAY,
            },
            GatewayError::UpstreamUnavailable(_) | GatewayError::UpstreamProtocol(_) => {
                StatusCode::BAD_GATEWAY
            }
            GatewayError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether sending the same request again (here or elsewhere) could succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            GatewayError::Upstream { status, .. } => *status == 429 || *status >= 500,
            GatewayError::UpstreamUnavailable(_) | GatewayError::UpstreamTimeout(_) => true,
            _ => false,
        }
    }

    /// The error as the tenant reads it about its request `request_id` for `model`: what
    /// failed upstream (which deployment, which address, the provider's words) stays in the
    /// log and the completion record; the tenant learns which model could not be served and
    /// the id to quote. The status and the error's type are kept. Errors about the request
    /// itself (4xx, a provider's refusal of the prompt) pass as they are: the client needs
    /// them to fix the request.
    pub fn for_tenant(self, model: &str, request_id: &str) -> GatewayError {
        let upstream =
            |status: u16, message: String, retry_after_s, code: &str| GatewayError::Upstream {
                status,
                message,
                retry_after_s,
                param: None,
                code: Some(code.to_string()),
            };
        match self {
            GatewayError::UpstreamUnavailable(_) | GatewayError::UpstreamProtocol(_) => upstream(
                502,
                format!(
                    "The model `{model}` could not be served: its providers failed or could not \
                     be reached. Please retry; quote request id {request_id} if it persists."
                ),
                None,
                "upstream_error",
            ),
            GatewayError::UpstreamTimeout(_) => upstream(
                504,
                format!(
                    "The model `{model}` did not answer in time. Please retry; quote request id \
                     {request_id} if it persists."
                ),
                None,
                "timeout",
            ),
            GatewayError::Upstream {
                status: 429,
                retry_after_s,
                ..
            } => upstream(
                429,
                format!(
                    "The model `{model}` is at its providers' rate limits. Please retry{} \
                     (request id {request_id}).",
                    retry_after_s.map_or(String::new(), |s| format!(" in {s} s"))
                ),
                retry_after_s,
                "rate_limit_exceeded",
            ),
            GatewayError::Upstream {
                status,
                retry_after_s,
                ..
            } if !matches!(status, 400 | 404 | 409 | 413 | 422) => upstream(
                status,
                format!(
                    "The model `{model}` could not be served: its provider answered with an \
                     error ({status}). Please retry; quote request id {request_id} if it \
                     persists."
                ),
                retry_after_s,
                "upstream_error",
            ),
            GatewayError::Internal(_) => GatewayError::Internal(format!(
                "the gateway failed to serve the request; quote request id {request_id}."
            )),
            other => other,
        }
    }

    /// A low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. } => "bad_request",
            GatewayError::Unauthorized(_) => "unauthorized",
            GatewayError::Forbidden(_) => "forbidden",
            GatewayError::Conflict(_) => "conflict",
            GatewayError::ModelNotFound(_) => "model_not_found",
            GatewayError::NotFound(_) => "not_found",
            GatewayError::PayloadTooLarge { .. } => "payload_too_large",
            GatewayError::RequestTimeout { .. } => "request_timeout",
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::Upstream { status: 429, .. } => "upstream_rate_limited",
            GatewayError::Upstream { status, .. } if *status >= 500 => "upstream_5xx",
            GatewayError::Upstream { .. } => "upstream_4xx",
            GatewayError::UpstreamUnavailable(_) => "upstream_unavailable",
            GatewayError::UpstreamTimeout(_) => "upstream_timeout",
            GatewayError::UpstreamProtocol(_) => "upstream_protocol",
            GatewayError::Internal(_) => "internal",
        }
    }

    fn openai_type_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            GatewayError::BadRequest { .. } => ("invalid_request_error", None),
            GatewayError::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            GatewayError::Forbidden(_) => ("permission_error", Some("permission_denied")),
            GatewayError::Conflict(_) => ("invalid_request_error", Some("conflict")),
            GatewayError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            GatewayError::NotFound(_) => ("invalid_request_error", Some("not_found")),
            GatewayError::PayloadTooLarge { .. } => {
                ("invalid_request_error", Some("request_too_large"))
            }
            GatewayError::RequestTimeout { .. } => {
                ("invalid_request_error", Some("request_timeout"))
            }
            GatewayError::RateLimited { quota: true, .. } => {
                ("insufficient_quota", Some("insufficient_quota"))
            }
            // OpenAI's own rate-limit errors are typed `tokens` or `requests`.
            GatewayError::RateLimited { limit, .. } if limit.ends_with("tokens_per_minute") => {
                ("tokens", Some("rate_limit_exceeded"))
            }
            GatewayError::RateLimited { .. } => ("requests", Some("rate_limit_exceeded")),
            GatewayError::Upstream { .. } => match self.status().as_u16() {
                429 => ("rate_limit_error", Some("rate_limit_exceeded")),
                s if s < 500 => ("invalid_request_error", None),
                _ => ("server_error", Some("upstream_error")),
            },
            GatewayError::UpstreamUnavailable(_) | GatewayError::UpstreamProtocol(_) => {
                ("server_error", Some("upstream_error"))
            }
            GatewayError::UpstreamTimeout(_) => ("server_error", Some("timeout")),
            GatewayError::Internal(_) => ("server_error", None),
        }
    }

    fn anthropic_type(&self) -> &'static str {
        match self.status().as_u16() {
            400 | 409 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            408 | 504 => "timeout_error",
            _ => "api_error",
        }
    }

    /// The JSON error body in the given API's own shape.
    pub fn body(&self, format: WireFormat) -> serde_json::Value {
        let message = self.to_string();
        match format {
            WireFormat::OpenAi => {
                let (kind, code) = self.openai_type_and_code();
                let (param, code) = match self {
                    GatewayError::BadRequest { param, .. } => {
                        (param.clone(), code.map(str::to_string))
                    }
                    GatewayError::RateLimited { limit, .. } => {
                        (Some(limit.clone()), code.map(str::to_string))
                    }
                    GatewayError::Upstream {
                        param,
                        code: upstream_code,
                        ..
                    } => (
                        param.clone(),
                        upstream_code.clone().or_else(|| code.map(str::to_string)),
                    ),
                    _ => (None, code.map(str::to_string)),
                };
                json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
            }
            WireFormat::Anthropic => {
                json!({"type": "error", "error": {"type": self.anthropic_type(), "message": message}})
            }
        }
    }

    /// A complete HTTP response in the given API's shape.
    pub fn into_response_for(self, format: WireFormat) -> Response {
        let status = self.status();
        let body = self.body(format).to_string();
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let GatewayError::Upstream {
            retry_after_s: Some(secs),
            ..
        } = &self
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*secs));
        }
        if let GatewayError::RateLimited {
            retry_after_s,
            headers: lines,
            ..
        } = &self
        {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
            for (name, value) in lines {
                if let Ok(v) = HeaderValue::from_str(value) {
                    headers.insert(*name, v);
                }
            }
        }
        if let GatewayError::PayloadTooLarge { .. } | GatewayError::RequestTimeout { .. } = &self {
            // The rest of the body is not read: the connection cannot be reused.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if status == StatusCode::UNAUTHORIZED && format == WireFormat::OpenAi {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// A [`GatewayError`] bound to the API shape the client spoke, so handlers can use `?`.
#[derive(Debug)]
pub struct ApiError {
    pub error: GatewayError,
    pub format: WireFormat,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.error.into_response_for(self.format)
    }
}

/// Attaches the client's wire format to a `Result`'s error.
pub trait InFormat<T> {
    fn in_format(self, format: WireFormat) -> Result<T, ApiError>;
}

impl<T> InFormat<T> for Result<T, GatewayError> {
    fn in_format(self, format: WireFormat) -> Result<T, ApiError> {
        self.map_err(|error| ApiError { error, format })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_auth_failure_is_a_bad_gateway_not_a_401() {
        let e = GatewayError::Upstream {
            status: 401,
            message: "bad key".into(),
            retry_after_s: None,
            param: None,
            code: None,
        };
        assert_eq!(e.status(), StatusCode::BAD_GATEWAY);
        assert!(!e.is_retryable());
    }

    #[test]
    fn shapes_follow_each_api() {
        let e = GatewayError::bad_param("temperature must be a number", "temperature");
        let o = e.body(WireFormat::OpenAi);
        assert_eq!(o["error"]["param"], "temperature");
        assert_eq!(o["error"]["type"], "invalid_request_error");
        let a = e.body(WireFormat::Anthropic);
        assert_eq!(a["type"], "error");
        assert_eq!(a["error"]["type"], "invalid_request_error");
    }

    #[test]
    fn a_slow_body_is_a_408_that_closes_the_connection_in_both_shapes() {
        let e = GatewayError::RequestTimeout { limit_ms: 1000 };
        assert_eq!(e.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(
            e.body(WireFormat::OpenAi)["error"]["code"],
            "request_timeout"
        );
        assert_eq!(
            e.body(WireFormat::Anthropic)["error"]["type"],
            "timeout_error"
        );
        let response = e.into_response_for(WireFormat::Anthropic);
        assert_eq!(response.headers()[header::CONNECTION], "close");
    }

    #[test]
    fn overloaded_maps_to_503_and_overloaded_error() {
        let e = GatewayError::Upstream {
            status: 529,
            message: "Overloaded".into(),
            retry_after_s: None,
            param: None,
            code: None,
        };
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            e.body(WireFormat::Anthropic)["error"]["type"],
            "overloaded_error"
        );
        assert!(e.is_retryable());
    }
}
