//! The admin REST API under `/admin/v1`, authenticated with the admin token
//! (`Authorization: Bearer $TOLLGATE_ADMIN_TOKEN`); disabled (404) when no token is set.
//! Every action is one [`Admin`] call, so the CLI and the API behave identically.
//! Money travels as decimal strings (numbers are accepted too and read exactly as written).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use rust_decimal::Decimal;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use super::query::OpenAiQuery;
use crate::admin::Admin;
use crate::api::{typed_from_value, WireFormat};
use crate::app::AppState;
use crate::error::{ApiError, GatewayError, InFormat};
use crate::store::{Discount, Enforcement, Invalidation, KeyLimits, Plan, Price, ALL_MODELS};

/// The admin routes (nested under `/admin/v1`).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/tenants", post(create_tenant).get(list_tenants))
        .route("/tenants/{tenant}", get(get_tenant))
        .route("/tenants/{tenant}/suspend", post(suspend_tenant))
        .route("/tenants/{tenant}/activate", post(activate_tenant))
        .route("/tenants/{tenant}/plan", put(set_plan))
        .route(
            "/tenants/{tenant}/limits",
            get(list_tenant_limits)
                .put(set_tenant_limit)
                .delete(delete_tenant_limit),
        )
        .route("/keys", post(create_key).get(list_keys))
        .route("/keys/revoke", post(revoke_key))
        .route("/keys/rotate", post(rotate_key))
        .route("/keys/limits", put(set_limits))
        .route("/plans", post(create_plan).get(list_plans))
        .route("/prices", post(add_price).get(list_prices))
        .route("/discounts", post(add_discount).get(list_discounts))
        .route("/credentials", post(put_credential).get(list_credentials))
        .route("/credentials/{name}", delete(delete_credential))
        .route("/audit", get(audit))
        .route("/audit/requests", get(audited_requests))
        .route("/deployments", get(deployments))
        .route("/invoices", get(list_invoices))
        .route("/billing-periods/{period}/close", post(close_period))
}

type AdminResult = Result<Response, ApiError>;

/// The admin API's caller, checked against the admin token before anything else of the
/// request is read: an extractor, so that no handler can forget it.
pub struct AdminCaller(Admin);

impl axum::extract::FromRequestParts<Arc<AppState>> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        admin(state, &parts.headers).map(AdminCaller)
    }
}

fn admin(state: &AppState, headers: &HeaderMap) -> Result<Admin, ApiError> {
    let token = state.admin_token.as_deref().ok_or(ApiError {
        error: GatewayError::NotFound(
            "The admin API is disabled: set TOLLGATE_ADMIN_TOKEN.".to_string(),
        ),
        format: WireFormat::OpenAi,
    })?;
    // Two different tokens are refused like a wrong one.
    let given = crate::auth::key_from_headers(headers)
        .ok()
        .flatten()
        .unwrap_or("");
    if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        return Err(ApiError {
            error: GatewayError::Unauthorized("Invalid admin token.".to_string()),
            format: WireFormat::OpenAi,
        });
    }
    Ok(state.admin("admin-api"))
}

/// A JSON body; one that is not JSON is a 400 in OpenAI's error shape (axum's own rejection
/// is plain text).
pub struct AdminJson(serde_json::Value);

impl axum::extract::FromRequest<Arc<AppState>> for AdminJson {
    type Rejection = ApiError;

    async fn from_request(
        request: axum::extract::Request,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let limit = state.config.server.max_body_bytes;
        let (parts, body) = request.into_parts();
        let bytes = super::inference::read_body(&parts.headers, body, limit)
            .await
            .in_format(WireFormat::OpenAi)?;
        serde_json::from_slice(&bytes)
            .map(AdminJson)
            .map_err(|e| GatewayError::bad_request(format!("The body is not valid JSON: {e}")))
            .in_format(WireFormat::OpenAi)
    }
}

fn body<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    typed_from_value(&value).in_format(WireFormat::OpenAi)
}

fn ok<T: serde::Serialize>(status: StatusCode, value: T) -> AdminResult {
    Ok((status, Json(value)).into_response())
}

fn list<T: serde::Serialize>(items: Vec<T>) -> AdminResult {
    ok(
        StatusCode::OK,
        serde_json::json!({"object": "list", "data": items}),
    )
}

/// Decimal from a JSON string or number (numbers are read from their text, not via f64).
pub mod decimal {
    use rust_decimal::Decimal;
    use serde::{Deserialize, Deserializer};
    use std::str::FromStr;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Number(serde_json::Number),
    }

    fn parse<E: serde::de::Error>(raw: Raw) -> Result<Decimal, E> {
        let text = match raw {
            Raw::Text(s) => s,
            Raw::Number(n) => n.to_string(),
        };
        Decimal::from_str(text.trim())
            .or_else(|_| Decimal::from_scientific(text.trim()))
            .map_err(|_| E::custom(format!("`{text}` is not a decimal number")))
    }

    pub fn required<'de, D: Deserializer<'de>>(d: D) -> Result<Decimal, D::Error> {
        parse(Raw::deserialize(d)?)
    }

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Decimal>, D::Error> {
        Option::<Raw>::deserialize(d)?.map(parse).transpose()
    }
}

/// Times from a JSON string: RFC 3339 or a date (midnight UTC), as [`parse_time`] reads them.
///
/// [`parse_time`]: crate::admin::parse_time
pub mod time_input {
    use serde::{Deserialize, Deserializer};
    use time::OffsetDateTime;

    pub fn optional<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OffsetDateTime>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| crate::admin::parse_time(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantBody {
    name: String,
    #[serde(default)]
    plan: Option<String>,
}

async fn create_tenant(AdminCaller(a): AdminCaller, AdminJson(v): AdminJson) -> AdminResult {
    let b: TenantBody = body(v)?;
    ok(
        StatusCode::CREATED,
        a.create_tenant(&b.name, b.plan.as_deref())
            .await
            .in_format(WireFormat::OpenAi)?,
    )
}

async fn list_tenants(AdminCaller(a): AdminCaller) -> AdminResult {
    list(a.list_tenants().await.in_format(WireFormat::OpenAi)?)
}

async fn get_tenant(AdminCaller(a): AdminCaller, Path(t): Path<String>) -> AdminResult {
    ok(
        StatusCode::OK,
        a.tenant(&t).await.in_format(WireFormat::OpenAi)?,
    )
}

async fn suspend_tenant(
    State(s): State<Arc<AppState>>,
    AdminCaller(a): AdminCaller,
    Path(t): Path<String>,
) -> AdminResult {
    let tenant = a
        .set_tenant_active(&t, false)
        .await
        .in_format(WireFormat::OpenAi)?;
    s.auth.apply(&Invalidation::Tenant(tenant.id.clone()));
    ok(StatusCode::OK, tenant)
}

async fn activate_tenant(
    State(s): State<Arc<AppState>>,
    AdminCaller(a): AdminCaller,
    Path(t): Path<String>,
) -> AdminResult {
    let tenant = a
        .set_tenant_active(&t, true)
        .await
        .in_format(WireFormat::OpenAi)?;
    s.auth.apply(&Invalidation::Tenant(tenant.id.clone()));
    ok(StatusCode::OK, tenant)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanRef {
    plan: String,
}

async fn set_plan(
    AdminCaller(a): AdminCaller,
    Path(t): Path<String>,
    AdminJson(v): AdminJson,
) -> AdminResult {
    let b: PlanRef = body(v)?;
    ok(
        StatusCode::OK,
        a.set_tenant_plan(&t, &b.plan)
            .await
            .in_format(WireFormat::OpenAi)?,
    )
}

/// Limits as the API and CLI accept them.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct LimitsBody {
    #[serde(default)]
    pub allowed_models: Option<Vec<String>>,
    #[serde(default)]
    pub rpm_limit: Option<i64>,
    #[serde(default)]
    pub tpm_limit: Option<i64>,
    #[serde(default, deserialize_with = "decimal::optional")]
    pub spend_limit: Option<Decimal>,
    #[serde(default)]
    pub max_concurrent: Option<i64>,
    #[serde(default)]
    pub enforcement: Enforcement,
}

impl LimitsBody {
    fn limits(&self) -> KeyLimits {
        KeyLimits {
            rpm_limit: self.rpm_limit,
            tpm_limit: self.tpm_limit,
            spend_limit: self.spend_limit,
            max_concurrent: self.max_concurrent,
            enforcement: self.enforcement,
        }
    }
}

/// Limits of a tenant or tenant × model, as `PUT /tenants/{tenant}/limits` accepts them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantLimitBody {
    /// A model alias, or `*` (the default) for the whole tenant.
    #[serde(default = "all_models")]
    model: String,
    #[serde(default)]
    rpm_limit: Option<i64>,
    #[serde(default)]
    tpm_limit: Option<i64>,
    #[serde(default, deserialize_with = "decimal::optional")]
    spend_limit: Option<Decimal>,
    #[serde(default)]
    max_concurrent: Option<i64>,
    #[serde(default)]
    enforcement: Enforcement,
}

fn all_models() -> String {
    ALL_MODELS.to_string()
}

async fn set_tenant_limit(
    State(s): State<Arc<AppState>>,
    AdminCaller(a): AdminCaller,
    Path(t): Path<String>,
    AdminJson(v): AdminJson,
) -> AdminResult {
    let b: TenantLimitBody = body(v)?;
    let limits = KeyLimits {
        rpm_limit: b.rpm_limit,
        tpm_limit: b.tpm_limit,
        spend_limit: b.spend_limit,
        max_concurrent: b.max_concurrent,
        enforcement: b.enforcement,
    };
    let limit = a
        .set_tenant_limit(&t, &b.model, limits)
        .await
        .in_format(WireFormat::OpenAi)?;
    s.auth.apply(&Invalidation::Tenant(limit.tenant_id.clone()));
    ok(StatusCode::OK, limit)
}

#[derive(Deserialize)]
struct LimitModelQuery {
    #[serde(default = "all_models")]
    model: String,
}

async fn delete_tenant_limit(
    State(s): State<Arc<AppState>>,
    AdminCaller(a): AdminCaller,
    Path(t): Path<String>,
    OpenAiQuery(q): OpenAiQuery<LimitModelQuery>,
) -> AdminResult {
    a.delete_tenant_limit(&t, &q.model)
        .await
        .in_format(WireFormat::OpenAi)?;
    let tenant = a.tenant(&t).await.in_format(WireFormat::OpenAi)?;
    s.auth.apply(&Invalidation::Tenant(tenant.id));
    ok(
        StatusCode::OK,
        serde_json::json!({"deleted": true, "model": q.model}),
    )
}

async fn list_tenant_limits(AdminCaller(a): AdminCaller, Path(t): Path<String>) -> AdminResult {
    list(
        a.tenant_limits(Some(&t))
            .await
            .in_format(WireFormat::OpenAi)?,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyBody {
    tenant: String,
    #[serde(default)]
    name: String,
    #[serde(default, deserialize_with = "time_input::optional")]
    expires_at: Option<OffsetDateTime>,
    #[serde(default)]
    metadata: serde_json::Value,
    #[serde(default)]
    allowed_models: Option<Vec<String>>,
    #[serde(default)]
    rpm_limit: Option<i64>,
    #[serde(default)]
    tpm_limit: Option<i64>,
    #[serde(default, deserialize_with = "decimal::optional")]
    spend_limit: Option<Decimal>,
    #[serde(default)]
    max_concurrent: Option<i64>,
    #[serde(default)]
    enforcement: Enforcement,
}

async fn create_key(AdminCaller(a): AdminCaller, AdminJson(v): AdminJson) -> AdminResult {
    let b: KeyBody = body(v)?;
    let limits = KeyLimits {
        rpm_limit: b.rpm_limit,
        tpm_limit: b.tpm_limit,
        spend_limit: b.spend_limit,
        max_concurrent: b.max_concurrent,
        enforcement: b.enforcement,
    };
    let issued = a
        .create_key(
            &b.tenant,
            &b.name,
            b.expires_at,
            b.allowed_models,
            limits,
            b.metadata,
        )
        .await
        .in_format(WireFormat::OpenAi)?;
    ok(StatusCode::CREATED, issued)
}

#[derive(Deserialize)]
struct TenantQuery {
    tenant: Option<String>,
}

async fn list_keys(
    AdminCaller(a): AdminCaller,
    OpenAiQuery(q): OpenAiQuery<TenantQuery>,
) -> AdminResult {
    list(
        a.list_keys(q.tenant.as_deref())
            .await
            .in_format(WireFormat::OpenAi)?,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyRef {
    /// The key's id, or the secret itself.
    key: String,
}

async fn revoke_key(
    State(s): State<Arc<AppState>>,
    AdminCaller(a): AdminCaller,
    AdminJson(v): AdminJson,
) -> AdminResult {
    let b: KeyRef = body(v)?;
    let key = a.revoke_key(&b.key).await.in_format(WireFormat::OpenAi)?;
    s.auth.forget_key(&key.id);
    ok(StatusCode::OK, key)
}

async fn rotate_key(
    State(s): State<Arc<AppState>>,
    AdminCaller(a): AdminCaller,
    AdminJson(v): AdminJson,
) -> AdminResult {
    let b: KeyRef = body(v)?;
    let old = a.resolve_key(&b.key).await.in_format(WireFormat::OpenAi)?;
    let issued = a.rotate_key(&old).await.in_format(WireFormat::OpenAi)?;
    s.auth.forget_key(&old);
    ok(StatusCode::CREATED, issued)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyLimitsBody {
    key: String,
    #[serde(flatten)]
    limits: LimitsBody,
}

async fn set_limits(
    State(s): State<Arc<AppState>>,
    AdminCaller(a): AdminCaller,
    AdminJson(v): AdminJson,
) -> AdminResult {
    let b: KeyLimitsBody = body(v)?;
    let limits = b.limits.limits();
    let key = a
        .set_key_limits(&b.key, b.limits.allowed_models, limits)
        .await
        .in_format(WireFormat::OpenAi)?;
    s.auth.forget_key(&key.id);
    ok(StatusCode::OK, key)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanBody {
    name: String,
    #[serde(default = "zero", deserialize_with = "decimal::required")]
    monthly_fee: Decimal,
    #[serde(default = "usd")]
    currency: String,
    #[serde(default)]
    rpm_limit: Option<i64>,
    #[serde(default)]
    tpm_limit: Option<i64>,
    #[serde(default, deserialize_with = "decimal::optional")]
    monthly_spend_limit: Option<Decimal>,
}

fn zero() -> Decimal {
    Decimal::ZERO
}

fn usd() -> String {
    "USD".to_string()
}

async fn create_plan(AdminCaller(a): AdminCaller, AdminJson(v): AdminJson) -> AdminResult {
    let b: PlanBody = body(v)?;
    let plan = Plan {
        id: String::new(),
        name: b.name,
        monthly_fee: b.monthly_fee,
        currency: b.currency,
        rpm_limit: b.rpm_limit,
        tpm_limit: b.tpm_limit,
        monthly_spend_limit: b.monthly_spend_limit,
    };
    ok(
        StatusCode::CREATED,
        a.create_plan(plan).await.in_format(WireFormat::OpenAi)?,
    )
}

async fn list_plans(AdminCaller(a): AdminCaller) -> AdminResult {
    list(a.list_plans().await.in_format(WireFormat::OpenAi)?)
}

/// A price-book entry as the API and CLI accept it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceBody {
    pub model: String,
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default, deserialize_with = "time_input::optional")]
    pub effective_from: Option<OffsetDateTime>,
    #[serde(deserialize_with = "decimal::required")]
    pub input_per_mtok: Decimal,
    #[serde(deserialize_with = "decimal::required")]
    pub cached_input_per_mtok: Decimal,
    #[serde(deserialize_with = "decimal::required")]
    pub output_per_mtok: Decimal,
    #[serde(default = "usd")]
    pub currency: String,
}

impl PriceBody {
    pub fn into_price(self) -> Price {
        Price {
            model: self.model,
            tenant_id: self.tenant,
            effective_from: self.effective_from.unwrap_or_else(OffsetDateTime::now_utc),
            input_per_mtok: self.input_per_mtok,
            cached_input_per_mtok: self.cached_input_per_mtok,
            output_per_mtok: self.output_per_mtok,
            currency: self.currency,
        }
    }
}

async fn add_price(AdminCaller(a): AdminCaller, AdminJson(v): AdminJson) -> AdminResult {
    let b: PriceBody = body(v)?;
    ok(
        StatusCode::CREATED,
        a.add_price(b.into_price())
            .await
            .in_format(WireFormat::OpenAi)?,
    )
}

#[derive(Deserialize)]
struct ModelQuery {
    model: Option<String>,
}

async fn list_prices(
    AdminCaller(a): AdminCaller,
    OpenAiQuery(q): OpenAiQuery<ModelQuery>,
) -> AdminResult {
    list(
        a.list_prices(q.model.as_deref())
            .await
            .in_format(WireFormat::OpenAi)?,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscountBody {
    tenant: String,
    #[serde(default)]
    model: Option<String>,
    #[serde(deserialize_with = "decimal::required")]
    percent: Decimal,
    #[serde(default, deserialize_with = "time_input::optional")]
    effective_from: Option<OffsetDateTime>,
    #[serde(default, deserialize_with = "time_input::optional")]
    effective_to: Option<OffsetDateTime>,
}

async fn add_discount(AdminCaller(a): AdminCaller, AdminJson(v): AdminJson) -> AdminResult {
    let b: DiscountBody = body(v)?;
    let d = Discount {
        tenant_id: b.tenant,
        model: b.model,
        percent: b.percent,
        effective_from: b.effective_from.unwrap_or_else(OffsetDateTime::now_utc),
        effective_to: b.effective_to,
    };
    ok(
        StatusCode::CREATED,
        a.add_discount(d).await.in_format(WireFormat::OpenAi)?,
    )
}

async fn list_discounts(
    AdminCaller(a): AdminCaller,
    OpenAiQuery(q): OpenAiQuery<TenantQuery>,
) -> AdminResult {
    list(
        a.list_discounts(q.tenant.as_deref())
            .await
            .in_format(WireFormat::OpenAi)?,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialBody {
    name: String,
    provider: String,
    secret: String,
    /// Overwrite a credential of the same name; without it an existing name is a 409.
    #[serde(default)]
    replace: bool,
}

async fn put_credential(AdminCaller(a): AdminCaller, AdminJson(v): AdminJson) -> AdminResult {
    let b: CredentialBody = body(v)?;
    ok(
        StatusCode::CREATED,
        a.put_credential(&b.name, &b.provider, &b.secret, b.replace)
            .await
            .in_format(WireFormat::OpenAi)?,
    )
}

async fn list_credentials(AdminCaller(a): AdminCaller) -> AdminResult {
    list(a.list_credentials().await.in_format(WireFormat::OpenAi)?)
}

async fn delete_credential(AdminCaller(a): AdminCaller, Path(name): Path<String>) -> AdminResult {
    a.delete_credential(&name)
        .await
        .in_format(WireFormat::OpenAi)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct AuditQuery {
    limit: Option<i64>,
}

/// `GET /admin/v1/deployments`: each deployment's breaker, in-flight count, latency
/// estimate, rate-limit state and spend, as this gateway instance sees them.
async fn deployments(State(s): State<Arc<AppState>>, _: AdminCaller) -> AdminResult {
    list(s.router.status())
}

async fn audit(
    AdminCaller(a): AdminCaller,
    OpenAiQuery(q): OpenAiQuery<AuditQuery>,
) -> AdminResult {
    list(
        a.audit_log(q.limit.unwrap_or(100))
            .await
            .in_format(WireFormat::OpenAi)?,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditedRequestsQuery {
    tenant: String,
    request_id: Option<String>,
    limit: Option<u64>,
}

/// `GET /admin/v1/audit/requests?tenant=&request_id=&limit=`: audited requests (`[audit]`)
/// of any tenant, from ClickHouse's `audit_log`, newest first; 404 when this gateway has no
/// ClickHouse. The same read as the tenant's own `GET /v1/audit/requests`.
async fn audited_requests(
    State(state): State<Arc<AppState>>,
    AdminCaller(a): AdminCaller,
    OpenAiQuery(q): OpenAiQuery<AuditedRequestsQuery>,
) -> AdminResult {
    list(
        a.audited_requests(
            state.audit_log.as_ref(),
            &q.tenant,
            q.request_id.as_deref(),
            q.limit,
        )
        .await
        .in_format(WireFormat::OpenAi)?,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InvoiceQuery {
    period: String,
    tenant: Option<String>,
}

/// The invoices of a period: a JSON array of the objects `tollgate invoices export` writes.
async fn list_invoices(
    AdminCaller(a): AdminCaller,
    OpenAiQuery(q): OpenAiQuery<InvoiceQuery>,
) -> AdminResult {
    ok(
        StatusCode::OK,
        a.invoices(&q.period, q.tenant.as_deref())
            .await
            .in_format(WireFormat::OpenAi)?,
    )
}

async fn close_period(AdminCaller(a): AdminCaller, Path(period): Path<String>) -> AdminResult {
    ok(
        StatusCode::OK,
        a.close_period(&period)
            .await
            .in_format(WireFormat::OpenAi)?,
    )
}
