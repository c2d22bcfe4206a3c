-- Stores one cache entry if its tenant's budget allows.
-- KEYS[1]: the entry, KEYS[2]: the tenant's byte counter (same hash tag).
-- ARGV[1]: the entry's bytes, ARGV[2]: their size, ARGV[3]: TTL in ms, ARGV[4]: the budget.
-- Returns 1 when stored, 0 when over budget.
local size = tonumber(ARGV[2])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if used + size > tonumber(ARGV[4]) then
  return 0
end
redis.call('INCRBY', KEYS[2], size)
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
