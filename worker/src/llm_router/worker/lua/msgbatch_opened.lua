-- msgbatch_opened.lua: a take's Message Batch exists: list it as open (to be looked at
-- until it ends) and forget the take. Used by llm_router.worker.batches.MessageBatches.
--
-- KEYS, in order:
--   1. the open batches, llm_router:msgbatch:open:<batch queue> (hash: batch id -> JSON)
--   2. this take, llm_router:msgbatch:take:<batch queue>:<take id> (list)
--   3. the takes, llm_router:msgbatch:sending:<batch queue> (sorted set)
-- ARGV, in order:
--   1. the batch id
--   2. what to keep of it (JSON: the model, when sent, custom id -> job id)
--   3. the take id
-- Returns 1.
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[3])
return 1
