//! SQLite implementation of [`MetaStore`] for the embedded default.
//!
//! Money is decimal text, timestamps RFC 3339 text. SQLite has no `LISTEN`/`NOTIFY`:
//! mutations append to the `invalidations` table in their transaction, and [`MetaStore::watch`]
//! polls it every 200 ms, so other processes sharing the file hear of a revocation within
//! that interval.
//!
//! Several connections write to the file: this pool's, the embedded billing pipeline's, and
//! those of every other gateway process sharing the data directory. Transactions that write
//! therefore start with `BEGIN IMMEDIATE` ([`SqliteStore::begin_write`]): see there why a plain
//! `BEGIN` fails under that concurrency instead of waiting.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use rust_decimal::Decimal;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
};
use sqlx::{Row, Sqlite, Transaction};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::mpsc;

use super::{
    check_name, is_foreign_key_violation, is_unique_violation, new_id, AuditEntry, Discount,
    Enforcement, Invalidation, KeyLimits, KeyRecord, KeySummary, LedgerLocation, MetaStore, NewKey,
    Plan, Price, PriceLine, StoreError, StoredCredential, Tenant, TenantLimit, UsageRow,
};

/// How often other processes' invalidations are polled.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The embedded metadata store: `tollgate.db` in the data directory.
pub struct SqliteStore {
    pool: SqlitePool,
    data_dir: PathBuf,
}

fn ts(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn parse_ts(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

fn get_ts(r: &SqliteRow, col: &str) -> OffsetDateTime {
    let s: String = r.get(col);
    parse_ts(&s).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn get_opt_ts(r: &SqliteRow, col: &str) -> Option<OffsetDateTime> {
    r.get::<Option<String>, _>(col)
        .as_deref()
        .and_then(parse_ts)
}

fn get_dec(r: &SqliteRow, col: &str) -> Decimal {
    let s: String = r.get(col);
    Decimal::from_str(&s).unwrap_or_default()
}

fn get_opt_dec(r: &SqliteRow, col: &str) -> Option<Decimal> {
    r.get::<Option<String>, _>(col)
        .and_then(|s| Decimal::from_str(&s).ok())
}

fn get_json(r: &SqliteRow, col: &str) -> serde_json::Value {
    r.get::<Option<String>, _>(col)
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(serde_json::Value::Null)
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `data_dir` and applies migrations.
    /// The database file's name in the data directory.
    pub const FILE_NAME: &'static str = "tollgate.db";

    /// Whether `data_dir` holds a store (that [`SqliteStore::open`] would open, not create).
    pub fn exists_in(data_dir: &Path) -> bool {
        data_dir.join(Self::FILE_NAME).is_file()
    }

    /// Opens the store in `data_dir`, creating the directory and the database if needed.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Invalid(format!(
                "cannot create data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join(Self::FILE_NAME))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("../schemas/migrations/sqlite")
            .run(&pool)
            .await?;
        Ok(SqliteStore {
            pool,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// Begins a transaction that will write, taking the database's write lock now.
    ///
    /// A plain (deferred) `BEGIN` takes a read snapshot at the first `SELECT` and asks for the
    /// write lock only at the first write. If another connection holds the write lock then,
    /// or has committed since the snapshot was taken, SQLite cannot upgrade the transaction
    /// and answers `SQLITE_BUSY` ("database is locked") at once, without waiting out the busy
    /// timeout: waiting could deadlock, or the snapshot is stale anyway. A revocation or a
    /// rotation made while another gateway process (or the billing pipeline) was writing
    /// failed that way. `BEGIN IMMEDIATE` asks for the write lock before reading anything,
    /// which does wait (up to the busy timeout), and the reads then see the latest data.
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

async fn publish(tx: &mut Transaction<'_, Sqlite>, inv: &Invalidation) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO invalidations (target, at) VALUES (?, ?)")
        .bind(inv.encode())
        .bind(ts(OffsetDateTime::now_utc()))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn tenant_from(r: &SqliteRow) -> Tenant {
    Tenant {
        id: r.get("id"),
        name: r.get("name"),
        status: r.get("status"),
        plan_id: r.get("plan_id"),
        created_at: get_ts(r, "created_at"),
    }
}

fn limits_from(r: &SqliteRow) -> KeyLimits {
    KeyLimits {
        rpm_limit: r.get("rpm_limit"),
        tpm_limit: r.get("tpm_limit"),
        spend_limit: get_opt_dec(r, "spend_limit"),
        max_concurrent: r.get("max_concurrent"),
        enforcement: Enforcement::parse(r.get("enforcement")),
    }
}

fn tenant_limit_from(r: &SqliteRow) -> TenantLimit {
    TenantLimit {
        tenant_id: r.get("tenant_id"),
        model: r.get("model"),
        limits: limits_from(r),
    }
}

fn models_from(r: &SqliteRow) -> Option<Vec<String>> {
    serde_json::from_value(get_json(r, "allowed_models")).ok()
}

const KEY_COLUMNS: &str = "id, tenant_id, name, key_prefix, status, created_at, expires_at, \
     last_used_at, allowed_models, rpm_limit, tpm_limit, spend_limit, max_concurrent, \
     enforcement, metadata";

fn key_summary_from(r: &SqliteRow) -> KeySummary {
    KeySummary {
        id: r.get("id"),
        tenant_id: r.get("tenant_id"),
        name: r.get("name"),
        prefix: r.get("key_prefix"),
        status: r.get("status"),
        created_at: get_ts(r, "created_at"),
        expires_at: get_opt_ts(r, "expires_at"),
        last_used_at: get_opt_ts(r, "last_used_at"),
        allowed_models: models_from(r),
        limits: limits_from(r),
        metadata: get_json(r, "metadata"),
    }
}

fn plan_from(r: &SqliteRow) -> Plan {
    Plan {
        id: r.get("id"),
        name: r.get("name"),
        monthly_fee: get_dec(r, "monthly_fee"),
        currency: r.get("currency"),
        rpm_limit: r.get("rpm_limit"),
        tpm_limit: r.get("tpm_limit"),
        monthly_spend_limit: get_opt_dec(r, "monthly_spend_limit"),
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

fn models_json(m: &Option<Vec<String>>) -> Option<String> {
    m.as_ref().map(|m| serde_json::json!(m).to_string())
}

#[async_trait]
impl MetaStore for SqliteStore {
    async fn create_tenant(&self, name: &str, plan_id: Option<&str>) -> Result<Tenant, StoreError> {
        let name = check_name("tenant", name)?;
        let id = new_id("ten");
        let now = OffsetDateTime::now_utc();
        sqlx::query("INSERT INTO tenants (id, name, status, plan_id, created_at) VALUES (?, ?, 'active', ?, ?)")
            .bind(&id)
            .bind(&name)
            .bind(plan_id)
            .bind(ts(now))
            .execute(&self.pool)
            .await
            .map_err(|e| map_write_error(e, || format!("a tenant named `{name}` already exists"), "no such plan"))?;
        Ok(Tenant {
            id,
            name,
            status: "active".to_string(),
            plan_id: plan_id.map(str::to_string),
            created_at: parse_ts(&ts(now)).unwrap_or(now),
        })
    }

    async fn tenant(&self, id_or_name: &str) -> Result<Option<Tenant>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, status, plan_id, created_at FROM tenants WHERE id = ?1 OR name = ?1 \
             ORDER BY (id = ?1) DESC LIMIT 1",
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
        let mut tx = self.begin_write().await?;
        let done = sqlx::query("UPDATE tenants SET status = ? WHERE id = ?")
            .bind(status)
            .bind(tenant_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no tenant `{tenant_id}`")));
        }
        publish(&mut tx, &Invalidation::Tenant(tenant_id.to_string())).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_tenant_plan(
        &self,
        tenant_id: &str,
        plan_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let done = sqlx::query("UPDATE tenants SET plan_id = ? WHERE id = ?")
            .bind(plan_id)
            .bind(tenant_id)
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
        let id = new_id("key");
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, key_hash, key_prefix, status, created_at, expires_at, \
             allowed_models, rpm_limit, tpm_limit, spend_limit, max_concurrent, enforcement, metadata) \
             VALUES (?, ?, ?, ?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&key.tenant_id)
        .bind(&key.name)
        .bind(key_hash)
        .bind(prefix)
        .bind(ts(OffsetDateTime::now_utc()))
        .bind(key.expires_at.map(ts))
        .bind(models_json(&key.allowed_models))
        .bind(key.limits.rpm_limit)
        .bind(key.limits.tpm_limit)
        .bind(key.limits.spend_limit.map(|d| d.to_string()))
        .bind(key.limits.max_concurrent)
        .bind(key.limits.enforcement.as_str())
        .bind(if key.metadata.is_null() { "{}".to_string() } else { key.metadata.to_string() })
        .execute(&self.pool)
        .await
        .map_err(|e| map_write_error(e, || "key collision, try again".to_string(), "no such tenant"))?;
        self.key_summary(&id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no key `{id}`")))
    }

    async fn key_by_hash(&self, key_hash: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT k.id AS key_id, k.status AS key_status, k.expires_at, k.allowed_models, \
                    k.rpm_limit, k.tpm_limit, k.spend_limit, k.max_concurrent, k.enforcement, \
                    t.id AS tenant_id, t.name AS tenant_name, t.status AS tenant_status, \
                    p.id AS plan_id, p.currency AS plan_currency, p.rpm_limit AS plan_rpm, \
                    p.tpm_limit AS plan_tpm, p.monthly_spend_limit AS plan_spend \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id \
             LEFT JOIN plans p ON p.id = t.plan_id WHERE k.key_hash = ?",
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
            expires_at: get_opt_ts(&r, "expires_at"),
            tenant_id,
            tenant_name: r.get("tenant_name"),
            tenant_status: r.get("tenant_status"),
            allowed_models: models_from(&r),
            limits: limits_from(&r),
            tenant_limits,
            plan_limits: has_plan.then(|| KeyLimits {
                rpm_limit: r.get("plan_rpm"),
                tpm_limit: r.get("plan_tpm"),
                spend_limit: get_opt_dec(&r, "plan_spend"),
                ..KeyLimits::default()
            }),
            currency: r
                .get::<Option<String>, _>("plan_currency")
                .unwrap_or_else(|| "USD".to_string()),
        }))
    }

    async fn key_summary(&self, key_id: &str) -> Result<Option<KeySummary>, StoreError> {
        let row = sqlx::query(&format!("SELECT {KEY_COLUMNS} FROM api_keys WHERE id = ?"))
            .bind(key_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(key_summary_from))
    }

    async fn key_id_by_hash(&self, key_hash: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT id FROM api_keys WHERE key_hash = ?")
                .bind(key_hash)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn list_keys(&self, tenant_id: Option<&str>) -> Result<Vec<KeySummary>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE (?1 IS NULL OR tenant_id = ?1) ORDER BY created_at, id"
        ))
        .bind(tenant_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(key_summary_from).collect())
    }

    async fn revoke_key(&self, key_id: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT key_hash, status FROM api_keys WHERE id = ?")
                .bind(key_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (hash, status) =
            row.ok_or_else(|| StoreError::NotFound(format!("no key `{key_id}`")))?;
        if status != "active" {
            return Err(StoreError::Conflict(format!(
                "key `{key_id}` is already revoked"
            )));
        }
        sqlx::query("UPDATE api_keys SET status = 'revoked', revoked_at = ? WHERE id = ?")
            .bind(ts(OffsetDateTime::now_utc()))
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        publish(&mut tx, &Invalidation::Key(hash)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn rotate_key(
        &self,
        key_id: &str,
        new_hash: &str,
        new_prefix: &str,
    ) -> Result<KeySummary, StoreError> {
        let mut tx = self.begin_write().await?;
        let row: Option<(String, String)> =
            sqlx::query_as("SELECT key_hash, status FROM api_keys WHERE id = ?")
                .bind(key_id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((old_hash, "active")) = row.as_ref().map(|(h, s)| (h.clone(), s.as_str())) else {
            return Err(StoreError::NotFound(format!("no active key `{key_id}`")));
        };
        let now = ts(OffsetDateTime::now_utc());
        sqlx::query("UPDATE api_keys SET status = 'revoked', revoked_at = ? WHERE id = ?")
            .bind(&now)
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        let new_key_id = new_id("key");
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, key_hash, key_prefix, status, created_at, expires_at, \
             allowed_models, rpm_limit, tpm_limit, spend_limit, metadata) \
             SELECT ?, tenant_id, name, ?, ?, 'active', ?, expires_at, allowed_models, rpm_limit, tpm_limit, \
             spend_limit, metadata FROM api_keys WHERE id = ?",
        )
        .bind(&new_key_id)
        .bind(new_hash)
        .bind(new_prefix)
        .bind(&now)
        .bind(key_id)
        .execute(&mut *tx)
        .await?;
        publish(&mut tx, &Invalidation::Key(old_hash)).await?;
        tx.commit().await?;
        self.key_summary(&new_key_id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no key `{new_key_id}`")))
    }

    async fn update_key(
        &self,
        key_id: &str,
        allowed_models: Option<Vec<String>>,
        limits: &KeyLimits,
    ) -> Result<(), StoreError> {
        limits.validate()?;
        let mut tx = self.begin_write().await?;
        let hash: Option<String> = sqlx::query_scalar("SELECT key_hash FROM api_keys WHERE id = ?")
            .bind(key_id)
            .fetch_optional(&mut *tx)
            .await?;
        let hash = hash.ok_or_else(|| StoreError::NotFound(format!("no key `{key_id}`")))?;
        sqlx::query(
            "UPDATE api_keys SET allowed_models = ?, rpm_limit = ?, tpm_limit = ?, spend_limit = ?, \
             max_concurrent = ?, enforcement = ? WHERE id = ?",
        )
            .bind(models_json(&allowed_models))
            .bind(limits.rpm_limit)
            .bind(limits.tpm_limit)
            .bind(limits.spend_limit.map(|d| d.to_string()))
            .bind(limits.max_concurrent)
            .bind(limits.enforcement.as_str())
            .bind(key_id)
            .execute(&mut *tx)
            .await?;
        publish(&mut tx, &Invalidation::Key(hash)).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn touch_keys(&self, key_ids: &[String], at: OffsetDateTime) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for id in key_ids {
            sqlx::query("UPDATE api_keys SET last_used_at = ? WHERE id = ?")
                .bind(ts(at))
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_plan(&self, plan: &Plan) -> Result<Plan, StoreError> {
        let name = check_name("plan", &plan.name)?;
        let id = if plan.id.is_empty() {
            new_id("plan")
        } else {
            plan.id.clone()
        };
        sqlx::query(
            "INSERT INTO plans (id, name, monthly_fee, currency, rpm_limit, tpm_limit, monthly_spend_limit, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&name)
        .bind(plan.monthly_fee.to_string())
        .bind(&plan.currency)
        .bind(plan.rpm_limit)
        .bind(plan.tpm_limit)
        .bind(plan.monthly_spend_limit.map(|d| d.to_string()))
        .bind(ts(OffsetDateTime::now_utc()))
        .execute(&self.pool)
        .await
        .map_err(|e| map_write_error(e, || format!("a plan named `{name}` already exists"), ""))?;
        Ok(Plan {
            id,
            name,
            ..plan.clone()
        })
    }

    async fn list_plans(&self) -> Result<Vec<Plan>, StoreError> {
        let rows = sqlx::query("SELECT id, name, monthly_fee, currency, rpm_limit, tpm_limit, monthly_spend_limit FROM plans ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(plan_from).collect())
    }

    async fn add_price(&self, p: &Price) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO prices (model, tenant_id, effective_from, input_per_mtok, cached_input_per_mtok, output_per_mtok, currency, created_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&p.model)
        .bind(p.tenant_id.as_deref().unwrap_or(""))
        .bind(ts(p.effective_from))
        .bind(p.input_per_mtok.to_string())
        .bind(p.cached_input_per_mtok.to_string())
        .bind(p.output_per_mtok.to_string())
        .bind(&p.currency)
        .bind(ts(OffsetDateTime::now_utc()))
        .execute(&self.pool)
        .await
        .map_err(|e| map_write_error(e, || format!("a price for `{}` effective at that time already exists", p.model), ""))?;
        Ok(())
    }

    async fn list_prices(&self, model: Option<&str>) -> Result<Vec<Price>, StoreError> {
        let rows = sqlx::query(
            "SELECT model, tenant_id, effective_from, input_per_mtok, cached_input_per_mtok, output_per_mtok, currency \
             FROM prices WHERE (?1 IS NULL OR model = ?1) ORDER BY model, tenant_id, effective_from",
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
                    effective_from: get_ts(r, "effective_from"),
                    input_per_mtok: get_dec(r, "input_per_mtok"),
                    cached_input_per_mtok: get_dec(r, "cached_input_per_mtok"),
                    output_per_mtok: get_dec(r, "output_per_mtok"),
                    currency: r.get("currency"),
                }
            })
            .collect())
    }

    async fn add_discount(&self, d: &Discount) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO discounts (tenant_id, model, percent, effective_from, effective_to, created_at) VALUES (?, ?, ?, ?, ?, ?)")
            .bind(&d.tenant_id)
            .bind(d.model.as_deref().unwrap_or(""))
            .bind(d.percent.to_string())
            .bind(ts(d.effective_from))
            .bind(d.effective_to.map(ts))
            .bind(ts(OffsetDateTime::now_utc()))
            .execute(&self.pool)
            .await
            .map_err(|e| map_write_error(e, String::new, "no such tenant"))?;
        Ok(())
    }

    async fn list_discounts(&self, tenant_id: Option<&str>) -> Result<Vec<Discount>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant_id, model, percent, effective_from, effective_to FROM discounts \
             WHERE (?1 IS NULL OR tenant_id = ?1) ORDER BY tenant_id, effective_from",
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
                    percent: get_dec(r, "percent"),
                    effective_from: get_ts(r, "effective_from"),
                    effective_to: get_opt_ts(r, "effective_to"),
                }
            })
            .collect())
    }

    async fn put_credential(&self, c: &StoredCredential) -> Result<(), StoreError> {
        let now = ts(OffsetDateTime::now_utc());
        sqlx::query(
            "INSERT INTO provider_credentials (name, provider, nonce, ciphertext, key_fingerprint, created_at) \
             VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET provider = excluded.provider, \
             nonce = excluded.nonce, ciphertext = excluded.ciphertext, key_fingerprint = excluded.key_fingerprint, \
             rotated_at = excluded.created_at",
        )
        .bind(&c.name)
        .bind(&c.provider)
        .bind(&c.nonce)
        .bind(&c.ciphertext)
        .bind(&c.key_fingerprint)
        .bind(&now)
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
        let done = sqlx::query("DELETE FROM provider_credentials WHERE name = ?")
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
        let mut tx = self.begin_write().await?;
        let now = ts(OffsetDateTime::now_utc());
        for c in credentials {
            sqlx::query("UPDATE provider_credentials SET nonce = ?, ciphertext = ?, key_fingerprint = ?, rotated_at = ? WHERE name = ?")
                .bind(&c.nonce)
                .bind(&c.ciphertext)
                .bind(&c.key_fingerprint)
                .bind(&now)
                .bind(&c.name)
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
        sqlx::query(
            "INSERT INTO audit_log (at, actor, action, target, details) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(ts(OffsetDateTime::now_utc()))
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(details.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_audit(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, details FROM audit_log ORDER BY id DESC LIMIT ?",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                id: r.get("id"),
                at: get_ts(r, "at"),
                actor: r.get("actor"),
                action: r.get("action"),
                target: r.get("target"),
                details: get_json(r, "details"),
            })
            .collect())
    }

    async fn set_tenant_limit(&self, limit: &TenantLimit) -> Result<(), StoreError> {
        limit.limits.validate()?;
        let l = &limit.limits;
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO tenant_limits (tenant_id, model, rpm_limit, tpm_limit, max_concurrent, \
             spend_limit, enforcement, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) \
             ON CONFLICT (tenant_id, model) DO UPDATE SET rpm_limit = excluded.rpm_limit, \
             tpm_limit = excluded.tpm_limit, max_concurrent = excluded.max_concurrent, \
             spend_limit = excluded.spend_limit, enforcement = excluded.enforcement, \
             updated_at = excluded.updated_at",
        )
        .bind(&limit.tenant_id)
        .bind(&limit.model)
        .bind(l.rpm_limit)
        .bind(l.tpm_limit)
        .bind(l.max_concurrent)
        .bind(l.spend_limit.map(|d| d.to_string()))
        .bind(l.enforcement.as_str())
        .bind(ts(OffsetDateTime::now_utc()))
        .execute(&mut *tx)
        .await
        .map_err(|e| map_write_error(e, String::new, "no such tenant"))?;
        publish(&mut tx, &Invalidation::Tenant(limit.tenant_id.clone())).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_tenant_limit(&self, tenant_id: &str, model: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let deleted = sqlx::query("DELETE FROM tenant_limits WHERE tenant_id = ? AND model = ?")
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
        publish(&mut tx, &Invalidation::Tenant(tenant_id.to_string())).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_tenant_limits(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<Vec<TenantLimit>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant_id, model, rpm_limit, tpm_limit, max_concurrent, spend_limit, enforcement \
             FROM tenant_limits WHERE (? IS NULL OR tenant_id = ?) ORDER BY tenant_id, model",
        )
        .bind(tenant_id)
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
             FROM usage_minutes WHERE tenant_id = ? AND minute >= ? AND minute < ? ORDER BY minute, model",
        )
        .bind(tenant_id)
        .bind(ts(from))
        .bind(ts(to))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| UsageRow {
                model: r.get("model"),
                minute: get_ts(r, "minute"),
                requests: r.get("requests"),
                input_tokens: r.get("input_tokens"),
                cached_input_tokens: r.get("cached_input_tokens"),
                output_tokens: r.get("output_tokens"),
                cost: get_dec(r, "cost"),
                cache_hits: r.get("cache_hits"),
                cache_savings: get_dec(r, "cache_savings"),
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
             FROM usage_price_lines WHERE period = ? AND (? IS NULL OR tenant_id = ?) \
             ORDER BY tenant_id, currency, model, event_period, price_from_ms, price_override",
        )
        .bind(period)
        .bind(tenant_id)
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
                price_override: r.get::<i64, _>("price_override") != 0,
                input_per_mtok: get_dec(r, "input_per_mtok"),
                cached_input_per_mtok: get_dec(r, "cached_input_per_mtok"),
                output_per_mtok: get_dec(r, "output_per_mtok"),
                requests: r.get("requests"),
                input_tokens: r.get("input_tokens"),
                cached_input_tokens: r.get("cached_input_tokens"),
                cache_write_input_tokens: r.get("cache_write_input_tokens"),
                output_tokens: r.get("output_tokens"),
                cost: get_dec(r, "cost"),
                cache_hits: r.get("cache_hits"),
                cache_savings: get_dec(r, "cache_savings"),
            })
            .collect())
    }

    async fn closed_period(&self, period: &str) -> Result<Option<OffsetDateTime>, StoreError> {
        let at: Option<String> =
            sqlx::query_scalar("SELECT closed_at FROM billing_periods WHERE period = ?")
                .bind(period)
                .fetch_optional(&self.pool)
                .await?;
        Ok(at.as_deref().and_then(parse_ts))
    }

    async fn close_period(&self, period: &str, actor: &str) -> Result<OffsetDateTime, StoreError> {
        // One INSERT is its own write transaction: the pipeline's commit, which reads
        // `billing_periods` inside its write transaction, sees the period either open or closed.
        let now = OffsetDateTime::now_utc();
        let now = now.replace_nanosecond(0).unwrap_or(now);
        sqlx::query("INSERT INTO billing_periods (period, closed_at, closed_by) VALUES (?, ?, ?)")
            .bind(period)
            .bind(ts(now))
            .bind(actor)
            .execute(&self.pool)
            .await
            .map_err(|e| {
                if is_unique_violation(&e) {
                    StoreError::Conflict(format!("billing period {period} is already closed"))
                } else {
                    StoreError::Database(e)
                }
            })?;
        Ok(now)
    }

    fn ledger_location(&self) -> LedgerLocation {
        LedgerLocation::Sqlite {
            data_dir: self.data_dir.clone(),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn watch(&self) -> Result<mpsc::Receiver<Invalidation>, StoreError> {
        let pool = self.pool.clone();
        let mut last: i64 = sqlx::query_scalar("SELECT COALESCE(MAX(id), 0) FROM invalidations")
            .fetch_one(&pool)
            .await?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            let mut healthy = true;
            loop {
                tokio::time::sleep(POLL_INTERVAL).await;
                let rows: Result<Vec<(i64, String)>, _> =
                    sqlx::query_as("SELECT id, target FROM invalidations WHERE id > ? ORDER BY id")
                        .bind(last)
                        .fetch_all(&pool)
                        .await;
                let sent = match rows {
                    Ok(rows) => {
                        let mut ok = true;
                        if !healthy {
                            healthy = true;
                            ok &= tx.send(Invalidation::All).await.is_ok();
                        }
                        for (id, target) in rows {
                            last = id;
                            ok &= tx.send(Invalidation::decode(&target)).await.is_ok();
                        }
                        ok
                    }
                    Err(_) if healthy => {
                        healthy = false;
                        tx.send(Invalidation::Lost).await.is_ok()
                    }
                    Err(_) => true,
                };
                if !sent {
                    return;
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tenants_keys_and_revocation_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let t = store.create_tenant("acme", None).await.unwrap();
        assert!(matches!(
            store.create_tenant("acme", None).await,
            Err(StoreError::Conflict(_))
        ));
        let k = crate::auth::keys::generate();
        let spec = NewKey {
            tenant_id: t.id.clone(),
            name: "ci".into(),
            ..Default::default()
        };
        let summary = store
            .create_key(&spec, &k.hash, &k.display_prefix)
            .await
            .unwrap();
        let mut watch = store.watch().await.unwrap();
        drop(store);
        // Migrations apply again, idempotently.
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let rec = store.key_by_hash(&k.hash).await.unwrap().unwrap();
        assert_eq!(rec.tenant_name, "acme");
        store.revoke_key(&summary.id).await.unwrap();
        assert!(matches!(
            store.revoke_key(&summary.id).await,
            Err(StoreError::Conflict(_))
        ));
        let inv = tokio::time::timeout(Duration::from_secs(2), watch.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(inv, Invalidation::Key(k.hash.clone()));
        assert_eq!(
            store
                .key_by_hash(&k.hash)
                .await
                .unwrap()
                .unwrap()
                .key_status,
            "revoked"
        );
    }

    /// Holds the database's write lock on a connection of its own (as another gateway
    /// process, or the billing pipeline, does while it writes) until the returned sender fires.
    async fn hold_write_lock(dir: &Path) -> tokio::sync::oneshot::Sender<()> {
        use sqlx::{ConnectOptions, Connection};
        let mut other = SqliteConnectOptions::new()
            .filename(dir.join("tollgate.db"))
            .connect()
            .await
            .unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut other)
            .await
            .unwrap();
        sqlx::query("INSERT INTO invalidations (target, at) VALUES ('all', '')")
            .execute(&mut other)
            .await
            .unwrap();
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = released.await;
            sqlx::query("COMMIT").execute(&mut other).await.unwrap();
            other.close().await.unwrap();
        });
        release
    }

    #[tokio::test]
    async fn revoking_and_rotating_wait_for_another_writer_instead_of_failing() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SqliteStore::open(dir.path()).await.unwrap());
        let t = store.create_tenant("acme", None).await.unwrap();
        let spec = NewKey {
            tenant_id: t.id.clone(),
            name: "ci".into(),
            ..Default::default()
        };
        let first = crate::auth::keys::generate();
        let first = store
            .create_key(&spec, &first.hash, &first.display_prefix)
            .await
            .unwrap();
        let second = crate::auth::keys::generate();
        let second = store
            .create_key(&spec, &second.hash, &second.display_prefix)
            .await
            .unwrap();

        // With a deferred BEGIN these read, then find the write lock taken and fail at once
        // with "database is locked"; they must wait for it instead.
        let release = hold_write_lock(dir.path()).await;
        let revoking = tokio::spawn({
            let store = store.clone();
            async move { store.revoke_key(&first.id).await }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = release.send(());
        revoking.await.unwrap().unwrap();

        let release = hold_write_lock(dir.path()).await;
        let rotating = tokio::spawn({
            let store = store.clone();
            let new = crate::auth::keys::generate();
            async move {
                store
                    .rotate_key(&second.id, &new.hash, &new.display_prefix)
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = release.send(());
        let rotated = rotating.await.unwrap().unwrap();
        assert_eq!(rotated.status, "active");
    }
}
