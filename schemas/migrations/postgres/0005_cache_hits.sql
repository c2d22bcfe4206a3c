-- Response cache hits in the ledger (see README "Response cache"): how many completions were
-- answered from the cache, and what they saved the tenant (the part of their original
-- answers' price not billed). `requests` and `cost` include the hits.
ALTER TABLE usage_minutes ADD COLUMN IF NOT EXISTS cache_hits BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_minutes ADD COLUMN IF NOT EXISTS cache_savings NUMERIC(38, 18) NOT NULL DEFAULT 0;
ALTER TABLE usage_price_lines ADD COLUMN IF NOT EXISTS cache_hits BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_price_lines ADD COLUMN IF NOT EXISTS cache_savings NUMERIC(38, 18) NOT NULL DEFAULT 0;
