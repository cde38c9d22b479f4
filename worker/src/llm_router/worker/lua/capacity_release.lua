-- capacity_release.lua: give back a slot or a place in line, drop lapsed slots and
-- places (as capacity_acquire.lua does), then wake the waiters now at the head (an
-- LPUSH to their process's list). Used by llm_router.worker.capacity.Capacity.
--
-- KEYS, in order: the first three of capacity_acquire.lua's:
--   1. holders
--   2. line
--   3. alive
-- ARGV, in order:
--   1. me (the waiter, "<process>:<n>")
--   2. slots (max_in_flight)
--   3. the wake-up list prefix, llm_router:capacity:wake: (the script appends the
--      waiter's process)
-- Returns the number of free slots.
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])

local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
for _, w in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[2], w)
  redis.call('ZREM', KEYS[3], w)
end

local free = tonumber(ARGV[2]) - redis.call('ZCARD', KEYS[1])
if free > 0 then
  for _, w in ipairs(redis.call('ZRANGE', KEYS[2], 0, free - 1)) do
    local list = ARGV[3] .. string.match(w, '^[^:]+')
    redis.call('LPUSH', list, w)
    redis.call('EXPIRE', list, 60)
  end
end
return free
