//! The metadata store seam: tenants and API keys.
//!
//! | file | implementation |
//! |---|---|
//! | `sqlite.rs` | embedded default, one file in the data directory |
//!
//! PostgreSQL arrives with the issue "Tenants, API keys and admin".

pub mod sqlite;

use async_trait::async_trait;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    NotFound(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// A tenant.
#[derive(Debug, Clone, PartialEq)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub status: String,
}

/// What authentication needs to know about a key.
#[derive(Debug, Clone)]
pub struct KeyRecord {
    pub key_id: String,
    pub key_status: String,
    pub expires_at: Option<time::OffsetDateTime>,
    pub tenant_id: String,
    pub tenant_name: String,
    pub tenant_status: String,
}

/// A key as listed (never the secret).
#[derive(Debug, Clone)]
pub struct KeySummary {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub prefix: String,
    pub status: String,
}

/// Tenants and keys. Implementations: SQLite (embedded), PostgreSQL (production, later).
#[async_trait]
pub trait MetaStore: Send + Sync {
    /// Creates a tenant; a duplicate name is a [`StoreError::Conflict`].
    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError>;
    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError>;
    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError>;
    /// Stores a key's hash for a tenant.
    async fn create_key(
        &self,
        tenant_id: &str,
        name: &str,
        key_hash: &str,
        display_prefix: &str,
    ) -> Result<KeySummary, StoreError>;
    async fn key_by_hash(&self, key_hash: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Cheap liveness probe for `/readyz`.
    async fn ping(&self) -> Result<(), StoreError>;
}
