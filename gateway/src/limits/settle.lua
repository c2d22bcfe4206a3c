-- Settles a request: its actual tokens replace the estimate in the tokens/min window it was
-- admitted in, its concurrency lease ends, its spend reservation is replaced by the actual
-- cost. The gateway settles each reservation exactly once.
--
-- KEYS[i]  base key of check i
-- ARGV[1]  request id   ARGV[2] tokens correction (actual - reserved, may be negative)
-- ARGV[3]  window the request was admitted in   ARGV[4] actual spend (micro-units)
-- ARGV[5]  number of checks, then one kind per check (as in reserve.lua)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local delta = tonumber(ARGV[2])
local window = ARGV[3]
local micros = tonumber(ARGV[4])
local n = tonumber(ARGV[5])
local keep = 40 * 24 * 3600 * 1000
local settled = 0
for i = 1, n do
  local kind = ARGV[5 + i]
  local base = KEYS[i]
  if kind == 't' and delta ~= 0 then
    if redis.call('EXISTS', base .. ':' .. window) == 1 then
      redis.call('INCRBY', base .. ':' .. window, delta)
    end
  elseif kind == 'c' then
    redis.call('ZREM', base, id)
  elseif kind == 's' or kind == 'S' then
    local amt = redis.call('HGET', base .. ':res', id)
    if amt then
      redis.call('HDEL', base .. ':res', id)
      redis.call('ZREM', base .. ':rexp', id)
      redis.call('DECRBY', base .. ':rtotal', tonumber(amt))
      settled = 1
    end
    if micros > 0 then
      if kind == 'S' then
        local bucket = math.floor(now / 1000)
        redis.call('HINCRBY', base .. ':pending', bucket, micros)
        redis.call('ZADD', base .. ':pidx', bucket, bucket)
        redis.call('INCRBY', base .. ':ptotal', micros)
        for _, k in ipairs({':pending', ':pidx', ':ptotal'}) do
          redis.call('PEXPIRE', base .. k, keep)
        end
      else
        redis.call('INCRBY', base .. ':spent', micros)
        redis.call('PEXPIRE', base .. ':spent', keep)
      end
    end
  end
end
-- 1 when a spend reservation was still open (0: its lease had run out, or none was made).
return settled
