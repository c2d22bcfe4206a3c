-- Invoice lines (see the PostgreSQL migration 0003_invoice_lines.sql); decimals as TEXT.

CREATE TABLE IF NOT EXISTS billing_periods (
    period     TEXT PRIMARY KEY,
    closed_at  TEXT NOT NULL,
    closed_by  TEXT NOT NULL DEFAULT ''
);

CREATE TABLE IF NOT EXISTS usage_price_lines (
    tenant_id                TEXT NOT NULL,
    period                   TEXT NOT NULL,
    event_period             TEXT NOT NULL,
    model                    TEXT NOT NULL,
    currency                 TEXT NOT NULL,
    price_from_ms            INTEGER NOT NULL,
    price_override           INTEGER NOT NULL,
    input_per_mtok           TEXT NOT NULL,
    cached_input_per_mtok    TEXT NOT NULL,
    output_per_mtok          TEXT NOT NULL,
    requests                 INTEGER NOT NULL DEFAULT 0,
    input_tokens             INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens      INTEGER NOT NULL DEFAULT 0,
    cache_write_input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens            INTEGER NOT NULL DEFAULT 0,
    cost                     TEXT NOT NULL DEFAULT '0',
    updated_seq              INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, period, event_period, model, currency, price_from_ms, price_override)
);
