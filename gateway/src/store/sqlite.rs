//! SQLite implementation of [`MetaStore`] for the embedded default.

use std::path::Path;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::Row;

use super::{KeyRecord, KeySummary, MetaStore, StoreError, Tenant};

/// The embedded metadata store: `tollgate.db` in the data directory.
pub struct SqliteStore {
    pool: SqlitePool,
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `data_dir` and applies migrations.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Database(sqlx::Error::Configuration(
                format!("cannot create data directory {}: {e}", data_dir.display()).into(),
            ))
        })?;
        let url = format!("sqlite://{}", data_dir.join("tollgate.db").display());
        let options = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(std::time::Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("../schemas/migrations/sqlite")
            .run(&pool)
            .await?;
        Ok(SqliteStore { pool })
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.is_unique_violation())
}

#[async_trait]
impl MetaStore for SqliteStore {
    async fn create_tenant(&self, name: &str) -> Result<Tenant, StoreError> {
        let name = name.trim();
        if name.is_empty() || name.len() > 128 {
            return Err(StoreError::Conflict(
                "tenant name must be 1 to 128 characters".to_string(),
            ));
        }
        let id = format!("ten_{}", uuid::Uuid::now_v7().simple());
        let res = sqlx::query(
            "INSERT INTO tenants (id, name, status, created_at) VALUES (?, ?, 'active', ?)",
        )
        .bind(&id)
        .bind(name)
        .bind(now_rfc3339())
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => Ok(Tenant {
                id,
                name: name.to_string(),
                status: "active".to_string(),
            }),
            Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict(format!(
                "a tenant named `{name}` already exists"
            ))),
            Err(e) => Err(e.into()),
        }
    }

    async fn tenant_by_name(&self, name: &str) -> Result<Option<Tenant>, StoreError> {
        let row = sqlx::query("SELECT id, name, status FROM tenants WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| Tenant {
            id: r.get("id"),
            name: r.get("name"),
            status: r.get("status"),
        }))
    }

    async fn list_tenants(&self) -> Result<Vec<Tenant>, StoreError> {
        let rows = sqlx::query("SELECT id, name, status FROM tenants ORDER BY created_at, name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| Tenant {
                id: r.get("id"),
                name: r.get("name"),
                status: r.get("status"),
            })
            .collect())
    }

    async fn create_key(
        &self,
        tenant_id: &str,
        name: &str,
        key_hash: &str,
        display_prefix: &str,
    ) -> Result<KeySummary, StoreError> {
        let id = format!("key_{}", uuid::Uuid::now_v7().simple());
        sqlx::query(
            "INSERT INTO api_keys (id, tenant_id, name, key_hash, key_prefix, status, created_at) \
             VALUES (?, ?, ?, ?, ?, 'active', ?)",
        )
        .bind(&id)
        .bind(tenant_id)
        .bind(name)
        .bind(key_hash)
        .bind(display_prefix)
        .bind(now_rfc3339())
        .execute(&self.pool)
        .await?;
        Ok(KeySummary {
            id,
            tenant_id: tenant_id.to_string(),
            name: name.to_string(),
            prefix: display_prefix.to_string(),
            status: "active".to_string(),
        })
    }

    async fn key_by_hash(&self, key_hash: &str) -> Result<Option<KeyRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT k.id AS key_id, k.status AS key_status, k.expires_at, \
                    t.id AS tenant_id, t.name AS tenant_name, t.status AS tenant_status \
             FROM api_keys k JOIN tenants t ON t.id = k.tenant_id WHERE k.key_hash = ?",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| {
            let expires: Option<String> = r.get("expires_at");
            KeyRecord {
                key_id: r.get("key_id"),
                key_status: r.get("key_status"),
                expires_at: expires.and_then(|s| {
                    time::OffsetDateTime::parse(&s, &time::format_description::well_known::Rfc3339)
                        .ok()
                }),
                tenant_id: r.get("tenant_id"),
                tenant_name: r.get("tenant_name"),
                tenant_status: r.get("tenant_status"),
            }
        }))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tenants_and_keys_round_trip_and_migrations_are_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let t = store.create_tenant("acme").await.unwrap();
        assert!(matches!(
            store.create_tenant("acme").await,
            Err(StoreError::Conflict(_))
        ));
        let k = crate::auth::keys::generate();
        store
            .create_key(&t.id, "ci", &k.hash, &k.display_prefix)
            .await
            .unwrap();
        drop(store);
        let store = SqliteStore::open(dir.path()).await.unwrap();
        let rec = store.key_by_hash(&k.hash).await.unwrap().unwrap();
        assert_eq!(rec.tenant_name, "acme");
        assert_eq!(rec.key_status, "active");
        assert!(store.key_by_hash("nope").await.unwrap().is_none());
    }
}
