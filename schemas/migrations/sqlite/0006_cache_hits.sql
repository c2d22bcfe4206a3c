-- Response cache hits in the ledger; mirrors schemas/migrations/postgres/0005_cache_hits.sql
-- (money as decimal text, like `cost`).
ALTER TABLE usage_minutes ADD COLUMN cache_hits INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_minutes ADD COLUMN cache_savings TEXT NOT NULL DEFAULT '0';
ALTER TABLE usage_price_lines ADD COLUMN cache_hits INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_price_lines ADD COLUMN cache_savings TEXT NOT NULL DEFAULT '0';
