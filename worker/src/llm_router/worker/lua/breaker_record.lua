-- breaker_record.lua: record a call's verdict in its model's shared circuit breaker.
-- Used by llm_router.worker.breaker.Breakers.
--
-- KEYS, in order:
--   1. the breaker hash, llm_router:breaker:<endpoint>
-- ARGV, in order:
--   1. me (this process's token)
--   2. the verdict: 'healthy', 'unwell' or 'abandoned'
--   3. the consecutive failures that open it
--   4. the key's time to live, ms
-- Returns {the new state when this call changed it, else '', consecutive failures}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local s = redis.call('HMGET', KEYS[1], 'state', 'probe')
local state, probe = s[1] or 'closed', s[2]
local mine = state == 'half_open' and probe == ARGV[1]
local changed, failures = '', 0
if ARGV[2] == 'healthy' then
  if mine then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0)
    redis.call('HDEL', KEYS[1], 'probe', 'probe_until', 'opened')
    changed = 'closed'
  elseif state == 'closed' then
    redis.call('HSET', KEYS[1], 'failures', 0)
  end
elseif ARGV[2] == 'unwell' then
  if mine then
    redis.call('HSET', KEYS[1], 'state', 'open', 'opened', now)
    redis.call('HDEL', KEYS[1], 'probe', 'probe_until')
    changed = 'open'
  elseif state == 'closed' then
    failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
    if failures >= tonumber(ARGV[3]) then
      redis.call('HSET', KEYS[1], 'state', 'open', 'opened', now)
      changed = 'open'
    end
  end
elseif mine then
  redis.call('HSET', KEYS[1], 'probe_until', 0)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return {changed, failures}
