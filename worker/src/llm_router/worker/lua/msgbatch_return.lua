-- msgbatch_return.lua: put a take's requests back at the head of their model's waiting
-- list: its sender failed to create the batch, or died before it knew. Used by
-- llm_router.worker.batches.MessageBatches.
--
-- KEYS, in order:
--   1. this take, llm_router:msgbatch:take:<batch queue>:<take id> (list)
--   2. the takes, llm_router:msgbatch:sending:<batch queue> (sorted set)
--   3. the model's waiting requests, llm_router:msgbatch:pending:<batch queue>:<model> (list)
--   4. the models with waiting requests, llm_router:msgbatch:models:<batch queue> (sorted set)
-- ARGV, in order:
--   1. the take id
--   2. the model (its label)
--   3. the score its model gets back in KEYS[4] (when to send, ms)
-- Returns how many requests went back.
local entries = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #entries, 1, -1 do
  redis.call('LPUSH', KEYS[3], entries[i])
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if #entries > 0 then
  redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
end
return #entries
