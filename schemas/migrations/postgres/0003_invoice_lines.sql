-- Invoice lines, written by the pipeline in the same transaction as the rest of the ledger:
-- per tenant x billing period x model x price in force. A line whose own period is closed is
-- booked into the first open period after it (event_period keeps where it came from).

CREATE TABLE IF NOT EXISTS billing_periods (
    period     TEXT PRIMARY KEY,
    closed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    closed_by  TEXT NOT NULL DEFAULT ''
);

CREATE TABLE IF NOT EXISTS usage_price_lines (
    tenant_id                TEXT NOT NULL,
    period                   TEXT NOT NULL,
    event_period             TEXT NOT NULL,
    model                    TEXT NOT NULL,
    currency                 TEXT NOT NULL,
    price_from_ms            BIGINT NOT NULL,
    price_override           BOOLEAN NOT NULL,
    input_per_mtok           NUMERIC(24, 12) NOT NULL,
    cached_input_per_mtok    NUMERIC(24, 12) NOT NULL,
    output_per_mtok          NUMERIC(24, 12) NOT NULL,
    requests                 BIGINT NOT NULL DEFAULT 0,
    input_tokens             BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens      BIGINT NOT NULL DEFAULT 0,
    cache_write_input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens            BIGINT NOT NULL DEFAULT 0,
    cost                     NUMERIC(38, 18) NOT NULL DEFAULT 0,
    updated_seq              BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, period, event_period, model, currency, price_from_ms, price_override)
);
