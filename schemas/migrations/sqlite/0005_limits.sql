-- Quotas and rate limits (see README "Quotas and rate limits"); mirrors
-- schemas/migrations/postgres/0004_limits.sql.
ALTER TABLE api_keys ADD COLUMN max_concurrent INTEGER CHECK (max_concurrent > 0);
ALTER TABLE api_keys ADD COLUMN enforcement TEXT NOT NULL DEFAULT 'hard'
    CHECK (enforcement IN ('hard', 'soft'));

CREATE TABLE IF NOT EXISTS tenant_limits (
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    model           TEXT NOT NULL DEFAULT '*',
    rpm_limit       INTEGER CHECK (rpm_limit > 0),
    tpm_limit       INTEGER CHECK (tpm_limit > 0),
    max_concurrent  INTEGER CHECK (max_concurrent > 0),
    spend_limit     TEXT,
    enforcement     TEXT NOT NULL DEFAULT 'hard' CHECK (enforcement IN ('hard', 'soft')),
    updated_at      TEXT NOT NULL,
    PRIMARY KEY (tenant_id, model)
);
