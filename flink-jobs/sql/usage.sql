-- Tollgate's usage aggregates in Flink SQL: the same results as the timely/differential
-- pipeline (pipeline/src/dataflow/), for teams that run Flink. `flink-jobs/job.py` fills in
-- the ${...} variables and runs every INSERT below as ONE job (a statement set).
--
--   llm.completions (Kafka, JSON; event time = event_time, watermark = event time - lateness)
--     → completions_unique: first copy of each event_id wins (processing order)
--     → billable_parts: each completion's usage (weight 1), and for a response cache hit the
--       original answer's usage at the fraction of its price billed (weight = fraction)
--     → completions_priced: two event-time temporal joins with the price book (the tenant's
--       own version in force at the event time, else the list price's), exact DECIMAL cost
--     → flink_usage_minutes  (tenant × model × minute)            JDBC upsert, absolute figures
--     → flink_usage_periods  (tenant × billing period × currency)  JDBC upsert, absolute figures
--
-- The cost formula is the one of schemas/src/pricing.rs (`cost`), written in SQL:
--   (uncached input × input + cached × cached-input + cache-write × input + output × output)
--   / 1 000 000, where uncached = input − cached − cache-write (never below 0); a cache hit
-- adds `hit_charge` (pricing.rs): its fraction of the cost of its original answer's usage.
-- DECIMAL precision is kept exact on purpose: a price per token (price per million / 10^6) is
-- DECIMAL(24,18) exactly; tokens are DECIMAL(12,0) (up to 10^12 per completion), each product
-- is DECIMAL(36,18) and the partial sums are cast back so that Flink's precision rules never
-- drop a decimal place (an addition past 38 digits would lower the scale).

CREATE TEMPORARY TABLE completions (
    event_id       STRING,
    event_time     STRING,
    request_id     STRING,
    tenant_id      STRING,
    upstream_model STRING,
    status         STRING,
    `usage`        ROW<input_tokens BIGINT, cached_input_tokens BIGINT,
                       cache_write_input_tokens BIGINT, output_tokens BIGINT, source STRING>,
    cache_hit      BOOLEAN,
    cache_saved_usage ROW<input_tokens BIGINT, cached_input_tokens BIGINT,
                          cache_write_input_tokens BIGINT, output_tokens BIGINT>,
    cache_price_fraction STRING,
    -- event_time is RFC 3339 UTC with milliseconds ("2026-12-07T18:35:17.123Z").
    event_ts AS TO_TIMESTAMP(event_time, 'yyyy-MM-dd''T''HH:mm:ss.SSS''Z'''),
    proc_time AS PROCTIME()
) WITH (
    'connector' = 'kafka',
    'topic' = '${TOPIC}',
    'properties.bootstrap.servers' = '${KAFKA_BOOTSTRAP}',
    'properties.group.id' = '${GROUP_ID}',
    'scan.startup.mode' = 'earliest-offset',
    ${KAFKA_BOUNDED}
    'format' = 'json',
    'json.fail-on-missing-field' = 'false',
    'json.ignore-parse-errors' = 'true'
);

-- The price book (PostgreSQL view flink_prices, sql/postgres.sql): every version of a
-- (model, tenant_id) with the instant it is superseded (effective_until); tenant_id '' is
-- the list price. Looked up per completion (cached for PRICE_REFRESH_MS, like the
-- pipeline's --price-refresh-ms): the version whose [effective_from, effective_until)
-- contains the completion's event time applies.
CREATE TEMPORARY TABLE prices (
    `model`               STRING,
    tenant_id             STRING,
    effective_from        TIMESTAMP(3),
    effective_until       TIMESTAMP(3),
    input_per_mtok        DECIMAL(24, 12),
    cached_input_per_mtok DECIMAL(24, 12),
    output_per_mtok       DECIMAL(24, 12),
    currency              STRING
) WITH (
    'connector' = 'jdbc',
    'url' = '${JDBC_URL}',
    'username' = '${JDBC_USER}',
    'password' = '${JDBC_PASSWORD}',
    'table-name' = 'flink_prices',
    'lookup.cache' = 'PARTIAL',
    'lookup.partial-cache.expire-after-write' = '${PRICE_REFRESH_MS} ms',
    'lookup.partial-cache.max-rows' = '100000',
    'lookup.partial-cache.cache-missing-key' = 'true'
);

CREATE TEMPORARY TABLE flink_usage_minutes (
    tenant_id                STRING,
    `model`                  STRING,
    `minute`                 TIMESTAMP(3),
    currency                 STRING,
    requests                 BIGINT,
    input_tokens             BIGINT,
    cached_input_tokens      BIGINT,
    cache_write_input_tokens BIGINT,
    output_tokens            BIGINT,
    cost                     DECIMAL(38, 18),
    errors                   BIGINT,
    unpriced                 BIGINT,
    cache_hits               BIGINT,
    cache_savings            DECIMAL(38, 18),
    PRIMARY KEY (tenant_id, `model`, `minute`) NOT ENFORCED
) WITH (
    'connector' = 'jdbc',
    'url' = '${JDBC_URL}',
    'username' = '${JDBC_USER}',
    'password' = '${JDBC_PASSWORD}',
    'table-name' = 'flink_usage_minutes',
    'sink.buffer-flush.max-rows' = '1000',
    'sink.buffer-flush.interval' = '1s'
);

CREATE TEMPORARY TABLE flink_usage_periods (
    tenant_id                STRING,
    `period`                 STRING,
    currency                 STRING,
    requests                 BIGINT,
    input_tokens             BIGINT,
    cached_input_tokens      BIGINT,
    cache_write_input_tokens BIGINT,
    output_tokens            BIGINT,
    cost                     DECIMAL(38, 18),
    errors                   BIGINT,
    unpriced                 BIGINT,
    cache_hits               BIGINT,
    cache_savings            DECIMAL(38, 18),
    PRIMARY KEY (tenant_id, `period`, currency) NOT ENFORCED
) WITH (
    'connector' = 'jdbc',
    'url' = '${JDBC_URL}',
    'username' = '${JDBC_USER}',
    'password' = '${JDBC_PASSWORD}',
    'table-name' = 'flink_usage_periods',
    'sink.buffer-flush.max-rows' = '1000',
    'sink.buffer-flush.interval' = '1s'
);

-- Duplicates (same event_id: producer retries, spool replays) count once: the first copy in
-- processing order wins, like the pipeline's Dedup.
CREATE TEMPORARY VIEW completions_unique AS
SELECT event_id, tenant_id, `model`, status, input_tokens, cached_input_tokens,
       cache_write_input_tokens, output_tokens, cache_hit, saved_input_tokens,
       saved_cached_input_tokens, saved_cache_write_input_tokens, saved_output_tokens,
       cache_price_fraction, event_ts, proc_time, list_tenant
FROM (
    SELECT event_id, tenant_id, upstream_model AS `model`, status,
           COALESCE(`usage`.input_tokens, 0) AS input_tokens,
           COALESCE(`usage`.cached_input_tokens, 0) AS cached_input_tokens,
           COALESCE(`usage`.cache_write_input_tokens, 0) AS cache_write_input_tokens,
           COALESCE(`usage`.output_tokens, 0) AS output_tokens,
           COALESCE(cache_hit, FALSE) AS cache_hit,
           COALESCE(cache_saved_usage.input_tokens, 0) AS saved_input_tokens,
           COALESCE(cache_saved_usage.cached_input_tokens, 0) AS saved_cached_input_tokens,
           COALESCE(cache_saved_usage.cache_write_input_tokens, 0) AS saved_cache_write_input_tokens,
           COALESCE(cache_saved_usage.output_tokens, 0) AS saved_output_tokens,
           -- Absent: "0" (free); a hit written before hits carried their original usage
           -- billed it in `usage` and has nothing more to bill (its saved usage reads as 0).
           CAST(COALESCE(cache_price_fraction, '0') AS DECIMAL(7, 6)) AS cache_price_fraction,
           event_ts, proc_time,
           '' AS list_tenant,
           ROW_NUMBER() OVER (PARTITION BY event_id ORDER BY proc_time ASC) AS rn
    FROM completions
    WHERE event_id IS NOT NULL AND tenant_id IS NOT NULL AND upstream_model IS NOT NULL
      AND event_ts IS NOT NULL
)
WHERE rn = 1;

-- What each completion bills, as parts priced by one formula: its own usage (request = 1,
-- weight 1) and, for a cache hit, its original answer's usage (request = 0, weight = the
-- fraction billed; what the rest of that price comes to is the hit's saving).
CREATE TEMPORARY VIEW billable_parts AS
SELECT tenant_id, `model`, status, event_ts, proc_time, list_tenant,
       1 AS request, CASE WHEN cache_hit THEN 1 ELSE 0 END AS hit,
       CAST(1 AS DECIMAL(7, 6)) AS weight,
       input_tokens, cached_input_tokens, cache_write_input_tokens, output_tokens
FROM completions_unique
UNION ALL
SELECT tenant_id, `model`, status, event_ts, proc_time, list_tenant,
       0 AS request, 0 AS hit, cache_price_fraction AS weight,
       saved_input_tokens, saved_cached_input_tokens, saved_cache_write_input_tokens,
       saved_output_tokens
FROM completions_unique
WHERE cache_hit;

CREATE TEMPORARY VIEW parts_listed AS
SELECT c.tenant_id, c.`model`, c.status, c.event_ts, c.request, c.hit, c.weight,
       c.input_tokens, c.cached_input_tokens, c.cache_write_input_tokens, c.output_tokens,
       COALESCE(o.currency, l.currency, 'USD') AS currency,
       CASE WHEN o.`model` IS NULL AND l.`model` IS NULL THEN 1 ELSE 0 END AS unpriced,
       -- At most 10^12 tokens × 10^6 per million: 12 integer digits, so DECIMAL(30, 18)
       -- holds the list cost exactly, and times the weight (DECIMAL(7, 6)) it stays within
       -- DECIMAL(38, 24): exact.
       CASE WHEN o.`model` IS NULL AND l.`model` IS NULL THEN CAST(0 AS DECIMAL(30, 18))
       ELSE CAST(
           CAST(
               CAST(CAST(GREATEST(c.input_tokens - c.cached_input_tokens
                                  - c.cache_write_input_tokens, 0) AS DECIMAL(12, 0))
                    * CAST(COALESCE(o.input_per_mtok, l.input_per_mtok)
                           * CAST(0.000001 AS DECIMAL(7, 6)) AS DECIMAL(24, 18))
                  + CAST(c.cached_input_tokens AS DECIMAL(12, 0))
                    * CAST(COALESCE(o.cached_input_per_mtok, l.cached_input_per_mtok)
                           * CAST(0.000001 AS DECIMAL(7, 6)) AS DECIMAL(24, 18))
                  AS DECIMAL(37, 18))
               + CAST(c.cache_write_input_tokens AS DECIMAL(12, 0))
                 * CAST(COALESCE(o.input_per_mtok, l.input_per_mtok)
                        * CAST(0.000001 AS DECIMAL(7, 6)) AS DECIMAL(24, 18))
               AS DECIMAL(37, 18))
           + CAST(c.output_tokens AS DECIMAL(12, 0))
             * CAST(COALESCE(o.output_per_mtok, l.output_per_mtok)
                    * CAST(0.000001 AS DECIMAL(7, 6)) AS DECIMAL(24, 18))
           AS DECIMAL(30, 18))
       END AS list_cost
FROM billable_parts AS c
LEFT JOIN prices FOR SYSTEM_TIME AS OF c.proc_time AS o
    ON c.`model` = o.`model` AND c.tenant_id = o.tenant_id
   AND o.effective_from <= c.event_ts AND c.event_ts < o.effective_until
LEFT JOIN prices FOR SYSTEM_TIME AS OF c.proc_time AS l
    ON c.`model` = l.`model` AND c.list_tenant = l.tenant_id
   AND l.effective_from <= c.event_ts AND c.event_ts < l.effective_until;

-- Per part: the cost billed (its weight of the list cost) and, for a hit's original answer,
-- the rest (what the hit saved). Counts and tokens come from the request parts only.
CREATE TEMPORARY VIEW completions_priced AS
SELECT tenant_id, `model`, status, event_ts, currency, request, hit,
       request * input_tokens AS input_tokens,
       request * cached_input_tokens AS cached_input_tokens,
       request * cache_write_input_tokens AS cache_write_input_tokens,
       request * output_tokens AS output_tokens,
       request * unpriced AS unpriced,
       CAST(list_cost * weight AS DECIMAL(38, 18)) AS cost,
       CASE WHEN request = 0
            THEN CAST(list_cost * (CAST(1 AS DECIMAL(7, 6)) - weight) AS DECIMAL(38, 18))
            ELSE CAST(0 AS DECIMAL(38, 18)) END AS cache_savings
FROM parts_listed;

INSERT INTO flink_usage_minutes
SELECT tenant_id, `model`, CAST(FLOOR(event_ts TO MINUTE) AS TIMESTAMP(3)), MAX(currency),
       CAST(SUM(request) AS BIGINT), SUM(input_tokens), SUM(cached_input_tokens), SUM(cache_write_input_tokens),
       SUM(output_tokens), CAST(SUM(cost) AS DECIMAL(38, 18)),
       SUM(CASE WHEN status = 'upstream_error' THEN request ELSE 0 END), SUM(unpriced),
       CAST(SUM(hit) AS BIGINT), CAST(SUM(cache_savings) AS DECIMAL(38, 18))
FROM completions_priced
GROUP BY tenant_id, `model`, FLOOR(event_ts TO MINUTE);

INSERT INTO flink_usage_periods
SELECT tenant_id, DATE_FORMAT(event_ts, 'yyyy-MM'), currency,
       CAST(SUM(request) AS BIGINT), SUM(input_tokens), SUM(cached_input_tokens), SUM(cache_write_input_tokens),
       SUM(output_tokens), CAST(SUM(cost) AS DECIMAL(38, 18)),
       SUM(CASE WHEN status = 'upstream_error' THEN request ELSE 0 END), SUM(unpriced),
       CAST(SUM(hit) AS BIGINT), CAST(SUM(cache_savings) AS DECIMAL(38, 18))
FROM completions_priced
GROUP BY tenant_id, DATE_FORMAT(event_ts, 'yyyy-MM'), currency;
