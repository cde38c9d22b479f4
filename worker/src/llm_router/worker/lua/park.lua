-- park.lua: park a batch-lane job whose next model answers through a Message Batch. The
-- job keeps its place in its queue but is scored far in the future (no worker claims
-- it; arq's producers see it deferred), its state is kept, its request waits to be sent,
-- and its lease is released: it holds no job slot while it waits. The try is not
-- counted. With no entry (a parked job claimed again), only the place and the lease
-- change. Used by llm_router.worker.queue.RedisQueue.park.
--
-- KEYS, in order:
--   1. arq:in-progress:<id>
--   2. the queue (sorted set)
--   3. the job's parked state, llm_router:parked:<id> (hash)
--   4. the parked jobs, llm_router:parked (sorted set, score = when parked, ms)
--   5. the model's waiting requests, llm_router:msgbatch:pending:<batch queue>:<model> (list)
--   6. the models with waiting requests, llm_router:msgbatch:models:<batch queue> (sorted set, score =
--      when its oldest waiting request was parked, ms)
--   7. arq:job:<id>
--   8. arq:retry:<id>
--   9. the parked jobs' deadlines, llm_router:parked_deadlines (sorted set, score = the
--      deadline, Unix ms)
-- ARGV, in order:
--   1. the job id
--   2. this worker's token
--   3. the job's state (JSON), or '' to keep the state it has
--   4. its request's entry for the batch (JSON), or '' for none
--   5. now, Unix ms
--   6. the score that keeps it parked (far in the future)
--   7. how long the job and its state are kept, ms
--   8. the model (its label)
--   9. the job's score before it was parked (where it goes back to)
--  10. its request's custom id
--  11. its deadline, Unix ms, or '' for none
-- Returns 1 when parked, 0 when the lease was no longer ours.
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
if ARGV[3] ~= '' then
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[3], 'state', ARGV[3], 'queue', KEYS[2], 'score', ARGV[9],
    'custom_id', ARGV[10], 'parked_ms', ARGV[5])
end
redis.call('PEXPIRE', KEYS[3], ARGV[7])
redis.call('PEXPIRE', KEYS[7], ARGV[7])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[1])
redis.call('ZADD', KEYS[4], 'NX', ARGV[5], ARGV[1])
if ARGV[11] ~= '' then redis.call('ZADD', KEYS[9], ARGV[11], ARGV[1]) end
if ARGV[4] ~= '' then
  redis.call('RPUSH', KEYS[5], ARGV[4])
  redis.call('ZADD', KEYS[6], 'NX', ARGV[5], ARGV[8])
end
if tonumber(redis.call('GET', KEYS[8]) or '0') > 0 then redis.call('DECR', KEYS[8]) end
redis.call('DEL', KEYS[1])
return 1
