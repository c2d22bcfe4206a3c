//! The metadata store seam: plans, tenants, API keys, the price book, discounts, provider
//! credentials (encrypted), the audit trail and the usage ledger's read side.
//!
//! | file | implementation |
//! |---|---|
//! | `postgres.rs` | production: PostgreSQL; invalidations by `LISTEN`/`NOTIFY` |
//! | `sqlite.rs` | embedded default: one file in the data directory; invalidations by polling |
//!
//! Mutations that can change the outcome of authentication (revoking a key, changing its
//! limits or models, suspending a tenant) publish an [`Invalidation`] in the same transaction,
//! so every gateway sharing the store drops its cached copy within a second.

pub mod postgres;
pub mod sqlite;

use async_trait::async_trait;
use rust_decimal::Decimal;
use serde::Serialize;
use time::OffsetDateTime;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A uniqueness or state conflict (duplicate name, already revoked...).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    /// Input the store refuses (bad limits, bad dates...).
    #[error("{0}")]
    Invalid(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub status: String,
    pub plan_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// Whether crossing a token or spend limit cuts a running stream (`hard`) or lets it finish
/// and refuses the next requests (`soft`). Request and concurrency limits only ever refuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Enforcement {
    #[default]
    Hard,
    Soft,
}

impl Enforcement {
    pub fn as_str(self) -> &'static str {
        match self {
            Enforcement::Hard => "hard",
            Enforcement::Soft => "soft",
        }
    }

    /// Parses the stored form; anything but `soft` is `hard` (the safe reading).
    pub fn parse(s: &str) -> Enforcement {
        if s == "soft" {
            Enforcement::Soft
        } else {
            Enforcement::Hard
        }
    }
}

/// The limits of one scope (a key, a tenant, a tenant × model): requests and tokens (input +
/// output) per minute, concurrent requests, and spend per billing period.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct KeyLimits {
    #[serde(default)]
    pub rpm_limit: Option<i64>,
    #[serde(default)]
    pub tpm_limit: Option<i64>,
    #[serde(with = "rust_decimal::serde::str_option", default)]
    pub spend_limit: Option<Decimal>,
    #[serde(default)]
    pub max_concurrent: Option<i64>,
    #[serde(default)]
    pub enforcement: Enforcement,
}

impl KeyLimits {
    /// Refuses non-positive request/token/concurrency limits and a spend limit out of range
    /// (`tollgate_schemas::pricing::check_amount`).
    pub fn validate(&self) -> Result<(), StoreError> {
        for (name, v) in [
            ("rpm_limit", self.rpm_limit),
            ("tpm_limit", self.tpm_limit),
            ("max_concurrent", self.max_concurrent),
        ] {
            if matches!(v, Some(n) if n <= 0) {
                return Err(StoreError::Invalid(format!(
                    "{name} must be a positive integer"
                )));
            }
        }
        if let Some(s) = self.spend_limit {
            tollgate_schemas::pricing::check_amount(s)
                .map_err(|e| StoreError::Invalid(format!("spend_limit {e}")))?;
        }
        Ok(())
    }

    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        self.rpm_limit.is_none()
            && self.tpm_limit.is_none()
            && self.spend_limit.is_none()
            && self.max_concurrent.is_none()
    }
}

/// Limits of a tenant (`model` `*`) or of a tenant × model alias.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TenantLimit {
    pub tenant_id: String,
    /// A model alias as clients name it, or `*` for the whole tenant.
    pub model: String,
    #[serde(flatten)]
    pub limits: KeyLimits,
}

/// The model name of a tenant-wide limit row.
pub const ALL_MODELS: &str = "*";

/// What authentication needs to know about a key.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub key_id: String,
    pub key_status: String,
    pub expires_at: Option<OffsetDateTime>,
    pub tenant_id: String,
    pub tenant_name: String,
    pub tenant_status: String,
    pub allowed_models: Option<Vec<String>>,
    pub limits: KeyLimits,
    /// The tenant's limit rows (tenant-wide `*` and per model).
    pub tenant_limits: Vec<TenantLimit>,
    /// The tenant's plan limits, which apply when there is no `*` row.
    pub plan_limits: Option<KeyLimits>,
    /// The currency of the tenant's spend limits (its plan's; `USD` without a plan).
    pub currency: String,
}

/// A key as listed (never the secret, never the hash).
#[derive(Debug, Clone, Serialize)]
pub struct KeySummary {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub prefix: String,
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<OffsetDateTime>,
    pub allowed_models: Option<Vec<String>>,
    #[serde(flatten)]
    pub limits: KeyLimits,
    pub metadata: serde_json::Value,
}

/// Everything about a new key but its secret.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    pub tenant_id: String,
    pub name: String,
    pub expires_at: Option<OffsetDateTime>,
    pub allowed_models: Option<Vec<String>>,
    pub limits: KeyLimits,
    pub metadata: serde_json::Value,
}

/// A plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub id: String,
    pub name: String,
    #[serde(with = "rust_decimal::serde::str")]
    pub monthly_fee: Decimal,
    pub currency: String,
    pub rpm_limit: Option<i64>,
    pub tpm_limit: Option<i64>,
    #[serde(with = "rust_decimal::serde::str_option")]
    pub monthly_spend_limit: Option<Decimal>,
}

/// One price-book entry: prices per million tokens, in force from `effective_from` until the
/// next entry for the same model and tenant.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Price {
    pub model: String,
    /// `None`: the list price; `Some(tenant)`: that tenant's override.
    pub tenant_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub effective_from: OffsetDateTime,
    #[serde(with = "rust_decimal::serde::str")]
    pub input_per_mtok: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub cached_input_per_mtok: Decimal,
    #[serde(with = "rust_decimal::serde::str")]
    pub output_per_mtok: Decimal,
    pub currency: String,
}

/// The price book by model, as billing applies it: store entries turned into
/// [`PriceSchedule`]s (one per model, every tenant override and effective date included).
pub fn price_schedules(
    prices: Vec<Price>,
) -> std::collections::HashMap<String, tollgate_schemas::pricing::PriceSchedule> {
    let mut rows: std::collections::HashMap<String, Vec<tollgate_schemas::pricing::PriceRow>> =
        std::collections::HashMap::new();
    for p in prices {
        rows.entry(p.model.clone())
            .or_default()
            .push(tollgate_schemas::pricing::PriceRow {
                model: p.model,
                tenant_id: p.tenant_id,
                effective_from_ms: tollgate_schemas::events::offset_unix_ms(p.effective_from),
                input_per_mtok: p.input_per_mtok,
                cached_input_per_mtok: p.cached_input_per_mtok,
                output_per_mtok: p.output_per_mtok,
                currency: p.currency,
            });
    }
    rows.into_iter()
        .map(|(model, rows)| (model, tollgate_schemas::pricing::PriceSchedule::new(rows)))
        .collect()
}

/// A percentage discount for a tenant (all models when `model` is `None`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Discount {
    pub tenant_id: String,
    pub model: Option<String>,
    #[serde(with = "rust_decimal::serde::str")]
    pub percent: Decimal,
    #[serde(with = "time::serde::rfc3339")]
    pub effective_from: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub effective_to: Option<OffsetDateTime>,
}

/// A provider credential as stored: encrypted.
#[derive(Debug, Clone)]
pub struct StoredCredential {
    pub name: String,
    pub provider: String,
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
    pub key_fingerprint: String,
}

/// One admin action.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    pub id: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub details: serde_json::Value,
}

/// Ledger usage for one tenant × model × minute.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub model: String,
    pub minute: OffsetDateTime,
    pub requests: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    /// Billed, cache hits included.
    pub cost: Decimal,
    pub currency: String,
    /// Requests answered from the response cache (included in `requests`).
    pub cache_hits: i64,
    /// What those hits saved: the part of their original answers' price not billed.
    pub cache_savings: Decimal,
}

/// One invoice line of the ledger (`usage_price_lines`): a tenant's usage in a booking
/// `period` (YYYY-MM) that happened in `event_period`, for one model at one price in force.
/// `event_period != period` marks a late adjustment of an earlier, closed period.
#[derive(Debug, Clone, PartialEq)]
pub struct PriceLine {
    pub tenant_id: String,
    pub period: String,
    pub event_period: String,
    pub model: String,
    pub currency: String,
    /// When the applied price took effect (Unix ms); `-1`: unpriced.
    pub price_from_ms: i64,
    /// A tenant-specific override rather than the list price.
    pub price_override: bool,
    pub input_per_mtok: Decimal,
    pub cached_input_per_mtok: Decimal,
    pub output_per_mtok: Decimal,
    pub requests: i64,
    /// All prompt tokens (cached and cache-write included).
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub cache_write_input_tokens: i64,
    pub output_tokens: i64,
    /// Exact cost, never rounded (cache hits included, at the fraction billed).
    pub cost: Decimal,
    /// Requests answered from the response cache (included in `requests`; their tokens are
    /// not in the token counts, which are what providers processed).
    pub cache_hits: i64,
    /// What those hits saved the tenant.
    pub cache_savings: Decimal,
}

/// Where a store's usage ledger lives: the billing pipeline writes it into the store's own
/// database, and [`MetaStore::usage`] reads it back.
#[derive(Clone, PartialEq, Eq)]
pub enum LedgerLocation {
    /// `tollgate.db` in this data directory.
    Sqlite { data_dir: std::path::PathBuf },
    /// This PostgreSQL database (the URL may hold a password: never log it).
    Postgres { url: String },
}

impl std::fmt::Debug for LedgerLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LedgerLocation::Sqlite { data_dir } => f
                .debug_struct("Sqlite")
                .field("data_dir", data_dir)
                .finish(),
            LedgerLocation::Postgres { .. } => f.write_str("Postgres { url: <redacted> }"),
        }
    }
}

/// A cached authentication result that is no longer valid.
#[derive(Debug, Clone, PartialEq)]
pub enum Invalidation {
    /// The key with this hash changed (revoked, limits, models).
    Key(String),
    /// Something about this tenant changed (suspended, reactivated).
    Tenant(String),
    /// Anything may have changed (the watch reconnected after missing messages).
    All,
    /// The watch lost its connection: cached results cannot be trusted until `All` follows.
    Lost,
}

impl Invalidation {
    /// The wire form used by `NOTIFY` payloads and the SQLite `invalidations` table.
    pub fn encode(&self) -> String {
        match self {
            Invalidation::Key(h) => format!("key:{h}"),
            Invalidation::Tenant(t) => format!("tenant:{t}"),
            Invalidation::All | Invalidation::Lost => "all".to_string(),
        }
    }

    pub fn decode(s: &str) -> Invalidation {
        match s.split_once(':') {
            Some(("key", h)) => Invalidation::Key(h.to_string()),
            Some(("tenant", t)) => Invalidation::Tenant(t.to_string()),
            _ => Invalidation::All,
        }
    }
}

/// The metadata store.
#[async_trait]
pub trait MetaStore: Send + Sync {
    // Tenants.
    /// Creates a tenant; a duplicate name is a [`StoreError::Conflict`].
    async fn create_tenant(&self, name: &str, plan_id: Option<&str>) -> Result<Tenant, StoreError>;
    /// A tenant by id or by name.
    async fn tenant(&self, id_or_name: &str) -> Result<Option<Tenant>, StoreError>;
    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError>;
    /// Sets `active` or `suspended`, publishing an invalidation.
    async fn set_tenant_status(&self, tenant_id: &str, status: &str) -> Result<(), StoreError>;
    async fn set_tenant_plan(
        &self,
        tenant_id: &str,
        plan_id: Option<&str>,
    ) -> Result<(), StoreError>;

    // Keys.
    /// Stores a new key's hash.
    async fn create_key(
        &self,
        key: &NewKey,
        key_hash: &str,
        prefix: &str,
    ) -> Result<KeySummary, StoreError>;
    async fn key_by_hash(&self, key_hash: &str) -> Result<Option<KeyRecord>, StoreError>;
    async fn key_summary(&self, key_id: &str) -> Result<Option<KeySummary>, StoreError>;
    async fn key_id_by_hash(&self, key_hash: &str) -> Result<Option<String>, StoreError>;
    async fn list_keys(&self, tenant_id: Option<&str>) -> Result<Vec<KeySummary>, StoreError>;
    /// Revokes a key, publishing an invalidation; revoking a revoked key is a conflict.
    async fn revoke_key(&self, key_id: &str) -> Result<(), StoreError>;
    /// Replaces a key: a new one with the same settings, the old one revoked, atomically.
    async fn rotate_key(
        &self,
        key_id: &str,
        new_hash: &str,
        new_prefix: &str,
    ) -> Result<KeySummary, StoreError>;
    /// Sets a key's models and limits, publishing an invalidation.
    async fn update_key(
        &self,
        key_id: &str,
        allowed_models: Option<Vec<String>>,
        limits: &KeyLimits,
    ) -> Result<(), StoreError>;
    /// Records that keys were used (batched by the caller).
    async fn touch_keys(&self, key_ids: &[String], at: OffsetDateTime) -> Result<(), StoreError>;

    // Plans, prices, discounts.
    async fn create_plan(&self, plan: &Plan) -> Result<Plan, StoreError>;
    async fn list_plans(&self) -> Result<Vec<Plan>, StoreError>;
    async fn add_price(&self, price: &Price) -> Result<(), StoreError>;
    /// Price-book entries, optionally for one model, ordered by model, tenant, time.
    async fn list_prices(&self, model: Option<&str>) -> Result<Vec<Price>, StoreError>;
    async fn add_discount(&self, discount: &Discount) -> Result<(), StoreError>;
    async fn list_discounts(&self, tenant_id: Option<&str>) -> Result<Vec<Discount>, StoreError>;

    // Provider credentials (already encrypted by the caller).
    async fn put_credential(&self, credential: &StoredCredential) -> Result<(), StoreError>;
    async fn list_credentials(&self) -> Result<Vec<StoredCredential>, StoreError>;
    async fn delete_credential(&self, name: &str) -> Result<(), StoreError>;
    /// Replaces every credential at once (master-key rotation), in one transaction.
    async fn replace_credentials(&self, credentials: &[StoredCredential])
        -> Result<(), StoreError>;

    // Audit trail.
    async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: &str,
        details: &serde_json::Value,
    ) -> Result<(), StoreError>;
    async fn list_audit(&self, limit: i64) -> Result<Vec<AuditEntry>, StoreError>;

    // Tenant limits.
    /// Creates or replaces the limits of a tenant (`model` `*`) or tenant × model, publishing
    /// an invalidation of the tenant.
    async fn set_tenant_limit(&self, limit: &TenantLimit) -> Result<(), StoreError>;
    /// Removes a limit row (NotFound if there is none), publishing an invalidation.
    async fn delete_tenant_limit(&self, tenant_id: &str, model: &str) -> Result<(), StoreError>;
    /// Limit rows, of one tenant or all, ordered by tenant and model.
    async fn list_tenant_limits(
        &self,
        tenant_id: Option<&str>,
    ) -> Result<Vec<TenantLimit>, StoreError>;

    // Ledger (read side).
    /// Ledger rows of a tenant in `[from, to)`.
    async fn usage(
        &self,
        tenant_id: &str,
        from: OffsetDateTime,
        to: OffsetDateTime,
    ) -> Result<Vec<UsageRow>, StoreError>;

    /// Invoice lines booked into `period` (YYYY-MM), of one tenant or all, ordered by
    /// tenant, currency, model, event period and price.
    async fn price_lines(
        &self,
        period: &str,
        tenant_id: Option<&str>,
    ) -> Result<Vec<PriceLine>, StoreError>;

    /// When `period` was closed, if it was.
    async fn closed_period(&self, period: &str) -> Result<Option<OffsetDateTime>, StoreError>;

    /// Closes `period`: the pipeline books its later lines into the next open period.
    /// Closing a closed period is a [`StoreError::Conflict`]. Returns the close time.
    async fn close_period(&self, period: &str, actor: &str) -> Result<OffsetDateTime, StoreError>;

    /// Where this store's usage ledger is written.
    fn ledger_location(&self) -> LedgerLocation;

    /// Liveness probe for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Starts delivering invalidations published by any process sharing this store.
    async fn watch(&self) -> Result<tokio::sync::mpsc::Receiver<Invalidation>, StoreError>;
}

/// A new opaque id with a type prefix (`ten_`, `key_`, `plan_`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

pub(crate) fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

pub(crate) fn is_foreign_key_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

/// Validates a tenant or plan name.
pub(crate) fn check_name(kind: &str, name: &str) -> Result<String, StoreError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 128 || name.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "{kind} name must be 1 to 128 printable characters"
        )));
    }
    Ok(name.to_string())
}
