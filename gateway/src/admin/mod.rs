//! Admin actions, shared by the admin REST API (`routes/admin.rs`) and the `tollgate` CLI:
//! each validates its input, performs one store change and records it in the audit trail.

use std::sync::Arc;

use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::json;
use time::OffsetDateTime;

use crate::auth::keys;
use crate::error::GatewayError;
use crate::invoices::{self, Invoice, InvoiceError, Period};
use crate::secrets::MasterKey;
use crate::store::{
    AuditEntry, Discount, KeyLimits, KeySummary, MetaStore, NewKey, Plan, Price, StoreError,
    Tenant, TenantLimit,
};

impl From<StoreError> for GatewayError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => GatewayError::Conflict(m),
            StoreError::NotFound(m) => GatewayError::NotFound(m),
            StoreError::Invalid(m) => GatewayError::bad_request(m),
            other => GatewayError::Internal(other.to_string()),
        }
    }
}

impl From<InvoiceError> for GatewayError {
    fn from(e: InvoiceError) -> Self {
        match e {
            InvoiceError::Store(e) => e.into(),
            InvoiceError::MalformedPeriod(_)
            | InvoiceError::FuturePeriod(_)
            | InvoiceError::NotEnded { .. } => GatewayError::bad_param(e.to_string(), "period"),
            InvoiceError::Output(m) => GatewayError::Internal(m),
        }
    }
}

/// The provider types a stored credential can be for: the `type`s of HTTP deployments in
/// the configuration (`[[deployments]]`); the built-in `mock` needs none.
pub const PROVIDER_TYPES: [&str; 4] = ["openai", "openai_compatible", "vllm", "anthropic"];

/// A point in time as the CLI's date flags and the admin API's date fields accept it: RFC 3339
/// (`2027-01-01T00:00:00Z`, any offset) or a calendar date (`2027-01-01`, meaning 00:00:00 UTC
/// that day).
pub fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    use time::format_description::well_known::Rfc3339;
    let s = s.trim();
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &date_format)
        .map(|d| d.midnight().assume_utc())
        .map_err(|_| {
            format!(
                "`{s}` is not a time: expected RFC 3339 (2027-01-01T00:00:00Z) or a date \
                 (2027-01-01, meaning 00:00:00 UTC)"
            )
        })
}

/// A closed billing period.
#[derive(Debug, Serialize)]
pub struct ClosedPeriod {
    pub period: String,
    #[serde(with = "time::serde::rfc3339")]
    pub closed_at: OffsetDateTime,
    pub closed_by: String,
}

/// A key as created or rotated: the summary and the secret, shown this once.
#[derive(Debug, Serialize)]
pub struct IssuedKey {
    pub key: KeySummary,
    pub secret: String,
}

/// A credential as listed: never the secret.
#[derive(Debug, Serialize)]
pub struct CredentialInfo {
    pub name: String,
    pub provider: String,
    pub key_fingerprint: String,
}

/// Admin actions over one store, on behalf of `actor`.
#[derive(Clone)]
pub struct Admin {
    pub store: Arc<dyn MetaStore>,
    pub master: Option<Arc<MasterKey>>,
    pub actor: String,
}

impl Admin {
    async fn record(
        &self,
        action: &str,
        target: &str,
        details: serde_json::Value,
    ) -> Result<(), GatewayError> {
        self.store
            .audit(&self.actor, action, target, &details)
            .await?;
        Ok(())
    }

    /// A tenant by id or name, or 404.
    pub async fn tenant(&self, tenant: &str) -> Result<Tenant, GatewayError> {
        self.store
            .tenant(tenant)
            .await?
            .ok_or_else(|| GatewayError::NotFound(format!("no tenant `{tenant}`")))
    }

    /// The id of an optional tenant reference (id or name), or 404.
    async fn tenant_id(&self, tenant: Option<&str>) -> Result<Option<String>, GatewayError> {
        match tenant {
            Some(t) => Ok(Some(self.tenant(t).await?.id)),
            None => Ok(None),
        }
    }

    async fn plan_id(&self, plan: &str) -> Result<String, GatewayError> {
        self.store
            .list_plans()
            .await?
            .into_iter()
            .find(|p| p.id == plan || p.name == plan)
            .map(|p| p.id)
            .ok_or_else(|| GatewayError::NotFound(format!("no plan `{plan}`")))
    }

    pub async fn create_tenant(
        &self,
        name: &str,
        plan: Option<&str>,
    ) -> Result<Tenant, GatewayError> {
        check_name("name", name, true)?;
        let plan_id = match plan {
            Some(p) => Some(self.plan_id(p).await?),
            None => None,
        };
        let t = self.store.create_tenant(name, plan_id.as_deref()).await?;
        self.record(
            "tenant.create",
            &t.id,
            json!({"name": t.name, "plan_id": t.plan_id}),
        )
        .await?;
        Ok(t)
    }

    pub async fn list_tenants(&self) -> Result<Vec<Tenant>, GatewayError> {
        Ok(self.store.list_tenants().await?)
    }

    /// Suspends (`active = false`) or reactivates a tenant; its keys follow at once.
    pub async fn set_tenant_active(
        &self,
        tenant: &str,
        active: bool,
    ) -> Result<Tenant, GatewayError> {
        let t = self.tenant(tenant).await?;
        let status = if active { "active" } else { "suspended" };
        self.store.set_tenant_status(&t.id, status).await?;
        self.record(
            if active {
                "tenant.activate"
            } else {
                "tenant.suspend"
            },
            &t.id,
            json!({}),
        )
        .await?;
        self.tenant(&t.id).await
    }

    pub async fn set_tenant_plan(&self, tenant: &str, plan: &str) -> Result<Tenant, GatewayError> {
        let t = self.tenant(tenant).await?;
        let plan_id = self.plan_id(plan).await?;
        self.store.set_tenant_plan(&t.id, Some(&plan_id)).await?;
        self.record("tenant.plan", &t.id, json!({"plan_id": plan_id}))
            .await?;
        self.tenant(&t.id).await
    }

    /// Sets the limits of a tenant (`model` `*`) or of a tenant × model alias.
    pub async fn set_tenant_limit(
        &self,
        tenant: &str,
        model: &str,
        limits: KeyLimits,
    ) -> Result<TenantLimit, GatewayError> {
        let t = self.tenant(tenant).await?;
        if let Some(s) = limits.spend_limit {
            check_money("spend_limit", s)?;
        }
        let model = model.trim();
        if model.is_empty() || model.len() > 256 {
            return Err(GatewayError::bad_param(
                "model must be a model alias or `*` (at most 256 bytes)",
                "model",
            ));
        }
        let limit = TenantLimit {
            tenant_id: t.id.clone(),
            model: model.to_string(),
            limits,
        };
        self.store.set_tenant_limit(&limit).await?;
        self.record("tenant.limits", &t.id, json!(limit)).await?;
        Ok(limit)
    }

    /// Removes the limits of a tenant (`model` `*`) or of a tenant × model alias.
    pub async fn delete_tenant_limit(&self, tenant: &str, model: &str) -> Result<(), GatewayError> {
        let t = self.tenant(tenant).await?;
        self.store.delete_tenant_limit(&t.id, model).await?;
        self.record("tenant.limits.delete", &t.id, json!({"model": model}))
            .await
    }

    /// Limit rows of a tenant, or of every tenant.
    pub async fn tenant_limits(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<TenantLimit>, GatewayError> {
        let id = match tenant {
            Some(t) => Some(self.tenant(t).await?.id),
            None => None,
        };
        Ok(self.store.list_tenant_limits(id.as_deref()).await?)
    }

    /// Creates a key for a tenant; the secret is in the result and nowhere else.
    pub async fn create_key(
        &self,
        tenant: &str,
        name: &str,
        expires_at: Option<OffsetDateTime>,
        allowed_models: Option<Vec<String>>,
        limits: KeyLimits,
        metadata: serde_json::Value,
    ) -> Result<IssuedKey, GatewayError> {
        let t = self.tenant(tenant).await?;
        check_name("name", name, false)?;
        check_allowed_models(allowed_models.as_deref())?;
        if matches!(expires_at, Some(e) if e <= OffsetDateTime::now_utc()) {
            return Err(GatewayError::bad_param(
                "expires_at is in the past",
                "expires_at",
            ));
        }
        if !(metadata.is_null() || metadata.is_object()) {
            return Err(GatewayError::bad_param(
                "metadata must be a JSON object",
                "metadata",
            ));
        }
        let new = keys::generate();
        let spec = NewKey {
            tenant_id: t.id.clone(),
            name: name.to_string(),
            expires_at,
            allowed_models,
            limits,
            metadata,
        };
        let key = self
            .store
            .create_key(&spec, &new.hash, &new.display_prefix)
            .await?;
        self.record(
            "key.create",
            &key.id,
            json!({"tenant_id": t.id, "name": name, "prefix": key.prefix}),
        )
        .await?;
        Ok(IssuedKey {
            key,
            secret: new.secret,
        })
    }

    pub async fn list_keys(&self, tenant: Option<&str>) -> Result<Vec<KeySummary>, GatewayError> {
        let tenant_id = self.tenant_id(tenant).await?;
        Ok(self.store.list_keys(tenant_id.as_deref()).await?)
    }

    /// A key id from an id or from the secret itself.
    pub async fn resolve_key(&self, key: &str) -> Result<String, GatewayError> {
        let key = key.trim();
        if key.starts_with("tg_") {
            if !keys::is_well_formed(key) {
                return Err(GatewayError::bad_request(
                    "that is not a valid key (bad checksum)",
                ));
            }
            return self
                .store
                .key_id_by_hash(&keys::hash(key))
                .await?
                .ok_or_else(|| GatewayError::NotFound("no such key".to_string()));
        }
        self.store
            .key_summary(key)
            .await?
            .map(|k| k.id)
            .ok_or_else(|| GatewayError::NotFound(format!("no key `{key}`")))
    }

    pub async fn revoke_key(&self, key: &str) -> Result<KeySummary, GatewayError> {
        let id = self.resolve_key(key).await?;
        self.store.revoke_key(&id).await?;
        self.record("key.revoke", &id, json!({})).await?;
        self.store
            .key_summary(&id)
            .await?
            .ok_or_else(|| GatewayError::NotFound(format!("no key `{id}`")))
    }

    /// Issues a replacement with the same settings and revokes the old key, atomically.
    pub async fn rotate_key(&self, key: &str) -> Result<IssuedKey, GatewayError> {
        let id = self.resolve_key(key).await?;
        let new = keys::generate();
        let summary = self
            .store
            .rotate_key(&id, &new.hash, &new.display_prefix)
            .await?;
        self.record("key.rotate", &id, json!({"replacement": summary.id}))
            .await?;
        Ok(IssuedKey {
            key: summary,
            secret: new.secret,
        })
    }

    pub async fn set_key_limits(
        &self,
        key: &str,
        allowed_models: Option<Vec<String>>,
        limits: KeyLimits,
    ) -> Result<KeySummary, GatewayError> {
        check_allowed_models(allowed_models.as_deref())?;
        let id = self.resolve_key(key).await?;
        self.store
            .update_key(&id, allowed_models.clone(), &limits)
            .await?;
        self.record(
            "key.limits",
            &id,
            json!({"allowed_models": allowed_models, "limits": limits}),
        )
        .await?;
        self.store
            .key_summary(&id)
            .await?
            .ok_or_else(|| GatewayError::NotFound(format!("no key `{id}`")))
    }

    pub async fn create_plan(&self, plan: Plan) -> Result<Plan, GatewayError> {
        check_name("name", &plan.name, true)?;
        check_money("monthly_fee", plan.monthly_fee)?;
        if let Some(s) = plan.monthly_spend_limit {
            check_money("monthly_spend_limit", s)?;
        }
        check_currency(&plan.currency)?;
        KeyLimits {
            rpm_limit: plan.rpm_limit,
            tpm_limit: plan.tpm_limit,
            ..KeyLimits::default()
        }
        .validate()?;
        let p = self.store.create_plan(&plan).await?;
        self.record("plan.create", &p.id, json!(p)).await?;
        Ok(p)
    }

    pub async fn list_plans(&self) -> Result<Vec<Plan>, GatewayError> {
        Ok(self.store.list_plans().await?)
    }

    pub async fn add_price(&self, mut price: Price) -> Result<Price, GatewayError> {
        if price.model.trim().is_empty() {
            return Err(GatewayError::bad_param("model must not be empty", "model"));
        }
        for (name, v) in [
            ("input_per_mtok", price.input_per_mtok),
            ("cached_input_per_mtok", price.cached_input_per_mtok),
            ("output_per_mtok", price.output_per_mtok),
        ] {
            check_price(name, v)?;
        }
        check_currency(&price.currency)?;
        if let Some(t) = &price.tenant_id {
            price.tenant_id = Some(self.tenant(t).await?.id);
        }
        self.store.add_price(&price).await?;
        self.record("price.add", &price.model, json!(price)).await?;
        Ok(price)
    }

    pub async fn list_prices(&self, model: Option<&str>) -> Result<Vec<Price>, GatewayError> {
        Ok(self.store.list_prices(model).await?)
    }

    pub async fn add_discount(&self, mut d: Discount) -> Result<Discount, GatewayError> {
        if d.percent <= Decimal::ZERO
            || d.percent > Decimal::ONE_HUNDRED
            || d.percent.normalize().scale() > 6
        {
            return Err(GatewayError::bad_param(
                "percent must be in (0, 100] with at most 6 decimal places",
                "percent",
            ));
        }
        if matches!(d.effective_to, Some(to) if to <= d.effective_from) {
            return Err(GatewayError::bad_param(
                "effective_to must be after effective_from",
                "effective_to",
            ));
        }
        d.tenant_id = self.tenant(&d.tenant_id).await?.id;
        self.store.add_discount(&d).await?;
        self.record("discount.add", &d.tenant_id, json!(d)).await?;
        Ok(d)
    }

    pub async fn list_discounts(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<Discount>, GatewayError> {
        let tenant_id = self.tenant_id(tenant).await?;
        Ok(self.store.list_discounts(tenant_id.as_deref()).await?)
    }

    fn master(&self) -> Result<&MasterKey, GatewayError> {
        self.master.as_deref().ok_or_else(|| {
            GatewayError::bad_request(crate::secrets::SecretsError::Missing.to_string())
        })
    }

    /// Stores a provider credential, encrypted. A name that exists already is a conflict
    /// unless `replace` is set (then the credential is overwritten). The secret is not audited.
    pub async fn put_credential(
        &self,
        name: &str,
        provider: &str,
        secret: &str,
        replace: bool,
    ) -> Result<CredentialInfo, GatewayError> {
        if name.trim().is_empty() || secret.is_empty() {
            return Err(GatewayError::bad_request(
                "credential name and secret must not be empty",
            ));
        }
        if !PROVIDER_TYPES.contains(&provider) {
            return Err(GatewayError::bad_param(
                format!(
                    "unknown provider `{provider}`; one of: {}",
                    PROVIDER_TYPES.join(", ")
                ),
                "provider",
            ));
        }
        let master = self.master()?;
        let exists = self
            .store
            .list_credentials()
            .await?
            .iter()
            .any(|c| c.name == name);
        if exists && !replace {
            return Err(GatewayError::Conflict(format!(
                "a credential named `{name}` exists already; to overwrite it, add it again \
                 with replace (CLI: --replace, admin API: \"replace\": true)"
            )));
        }
        let stored = master
            .encrypt(name, provider, secret)
            .map_err(|e| GatewayError::Internal(e.to_string()))?;
        self.store.put_credential(&stored).await?;
        self.record(
            "credential.put",
            name,
            json!({"provider": provider, "replaced": exists}),
        )
        .await?;
        Ok(CredentialInfo {
            name: stored.name,
            provider: stored.provider,
            key_fingerprint: stored.key_fingerprint,
        })
    }

    pub async fn list_credentials(&self) -> Result<Vec<CredentialInfo>, GatewayError> {
        Ok(self
            .store
            .list_credentials()
            .await?
            .into_iter()
            .map(|c| CredentialInfo {
                name: c.name,
                provider: c.provider,
                key_fingerprint: c.key_fingerprint,
            })
            .collect())
    }

    pub async fn delete_credential(&self, name: &str) -> Result<(), GatewayError> {
        self.store.delete_credential(name).await?;
        self.record("credential.delete", name, json!({})).await
    }

    /// Decrypts every credential (for the router at start-up).
    pub async fn decrypt_credentials(
        &self,
    ) -> Result<std::collections::HashMap<String, String>, GatewayError> {
        let stored = self.store.list_credentials().await?;
        if stored.is_empty() {
            return Ok(Default::default());
        }
        let master = self.master()?;
        stored
            .iter()
            .map(|c| {
                master
                    .decrypt(c)
                    .map(|s| (c.name.clone(), s))
                    .map_err(|e| GatewayError::Internal(e.to_string()))
            })
            .collect()
    }

    /// Re-encrypts every credential from `old` to `new` in one transaction.
    pub async fn rotate_master(
        &self,
        old: &MasterKey,
        new: &MasterKey,
    ) -> Result<usize, GatewayError> {
        let stored = self.store.list_credentials().await?;
        let mut rotated = Vec::with_capacity(stored.len());
        for c in &stored {
            let plain = old
                .decrypt(c)
                .map_err(|e| GatewayError::bad_request(e.to_string()))?;
            rotated.push(
                new.encrypt(&c.name, &c.provider, &plain)
                    .map_err(|e| GatewayError::Internal(e.to_string()))?,
            );
        }
        self.store.replace_credentials(&rotated).await?;
        self.record(
            "credential.rotate_master",
            "*",
            json!({"count": rotated.len(), "new_fingerprint": new.fingerprint()}),
        )
        .await?;
        Ok(rotated.len())
    }

    /// The invoices of `period` (YYYY-MM), of one tenant (id or name) or all. The current
    /// period gives drafts; a period that has not started is refused.
    pub async fn invoices(
        &self,
        period: &str,
        tenant: Option<&str>,
    ) -> Result<Vec<Invoice>, GatewayError> {
        let p = Period::parse(period)?;
        p.check_started(OffsetDateTime::now_utc())?;
        let t = match tenant {
            Some(t) => Some(self.tenant(t).await?),
            None => None,
        };
        Ok(invoices::load(self.store.as_ref(), p, t.as_ref()).await?)
    }

    /// Closes a period that has ended: its invoices become final, and usage of it metered
    /// later is booked into the next open period as adjustments.
    pub async fn close_period(&self, period: &str) -> Result<ClosedPeriod, GatewayError> {
        let p = Period::parse(period)?;
        p.check_ended(OffsetDateTime::now_utc())?;
        let label = p.to_string();
        let closed_at = self.store.close_period(&label, &self.actor).await?;
        self.record("billing_period.close", &label, json!({}))
            .await?;
        Ok(ClosedPeriod {
            period: label,
            closed_at,
            closed_by: self.actor.clone(),
        })
    }

    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>, GatewayError> {
        Ok(self.store.list_audit(limit.clamp(1, 10_000)).await?)
    }

    /// Audited requests of `tenant` (id or name), newest first: the rows of `request_id`, or
    /// the latest `limit` (see [`crate::audit::find_requests`], which this shares with the
    /// tenant's own `GET /v1/audit/requests`). `store` is `None` when no ClickHouse is
    /// configured (a 404 saying so).
    pub async fn audited_requests(
        &self,
        store: Option<&tollgate_pipeline::audit::AuditStore>,
        tenant: &str,
        request_id: Option<&str>,
        limit: Option<u64>,
    ) -> Result<Vec<tollgate_pipeline::audit::AuditRow>, GatewayError> {
        let tenant_id = self.tenant(tenant).await?.id;
        crate::audit::find_requests(store, &tenant_id, request_id, limit).await
    }
}

fn check_money(name: &str, v: Decimal) -> Result<(), GatewayError> {
    tollgate_schemas::pricing::check_amount(v)
        .map_err(|e| GatewayError::bad_param(format!("{name} {e}"), name))
}

fn check_price(name: &str, v: Decimal) -> Result<(), GatewayError> {
    tollgate_schemas::pricing::check_price(v)
        .map_err(|e| GatewayError::bad_param(format!("{name} {e}"), name))
}

/// Longest tenant, key or plan name.
const MAX_NAME_CHARS: usize = 200;

/// A display name: at most [`MAX_NAME_CHARS`], no control characters (they would forge lines
/// in logs and exports), and not blank when `required`.
fn check_name(field: &str, name: &str, required: bool) -> Result<(), GatewayError> {
    let problem = if required && name.trim().is_empty() {
        "must not be empty"
    } else if name.chars().count() > MAX_NAME_CHARS {
        "is longer than 200 characters"
    } else if name.chars().any(char::is_control) {
        "must not contain control characters"
    } else {
        return Ok(());
    };
    Err(GatewayError::bad_param(format!("{field} {problem}"), field))
}

/// A key's model list: absent (every model) or non-empty names; an empty list or an empty
/// name would make a key that can call nothing.
fn check_allowed_models(models: Option<&[String]>) -> Result<(), GatewayError> {
    let Some(models) = models else {
        return Ok(());
    };
    let param = "allowed_models";
    if models.is_empty() {
        return Err(GatewayError::bad_param(
            "allowed_models must name at least one model (leave it out to allow every model)",
            param,
        ));
    }
    for m in models {
        if m.trim().is_empty() || m.chars().count() > MAX_NAME_CHARS {
            return Err(GatewayError::bad_param(
                "allowed_models entries must be model names of 1 to 200 characters",
                param,
            ));
        }
    }
    Ok(())
}

fn check_currency(c: &str) -> Result<(), GatewayError> {
    if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(GatewayError::bad_param(
            "currency must be a 3-letter ISO 4217 code such as USD",
            "currency",
        ));
    }
    Ok(())
}
