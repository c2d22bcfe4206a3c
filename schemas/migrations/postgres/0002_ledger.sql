-- Billing ledger written by the pipeline (tollgate-pipeline), one transaction per batch:
-- aggregate deltas, source positions, rejected messages and the analytics outbox together.
-- Costs carry 18 decimal places: a price has at most 12 and is per million tokens, so every
-- cost is stored exactly (rounding happens only on invoice lines).

ALTER TABLE usage_minutes ALTER COLUMN cost TYPE NUMERIC(38, 18);
ALTER TABLE usage_minutes
    ADD COLUMN IF NOT EXISTS cache_write_input_tokens BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS errors BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS client_disconnects BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS unpriced BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS ttft_count BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS ttft_sum_ms BIGINT NOT NULL DEFAULT 0,
    -- Completions by time to first token: <=100, <=250, <=500, <=1000, <=2500, <=5000,
    -- <=10000 ms, and above.
    ADD COLUMN IF NOT EXISTS ttft_buckets BIGINT[] NOT NULL DEFAULT '{0,0,0,0,0,0,0,0}',
    ADD COLUMN IF NOT EXISTS updated_seq BIGINT NOT NULL DEFAULT 0;

-- Per tenant x billing period (calendar month, UTC): what budgets and invoices read.
CREATE TABLE IF NOT EXISTS usage_periods (
    tenant_id                TEXT NOT NULL,
    period                   TEXT NOT NULL,
    currency                 TEXT NOT NULL,
    requests                 BIGINT NOT NULL DEFAULT 0,
    input_tokens             BIGINT NOT NULL DEFAULT 0,
    cached_input_tokens      BIGINT NOT NULL DEFAULT 0,
    cache_write_input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens            BIGINT NOT NULL DEFAULT 0,
    cost                     NUMERIC(38, 18) NOT NULL DEFAULT 0,
    errors                   BIGINT NOT NULL DEFAULT 0,
    updated_seq              BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, period, currency)
);

-- Next offset to read per source partition, committed with the rows it produced.
CREATE TABLE IF NOT EXISTS pipeline_positions (
    source        TEXT NOT NULL,
    partition     INTEGER NOT NULL,
    next_offset   BIGINT NOT NULL,
    max_event_ms  BIGINT NOT NULL,
    PRIMARY KEY (source, partition)
);

-- One row per ledger commit; seq increases across restarts and versions the balances.
CREATE TABLE IF NOT EXISTS pipeline_commits (
    seq           BIGINT PRIMARY KEY,
    committed_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    events        BIGINT NOT NULL,
    duplicates    BIGINT NOT NULL,
    rejects       BIGINT NOT NULL
);

-- Messages that cannot be billed (malformed, unknown schema version): kept, never dropped.
CREATE TABLE IF NOT EXISTS pipeline_rejects (
    source     TEXT NOT NULL,
    partition  INTEGER NOT NULL,
    "offset"   BIGINT NOT NULL,
    reason     TEXT NOT NULL,
    payload    TEXT NOT NULL,
    seq        BIGINT NOT NULL,
    PRIMARY KEY (source, partition, "offset")
);

-- Analytics rows of committed batches not yet confirmed written to ClickHouse.
CREATE TABLE IF NOT EXISTS pipeline_outbox (
    seq      BIGINT PRIMARY KEY,
    payload  TEXT NOT NULL
);
