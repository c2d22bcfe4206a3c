-- Adds one gateway's new usage of a deployment to the current minute's counters and returns
-- everyone's: current requests, tokens, previous minute's requests, tokens.
-- KEYS[1]: this minute's hash, KEYS[2]: the previous minute's (same hash tag).
-- ARGV[1]: requests to add, ARGV[2]: tokens to add.
local requests = tonumber(ARGV[1]) or 0
local tokens = tonumber(ARGV[2]) or 0
if requests > 0 then redis.call('HINCRBY', KEYS[1], 'r', requests) end
if tokens > 0 then redis.call('HINCRBY', KEYS[1], 't', tokens) end
if requests > 0 or tokens > 0 then redis.call('PEXPIRE', KEYS[1], 180000) end
local cur = redis.call('HMGET', KEYS[1], 'r', 't')
local prev = redis.call('HMGET', KEYS[2], 'r', 't')
return {tonumber(cur[1]) or 0, tonumber(cur[2]) or 0, tonumber(prev[1]) or 0, tonumber(prev[2]) or 0}
