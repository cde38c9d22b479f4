-- capacity_acquire.lua: take one of a model's max_in_flight slots, or a place in line.
-- First drops lapsed slots (KEYS[1]) and lapsed places in line (KEYS[2], with their
-- expiry in KEYS[3]); `now` is Redis's clock in ms. Keys nobody has used for a day
-- expire. Used by llm_router.worker.capacity.Capacity.
--
-- KEYS, in order (prefix llm_router:capacity:<model>:):
--   1. holders: sorted set, slot -> lease expiry ms
--   2. line: sorted set, waiter -> ticket
--   3. alive: sorted set, waiter -> expiry ms
--   4. ticket counter
-- ARGV, in order:
--   1. slots (max_in_flight)
--   2. me (the waiter, "<process>:<n>")
--   3. lease, ms
--   4. waiter time to live, ms
--   5. ticket offset (0, or BATCH_TICKET_OFFSET for batch work)
-- Returns {1, 0, held} when `me` is among the first free places in line (joining the
-- line first if it is not in it) and takes a slot; else {0, ahead, held}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[2], w)
  redis.call('ZREM', KEYS[3], w)
end

if not redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]) + tonumber(ARGV[5]), ARGV[2])
end
local held = redis.call('ZCARD', KEYS[1])
local ahead = redis.call('ZRANK', KEYS[2], ARGV[2])
if ahead < tonumber(ARGV[1]) - held then
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], 86400000)
  redis.call('PEXPIRE', KEYS[4], 86400000)
  return {1, 0, held + 1}
end
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[2])
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], 86400000) end
return {0, ahead, held}
