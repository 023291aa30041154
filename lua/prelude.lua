-- prelude: helpers shared by the *_v1 scripts. Each script is sent as this prelude followed by
-- its own file, so a script's SHA covers both and a change here reloads every script.
-- Everything here is a local function: no global is created and nothing runs until a script
-- calls it (forget_v1, for one, never reads TIME).

-- The server's clock, read once per script: unix seconds and unix milliseconds.
local function server_time()
  local t = redis.call('TIME')
  local now_s = tonumber(t[1])
  return now_s, now_s * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Whether a calendar window passed in ARGV does not contain now_s. The C counters' fields
-- follow ARGV[first], 4 per counter: kind, a, b, amount; a calendar counter ('c') carries its
-- window [a, b) in unix seconds.
local function window_passed(first, C, now_s)
  for i = 1, C do
    local o = first + 4 * (i - 1)
    if ARGV[o + 1] == 'c' then
      local a, b = tonumber(ARGV[o + 2]), tonumber(ARGV[o + 3])
      if not (a <= now_s and now_s < b) then
        return true
      end
    end
  end
  return false
end

-- The SEED reply {'SEED', now_ms, seq, c1, c2, ...} naming the counters (1..C) whose data key
-- KEYS[3i+1] is missing, or nil when every counter has data.
local function seed_reply(C, now_ms)
  local missing = {}
  for i = 1, C do
    if redis.call('EXISTS', KEYS[3 * i + 1]) == 0 then
      missing[#missing + 1] = i
    end
  end
  if #missing == 0 then
    return nil
  end
  local out = {'SEED', now_ms, tonumber(redis.call('GET', KEYS[3]) or '0')}
  for _, i in ipairs(missing) do
    out[#out + 1] = i
  end
  return out
end

-- Negates an integer in text form (no round trip through a double).
local function neg(s)
  if string.sub(s, 1, 1) == '-' then
    return string.sub(s, 2)
  end
  return '-' .. s
end

-- Adds amount to a hash field, setting it to 0 if the result is negative.
local function incr_clamped(key, field, amount)
  if redis.call('HINCRBY', key, field, amount) < 0 then
    redis.call('HSET', key, field, 0)
  end
end

-- Removes one trace's hold from a counter: its amount from res (sum and h:<trace>) and its
-- expiry from exp. Nothing happens where the hold is already gone.
local function drop_hold(res, exp, trace)
  local f = 'h:' .. trace
  local held = redis.call('HGET', res, f)
  if held then
    redis.call('HINCRBY', res, 'sum', neg(held))
    redis.call('HDEL', res, f)
  end
  redis.call('ZREM', exp, trace)
end

-- Holds whose expiry passed (their instance died) stop counting; at most 256 per call.
local function reap(res, exp, now_ms)
  for _, tr in ipairs(redis.call('ZRANGEBYSCORE', exp, '-inf', now_ms, 'LIMIT', 0, 256)) do
    drop_hold(res, exp, tr)
  end
end
