-- failed_requeue.lua: put a job from the failed-job registry back on its queue, to run
-- once more. Used by llm_router.client.failed.FailedJobs.requeue (`llm-router failed
-- requeue`).
--
-- KEYS, in order:
--   1. the registry, llm_router:failed (sorted set of job ids)
--   2. the job's entry, llm_router:failed:<id> (JSON with "job", the job blob, and "queue")
--   3. arq:job:<id>
--   4. arq:result:<id>
--   5. arq:retry:<id>
--   6. the queue the entry names (sorted set)
--   7. its wake-up list, <queue>:wake
--   8. llm_router:metrics:counted:<id> (so that the new run is counted)
--   9. llm_router:deadline:<id>
--  10. llm_router:cancel:<id>
-- ARGV, in order:
--   1. the job id
--   2. the job key's time to live, ms (86400000)
--   3. the job's score in the queue: now, Unix ms
--   4. the last index kept in the wake-up list (99)
--   5. the job's new deadline, ms from now, or '' for none (its request's expires_in)
-- Returns 1 when requeued; 0 when the registry has no such job; -1 when its entry holds
-- no job blob (it had expired before it ran); -2 when it names another queue than KEYS[6];
-- -3 when the job is queued or running already.
local entry = redis.call('GET', KEYS[2])
if not entry then return 0 end
local e = cjson.decode(entry)
if type(e.job) ~= 'string' then return -1 end
if e.queue ~= KEYS[6] then return -2 end
if redis.call('EXISTS', KEYS[3]) == 1 then return -3 end
redis.call('SET', KEYS[3], e.job, 'PX', ARGV[2])
redis.call('DEL', KEYS[4], KEYS[5], KEYS[8], KEYS[10])
if ARGV[5] ~= '' then
  redis.call('SET', KEYS[9], '1', 'PX', ARGV[5])
else
  redis.call('DEL', KEYS[9])
end
redis.call('ZADD', KEYS[6], ARGV[3], ARGV[1])
redis.call('LPUSH', KEYS[7], '1')
redis.call('LTRIM', KEYS[7], 0, ARGV[4])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
