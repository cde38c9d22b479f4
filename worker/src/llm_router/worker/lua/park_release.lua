-- park_release.lua: a parked job stops waiting for its batch (its producer cancelled it,
-- or its deadline passed): it goes back to its queue at its old place, marked
-- ``stopped``, and a wake-up calls a worker, which ends it ``cancelled`` or ``expired``.
-- Its request, if not sent yet, is left out of the batch; an answer that comes later is
-- dropped. Used by llm_router.worker.batches.MessageBatches.release.
--
-- KEYS, in order:
--   1. the job's parked state, llm_router:parked:<id> (hash)
--   2. the parked jobs, llm_router:parked (sorted set)
--   3. their deadlines, llm_router:parked_deadlines (sorted set)
-- ARGV, in order:
--   1. the job id
--   2. the most wake-up tokens kept
-- Returns 1 when the job was put back, 0 when it was not waiting (any more).
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'stopped', '1')
local queue = redis.call('HGET', KEYS[1], 'queue')
redis.call('ZADD', queue, redis.call('HGET', KEYS[1], 'score'), ARGV[1])
redis.call('LPUSH', queue .. ':wake', '1')
redis.call('LTRIM', queue .. ':wake', 0, tonumber(ARGV[2]) - 1)
return 1
