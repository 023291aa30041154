-- touch_v1: keep a live request's hold from being reaped (its instance is still running it).
--
-- KEYS: the layout of reserve_v1 —
--   KEYS[1] hold, KEYS[2] done, KEYS[3] seq, then per counter i: KEYS[3i+1] data,
--   KEYS[3i+2] res, KEYS[3i+3] exp (only hold, res and exp are used here).
--
-- ARGV[1] trace id
-- ARGV[2] hold ttl (ms), counted from now
-- ARGV[3] C, number of distinct counters
--
-- Time: the server's TIME. Returns {'OK', now_ms}, or {'GONE', now_ms} when the hold no
-- longer exists (settled, released, or reaped): nothing is changed then.

-- server_time and the other helpers: lua/prelude.lua, sent ahead of this file.
local _, now_ms = server_time()

local trace = ARGV[1]
local ttl = tonumber(ARGV[2])
local C = tonumber(ARGV[3])

if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'GONE', now_ms}
end
redis.call('PEXPIRE', KEYS[1], ttl)
for i = 1, C do
  local res, exp = KEYS[3 * i + 2], KEYS[3 * i + 3]
  redis.call('ZADD', exp, 'XX', now_ms + ttl, trace)
  if redis.call('PTTL', res) < ttl then
    redis.call('PEXPIRE', res, ttl)
  end
  if redis.call('PTTL', exp) < ttl then
    redis.call('PEXPIRE', exp, ttl)
  end
end
return {'OK', now_ms}
