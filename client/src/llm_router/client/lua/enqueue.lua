-- enqueue.lua: queue one llm-router job, or hand it straight to a waiting worker.
-- Used by llm_router.client.RouterClient.enqueue; a producer in another language can
-- run it the same way, with EVALSHA (after SCRIPT LOAD) or EVAL and 5 keys. It also
-- writes keys it builds itself (below), so it needs one Redis server, not a Cluster.
--
-- KEYS, in order:
--   1. arq:job:<id>         the job blob (string); <id> is the job id, ARGV[4]
--   2. arq:result:<id>      the job's result (string), once there is one
--   3. <queue>              the queue: a sorted set of job ids scored by enqueue time
--                           (llm_router:queue by default; backfills use llm_router:batch)
--   4. <queue>:wake         the queue's wake-up list, where idle workers block
--   5. <queue>:idle         the waiting workers: a sorted set, member
--                           "<worker token>|<lease ms>", score = when it expires (Unix ms)
-- ARGV, in order:
--   1. the job blob: compact UTF-8 JSON
--      {"t":1,"f":"route","a":[<request>],"k":{"reply_to":"llm_router:reply:<...>"},"et":<ms>}
--      (the result is LPUSHed to reply_to, a list under llm_router:reply:)
--   2. the job key's time to live, in ms (86400000: a day)
--   3. the job's score in the queue: its enqueue time, Unix ms (the blob's "et")
--   4. the job id
--   5. the last index kept in the wake-up list (LTRIM end): 99 keeps at most 100 tokens
--   6. the inbox key prefix, "<queue>:inbox:" (the script appends the worker's token)
--   7. the try counter's time to live, in seconds (88400)
--   8. optional (protocol version 2): the job's deadline, ms from now on Redis' clock, or
--      '' / absent for none. It becomes llm_router:deadline:<id> = '1' with this time to
--      live; a job whose deadline key is gone when a worker takes it ends "expired".
-- Returns:
--   0  nothing done: the job key or its result already exists (a repeated enqueue of
--      the same id is safe and never queues the job twice)
--   1  queued, and one wake-up token ('1') pushed to KEYS[4] so that the next worker
--      with a free slot claims it
--   2  queued and handed to a waiting worker at once, which is then taken out of KEYS[5]
-- What it does: SET KEYS[1] (PX ARGV[2]) and ZADD it to KEYS[3]. If a worker in
-- KEYS[5] has not expired (by Redis's clock), it leases the job to that worker:
-- SET arq:in-progress:<id> = <worker token> PX <lease ms>, INCR arq:retry:<id> (the
-- try number, EXPIRE ARGV[7]), LPUSH "<id> <try> <score> <blob>" to the worker's inbox
-- <ARGV[6]><worker token> (EXPIRE 60 s). The job stays in the queue until its result
-- is stored.
if redis.call('EXISTS', KEYS[1], KEYS[2]) > 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[8] and ARGV[8] ~= '' then
  redis.call('SET', 'llm_router:deadline:' .. ARGV[4], '1', 'PX', ARGV[8])
end
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4])
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local idle = redis.call('ZRANGEBYSCORE', KEYS[5], now, '+inf', 'LIMIT', 0, 1)
if #idle > 0 then
  local member = idle[1]
  redis.call('ZREM', KEYS[5], member)
  local cut = string.find(member, '|', 1, true)
  local token, lease = string.sub(member, 1, cut - 1), string.sub(member, cut + 1)
  redis.call('SET', 'arq:in-progress:' .. ARGV[4], token, 'PX', lease)
  local tries = redis.call('INCR', 'arq:retry:' .. ARGV[4])
  redis.call('EXPIRE', 'arq:retry:' .. ARGV[4], ARGV[7])
  local inbox = ARGV[6] .. token
  redis.call('LPUSH', inbox, ARGV[4] .. ' ' .. tries .. ' ' .. ARGV[3] .. ' ' .. ARGV[1])
  redis.call('EXPIRE', inbox, 60)
  return 2
end
redis.call('LPUSH', KEYS[4], '1')
redis.call('LTRIM', KEYS[4], 0, ARGV[5])
return 1
