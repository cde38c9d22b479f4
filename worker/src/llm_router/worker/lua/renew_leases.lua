-- renew_leases.lua: extend this worker's leases. Used by
-- llm_router.worker.queue.RedisQueue.renew.
--
-- KEYS: the in-progress keys, arq:in-progress:<id>, of the jobs this worker runs.
-- ARGV, in order:
--   1. this worker's token
--   2. lease, ms (PEXPIRE)
-- Returns {the keys that are no longer this worker's (their jobs are lost to it), the
-- keys of jobs a producer asked to cancel (llm_router:cancel:<id> exists)}.
local lost, cancelled = {}, {}
local prefix = #'arq:in-progress:'
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    lost[#lost + 1] = key
  end
  if redis.call('EXISTS', 'llm_router:cancel:' .. string.sub(key, prefix + 1)) == 1 then
    cancelled[#cancelled + 1] = key
  end
end
return {lost, cancelled}
