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

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local trace = ARGV[1]
local C = tonumber(ARGV[2])
local f = 'h:' .. trace

for i = 1, C do
  local res, exp = KEYS[3 * i + 2], KEYS[3 * i + 3]
  local held = redis.call('HGET', res, f)
  if held then
    if string.sub(held, 1, 1) == '-' then
      redis.call('HINCRBY', res, 'sum', string.sub(held, 2))
    else
      redis.call('HINCRBY', res, 'sum', '-' .. held)
    end
    redis.call('HDEL', res, f)
  end
  redis.call('ZREM', exp, trace)
end
redis.call('DEL', KEYS[1])
return {'OK', now_ms}
