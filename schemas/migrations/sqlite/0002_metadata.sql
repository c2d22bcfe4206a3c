-- The metadata store beyond tenants and keys (SQLite mirror of postgres/0001_metadata.sql).
-- Money is stored as decimal TEXT (never REAL); timestamps as RFC 3339 UTC TEXT.

CREATE TABLE IF NOT EXISTS plans (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL UNIQUE,
    monthly_fee         TEXT NOT NULL DEFAULT '0',
    currency            TEXT NOT NULL DEFAULT 'USD',
    rpm_limit           INTEGER CHECK (rpm_limit > 0),
    tpm_limit           INTEGER CHECK (tpm_limit > 0),
    monthly_spend_limit TEXT,
    created_at          TEXT NOT NULL
);

ALTER TABLE tenants ADD COLUMN plan_id TEXT REFERENCES plans(id);
ALTER TABLE tenants ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';

ALTER TABLE api_keys ADD COLUMN last_used_at TEXT;
ALTER TABLE api_keys ADD COLUMN revoked_at TEXT;
ALTER TABLE api_keys ADD COLUMN allowed_models TEXT;
ALTER TABLE api_keys ADD COLUMN rpm_limit INTEGER CHECK (rpm_limit > 0);
ALTER TABLE api_keys ADD COLUMN tpm_limit INTEGER CHECK (tpm_limit > 0);
ALTER TABLE api_keys ADD COLUMN spend_limit TEXT;
ALTER TABLE api_keys ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}';

CREATE TABLE IF NOT EXISTS prices (
    id                     INTEGER PRIMARY KEY AUTOINCREMENT,
    model                  TEXT NOT NULL,
    tenant_id              TEXT NOT NULL DEFAULT '',
    effective_from         TEXT NOT NULL,
    input_per_mtok         TEXT NOT NULL,
    cached_input_per_mtok  TEXT NOT NULL,
    output_per_mtok        TEXT NOT NULL,
    currency               TEXT NOT NULL DEFAULT 'USD',
    created_at             TEXT NOT NULL,
    UNIQUE (model, tenant_id, effective_from)
);

CREATE TABLE IF NOT EXISTS discounts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    model           TEXT NOT NULL DEFAULT '',
    percent         TEXT NOT NULL,
    effective_from  TEXT NOT NULL,
    effective_to    TEXT,
    created_at      TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS provider_credentials (
    name            TEXT PRIMARY KEY,
    provider        TEXT NOT NULL,
    nonce           BLOB NOT NULL,
    ciphertext      BLOB NOT NULL,
    key_fingerprint TEXT NOT NULL,
    created_at      TEXT NOT NULL,
    rotated_at      TEXT
);

CREATE TABLE IF NOT EXISTS audit_log (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    at          TEXT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    details     TEXT NOT NULL DEFAULT '{}'
);

CREATE TABLE IF NOT EXISTS usage_minutes (
    tenant_id            TEXT NOT NULL,
    model                TEXT NOT NULL,
    minute               TEXT NOT NULL,
    requests             INTEGER NOT NULL DEFAULT 0,
    input_tokens         INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens  INTEGER NOT NULL DEFAULT 0,
    output_tokens        INTEGER NOT NULL DEFAULT 0,
    cost                 TEXT NOT NULL DEFAULT '0',
    currency             TEXT NOT NULL DEFAULT 'USD',
    PRIMARY KEY (tenant_id, model, minute)
);

-- Key and tenant changes other processes sharing this file must hear about (SQLite has no
-- LISTEN/NOTIFY): each gateway polls for rows past the last id it saw.
CREATE TABLE IF NOT EXISTS invalidations (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    target  TEXT NOT NULL,
    at      TEXT NOT NULL
);
