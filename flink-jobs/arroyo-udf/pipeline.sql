-- Example Arroyo pipeline: usage per tenant × model × minute from llm.completions, priced
-- with the tollgate_cost UDF of this crate (the project's pricing rule, exact). Register the
-- UDF in Arroyo (the Rust source of src/lib.rs with its dependencies, or the dynamic library
-- `cargo build --release` makes), then run this SQL.
--
-- What it shows, and what it leaves out compared with the timely pipeline and the Flink job:
-- - duplicates (same event_id, same event_time) are removed inside each one-minute window;
--   a copy arriving after its window closed (later than the watermark allows) is dropped;
-- - prices are written inline, one CASE per unit price, as list prices in force now; Arroyo
--   has no effective-dated lookup into PostgreSQL, so tenant overrides and price changes need
--   a price stream joined in (or the Flink job, which has both);
-- - the result goes to a Kafka topic as JSON rows (one per tenant × model × minute);
-- - response cache hits are billed at their `usage` (zero), not at their fraction
--   (`cache_price_fraction`) of `cache_saved_usage` as the pipeline and the Flink job bill
--   them (`tollgate_schemas::pricing::hit_charge`).

CREATE TABLE completions (
    event_id TEXT NOT NULL,
    event_time TIMESTAMP NOT NULL,
    tenant_id TEXT NOT NULL,
    upstream_model TEXT NOT NULL,
    input_tokens BIGINT UNSIGNED NOT NULL,
    cached_input_tokens BIGINT UNSIGNED NOT NULL,
    cache_write_input_tokens BIGINT UNSIGNED NOT NULL,
    output_tokens BIGINT UNSIGNED NOT NULL
) WITH (
    connector = 'kafka',
    type = 'source',
    bootstrap_servers = 'localhost:9092',
    topic = 'llm.completions',
    format = 'json',
    'source.offset' = 'earliest',
    event_time_field = 'event_time'
);

CREATE TABLE usage_minutes (
    tenant_id TEXT,
    model TEXT,
    minute_start TIMESTAMP,
    requests BIGINT,
    input_tokens BIGINT,
    output_tokens BIGINT,
    cost DECIMAL(38, 18)
) WITH (
    connector = 'kafka',
    type = 'sink',
    bootstrap_servers = 'localhost:9092',
    topic = 'tollgate.arroyo.usage_minutes',
    format = 'json'
);

CREATE VIEW unique_completions AS
SELECT event_id, tenant_id, upstream_model AS model,
       input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens,
       tumble(INTERVAL '1' MINUTE) AS w
FROM completions
GROUP BY event_id, tenant_id, upstream_model, input_tokens, cached_input_tokens,
         cache_write_input_tokens, output_tokens, w;

INSERT INTO usage_minutes
SELECT tenant_id, model, w.start, count(*), sum(input_tokens), sum(output_tokens),
       sum(CAST(tollgate_cost(
           input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens,
           CASE model WHEN 'gpt-4o-mini' THEN '0.15' WHEN 'claude-3-5-haiku' THEN '0.8'
                      ELSE '0' END,
           CASE model WHEN 'gpt-4o-mini' THEN '0.075' WHEN 'claude-3-5-haiku' THEN '0.08'
                      ELSE '0' END,
           CASE model WHEN 'gpt-4o-mini' THEN '0.6' WHEN 'claude-3-5-haiku' THEN '4'
                      ELSE '0' END) AS DECIMAL(38, 18)))
FROM unique_completions
GROUP BY tenant_id, model, w;
