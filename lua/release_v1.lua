-- release_v1: drop one request's hold without counting anything. Idempotent.
--
-- KEYS: the layout of reserve_v1 —
--   KEYS[1] hold, KEYS[2] done, KEYS[3] seq, then per counter i: KEYS[3i+1] data,
--   KEYS[3i+2] res, KEYS[3i+3] exp (only res and exp are used here).
--
-- ARGV[1] trace id
-- ARGV[2] C, number of distinct counters
--
-- Time: the server's TIME (reported only). Returns {'OK', now_ms}.

-- server_time and the other helpers: lua/prelude.lua, sent ahead of this file.
local _, now_ms = server_time()

local trace = ARGV[1]
local C = tonumber(ARGV[2])

for i = 1, C do
  drop_hold(KEYS[3 * i + 2], KEYS[3 * i + 3], trace)
end
redis.call('DEL', KEYS[1])
return {'OK', now_ms}
