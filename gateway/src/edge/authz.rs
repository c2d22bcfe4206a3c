//! `envoy.service.auth.v3.Authorization`: Envoy's ext_authz filter asks, for each request,
//! whether its key may pass.
//!
//! The key is read the way the HTTP path reads it (`Authorization: Bearer` or `x-api-key`)
//! and checked by the same [`Authenticator`] (format and checksum, key cache, store, the
//! revocation feed). Allowed: Envoy forwards the request with the key removed and the
//! identity headers set (overwriting any a client sent). Denied: Envoy answers with the
//! status and error body the HTTP path would have sent — 401 for a missing, unknown, revoked
//! or expired key, 403 for a suspended tenant, 500 when the store cannot answer — in
//! Anthropic's shape on `/v1/messages`, else OpenAI's.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue};
use envoy_types::ext_authz::v3::pb::{
    CheckRequest, CheckResponse, HeaderAppendAction, HttpStatusCode,
};
use envoy_types::ext_authz::v3::{
    CheckRequestExt, CheckResponseExt, DeniedHttpResponseBuilder, OkHttpResponseBuilder,
};
use tonic::{Request, Response, Status};

use super::{EdgeMetrics, KEY_HASH_HEADER, KEY_ID_HEADER, TENANT_HEADER};
use crate::api::WireFormat;
use crate::auth::{keys, Authenticator, Caller};
use crate::error::GatewayError;

/// The generated server types.
pub mod pb {
    pub use envoy_types::ext_authz::v3::pb::{Authorization, AuthorizationServer};
}

/// Headers a client may send its key in; Envoy removes them once the key is checked.
const KEY_HEADERS: [&str; 2] = ["authorization", "x-api-key"];

/// The Authorization service.
pub struct AuthzService {
    auth: Arc<Authenticator>,
    metrics: EdgeMetrics,
}

impl AuthzService {
    pub fn new(auth: Arc<Authenticator>, metrics: EdgeMetrics) -> Self {
        AuthzService { auth, metrics }
    }

    /// The decision for one request's headers and path.
    pub async fn decide(
        &self,
        headers: Option<&std::collections::HashMap<String, String>>,
        path: &str,
    ) -> CheckResponse {
        // Only the key headers are looked at: whatever else a client sent is no credential.
        let mut keys = HeaderMap::new();
        for name in KEY_HEADERS {
            if let Some(v) = headers
                .and_then(|h| h.get(name))
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                keys.insert(name, v);
            }
        }
        let (decision, response) = match self.auth.authenticate(&keys).await {
            Ok(caller) => ("allowed", allowed(&caller, &keys)),
            Err(e) => {
                let format = if path.starts_with("/v1/messages") {
                    WireFormat::Anthropic
                } else {
                    WireFormat::OpenAi
                };
                (e.label(), denied(&e, format))
            }
        };
        self.metrics.authz.with_label_values(&[decision]).inc();
        response
    }
}

#[tonic::async_trait]
impl pb::Authorization for AuthzService {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let request = request.into_inner();
        let path = request
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .map_or("", |h| h.path.as_str());
        Ok(Response::new(
            self.decide(request.get_client_headers(), path).await,
        ))
    }
}

/// Pass, with the identity headers in place of the key.
fn allowed(caller: &Caller, sent: &HeaderMap) -> CheckResponse {
    let overwrite = Some(HeaderAppendAction::OverwriteIfExistsOrAdd);
    let mut ok = OkHttpResponseBuilder::new();
    let key_hash = crate::auth::key_from_headers(sent)
        .ok()
        .flatten()
        .map(keys::hash)
        .unwrap_or_default();
    ok.add_header(TENANT_HEADER, caller.tenant_id.clone(), overwrite, false)
        .add_header(KEY_ID_HEADER, caller.key_id.clone(), overwrite, false)
        .add_header(KEY_HASH_HEADER, key_hash, overwrite, false);
    for name in KEY_HEADERS {
        ok.remove_header(name);
    }
    let mut response = CheckResponse::with_status(Status::ok("allowed"));
    response.set_http_response(ok);
    response
}

/// Refuse, with the HTTP path's status and error body.
fn denied(error: &GatewayError, format: WireFormat) -> CheckResponse {
    let status = error.status().as_u16();
    let code = HttpStatusCode::try_from(i32::from(status)).unwrap_or(HttpStatusCode::Forbidden);
    let mut d = DeniedHttpResponseBuilder::new();
    d.set_http_status(code)
        .add_header(
            "content-type",
            "application/json",
            Some(HeaderAppendAction::OverwriteIfExistsOrAdd),
            false,
        )
        .set_body(error.body(format).to_string());
    let grpc = match status {
        401 => Status::unauthenticated(error.to_string()),
        403 => Status::permission_denied(error.to_string()),
        _ => Status::unavailable(error.to_string()),
    };
    let mut response = CheckResponse::with_status(grpc);
    response.set_http_response(d);
    response
}
