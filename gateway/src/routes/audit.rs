//! `GET /v1/audit/requests?request_id=&limit=`: the caller's tenant's audited requests
//! (`[audit]`), newest first, in the admin route's row shape. The tenant is the API key's,
//! never a parameter: `tenant` is refused (400), and another tenant's request id finds nothing
//! (an empty list, like an unknown id). 404 when this gateway has no ClickHouse.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::json;

use super::caller::TenantCaller;
use super::query::OpenAiQuery;
use crate::api::WireFormat;
use crate::app::AppState;
use crate::error::{ApiError, GatewayError, InFormat};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditedRequestsQuery {
    request_id: Option<String>,
    limit: Option<u64>,
    /// Read only to refuse it with a message saying why (an unknown field would be refused
    /// too, less clearly).
    tenant: Option<IgnoredAny>,
}

impl AuditedRequestsQuery {
    /// Refuses what the query string may not ask for.
    fn check(&self) -> Result<(), GatewayError> {
        if self.tenant.is_some() {
            return Err(GatewayError::bad_param(
                "`tenant` is not accepted here: this route reads the tenant of the API key only",
                "tenant",
            ));
        }
        Ok(())
    }
}

pub async fn requests(
    State(state): State<Arc<AppState>>,
    TenantCaller(caller): TenantCaller,
    OpenAiQuery(q): OpenAiQuery<AuditedRequestsQuery>,
) -> Result<Response, ApiError> {
    q.check().in_format(WireFormat::OpenAi)?;
    let rows = crate::audit::find_requests(
        state.audit_log.as_ref(),
        &caller.tenant_id,
        q.request_id.as_deref(),
        q.limit,
    )
    .await
    .in_format(WireFormat::OpenAi)?;
    Ok(Json(json!({"object": "list", "data": rows})).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: failing loudly is the point

    use super::*;
    use axum::http::Uri;

    fn parse(query: &str) -> Result<AuditedRequestsQuery, GatewayError> {
        let uri: Uri = format!("/v1/audit/requests{query}").parse().unwrap();
        let q: AuditedRequestsQuery = super::super::query::parse(&uri)?;
        q.check().map(|()| q)
    }

    #[test]
    fn the_tenant_is_never_a_parameter() {
        for query in ["?tenant=acme", "?tenant=", "?request_id=req_1&tenant=ten_2"] {
            let Err(GatewayError::BadRequest { param, .. }) = parse(query) else {
                panic!("{query} accepted");
            };
            assert_eq!(param.as_deref(), Some("tenant"), "{query}");
        }
    }

    #[test]
    fn request_id_and_limit_are_read_and_anything_else_is_refused() {
        let q = parse("?request_id=req_1&limit=5").unwrap();
        assert_eq!(q.request_id.as_deref(), Some("req_1"));
        assert_eq!(q.limit, Some(5));
        let q = parse("").unwrap();
        assert!(q.request_id.is_none() && q.limit.is_none());
        for bad in [
            "?limit=ten",
            "?limit=-1",
            "?tenant_id=x",
            "?limit=1&limit=2",
        ] {
            assert!(
                matches!(parse(bad), Err(GatewayError::BadRequest { .. })),
                "{bad}"
            );
        }
    }
}
