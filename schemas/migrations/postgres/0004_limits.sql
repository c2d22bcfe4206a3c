-- Quotas and rate limits (see README "Quotas and rate limits").
-- A key may also cap its concurrent streams; every limit row says whether crossing it cuts a
-- running stream ('hard') or lets it finish and refuses the next requests ('soft').
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS max_concurrent BIGINT CHECK (max_concurrent > 0);
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS enforcement TEXT NOT NULL DEFAULT 'hard'
    CHECK (enforcement IN ('hard', 'soft'));

-- Limits per tenant (model '*') and per tenant x model alias. A tenant without a '*' row
-- gets its plan's limits. spend_limit is per billing period, in the plan's currency.
CREATE TABLE IF NOT EXISTS tenant_limits (
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    model           TEXT NOT NULL DEFAULT '*',
    rpm_limit       BIGINT CHECK (rpm_limit > 0),
    tpm_limit       BIGINT CHECK (tpm_limit > 0),
    max_concurrent  BIGINT CHECK (max_concurrent > 0),
    spend_limit     NUMERIC(24, 12) CHECK (spend_limit >= 0),
    enforcement     TEXT NOT NULL DEFAULT 'hard' CHECK (enforcement IN ('hard', 'soft')),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, model)
);
