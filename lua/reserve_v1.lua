-- reserve_v1: check every limit of one request and hold its estimate — all or nothing.
--
-- Key layout (every key shares the request's {hash tag}, so a cluster runs this on one node):
--   KEYS[1]  hold   tg:v1:{tag}:h:<trace>   string, exists while the request is held
--   KEYS[2]  done   tg:v1:{tag}:d:<trace>   string, set by settle: a settled trace id is never
--                                           held again (`DUP`) while it is remembered; release
--                                           does not set it, so a released id may be held again
--   KEYS[3]  seq    tg:v1:{tag}:seq         integer, bumped by every settle (seeding races)
--   then per counter i = 1..C, three keys:
--   KEYS[3i+1] data  tg:v1:{tag}:c:<id>  hash; its existence is the initialization marker
--                    calendar: s = window start, e = window end (unix s), u = used
--                    rolling:  h = newest bucket index, b<index> = amount per bucket
--                    total:    u = used
--   KEYS[3i+2] res   tg:v1:{tag}:r:<id>  hash: sum = amount held, h:<trace> = one hold's amount
--   KEYS[3i+3] exp   tg:v1:{tag}:x:<id>  zset: trace -> hold expiry (unix ms), reaped lazily
--
-- ARGV[1] trace id
-- ARGV[2] hold ttl (ms)
-- ARGV[3] C, number of distinct counters
-- ARGV[4] L, number of limits (several limits may share one counter)
-- then 4 fields per counter: kind, a, b, amount
--   kind 'c' (calendar): a, b = the current window [start, end) in unix seconds, computed by
--                        the client from its estimate of this server's clock
--   kind 'r' (rolling):  a = bucket length in seconds (window / 60), b unused
--   kind 't' (total):    a, b unused
--   amount = the estimate in this counter's metric (integer text)
-- then 2 fields per limit, in the caller's order: counter number (1-based), cap (> 0 or 0)
--
-- Time: the server's TIME. Returns, always as an array whose first two items are a status and
-- the server time in unix ms:
--   {'DUP', now}                       the trace id is already held, or was settled (its
--                                      ledger row may not have reached Postgres yet);
--                                      nothing changed
--   {'DISABLED', now, limit}           a limit has cap 0; nothing changed
--   {'TIME', now}                      a calendar window passed in ARGV does not contain now;
--                                      nothing changed, the client recomputes at `now`
--   {'SEED', now, seq, c1, c2, ...}    counters without data (never seeded, flushed, evicted,
--                                      expired); nothing changed; the client seeds them with
--                                      seed_v1 and calls again
--   {'EXCEEDED', now, limit, states}   the first limit (caller's order) that would go over;
--                                      nothing held
--   {'OK', now, states}                held on every counter
-- where states is one array per counter: {reserved, used, [bucket index, amount]...}
-- (buckets only for rolling counters: the counted non-empty ones).
-- Numbers are exact up to 2^53 (Lua doubles).

-- server_time and the other helpers: lua/prelude.lua, sent ahead of this file.
local now_s, now_ms = server_time()

local trace = ARGV[1]
local ttl = tonumber(ARGV[2])
local C = tonumber(ARGV[3])
local L = tonumber(ARGV[4])

if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return {'DUP', now_ms}
end

local lim0 = 4 + 4 * C
for j = 1, L do
  if tonumber(ARGV[lim0 + 2 * j]) == 0 then
    return {'DISABLED', now_ms, j}
  end
end

local kind, a, b, amt = {}, {}, {}, {}
for i = 1, C do
  local o = 4 + 4 * (i - 1)
  kind[i] = ARGV[o + 1]
  a[i] = tonumber(ARGV[o + 2])
  b[i] = tonumber(ARGV[o + 3])
  amt[i] = ARGV[o + 4]
end
if window_passed(4, C, now_s) then
  return {'TIME', now_ms}
end

local seed = seed_reply(C, now_ms)
if seed then
  return seed
end

-- Usage counted now, and the state reported to the client.
local function read(i)
  local data = KEYS[3 * i + 1]
  if kind[i] == 'c' then
    local v = redis.call('HMGET', data, 'e', 'u')
    if (tonumber(v[1]) or 0) > now_s then
      local u = tonumber(v[2]) or 0
      return u, {u}
    end
    return 0, {0}
  elseif kind[i] == 'r' then
    local all = redis.call('HGETALL', data)
    local head = math.floor(now_s / a[i])
    for k = 1, #all, 2 do
      if all[k] == 'h' then
        head = math.max(head, tonumber(all[k + 1]))
      end
    end
    local oldest = head - 59
    local sum, pairs_ = 0, {}
    for k = 1, #all, 2 do
      if string.sub(all[k], 1, 1) == 'b' then
        local idx = tonumber(string.sub(all[k], 2))
        local v = tonumber(all[k + 1])
        if idx >= oldest and v ~= 0 then
          sum = sum + v
          pairs_[#pairs_ + 1] = idx
          pairs_[#pairs_ + 1] = v
        end
      end
    end
    local st = {sum}
    for _, x in ipairs(pairs_) do
      st[#st + 1] = x
    end
    return sum, st
  else
    local u = tonumber(redis.call('HGET', data, 'u') or '0')
    return u, {u}
  end
end

local used, reserved, states = {}, {}, {}
for i = 1, C do
  reap(KEYS[3 * i + 2], KEYS[3 * i + 3], now_ms)
  local r = tonumber(redis.call('HGET', KEYS[3 * i + 2], 'sum') or '0')
  if r < 0 then
    r = 0
  end
  reserved[i] = r
  used[i], states[i] = read(i)
end

local function with_reserved(extra)
  local out = {}
  for i = 1, C do
    local st = {reserved[i] + (extra and tonumber(amt[i]) or 0)}
    for _, x in ipairs(states[i]) do
      st[#st + 1] = x
    end
    out[i] = st
  end
  return out
end

for j = 1, L do
  local i = tonumber(ARGV[lim0 + 2 * j - 1])
  local cap = tonumber(ARGV[lim0 + 2 * j])
  if used[i] + reserved[i] + tonumber(amt[i]) > cap then
    return {'EXCEEDED', now_ms, j, with_reserved(false)}
  end
end

local expiry = now_ms + ttl
for i = 1, C do
  local res, exp = KEYS[3 * i + 2], KEYS[3 * i + 3]
  redis.call('HSET', res, 'h:' .. trace, amt[i])
  redis.call('HINCRBY', res, 'sum', amt[i])
  redis.call('ZADD', exp, expiry, trace)
  -- Both keys outlive every hold they record; each hold is reaped by its own expiry.
  if redis.call('PTTL', res) < ttl then
    redis.call('PEXPIRE', res, ttl)
  end
  if redis.call('PTTL', exp) < ttl then
    redis.call('PEXPIRE', exp, ttl)
  end
end
redis.call('SET', KEYS[1], C, 'PX', ttl)
return {'OK', now_ms, with_reserved(true)}
