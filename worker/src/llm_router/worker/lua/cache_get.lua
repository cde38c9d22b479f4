-- cache_get.lua: look a request up in the response cache and count the lookup, in one
-- round trip. An entry is a hit only when it is no older than the request will take:
-- its age is the time to live it was stored with (the entry's first JSON field,
-- "kept_ms") minus what is left of it (PTTL), both on Redis' clock. Used by
-- llm_router.worker.cache.ResponseCache.
--
-- KEYS, in order:
--   1. the entry, llm_router:cache:<sha256 hex>
--   2. the stats hash, llm_router:cache:stats (fields "hits", "misses")
-- ARGV, in order:
--   1. the oldest answer the request takes, ms (its cache_ttl)
-- Returns {entry, age in ms} on a hit; false on a miss (no entry, too old, or not
-- one this script can read).
local entry = redis.call('GET', KEYS[1])
if entry then
  local kept = tonumber(string.match(entry, '^{"kept_ms":(%d+),'))
  local left = redis.call('PTTL', KEYS[1])
  if kept and left >= 0 then
    local age = math.max(0, kept - left)
    if age <= tonumber(ARGV[1]) then
      redis.call('HINCRBY', KEYS[2], 'hits', 1)
      return {entry, age}
    end
  end
end
redis.call('HINCRBY', KEYS[2], 'misses', 1)
return false
