//! Every response carries `x-request-id`: the layer gives each request an id
//! (`req_<UUIDv7>`, time-ordered) before any handler runs, handlers find it in the request's
//! extensions ([`RequestId`]), and the events and the access log of the request use the same
//! one. A client's own `x-request-id` is not taken over: ids must be unique across tenants.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

/// The response header naming the request.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// A request's id.
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

impl RequestId {
    pub fn new() -> RequestId {
        RequestId(format!("req_{}", uuid::Uuid::now_v7().simple()).into())
    }

    /// The id the layer gave the request (a new one if it went around the layer).
    pub fn of(extensions: &axum::http::Extensions) -> RequestId {
        extensions.get::<RequestId>().cloned().unwrap_or_default()
    }
}

impl Default for RequestId {
    fn default() -> Self {
        RequestId::new()
    }
}

/// The layer: assigns the id, and sets the header on the response.
pub async fn assign(mut request: Request, next: Next) -> Response {
    let id = RequestId::new();
    request.extensions_mut().insert(id.clone());
    let mut response = next.run(request).await;
    if let Ok(v) = HeaderValue::from_str(&id.0) {
        response.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    response
}
