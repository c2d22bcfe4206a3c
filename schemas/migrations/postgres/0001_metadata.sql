-- Tollgate metadata store (PostgreSQL): plans, tenants, API keys, price book, discounts,
-- provider credentials, audit trail, and the usage ledger read by GET /v1/usage.
-- Money is NUMERIC (exact); timestamps are TIMESTAMPTZ.

CREATE TABLE IF NOT EXISTS plans (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL UNIQUE,
    monthly_fee         NUMERIC(24, 12) NOT NULL DEFAULT 0 CHECK (monthly_fee >= 0),
    currency            TEXT NOT NULL DEFAULT 'USD',
    rpm_limit           BIGINT CHECK (rpm_limit > 0),
    tpm_limit           BIGINT CHECK (tpm_limit > 0),
    monthly_spend_limit NUMERIC(24, 12) CHECK (monthly_spend_limit >= 0),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    status      TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    plan_id     TEXT REFERENCES plans(id),
    metadata    JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS api_keys (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    name            TEXT NOT NULL DEFAULT '',
    key_hash        TEXT NOT NULL UNIQUE,
    key_prefix      TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at      TIMESTAMPTZ,
    last_used_at    TIMESTAMPTZ,
    revoked_at      TIMESTAMPTZ,
    allowed_models  JSONB,
    rpm_limit       BIGINT CHECK (rpm_limit > 0),
    tpm_limit       BIGINT CHECK (tpm_limit > 0),
    spend_limit     NUMERIC(24, 12) CHECK (spend_limit >= 0),
    metadata        JSONB NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant_id);

-- Effective-dated price book: the row with the latest effective_from <= t applies at t.
-- tenant_id '' is the list price; a tenant id is an override for that tenant.
CREATE TABLE IF NOT EXISTS prices (
    id                     BIGSERIAL PRIMARY KEY,
    model                  TEXT NOT NULL,
    tenant_id              TEXT NOT NULL DEFAULT '',
    effective_from         TIMESTAMPTZ NOT NULL,
    input_per_mtok         NUMERIC(24, 12) NOT NULL CHECK (input_per_mtok >= 0),
    cached_input_per_mtok  NUMERIC(24, 12) NOT NULL CHECK (cached_input_per_mtok >= 0),
    output_per_mtok        NUMERIC(24, 12) NOT NULL CHECK (output_per_mtok >= 0),
    currency               TEXT NOT NULL DEFAULT 'USD',
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (model, tenant_id, effective_from)
);

-- Percentage discounts per tenant (all models when model is ''), effective-dated.
CREATE TABLE IF NOT EXISTS discounts (
    id              BIGSERIAL PRIMARY KEY,
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    model           TEXT NOT NULL DEFAULT '',
    percent         NUMERIC(9, 6) NOT NULL CHECK (percent > 0 AND percent <= 100),
    effective_from  TIMESTAMPTZ NOT NULL,
    effective_to    TIMESTAMPTZ,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (effective_to IS NULL OR effective_to > effective_from)
);

-- Provider credentials, AES-256-GCM encrypted under the master key from the environment.
CREATE TABLE IF NOT EXISTS provider_credentials (
    name            TEXT PRIMARY KEY,
    provider        TEXT NOT NULL,
    nonce           BYTEA NOT NULL,
    ciphertext      BYTEA NOT NULL,
    key_fingerprint TEXT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    rotated_at      TIMESTAMPTZ
);

CREATE TABLE IF NOT EXISTS audit_log (
    id          BIGSERIAL PRIMARY KEY,
    at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target      TEXT NOT NULL,
    details     JSONB NOT NULL DEFAULT '{}'::jsonb
);

-- Usage ledger, per tenant x model x minute (written by the billing pipeline).
CREATE TABLE IF NOT EXISTS usage_minutes (
    tenant_id            TEXT NOT NULL,
    model                TEXT NOT NULL,
    minute               TIMESTAMPTZ NOT NULL,
    requests             BIGINT NOT NULL DEFAULT 0,
    input_tokens         BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens  BIGINT NOT NULL DEFAULT 0,
    output_tokens        BIGINT NOT NULL DEFAULT 0,
    cost                 NUMERIC(30, 12) NOT NULL DEFAULT 0,
    currency             TEXT NOT NULL DEFAULT 'USD',
    PRIMARY KEY (tenant_id, model, minute)
);
