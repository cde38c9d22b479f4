-- metrics_record.lua: one round trip per job: count (once per job id), snapshot,
-- publish. A job that ran twice (at-least-once delivery) is counted and announced
-- once. Used by llm_router.worker.metrics.Metrics.
--
-- KEYS, in order:
--   1. the counters hash, llm_router:metrics:counters (field "<model>|<outcome>")
--   2. the per-job marker, llm_router:metrics:counted:<id>
--   3. the jobs stored but not yet counted, llm_router:metrics:pending (finish.lua)
-- ARGV, in order:
--   1. the marker's time to live, s
--   2. the channel to publish on
--   3. the event's JSON without its closing brace
--   4. the job id (taken out of KEYS[3])
--   5, 6, ...  the "<model>|<outcome>" fields to add 1 to
-- Returns the snapshot's JSON ({"<model>": {"success": n, ...}}), which is spliced
-- into the published event.
local fresh = redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1])
if fresh then
  for i = 5, #ARGV do redis.call('HINCRBY', KEYS[1], ARGV[i], 1) end
end
redis.call('ZREM', KEYS[3], ARGV[4])
local flat = redis.call('HGETALL', KEYS[1])
local snap = {}
for i = 1, #flat, 2 do
  local field = flat[i]
  local cut = string.find(field, '|[^|]*$')
  if cut then
    local model, outcome = string.sub(field, 1, cut - 1), string.sub(field, cut + 1)
    snap[model] = snap[model] or {success = 0, fallback = 0, error = 0, skipped = 0}
    snap[model][outcome] = tonumber(flat[i + 1])
  end
end
local snapshot = '{}'
if next(snap) ~= nil then snapshot = cjson.encode(snap) end
if fresh then
  redis.call('PUBLISH', ARGV[2], ARGV[3] .. ',"metrics_snapshot":' .. snapshot .. '}')
end
return snapshot
