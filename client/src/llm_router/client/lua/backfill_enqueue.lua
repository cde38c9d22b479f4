-- backfill_enqueue.lua: queue many jobs (up to 500 rows per call) for a backfill.
-- Used by llm_router.client.backfill.Backfill. The job and result keys are built here
-- from arq's prefixes instead of being passed as KEYS, so that one call can carry
-- hundreds of rows (fine on one Redis server, not on a Cluster).
--
-- KEYS, in order:
--   1. <queue>          the batch queue: a sorted set of job ids scored by enqueue time
--                       (llm_router:batch by default)
--   2. <queue>:wake     its wake-up list, where idle workers block
-- ARGV, in order:
--   1. each job key's time to live, in ms (86400000: a day)
--   2. the score of every job queued: the enqueue time, Unix ms
--   3. the most wake-up tokens kept in KEYS[2] (100)
--   4. the job key prefix, "arq:job:"
--   5. the result key prefix, "arq:result:"
--   6. each job's deadline, ms from now on Redis' clock, or '' for none (enqueue.lua's
--      ARGV[8]: llm_router:deadline:<id> = '1' with this time to live)
--   7, 8, ...  pairs: job id, job blob (the JSON of enqueue.lua's ARGV[1])
-- Returns one answer per row, in order:
--   the result blob  the job already finished (while the producer was away)
--   0                its job key exists: queued or running, wait for its reply
--   1                queued now (SET arq:job:<id> NX, ZADD to KEYS[1])
-- Then one wake-up token per job queued now, at most the cap, so waiting workers start
-- at once.
local unpack = unpack or table.unpack
local out, members = {}, {}
for i = 7, #ARGV, 2 do
  local id = ARGV[i]
  local result = redis.call('GET', ARGV[5] .. id)
  if result then
    out[#out + 1] = result
  elseif redis.call('SET', ARGV[4] .. id, ARGV[i + 1], 'PX', ARGV[1], 'NX') then
    out[#out + 1] = 1
    if ARGV[6] ~= '' then
      redis.call('SET', 'llm_router:deadline:' .. id, '1', 'PX', ARGV[6])
    end
    members[#members + 1] = ARGV[2]
    members[#members + 1] = id
  else
    out[#out + 1] = 0
  end
end
if #members > 0 then
  redis.call('ZADD', KEYS[1], unpack(members))
  local cap = tonumber(ARGV[3])
  for _ = 1, math.min(#members / 2, cap) do redis.call('LPUSH', KEYS[2], '1') end
  redis.call('LTRIM', KEYS[2], 0, cap - 1)
end
return out
