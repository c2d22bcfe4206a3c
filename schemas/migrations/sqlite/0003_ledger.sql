-- Billing ledger of the embedded pipeline (same tables as PostgreSQL's 0002_ledger.sql).
-- Decimals are TEXT holding exact decimal strings; the pipeline adds them in Rust inside the
-- transaction (SQLite has one writer at a time).

ALTER TABLE usage_minutes ADD COLUMN cache_write_input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_minutes ADD COLUMN errors INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_minutes ADD COLUMN client_disconnects INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_minutes ADD COLUMN unpriced INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_minutes ADD COLUMN ttft_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_minutes ADD COLUMN ttft_sum_ms INTEGER NOT NULL DEFAULT 0;
-- JSON array of 8 counts (see the PostgreSQL migration for the bucket bounds).
ALTER TABLE usage_minutes ADD COLUMN ttft_buckets TEXT NOT NULL DEFAULT '[0,0,0,0,0,0,0,0]';
ALTER TABLE usage_minutes ADD COLUMN updated_seq INTEGER NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS usage_periods (
    tenant_id                TEXT NOT NULL,
    period                   TEXT NOT NULL,
    currency                 TEXT NOT NULL,
    requests                 INTEGER NOT NULL DEFAULT 0,
    input_tokens             INTEGER NOT NULL DEFAULT 0,
    cached_input_tokens      INTEGER NOT NULL DEFAULT 0,
    cache_write_input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens            INTEGER NOT NULL DEFAULT 0,
    cost                     TEXT NOT NULL DEFAULT '0',
    errors                   INTEGER NOT NULL DEFAULT 0,
    updated_seq              INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, period, currency)
);

CREATE TABLE IF NOT EXISTS pipeline_positions (
    source        TEXT NOT NULL,
    partition     INTEGER NOT NULL,
    next_offset   INTEGER NOT NULL,
    max_event_ms  INTEGER NOT NULL,
    PRIMARY KEY (source, partition)
);

CREATE TABLE IF NOT EXISTS pipeline_commits (
    seq           INTEGER PRIMARY KEY,
    committed_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    events        INTEGER NOT NULL,
    duplicates    INTEGER NOT NULL,
    rejects       INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS pipeline_rejects (
    source     TEXT NOT NULL,
    partition  INTEGER NOT NULL,
    "offset"   INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    payload    TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (source, partition, "offset")
);

CREATE TABLE IF NOT EXISTS pipeline_outbox (
    seq      INTEGER PRIMARY KEY,
    payload  TEXT NOT NULL
);
