-- Tollgate analytics tables (ClickHouse), run by the pipeline's ClickHouse sink on start.
-- The sink drops whole-line `--` comments, then splits statements on semicolons: keep
-- comments on their own lines and semicolons out of statements.
-- Only types and syntax that both ClickHouse 18.16 and current releases accept: String,
-- (U)Int*, Decimal(38,18), DateTime, UUID, Array, MergeTree with ORDER BY / PARTITION BY.
--
-- Every row carries the ledger batch (`batch_seq`) that produced it: the sink checks it before
-- inserting again, so replaying a batch never duplicates rows.

-- One row per billed completion.
CREATE TABLE IF NOT EXISTS request_facts
(
    event_id                 UUID,
    event_time               DateTime,
    event_ms                 Int64,
    received_ms              Int64,
    tenant_id                String,
    key_id                   String,
    request_id               String,
    route                    String,
    requested_model          String,
    model                    String,
    provider                 String,
    deployment               String,
    stream                   UInt8,
    outcome                  String,
    input_tokens             UInt64,
    cached_input_tokens      UInt64,
    cache_write_input_tokens UInt64,
    output_tokens            UInt64,
    usage_counted            UInt8,
    ttft_ms                  Int64,
    latency_ms               UInt64,
    retries                  UInt32,
    fallbacks                UInt32,
    cost                     Decimal(38, 18),
    currency                 String,
    price_from_ms            Int64,
    price_override           UInt8,
    kafka_partition          UInt32,
    kafka_offset             Int64,
    batch_seq                UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant_id, event_time, event_id);

-- Per tenant x model x minute deltas: one row per key and batch, sum() them for totals.
-- Plain MergeTree, not SummingMergeTree: merging rows of different batches would overwrite
-- `batch_seq` (which the replay check reads) and leave `ttft_buckets` unsummed.
CREATE TABLE IF NOT EXISTS usage_minutes
(
    tenant_id                String,
    model                    String,
    minute                   DateTime,
    currency                 String,
    requests                 Int64,
    input_tokens             Int64,
    cached_input_tokens      Int64,
    cache_write_input_tokens Int64,
    output_tokens            Int64,
    cost                     Decimal(38, 18),
    errors                   Int64,
    client_disconnects       Int64,
    unpriced                 Int64,
    ttft_count               Int64,
    ttft_sum_ms              Int64,
    ttft_buckets             Array(Int64),
    batch_seq                UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(minute)
ORDER BY (tenant_id, model, minute, currency, batch_seq);

-- One row per fully written batch.
CREATE TABLE IF NOT EXISTS analytics_batches
(
    batch_seq  UInt64,
    rows       UInt64,
    written_at DateTime
)
ENGINE = MergeTree
ORDER BY batch_seq;
