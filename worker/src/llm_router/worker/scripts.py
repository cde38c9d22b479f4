"""The worker's side of the queue, as Redis scripts: each step is one atomic round trip.

Keys are arq's (``arq:job:``, ``arq:in-progress:``, ``arq:retry:``, ``arq:result:``
and the queue's sorted set), so arq producers and tools still understand them.
``arq:in-progress:<id>`` holds the token of the worker that leases the job.
"""

from __future__ import annotations

#: Find due jobs nobody holds, lease them and read them, in one step, from each queue in
#: turn (interactive first). Jobs being run stay in their queue, so the script pages past
#: them. KEYS: the queues, in claim order. ARGV: now ms, lease ms, most jobs in all,
#: token, most entries to look at per queue, retry-key ttl s, then the most jobs to take
#: from each queue. Returns queue index (0-based), id, score, job blob (false if
#: expired), try number, ...
CLAIM = """
local left, scan_max = tonumber(ARGV[3]), tonumber(ARGV[5])
local out = {}
for q = 1, #KEYS do
  local want, seen = math.min(tonumber(ARGV[6 + q]), left), 0
  while want > 0 and seen < scan_max do
    local ids = redis.call('ZRANGEBYSCORE', KEYS[q], '-inf', ARGV[1], 'LIMIT', seen, 100)
    if #ids == 0 then break end
    seen = seen + #ids
    for _, id in ipairs(ids) do
      if want > 0
         and redis.call('SET', 'arq:in-progress:' .. id, ARGV[4], 'NX', 'PX', ARGV[2]) then
        local tries = redis.call('INCR', 'arq:retry:' .. id)
        redis.call('EXPIRE', 'arq:retry:' .. id, ARGV[6])
        out[#out + 1] = q - 1
        out[#out + 1] = id
        out[#out + 1] = redis.call('ZSCORE', KEYS[q], id)
        out[#out + 1] = redis.call('GET', 'arq:job:' .. id)
        out[#out + 1] = tries
        want, left = want - 1, left - 1
      end
    end
  end
end
return out
"""

#: Extend this worker's leases. KEYS: in-progress keys. ARGV: token, lease ms.
#: Returns the keys that are no longer this worker's.
RENEW = """
local lost = {}
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    lost[#lost + 1] = key
  end
end
return lost
"""

#: Store a job's result, push it to the producer's reply list and release the lease;
#: the first result wins. With an empty blob, hand the job back instead (it stays
#: queued, is not counted as a try, and a wake-up token calls another worker).
#: KEYS: result, in-progress, retry, job, queue, reply list ('' for none), wake-up list.
#: ARGV: job id, token, result blob, result ttl ms ('' = forever), reply ttl s, wake-up cap.
#: Returns 1 when done, 0 when another run's result was already there (or, handing
#: back, when the lease was no longer ours).
FINISH = """
local function release()
  if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
end
if ARGV[3] == '' then
  if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
  redis.call('DEL', KEYS[2])
  if tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then redis.call('DECR', KEYS[3]) end
  redis.call('LPUSH', KEYS[7], '1')
  redis.call('LTRIM', KEYS[7], 0, tonumber(ARGV[6]) - 1)
  return 1
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  release()
  return 0
end
if ARGV[4] == '' then
  redis.call('SET', KEYS[1], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
if KEYS[6] ~= '' then
  redis.call('LPUSH', KEYS[6], ARGV[3])
  redis.call('EXPIRE', KEYS[6], ARGV[5])
end
redis.call('DEL', KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
release()
return 1
"""

#: A waiting worker offers itself to producers, whose enqueue script then hands it a
#: job directly (lease, try count and job in its inbox: no claim round trip). Expires
#: unless renewed. KEYS[1] idle set. ARGV: member ``<token>|<lease ms>``, ttl ms.
REGISTER = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
