-- budget_settle.lua: release a call's hold and count what it used against its chain
-- and its model. Used by llm_router.worker.budgets.Ledger.settle.
--
-- KEYS, in order:
--   1. the day's hash, llm_router:spend:<day>
--   2. its holds, llm_router:spend:<day>:holds
-- ARGV, in order:
--   1. the chain
--   2. the model
--   3. the hold's member ('' for none)
--   4. the hold, nusd
--   5. the day hash's time to live, s
--   6. the cost, nusd, then the token counts: 7. input, 8. output, 9. cache read
--      input, 10. cache creation input (6 to 10 absent when nothing answered)
-- Returns 1.
local prefix = 'chain|' .. ARGV[1] .. '|'
if ARGV[3] ~= '' and redis.call('ZREM', KEYS[2], ARGV[3]) == 1 then
  redis.call('HINCRBY', KEYS[1], prefix .. 'reserved_nusd', -tonumber(ARGV[4]))
end
if #ARGV > 5 then
  local model = 'model|' .. ARGV[2] .. '|'
  redis.call('HINCRBY', KEYS[1], prefix .. 'spent_nusd', ARGV[6])
  redis.call('HINCRBY', KEYS[1], prefix .. 'calls', 1)
  redis.call('HINCRBY', KEYS[1], model .. 'cost_nusd', ARGV[6])
  redis.call('HINCRBY', KEYS[1], model .. 'calls', 1)
  redis.call('HINCRBY', KEYS[1], model .. 'input_tokens', ARGV[7])
  redis.call('HINCRBY', KEYS[1], model .. 'output_tokens', ARGV[8])
  redis.call('HINCRBY', KEYS[1], model .. 'cache_read_input_tokens', ARGV[9])
  redis.call('HINCRBY', KEYS[1], model .. 'cache_creation_input_tokens', ARGV[10])
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
