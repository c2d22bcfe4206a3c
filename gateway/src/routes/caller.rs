//! The caller of a tenant's JSON routes that are not inference (`GET /v1/usage`,
//! `GET /v1/audit/requests`): authenticated with the tenant's own API key before anything
//! else of the request is read, errors in OpenAI's shape. An extractor, so that such a route
//! cannot forget it, and so that the tenant a route answers for is always the key's.

use std::sync::Arc;

use axum::http::request::Parts;

use crate::api::WireFormat;
use crate::app::AppState;
use crate::auth::Caller;
use crate::error::{ApiError, InFormat};

/// The authenticated caller; its `tenant_id` is the only tenant the route may read.
pub struct TenantCaller(pub Caller);

impl axum::extract::FromRequestParts<Arc<AppState>> for TenantCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        state
            .auth
            .authenticate(&parts.headers)
            .await
            .map(TenantCaller)
            .in_format(WireFormat::OpenAi)
    }
}
