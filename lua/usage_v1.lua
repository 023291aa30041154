-- usage_v1: report counters (used and held) without changing what they count.
--
-- KEYS: the layout of reserve_v1 —
--   KEYS[1] hold, KEYS[2] done (both unused here), KEYS[3] seq, then per counter i:
--   KEYS[3i+1] data, KEYS[3i+2] res, KEYS[3i+3] exp.
--
-- ARGV[1] C, number of distinct counters
-- then 4 fields per counter: kind, a, b, amount (as in reserve_v1; amount unused)
--
-- The only writes are the reaping of expired holds, as reserve_v1 does.
-- Time: the server's TIME. Returns:
--   {'TIME', now}                    a calendar window in ARGV does not contain now
--   {'SEED', now, seq, c1, c2, ...}  counters without data; nothing changed
--   {'OK', now, states}              one {reserved, used, [bucket index, amount]...} per counter

-- server_time and the other helpers: lua/prelude.lua, sent ahead of this file.
local now_s, now_ms = server_time()

local C = tonumber(ARGV[1])
local kind, a = {}, {}
for i = 1, C do
  local o = 1 + 4 * (i - 1)
  kind[i] = ARGV[o + 1]
  a[i] = tonumber(ARGV[o + 2])
end
if window_passed(1, C, now_s) then
  return {'TIME', now_ms}
end

local seed = seed_reply(C, now_ms)
if seed then
  return seed
end

local states = {}
for i = 1, C do
  local data, res, exp = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  reap(res, exp, now_ms)
  local r = tonumber(redis.call('HGET', res, 'sum') or '0')
  if r < 0 then
    r = 0
  end
  local st = {r}
  if kind[i] == 'c' then
    local v = redis.call('HMGET', data, 'e', 'u')
    if (tonumber(v[1]) or 0) > now_s then
      st[2] = tonumber(v[2]) or 0
    else
      st[2] = 0
    end
  elseif kind[i] == 'r' then
    local all = redis.call('HGETALL', data)
    local head = math.floor(now_s / a[i])
    for k = 1, #all, 2 do
      if all[k] == 'h' then
        head = math.max(head, tonumber(all[k + 1]))
      end
    end
    local sum = 0
    st[2] = 0
    for k = 1, #all, 2 do
      if string.sub(all[k], 1, 1) == 'b' then
        local idx = tonumber(string.sub(all[k], 2))
        local v = tonumber(all[k + 1])
        if idx >= head - 59 and v ~= 0 then
          sum = sum + v
          st[#st + 1] = idx
          st[#st + 1] = v
        end
      end
    end
    st[2] = sum
  else
    st[2] = tonumber(redis.call('HGET', data, 'u') or '0')
  end
  states[i] = st
end
return {'OK', now_ms, states}
