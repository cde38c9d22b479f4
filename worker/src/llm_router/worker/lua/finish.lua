-- finish.lua: store a job's result, push it to the producer's reply list and release
-- the lease; the first result wins. With an empty blob, hand the job back instead (it
-- stays queued, is not counted as a try, and a wake-up token calls another worker).
-- Used by llm_router.worker.queue.RedisQueue.finish and .hand_back.
--
-- KEYS, in order:
--   1. arq:result:<id>
--   2. arq:in-progress:<id>
--   3. arq:retry:<id>
--   4. arq:job:<id>
--   5. the queue (sorted set)
--   6. the producer's reply list ('' for none)
--   7. the queue's wake-up list, <queue>:wake
--   8. the jobs stored but not yet counted, llm_router:metrics:pending (sorted set,
--      score = when stored, ms): metrics_record.lua takes the job out once it counts it
--   9. the failed-job registry, llm_router:failed (sorted set, score = when, ms)
--  10. this job's entry in it, llm_router:failed:<id>
-- ARGV, in order:
--   1. the job id
--   2. this worker's token
--   3. the result blob ('' hands the job back)
--   4. the result's time to live, ms
--   5. the reply list's time to live, s
--   6. the most wake-up tokens kept
--   7. '1': the job is to be counted and announced (KEYS[8]); '': not
--   8. the registry entry (JSON: the job blob and the result), or '' when the job did not
--      end failed or expired
--   9. the most jobs the registry keeps (the oldest go first)
--  10. how long an entry is kept, ms
-- Storing a result also drops the job's parked state, llm_router:parked:<id> (a job
-- answered through a Message Batch).
-- Returns 1 when done, 0 when another run's result was already there (or, handing
-- back, when the lease was no longer ours).
local function release()
  if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
end
if ARGV[3] == '' then
  if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
  redis.call('DEL', KEYS[2])
  if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
  redis.call('LPUSH', KEYS[7], '1')
  redis.call('LTRIM', KEYS[7], 0, tonumber(ARGV[6]) - 1)
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  release()
  return 0
end
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
if KEYS[6] ~= '' then
  redis.call('LPUSH', KEYS[6], ARGV[3])
  redis.call('EXPIRE', KEYS[6], ARGV[5])
end
redis.call('DEL', KEYS[3], KEYS[4], 'llm_router:parked:' .. ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[7] == '1' then
  redis.call('ZADD', KEYS[8], now, ARGV[1])
end
local keep = tonumber(ARGV[9])
if ARGV[8] ~= '' and keep > 0 then
  redis.call('SET', KEYS[10], ARGV[8], 'PX', ARGV[10])
  redis.call('ZADD', KEYS[9], now, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[9], '-inf', now - tonumber(ARGV[10]))
  local over = redis.call('ZCARD', KEYS[9]) - keep
  if over > 0 then
    for _, id in ipairs(redis.call('ZRANGE', KEYS[9], 0, over - 1)) do
      redis.call('DEL', 'llm_router:failed:' .. id)
    end
    redis.call('ZREMRANGEBYRANK', KEYS[9], 0, over - 1)
  end
end
release()
return 1
