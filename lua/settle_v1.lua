-- settle_v1: replace one request's hold with its actual amounts, exactly once per trace id.
--
-- KEYS: the layout of reserve_v1 —
--   KEYS[1] hold, KEYS[2] done, KEYS[3] seq, then per counter i: KEYS[3i+1] data,
--   KEYS[3i+2] res, KEYS[3i+3] exp.
--
-- ARGV[1] trace id
-- ARGV[2] done-marker ttl (ms): how long a replay of this settle is recognised
-- ARGV[3] C, number of distinct counters
-- ARGV[4] the request's start time (unix ms): actual usage belongs to the window or bucket
--         containing it, not to the one containing now
-- then 4 fields per counter: kind, a, b, amount (as in reserve_v1; amount = actual usage,
-- may be negative for a correction)
--
-- Per counter: the trace's hold (if any) is removed from `res`, and the actual amount is added
-- to `data` when `data` exists. A missing `data` is left missing: it is seeded from the ledger
-- on next use, and the ledger already holds this request (it is written before the counters).
-- Calendar: rolled over to the window [a, b) when the stored one has ended; usage started
-- before the current window is dropped (that window no longer counts). Rolling: usage goes to
-- the bucket of the start time, dropped when that bucket is no longer counted; a start time in
-- the future (clock skew) counts in the newest bucket. Every cell is clamped at zero.
-- A trace without a hold (expired, or held by a process that died) still adds its usage —
-- once: `done` remembers the settle for ARGV[2] ms.
--
-- Time: the server's TIME. Returns {status, now_ms}:
--   'DONE'  already settled (replay); nothing changed
--   'TIME'  a calendar window in ARGV does not contain now; nothing changed
--   'OK'    settled

-- server_time and the other helpers: lua/prelude.lua, sent ahead of this file.
local now_s, now_ms = server_time()

local trace = ARGV[1]
local done_ttl = tonumber(ARGV[2])
local C = tonumber(ARGV[3])
local at_ms = tonumber(ARGV[4])

if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'DONE', now_ms}
end

if window_passed(4, C, now_s) then
  return {'TIME', now_ms}
end

for i = 1, C do
  local o = 4 + 4 * (i - 1)
  local kind, a, b, amount = ARGV[o + 1], tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3]), ARGV[o + 4]
  local data, res, exp = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]

  drop_hold(res, exp, trace)

  if tonumber(amount) ~= 0 and redis.call('EXISTS', data) == 1 then
    if kind == 'c' then
      local v = redis.call('HMGET', data, 's', 'e')
      local s, e = tonumber(v[1]) or 0, tonumber(v[2]) or 0
      if e <= now_s then
        s, e = a, b
        redis.call('HSET', data, 's', a, 'e', b, 'u', 0)
        -- Kept one more window length, so steady traffic rolls over here instead of reseeding.
        redis.call('PEXPIREAT', data, (b + (b - a)) * 1000)
      end
      if at_ms >= s * 1000 then
        incr_clamped(data, 'u', amount)
      end
    elseif kind == 'r' then
      local head = math.max(tonumber(redis.call('HGET', data, 'h') or '0'), math.floor(now_s / a))
      redis.call('HSET', data, 'h', head)
      local idx = math.min(math.floor(math.floor(at_ms / 1000) / a), head)
      if idx > head - 60 then
        incr_clamped(data, 'b' .. string.format('%d', idx), amount)
      end
      -- Forget buckets that are no longer counted.
      for _, k in ipairs(redis.call('HKEYS', data)) do
        if string.sub(k, 1, 1) == 'b' and tonumber(string.sub(k, 2)) <= head - 60 then
          redis.call('HDEL', data, k)
        end
      end
      -- Every bucket has expired one window plus one bucket after the newest write.
      redis.call('PEXPIRE', data, 61 * a * 1000)
    else
      incr_clamped(data, 'u', amount)
    end
  end
end

redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[2], 1, 'PX', done_ttl)
redis.call('INCR', KEYS[3])
return {'OK', now_ms}
