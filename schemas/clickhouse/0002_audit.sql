-- The audit trail of requests (`[audit]` in the gateway): one row per audited request, written
-- by the pipeline's audit consumer from the `llm.audit` topic. Created by the consumer on
-- start; `{ttl}` is replaced by `TTL ts + INTERVAL <retention_days> DAY` on servers that know
-- TTL (19.6 and later) and by nothing on older ones. Either way the consumer also drops the
-- daily partitions older than the retention, so the retention holds on every version.
--
-- ReplacingMergeTree over a key that ends with `event_id`: two copies of one event (a second
-- writer, a replay racing a crash) collapse at merge time. The consumer does not rely on it:
-- before inserting a batch it skips the events already present, so plain SELECTs see each
-- event once.
CREATE TABLE IF NOT EXISTS audit_log
(
    event_id            String,
    ts                  DateTime,
    event_ms            Int64,
    received_ms         Int64,
    tenant_id           String,
    key_id              String,
    request_id          String,
    route               String,
    requested_model     String,
    model_alias         String,
    deployment          String,
    provider            String,
    upstream_model      String,
    stream              UInt8,
    status              String,
    error               String,
    input_tokens        UInt64,
    cached_input_tokens UInt64,
    output_tokens       UInt64,
    usage_source        String,
    request_body        String,
    request_bytes       UInt64,
    request_truncated   UInt8,
    response_kind       String,
    response_body       String,
    response_bytes      UInt64,
    response_truncated  UInt8
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMMDD(ts)
ORDER BY (tenant_id, request_id, ts, event_id)
{ttl}
