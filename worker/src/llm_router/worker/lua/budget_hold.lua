-- budget_hold.lua: drop stale holds, then hold a call's worst-case cost against its
-- chain's daily budget unless spent + held already reach it. Amounts are in nusd
-- (nano-dollars). Used by llm_router.worker.budgets.Ledger.hold.
--
-- KEYS, in order:
--   1. the day's hash, llm_router:spend:<day> (fields "chain|<chain>|spent_nusd", ...)
--   2. its holds, llm_router:spend:<day>:holds (member "<chain>|<nusd>|<id>", score
--      = expiry, Unix s)
-- ARGV, in order:
--   1. now, Unix s
--   2. the chain
--   3. the hold, nusd
--   4. the budget, nusd
--   5. the hold's member
--   6. the hold's expiry, Unix s
--   7. the keys' time to live, s
-- Returns {admitted (1 or 0), spent, held} (nusd), as seen before the hold.
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, member in ipairs(stale) do
  local chain, amount = string.match(member, '^(.*)|(%d+)|[^|]*$')
  if chain then
    redis.call('HINCRBY', KEYS[1], 'chain|' .. chain .. '|reserved_nusd', -tonumber(amount))
  end
  redis.call('ZREM', KEYS[2], member)
end
local prefix = 'chain|' .. ARGV[2] .. '|'
local spent = tonumber(redis.call('HGET', KEYS[1], prefix .. 'spent_nusd') or '0')
local held = tonumber(redis.call('HGET', KEYS[1], prefix .. 'reserved_nusd') or '0')
redis.call('HSET', KEYS[1], prefix .. 'budget_nusd', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[7])
if spent + held >= tonumber(ARGV[4]) then return {0, spent, held} end
redis.call('HINCRBY', KEYS[1], prefix .. 'reserved_nusd', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[7])
return {1, spent, held}
