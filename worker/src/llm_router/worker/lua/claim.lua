-- claim.lua: find due jobs nobody holds, lease them and read them, in one step, from
-- each queue in turn (interactive first). Jobs being run stay in their queue, so the
-- script pages past them. Used by llm_router.worker.queue.RedisQueue.claim.
--
-- KEYS: the queues (sorted sets of job ids, score = enqueue ms), in claim order.
-- ARGV, in order:
--   1. now, Unix ms (jobs scored later are not due)
--   2. lease, ms (arq:in-progress:<id> = token, PX lease)
--   3. the most jobs to take in all
--   4. this worker's token
--   5. the most entries to look at per queue
--   6. the try counter's (arq:retry:<id>) time to live, s
--   7, 8, ...  the most jobs to take from each queue, one per key
-- Returns a flat array, eight entries per job claimed: queue index (0-based), job id,
-- score, job blob (false if the job key expired), try number, what is left of its
-- deadline in ms (PTTL of llm_router:deadline:<id>: -2 when there is none, or it has
-- passed), 1 when a producer asked to cancel it (llm_router:cancel:<id>), else 0, and
-- 1 when it was parked for a Message Batch (llm_router:parked:<id> exists), else 0.
local left, scan_max = tonumber(ARGV[3]), tonumber(ARGV[5])
local out = {}
for q = 1, #KEYS do
  local want, seen = math.min(tonumber(ARGV[6 + q]), left), 0
  while want > 0 and seen < scan_max do
    local ids = redis.call('ZRANGEBYSCORE', KEYS[q], '-inf', ARGV[1], 'LIMIT', seen, 100)
    if #ids == 0 then break end
    seen = seen + #ids
    for _, id in ipairs(ids) do
      if want > 0
         and redis.call('SET', 'arq:in-progress:' .. id, ARGV[4], 'NX', 'PX', ARGV[2]) then
        local tries = redis.call('INCR', 'arq:retry:' .. id)
        redis.call('EXPIRE', 'arq:retry:' .. id, ARGV[6])
        out[#out + 1] = q - 1
        out[#out + 1] = id
        out[#out + 1] = redis.call('ZSCORE', KEYS[q], id)
        out[#out + 1] = redis.call('GET', 'arq:job:' .. id)
        out[#out + 1] = tries
        out[#out + 1] = redis.call('PTTL', 'llm_router:deadline:' .. id)
        out[#out + 1] = redis.call('EXISTS', 'llm_router:cancel:' .. id)
        out[#out + 1] = redis.call('EXISTS', 'llm_router:parked:' .. id)
        want, left = want - 1, left - 1
      end
    end
  end
end
return out
