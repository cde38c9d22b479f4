-- msgbatch_take.lua: take a model's waiting requests to send as one Message Batch: at
-- most a count and a size, at least one. They are kept under a take id until the batch
-- is known to exist (msgbatch_opened.lua), so a sender that dies in between loses none
-- (msgbatch_return.lua puts them back). Used by
-- llm_router.worker.batches.MessageBatches.
--
-- KEYS, in order:
--   1. the model's waiting requests, llm_router:msgbatch:pending:<batch queue>:<model> (list)
--   2. the models with waiting requests, llm_router:msgbatch:models:<batch queue> (sorted set)
--   3. this take, llm_router:msgbatch:take:<batch queue>:<take id> (list)
--   4. the takes, llm_router:msgbatch:sending:<batch queue> (sorted set, score = when taken, ms)
-- ARGV, in order:
--   1. the model (its label)
--   2. the most requests
--   3. the most bytes
--   4. the take id, <random>|<model>
--   5. now, Unix ms
-- The model's score becomes the parking time of the oldest request left (an entry
-- begins {"ms":<when parked>,...}; else now).
-- Returns the entries taken (JSON strings).
local most, room = tonumber(ARGV[2]), tonumber(ARGV[3])
local taken, size = {}, 0
while #taken < most do
  local entry = redis.call('LINDEX', KEYS[1], 0)
  if not entry then break end
  if #taken > 0 and size + #entry > room then break end
  redis.call('LPOP', KEYS[1])
  taken[#taken + 1] = entry
  size = size + #entry
end
local head = redis.call('LINDEX', KEYS[1], 0)
if not head then
  redis.call('ZREM', KEYS[2], ARGV[1])
else  -- what is left is due when its oldest request is (entries begin {"ms":<parked>)
  redis.call('ZADD', KEYS[2], string.match(head, '^{"ms":(%d+)') or ARGV[5], ARGV[1])
end
for i = 1, #taken, 1000 do  -- unpack's arguments are bounded by Lua's stack
  redis.call('RPUSH', KEYS[3], unpack(taken, i, math.min(i + 999, #taken)))
end
if #taken > 0 then redis.call('ZADD', KEYS[4], ARGV[5], ARGV[4]) end
return taken
