-- Reserves (or extends) one request's share of every limit that applies to it, atomically:
-- either every check passes and every counter moves, or nothing moves.
--
-- KEYS[i]  base key of check i
-- ARGV[1]  request id            ARGV[2] lease (ms)         ARGV[3] tokens asked
-- ARGV[4]  spend asked (micro-units of the currency)        ARGV[5] ledger lag allowance (ms)
-- ARGV[6]  number of checks      ARGV[7] 'admit' or 'extend'
-- then per check: kind, limit, soft ('1'/'0'), balance key ('' unless kind is 'S')
--   kind 'r' requests/min, 't' tokens/min, 'c' concurrent requests,
--        's' spend counted by the gateways, 'S' spend with the pipeline's balance as authority
--
-- Returns { granted (1/0), index of the first failing check (0 if none), window,
--           then per check: used before this request, limit }
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id = ARGV[1]
local lease = tonumber(ARGV[2])
local tokens = tonumber(ARGV[3])
local micros = tonumber(ARGV[4])
local lag = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local extend = ARGV[7] == 'extend'
local W = 60000
local w = math.floor(now / W)
local keep = 40 * 24 * 3600 * 1000

-- Sliding window: this minute's count plus the previous minute's, weighted by how much of
-- it still lies within the last 60 s.
local function window_used(base)
  local cur = tonumber(redis.call('GET', base .. ':' .. w) or '0')
  local prev = tonumber(redis.call('GET', base .. ':' .. (w - 1)) or '0')
  return cur + math.ceil(prev * (W - now % W) / W)
end

-- An exact decimal string as whole micro-units, rounded up (never under-counts spend).
local function to_micros(s)
  if not s then return 0 end
  local i, f = string.match(s, '^(%d*)%.?(%d*)$')
  if not i then return 0 end
  local v = tonumber(i ~= '' and i or '0') * 1000000 + tonumber(string.sub(f .. '000000', 1, 6))
  if string.find(string.sub(f, 7), '[1-9]') then v = v + 1 end
  return v
end

-- Open reservations of a spend scope, dropping those whose lease ran out.
local function reserved(base)
  local expired = redis.call('ZRANGEBYSCORE', base .. ':rexp', '-inf', now)
  for _, rid in ipairs(expired) do
    local amt = tonumber(redis.call('HGET', base .. ':res', rid) or '0')
    redis.call('HDEL', base .. ':res', rid)
    redis.call('ZREM', base .. ':rexp', rid)
    redis.call('DECRBY', base .. ':rtotal', amt)
  end
  return tonumber(redis.call('GET', base .. ':rtotal') or '0')
end

-- Settled spend: the pipeline's balance plus what the gateways settled since its last update
-- (less the lag allowance), or the gateways' own count. Settlements are kept per second
-- (`:pending` amounts, `:pidx` their seconds, `:ptotal` their sum); those the balance already
-- holds are dropped here, so each call reads a sum instead of every bucket.
local function settled(base, kind, balkey)
  if kind ~= 'S' then
    return tonumber(redis.call('GET', base .. ':spent') or '0')
  end
  local bal = redis.call('HMGET', balkey, 'spend', 'updated_ms')
  if bal[2] then
    local last_covered = math.floor((tonumber(bal[2]) - lag) / 1000) - 1
    local old = redis.call('ZRANGEBYSCORE', base .. ':pidx', '-inf', last_covered)
    for _, bucket in ipairs(old) do
      local amt = tonumber(redis.call('HGET', base .. ':pending', bucket) or '0')
      redis.call('HDEL', base .. ':pending', bucket)
      redis.call('ZREM', base .. ':pidx', bucket)
      redis.call('DECRBY', base .. ':ptotal', amt)
    end
  end
  return to_micros(bal[1]) + tonumber(redis.call('GET', base .. ':ptotal') or '0')
end

local out = {0, 0, w}
local fail = 0
for i = 1, n do
  local a = 7 + (i - 1) * 4
  local kind, limit, soft, balkey = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3] == '1', ARGV[a + 4]
  local base = KEYS[i]
  local used, ask
  if kind == 'r' then
    used = window_used(base)
    ask = extend and 0 or 1
  elseif kind == 't' then
    used = window_used(base)
    ask = tokens
  elseif kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', base, '-inf', now)
    used = redis.call('ZCARD', base)
    if extend then used = used - 1 end
    ask = extend and 0 or 1
  else
    used = settled(base, kind, balkey) + reserved(base)
    ask = micros
  end
  out[#out + 1] = used
  out[#out + 1] = limit
  if fail == 0 and ask > 0 then
    -- Hard limits refuse what would cross them; soft ones refuse new requests once crossed
    -- and never stop a running one.
    local over
    if kind == 'r' or kind == 'c' or not soft then
      over = used + ask > limit
    else
      over = (not extend) and used >= limit
    end
    if over then fail = i end
  end
end
if fail > 0 then
  out[2] = fail
  return out
end

-- Expiries are set when a counter is created (its first increment), not on every call.
for i = 1, n do
  local a = 7 + (i - 1) * 4
  local kind = ARGV[a + 1]
  local base = KEYS[i]
  if kind == 'r' and not extend then
    if redis.call('INCRBY', base .. ':' .. w, 1) == 1 then
      redis.call('PEXPIRE', base .. ':' .. w, 2 * W + 1000)
    end
  elseif kind == 't' and tokens > 0 then
    if redis.call('INCRBY', base .. ':' .. w, tokens) == tokens then
      redis.call('PEXPIRE', base .. ':' .. w, 2 * W + 1000)
    end
  elseif kind == 'c' then
    redis.call('ZADD', base, now + lease, id)
    redis.call('PEXPIRE', base, lease + 1000)
  elseif (kind == 's' or kind == 'S') and micros > 0 then
    redis.call('HINCRBY', base .. ':res', id, micros)
    redis.call('ZADD', base .. ':rexp', now + lease, id)
    if redis.call('INCRBY', base .. ':rtotal', micros) == micros then
      redis.call('PEXPIRE', base .. ':res', keep)
      redis.call('PEXPIRE', base .. ':rexp', keep)
      redis.call('PEXPIRE', base .. ':rtotal', keep)
    end
  end
end
out[1] = 1
return out
