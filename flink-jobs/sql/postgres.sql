-- PostgreSQL objects of the Flink SQL jobs (flink-jobs/sql/usage.sql), applied by
-- `flink-jobs/run` before it starts them. Idempotent. The jobs read the pipeline's price book
-- (`prices`, schemas/migrations/postgres/0001_metadata.sql) and write tables of their own,
-- never the pipeline's ledger: `tollgate reconcile --flink` compares the two.
--
-- Times are UTC wall-clock `TIMESTAMP` (no time zone): Flink's JDBC connector converts a
-- `TIMESTAMPTZ` through the JVM's time zone, a plain `TIMESTAMP` round-trips unchanged
-- whatever zone the Flink cluster runs in.

-- The price book as the jobs see it: every version of a (model, tenant_id), in force from
-- effective_from until the next version's effective_from (effective_until; 9999-12-31 for
-- the newest). tenant_id '' is the list price.
DROP VIEW IF EXISTS flink_prices;
CREATE VIEW flink_prices AS
SELECT model,
       tenant_id,
       (effective_from AT TIME ZONE 'UTC') AS effective_from,
       COALESCE(LEAD(effective_from) OVER (PARTITION BY model, tenant_id ORDER BY effective_from)
                    AT TIME ZONE 'UTC',
                TIMESTAMP '9999-12-31 00:00:00') AS effective_until,
       input_per_mtok,
       cached_input_per_mtok,
       output_per_mtok,
       currency
FROM prices;

-- Per tenant × model × minute (the minute's start, UTC). Absolute figures, upserted.
CREATE TABLE IF NOT EXISTS flink_usage_minutes (
    tenant_id                TEXT NOT NULL,
    model                    TEXT NOT NULL,
    minute                   TIMESTAMP NOT NULL,
    currency                 TEXT NOT NULL,
    requests                 BIGINT NOT NULL,
    input_tokens             BIGINT NOT NULL,
    cached_input_tokens      BIGINT NOT NULL,
    cache_write_input_tokens BIGINT NOT NULL,
    output_tokens            BIGINT NOT NULL,
    cost                     NUMERIC(38, 18) NOT NULL,
    errors                   BIGINT NOT NULL,
    unpriced                 BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, model, minute)
);
-- Response cache hits (in `requests` and, at the fraction billed, `cost`) and what they saved.
ALTER TABLE flink_usage_minutes ADD COLUMN IF NOT EXISTS cache_hits BIGINT NOT NULL DEFAULT 0;
ALTER TABLE flink_usage_minutes
    ADD COLUMN IF NOT EXISTS cache_savings NUMERIC(38, 18) NOT NULL DEFAULT 0;

-- Per tenant × billing period (calendar month of the event time, UTC: 'YYYY-MM') × currency.
CREATE TABLE IF NOT EXISTS flink_usage_periods (
    tenant_id                TEXT NOT NULL,
    period                   TEXT NOT NULL,
    currency                 TEXT NOT NULL,
    requests                 BIGINT NOT NULL,
    input_tokens             BIGINT NOT NULL,
    cached_input_tokens      BIGINT NOT NULL,
    cache_write_input_tokens BIGINT NOT NULL,
    output_tokens            BIGINT NOT NULL,
    cost                     NUMERIC(38, 18) NOT NULL,
    errors                   BIGINT NOT NULL,
    unpriced                 BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, period, currency)
);
ALTER TABLE flink_usage_periods ADD COLUMN IF NOT EXISTS cache_hits BIGINT NOT NULL DEFAULT 0;
ALTER TABLE flink_usage_periods
    ADD COLUMN IF NOT EXISTS cache_savings NUMERIC(38, 18) NOT NULL DEFAULT 0;
