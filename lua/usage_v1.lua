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

local t = redis.call('TIME')
local now_s = tonumber(t[1])
local now_ms = now_s * 1000 + math.floor(tonumber(t[2]) / 1000)

local C = tonumber(ARGV[1])
local kind, a = {}, {}
for i = 1, C do
  local o = 1 + 4 * (i - 1)
  kind[i] = ARGV[o + 1]
  a[i] = tonumber(ARGV[o + 2])
  local b = tonumber(ARGV[o + 3])
  if kind[i] == 'c' and not (a[i] <= now_s and now_s < b) then
    return {'TIME', now_ms}
  end
end

local missing = {}
for i = 1, C do
  if redis.call('EXISTS', KEYS[3 * i + 1]) == 0 then
    missing[#missing + 1] = i
  end
end
if #missing > 0 then
  local out = {'SEED', now_ms, tonumber(redis.call('GET', KEYS[3]) or '0')}
  for _, i in ipairs(missing) do
    out[#out + 1] = i
  end
  return out
end

local function neg(s)
  if string.sub(s, 1, 1) == '-' then
    return string.sub(s, 2)
  end
  return '-' .. s
end

local states = {}
for i = 1, C do
  local data, res, exp = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  for _, tr in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', now_ms, 'LIMIT', 0, 256)) do
    local held = redis.call('HGET', res, 'h:' .. tr)
    if held then
      redis.call('HINCRBY', res, 'sum', neg(held))
      redis.call('HDEL', res, 'h:' .. tr)
    end
    redis.call('ZREM', exp, tr)
  end
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
