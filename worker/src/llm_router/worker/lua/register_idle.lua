-- register_idle.lua: a waiting worker offers itself to producers, whose enqueue script
-- (the client's enqueue.lua) then hands it a job directly (lease, try count and job in
-- its inbox: no claim round trip). Expires unless renewed. Used by
-- llm_router.worker.queue.RedisQueue.wait_for_work.
--
-- KEYS, in order:
--   1. the idle set, <queue>:idle
-- ARGV, in order:
--   1. the member, "<worker token>|<lease ms>"
--   2. time to live, ms (score = Redis's now + this)
-- Returns 1.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
