-- breaker_admit.lua: may a call go to the model, as its shared circuit breaker says.
-- Used by llm_router.worker.breaker.Breakers.admit.
--
-- KEYS, in order:
--   1. the breaker hash, llm_router:breaker:<endpoint>
-- ARGV, in order:
--   1. me (this process's token)
--   2. cool-down, ms
--   3. probe lease, ms
-- Returns {decision, ms left, changed}: 'pass' (closed; failures so far instead of ms),
-- 'open' (skip; ms until the cool-down ends), 'probing' (skip: another call probes; ms
-- until its lease ends), 'probe' (me; changed = 1 when this call moved it from open to
-- half_open).
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local s = redis.call('HMGET', KEYS[1], 'state', 'opened', 'probe_until', 'failures')
local state = s[1] or 'closed'
if state == 'closed' then return {'pass', tonumber(s[4]) or 0, 0} end
if state == 'open' then
  local left = (tonumber(s[2]) or 0) + tonumber(ARGV[2]) - now
  if left > 0 then return {'open', left, 0} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe', ARGV[1],
             'probe_until', now + tonumber(ARGV[3]))
  return {'probe', 0, 1}
end
local until_ms = tonumber(s[3]) or 0
if until_ms <= now then
  redis.call('HSET', KEYS[1], 'probe', ARGV[1], 'probe_until', now + tonumber(ARGV[3]))
  return {'probe', 0, 0}
end
return {'probing', until_ms - now, 0}
