//! PostgreSQL implementation of [`MetaStore`] (production).
//!
//! Invalidations travel on the `tollgate_invalidate` channel: mutations call `pg_notify` in
//! their own transaction, so a notification is delivered exactly when the change commits.

use std::time::Duration;

use async_trait::async_trait;
use rust_decimal::Decimal;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::{
    check_name, is_foreign_key_violation, is_unique_violation, new_id, AuditEntry, Discount,
    Enforcement, Invalidation, KeyLimits, KeyRecord, KeySummary, LedgerLocation, MetaStore, NewKey,
    Plan, Price, PriceLine, StoreError, StoredCredential, Tenant, TenantLimit, UsageRow,
};

const CHANNEL: &str = "tollgate_invalidate";

/// The production metadata store.
pub struct PostgresStore {
    pool: PgPool,
    url: String,
}

impl PostgresStore {
    /// Connects and applies migrations (idempotent).
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        sqlx::migrate!("../schemas/migrations/postgres")
            .run(&pool)
            .await?;
        Ok(PostgresStore {
            pool,
            url: url.to_string(),
        })
    }
}

async fn notify(tx: &mut Transaction<'_, Postgres>, inv: &Invalidation) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(inv.encode())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn tenant_from(r: &PgRow) -> Tenant {
    Tenant {
        id: r.get("id"),
        name: r.get("name"),
        status: r.get("status"),
        plan_id: r.get("plan_id"),
        created_at: r.get("created_at"),
    }
}

fn models_from(v: Option<serde_json::Value>) -> Option<Vec<String>> {
    v.and_then(|v| serde_json::from_value(v).ok())
}

fn limits_from(r: &PgRow) -> KeyLimits {
    KeyLimits {
        rpm_limit: r.get("rpm_limit"),
        tpm_limit: r.get("tpm_limit"),
        spend_limit: r.get("spend_limit"),
        max_concurrent: r.get("max_concurrent"),
        enforcement: Enforcement::parse(r.get("enforcement")),
    }
}

fn tenant_limit_from(r: &PgRow) -> TenantLimit {
    TenantLimit {
        tenant_id: r.get("tenant_id"),
        model: r.get("model"),
        limits: limits_from(r),
    }
}

const TENANT_LIMIT_COLUMNS: &str =
    "tenant_id, model, rpm_limit, tpm_limit, max_concurrent, spend_limit, enforcement";

fn key_summary_from(r: &PgRow) -> KeySummary {
    KeySummary {
        id: r.get("id"),
        tenant_id: r.get("tenant_id"),
        name: r.get("name"),
        prefix: r.get("key_prefix"),
        status: r.get("status"),
        created_at: r.get("created_at"),
        expires_at: r.get("expires_at"),
        last_used_at: r.get("last_used_at"),
        allowed_models: models_from(r.get("allowed_models")),
        limits: limits_from(r),
        metadata: r.get("metadata"),
    }
}

const KEY_COLUMNS: &str = "id, tenant_id, name, key_prefix, status, created_at, expires_at, \
     last_used_at, allowed_models, rpm_limit, tpm_limit, spend_limit, max_concurrent, \
     enforcement, metadata";

fn plan_from(r: &PgRow) -> Plan {
    Plan {
        id: r.get("id"),
        name: r.get("name"),
        monthly_fee: r.get("monthly_fee"),
        currency: r.get("currency"),
        rpm_limit: r.get("rpm_limit"),
        tpm_limit: r.get("tpm_limit"),
        monthly_spend_limit: r.get("monthly_spend_limit"),
    }
}

fn map_write_error(e: sqlx::Error, conflict: impl FnOnce() -> String, missing: &str) -> StoreError {
    if is_unique_violation(&e) {
        StoreError::Conflict(conflict())
    } else if is_foreign_key_violation(&e) {
        StoreError::NotFound(missing.to_string())
    } else {
        StoreError::Database(e)
    }
}

#[async_trait]
impl MetaStore for PostgresStore {
    async fn create_tenant(&self, name: &str, plan_id: Option<&str>) -> Result<Tenant, StoreError> {
        let name = check_name("tenant", name)?;
        let row = sqlx::query(
            "INSERT INTO tenants (id, name, plan_id) VALUES ($1, $2, $3) \
             RETURNING id, name, status, plan_id, created_at",
        )
        .bind(new_id("ten"))
        .bind(&name)
        .bind(plan_id)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| {
            map_write_error(
                e,
                || format!("a tenant named `{name}` already exists"),
                "no such plan",
            )
        })?;
        Ok(tenant_from(&row))
    }

    async fn tenant(&self, id_or_name: &str) -> Result<Option<Tenant>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, status, plan_id, created_at FROM tenants WHERE id = $1 OR name = $1 \
             ORDER BY (id = $1) DESC LIMIT 1",
        )
        .bind(id_or_name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.as_ref().map(tenant_from))
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, status, plan_id, created_at FROM tenants ORDER BY created_at, name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(tenant_from).collect())
    }

    async fn set_tenant_status(&self, tenant_id: &str, status: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("UPDATE tenants SET status = $2 WHERE id = $1")
            .bind(tenant_id)
            .bind(status)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no tenant `{tenant_id}`")));
        }
        notify(&mut tx, &Invalidation::Tenant(tenant_id.to_string())).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_tenant_plan(
        &self,
        tenant_id: &str,
        plan_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE tenants SET plan_id = $2 WHERE id = $1")
            .bind(tenant_id)
            .bind(plan_id)
            .execute(&self.pool)
            .await
            .map_err(|e| map_write_error(e, String::new, "no such plan"))?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no tenant `{tenant_id}`")));
        }
        Ok(())
    }

    async fn create_key(
        &self,
        key: &NewKey,
        key_hash: &str,
        prefix: &str,
    ) -> Result<KeySummary, StoreError> {
        key.limits.validate()?;
        let row = sqlx::query(&format!(
            "INSERT INTO api_keys (id, tenant_id, name, key_hash, key_prefix, expires_at, allowed_models, \
             rpm_limit, tpm_limit, spend_limit, max_concurrent, enforcement, metadata) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13) RETURNING {KEY_COLUMNS}"
        ))
        .bind(new_id("key"))
        .bind(&key.tenant_id)
        .bind(&key.name)
        .bind(key_hash)
        .bind(prefix)
        .bind(key.expires_at)
        .bind(key.allowed_models.as_ref().map(|m| serde_json::json!(m)))
        .bind(key.limits.rpm_limit)
        .bind(key.limits.tpm_limit)
        .bind(key.limits.spend_limit)
        .bind(key.limits.max_concurrent)
        .bind(key.limits.enforcement.as_str())
        .bind(if key.metadata.is_null() { serde_json::json!({}) } else { key.metadata.clone() })
        .fetch_one(&self.pool)
        .await
        .map_err(|e| map_write_error(e, || "key collision, try again".to_string(), "no such tenant"))?;
        Ok(key_summary_from(&row))
    }

    async fn key_by_hash(&self, key_hash: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT k.id AS key_id, k.status AS key_status, k.expires_at, k.allowed_models, \
                    k.rpm_limit, k.tpm_limit, k.spend_limit, k.max_concurrent, k.enforcement, \
                    t.id AS tenant_id, t.name AS tenant_name, t.status AS tenant_status, \
                    p.id AS plan_id, p.currency AS plan_currency, p.rpm_limit AS plan_rpm, \
                    p.tpm_limit AS plan_tpm, p.monthly_spend_limit AS plan_spend \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             LEFT JOIN plans p ON p.id = t.plan_id WHERE k.key_hash = $1",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let tenant_id: String = r.get("tenant_id");
        let tenant_limits = self.list_tenant_limits(Some(&tenant_id)).await?;
        let has_plan = r.get::<Option<String>, _>("plan_id").is_some();
        Ok(Some(KeyRecord {
            key_id: r.get("key_id"),
            key_status: r.get("key_status"),
            expires_at: r.get("expires_at"),
            tenant_id,
            tenant_name: r.get("tenant_name"),
            tenant_status: r.get("tenant_status"),
            allowed_models: models_from(r.get("allowed_models")),
            limits: limits_from(&r),
            tenant_limits,
            plan_limits: has_plan.then(|| KeyLimits {
                rpm_limit: r.get("plan_rpm"),
                tpm_limit: r.get("plan_tpm"),
                spend_limit: r.get("plan_spend"),
                ..KeyLimits::default()
            }),
            currency: r
                .get::<Option<String>, _>("plan_currency")
                .unwrap_or_else(|| "USD".to_string()),
        }))
    }

    async fn key_summary(&self, key_id: &str) -> Result<Option<KeySummary>, StoreError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = $1"))
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(key_summary_from))
    }

    async fn key_id_by_hash(&self, key_hash: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT id FROM api_keys WHERE key_hash = $1")
                .bind(key_hash)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn list_keys(&self, tenant_id: Option<&str>) -> Result<Vec<KeySummary>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE ($1::text IS NULL OR tenant_id = $1) ORDER BY created_at, id"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(key_summary_from).collect())
    }

    async fn revoke_key(&self, key_id: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let hash: Option<String> = sqlx::query_scalar(
            "UPDATE api_keys SET status = 'revoked', revoked_at = now() \
             WHERE id = $1 AND status = 'active' RETURNING key_hash",
        )
        .bind(key_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(hash) = hash else {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT id FROM api_keys WHERE id = $1")
                    .bind(key_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            return Err(match exists {
                Some(_) => StoreError::Conflict(format!("key `{key_id}` is already revoked")),
                None => StoreError::NotFound(format!("no key `{key_id}`")),
            });
        };
        notify(&mut tx, &Invalidation::Key(hash)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn rotate_key(
        &self,
        key_id: &str,
        new_hash: &str,
        new_prefix: &str,
    ) -> Result<KeySummary, StoreError> {
        let mut tx = self.pool.begin().await?;
        let old_hash: Option<String> = sqlx::query_scalar(
            "UPDATE api_keys SET status = 'revoked', revoked_at = now() \
             WHERE id = $1 AND status = 'active' RETURNING key_hash",
        )
        .bind(key_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(old_hash) = old_hash else {
            return Err(StoreError::NotFound(format!("no active key `{key_id}`")));
        };
        let row = sqlx::query(&format!(
            "INSERT INTO api_keys (id, tenant_id, name, key_hash, key_prefix, expires_at, allowed_models, \
             rpm_limit, tpm_limit, spend_limit, metadata) \
             SELECT $2, tenant_id, name, $3, $4, expires_at, allowed_models, rpm_limit, tpm_limit, \
             spend_limit, metadata FROM api_keys WHERE id = $1 RETURNING {KEY_COLUMNS}"
        ))
        .bind(key_id)
        .bind(new_id("key"))
        .bind(new_hash)
        .bind(new_prefix)
        .fetch_one(&mut *tx)
        .await?;
        notify(&mut tx, &Invalidation::Key(old_hash)).await?;
        tx.commit().await?;
        Ok(key_summary_from(&row))
    }

    async fn update_key(
        &self,
        key_id: &str,
        allowed_models: Option<Vec<String>>,
        limits: &KeyLimits,
    ) -> Result<(), StoreError> {
        limits.validate()?;
        let mut tx = self.pool.begin().await?;
        let hash: Option<String> = sqlx::query_scalar(
            "UPDATE api_keys SET allowed_models = $2, rpm_limit = $3, tpm_limit = $4, spend_limit = $5, \
             max_concurrent = $6, enforcement = $7 WHERE id = $1 RETURNING key_hash",
        )
        .bind(key_id)
        .bind(allowed_models.map(|m| serde_json::json!(m)))
        .bind(limits.rpm_limit)
        .bind(limits.tpm_limit)
        .bind(limits.spend_limit)
        .bind(limits.max_concurrent)
        .bind(limits.enforcement.as_str())
        .fetch_optional(&mut *tx)
        .await?;
        let hash = hash.ok_or_else(|| StoreError::NotFound(format!("no key `{key_id}`")))?;
        notify(&mut tx, &Invalidation::Key(hash)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn touch_keys(&self, key_ids: &[String], at: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE id = ANY($1) AND (last_used_at IS NULL OR last_used_at < $2)")
            .bind(key_ids)
            .bind(at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn create_plan(&self, plan: &Plan) -> Result<Plan, StoreError> {
        let name = check_name("plan", &plan.name)?;
        let row = sqlx::query(
            "INSERT INTO plans (id, name, monthly_fee, currency, rpm_limit, tpm_limit, monthly_spend_limit) \
             VALUES ($1,$2,$3,$4,$5,$6,$7) RETURNING id, name, monthly_fee, currency, rpm_limit, tpm_limit, monthly_spend_limit",
        )
        .bind(if plan.id.is_empty() { new_id("plan") } else { plan.id.clone() })
        .bind(&name)
        .bind(plan.monthly_fee)
        .bind(&plan.currency)
        .bind(plan.rpm_limit)
        .bind(plan.tpm_limit)
        .bind(plan.monthly_spend_limit)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| map_write_error(e, || format!("a plan named `{name}` already exists"), ""))?;
        Ok(plan_from(&row))
    }

    async fn list_plans(&self) -> Result<Vec<Plan>, StoreError> {
        let rows = sqlx::query("SELECT id, name, monthly_fee, currency, rpm_limit, tpm_limit, monthly_spend_limit FROM plans ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(plan_from).collect())
    }

    async fn add_price(&self, p: &Price) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO prices (model, tenant_id, effective_from, input_per_mtok, cached_input_per_mtok, output_per_mtok, currency) \
             VALUES ($1,$2,$3,$4,$5,$6,$7)",
        )
        .bind(&p.model)
        .bind(p.tenant_id.as_deref().unwrap_or(""))
        .bind(p.effective_from)
        .bind(p.input_per_mtok)
        .bind(p.cached_input_per_mtok)
        .bind(p.output_per_mtok)
        .bind(&p.currency)
        .execute(&self.pool)
        .await
        .map_err(|e| map_write_error(e, || format!("a price for `{}` effective at that time already exists", p.model), ""))?;
        Ok(())
    }

    async fn list_prices(&self, model: Option<&str>) -> Result<Vec<Price>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, tenant_id, effective_from, input_per_mtok, cached_input_per_mtok, output_per_mtok, currency \
             FROM prices WHERE ($1::text IS NULL OR model = $1) ORDER BY model, tenant_id, effective_from",
        )
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let tenant: String = r.get("tenant_id");
                Price {
                    model: r.get("model"),
                    tenant_id: (!tenant.is_empty()).then_some(tenant),
                    effective_from: r.get("effective_from"),
                    input_per_mtok: r.get("input_per_mtok"),
                    cached_input_per_mtok: r.get("cached_input_per_mtok"),
                    output_per_mtok: r.get("output_per_mtok"),
                    currency: r.get("currency"),
                }
            })
            .collect())
    }

    async fn add_discount(&self, d: &Discount) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO discounts (tenant_id, model, percent, effective_from, effective_to) VALUES ($1,$2,$3,$4,$5)")
            .bind(&d.tenant_id)
            .bind(d.model.as_deref().unwrap_or(""))
            .bind(d.percent)
            .bind(d.effective_from)
            .bind(d.effective_to)
            .execute(&self.pool)
            .await
            .map_err(|e| map_write_error(e, String::new, "no such tenant"))?;
        Ok(())
    }

    async fn list_discounts(&self, tenant_id: Option<&str>) -> Result<Vec<Discount>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant_id, model, percent, effective_from, effective_to FROM discounts \
             WHERE ($1::text IS NULL OR tenant_id = $1) ORDER BY tenant_id, effective_from",
        )
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let model: String = r.get("model");
                Discount {
                    tenant_id: r.get("tenant_id"),
                    model: (!model.is_empty()).then_some(model),
                    percent: r.get::<Decimal, _>("percent"),
                    effective_from: r.get("effective_from"),
                    effective_to: r.get("effective_to"),
                }
            })
            .collect())
    }

    async fn put_credential(&self, c: &StoredCredential) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO provider_credentials (name, provider, nonce, ciphertext, key_fingerprint) VALUES ($1,$2,$3,$4,$5) \
             ON CONFLICT (name) DO UPDATE SET provider = EXCLUDED.provider, nonce = EXCLUDED.nonce, \
             ciphertext = EXCLUDED.ciphertext, key_fingerprint = EXCLUDED.key_fingerprint, rotated_at = now()",
        )
        .bind(&c.name)
        .bind(&c.provider)
        .bind(&c.nonce)
        .bind(&c.ciphertext)
        .bind(&c.key_fingerprint)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_credentials(&self) -> Result<Vec<StoredCredential>, StoreError> {
        let rows = sqlx::query("SELECT name, provider, nonce, ciphertext, key_fingerprint FROM provider_credentials ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| StoredCredential {
                name: r.get("name"),
                provider: r.get("provider"),
                nonce: r.get("nonce"),
                ciphertext: r.get("ciphertext"),
                key_fingerprint: r.get("key_fingerprint"),
            })
            .collect())
    }

    async fn delete_credential(&self, name: &str) -> Result<(), StoreError> {
        let done = sqlx::query("DELETE FROM provider_credentials WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no credential `{name}`")));
        }
        Ok(())
    }

    async fn replace_credentials(
        &self,
        credentials: &[StoredCredential],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for c in credentials {
            sqlx::query(
                "UPDATE provider_credentials SET nonce = $2, ciphertext = $3, key_fingerprint = $4, rotated_at = now() WHERE name = $1",
            )
            .bind(&c.name)
            .bind(&c.nonce)
            .bind(&c.ciphertext)
            .bind(&c.key_fingerprint)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        details: &serde_json::Value,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO audit_log (actor, action, target, details) VALUES ($1,$2,$3,$4)")
            .bind(actor)
            .bind(action)
            .bind(target)
            .bind(details)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list_audit(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query("SELECT id, at, actor, action, target, details FROM audit_log ORDER BY id DESC LIMIT $1")
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                id: r.get("id"),
                at: r.get("at"),
                actor: r.get("actor"),
                action: r.get("action"),
                target: r.get("target"),
                details: r.get("details"),
            })
            .collect())
    }

    async fn set_tenant_limit(&self, limit: &TenantLimit) -> Result<(), StoreError> {
        limit.limits.validate()?;
        let l = &limit.limits;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tenant_limits (tenant_id, model, rpm_limit, tpm_limit, max_concurrent, \
             spend_limit, enforcement, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7, now()) \
             ON CONFLICT (tenant_id, model) DO UPDATE SET rpm_limit = EXCLUDED.rpm_limit, \
             tpm_limit = EXCLUDED.tpm_limit, max_concurrent = EXCLUDED.max_concurrent, \
             spend_limit = EXCLUDED.spend_limit, enforcement = EXCLUDED.enforcement, \
             updated_at = now()",
        )
        .bind(&limit.tenant_id)
        .bind(&limit.model)
        .bind(l.rpm_limit)
        .bind(l.tpm_limit)
        .bind(l.max_concurrent)
        .bind(l.spend_limit)
        .bind(l.enforcement.as_str())
        .execute(&mut *tx)
        .await
        .map_err(|e| map_write_error(e, String::new, "no such tenant"))?;
        notify(&mut tx, &Invalidation::Tenant(limit.tenant_id.clone())).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_tenant_limit(&self, tenant_id: &str, model: &str) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query("DELETE FROM tenant_limits WHERE tenant_id = $1 AND model = $2")
            .bind(tenant_id)
            .bind(model)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if deleted == 0 {
            return Err(StoreError::NotFound(format!(
                "no limits for tenant `{tenant_id}` and model `{model}`"
            )));
        }
        notify(&mut tx, &Invalidation::Tenant(tenant_id.to_string())).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_tenant_limits(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<Vec<TenantLimit>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {TENANT_LIMIT_COLUMNS} FROM tenant_limits \
             WHERE ($1::text IS NULL OR tenant_id = $1) ORDER BY tenant_id, model"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(tenant_limit_from).collect())
    }

    async fn usage(
        &self,
        tenant_id: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, minute, requests, input_tokens, cached_input_tokens, output_tokens, cost, currency, \
               cache_hits, cache_savings \
             FROM usage_minutes WHERE tenant_id = $1 AND minute >= $2 AND minute < $3 ORDER BY minute, model",
        )
        .bind(tenant_id)
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| UsageRow {
                model: r.get("model"),
                minute: r.get("minute"),
                requests: r.get("requests"),
                input_tokens: r.get("input_tokens"),
                cached_input_tokens: r.get("cached_input_tokens"),
                output_tokens: r.get("output_tokens"),
                cost: r.get("cost"),
                cache_hits: r.get("cache_hits"),
                cache_savings: r.get("cache_savings"),
                currency: r.get("currency"),
            })
            .collect())
    }

    async fn price_lines(
        &self,
        period: &str,
        tenant_id: Option<&str>,
    ) -> Result<Vec<PriceLine>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant_id, period, event_period, model, currency, price_from_ms, price_override, \
               input_per_mtok, cached_input_per_mtok, output_per_mtok, requests, input_tokens, \
               cached_input_tokens, cache_write_input_tokens, output_tokens, cost, cache_hits, \
               cache_savings \
             FROM usage_price_lines WHERE period = $1 AND ($2::TEXT IS NULL OR tenant_id = $2) \
             ORDER BY tenant_id, currency, model, event_period, price_from_ms, price_override",
        )
        .bind(period)
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| PriceLine {
                tenant_id: r.get("tenant_id"),
                period: r.get("period"),
                event_period: r.get("event_period"),
                model: r.get("model"),
                currency: r.get("currency"),
                price_from_ms: r.get("price_from_ms"),
                price_override: r.get("price_override"),
                input_per_mtok: r.get("input_per_mtok"),
                cached_input_per_mtok: r.get("cached_input_per_mtok"),
                output_per_mtok: r.get("output_per_mtok"),
                requests: r.get("requests"),
                input_tokens: r.get("input_tokens"),
                cached_input_tokens: r.get("cached_input_tokens"),
                cache_write_input_tokens: r.get("cache_write_input_tokens"),
                output_tokens: r.get("output_tokens"),
                cost: r.get("cost"),
                cache_hits: r.get("cache_hits"),
                cache_savings: r.get("cache_savings"),
            })
            .collect())
    }

    async fn closed_period(&self, period: &str) -> Result<Option<OffsetDateTime>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT closed_at FROM billing_periods WHERE period = $1")
                .bind(period)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn close_period(&self, period: &str, actor: &str) -> Result<OffsetDateTime, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The pipeline's commit holds SHARE on billing_periods while it books lines: EXCLUSIVE
        // waits for commits in flight, so no line lands in a period after it is closed.
        sqlx::query("LOCK TABLE billing_periods IN EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let closed: Option<OffsetDateTime> = sqlx::query_scalar(
            "INSERT INTO billing_periods (period, closed_at, closed_by) \
             VALUES ($1, date_trunc('second', now()), $2) \
             ON CONFLICT (period) DO NOTHING RETURNING closed_at",
        )
        .bind(period)
        .bind(actor)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(closed) = closed else {
            return Err(StoreError::Conflict(format!(
                "billing period {period} is already closed"
            )));
        };
        tx.commit().await?;
        Ok(closed)
    }

    fn ledger_location(&self) -> LedgerLocation {
        LedgerLocation::Postgres {
            url: self.url.clone(),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn watch(&self) -> Result<mpsc::Receiver<Invalidation>, StoreError> {
        let mut listener = PgListener::connect(&self.url).await?;
        listener.listen(CHANNEL).await?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) => {
                        if tx.send(Invalidation::decode(n.payload())).await.is_err() {
                            return;
                        }
                    }
                    // The connection dropped: notifications may have been missed. Say so, then
                    // wait until the listener is back (it re-subscribes on reconnect).
                    Ok(None) | Err(_) => {
                        if tx.send(Invalidation::Lost).await.is_err() {
                            return;
                        }
                        loop {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            if sqlx::query("SELECT 1").execute(&mut listener).await.is_ok() {
                                break;
                            }
                        }
                        if tx.send(Invalidation::All).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Ok(rx)
    }
}
