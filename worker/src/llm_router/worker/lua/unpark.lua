-- unpark.lua: a parked job's batch result is in: keep it with the job's state and put
-- the job back in its queue at its old place, waking a worker. A result for a job that
-- is no longer parked for this request (finished, parked again elsewhere, or answered
-- already) is dropped: each request is resumed once. Used by
-- llm_router.worker.batches.MessageBatches.
--
-- KEYS, in order:
--   1. the job's parked state, llm_router:parked:<id> (hash)
--   2. the parked jobs, llm_router:parked (sorted set)
--   3. their deadlines, llm_router:parked_deadlines (sorted set)
-- ARGV, in order:
--   1. the job id
--   2. the request's custom id
--   3. the result (JSON: the batch's result object for the request)
--   4. the batch id
--   5. the most wake-up tokens kept
-- Returns 1 when the job was put back, 0 when the result was dropped.
if redis.call('HGET', KEYS[1], 'custom_id') ~= ARGV[2] then return 0 end
if redis.call('HEXISTS', KEYS[1], 'result') == 1 then return 0 end
redis.call('HSET', KEYS[1], 'result', ARGV[3], 'batch_id', ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local queue = redis.call('HGET', KEYS[1], 'queue')
redis.call('ZADD', queue, redis.call('HGET', KEYS[1], 'score'), ARGV[1])
redis.call('LPUSH', queue .. ':wake', '1')
redis.call('LTRIM', queue .. ':wake', 0, tonumber(ARGV[5]) - 1)
return 1
