-- seed_v1: write counters loaded from the ledger, only where they are still missing.
--
-- Racing instances may load the same counter; only the first write lands, so a counter is
-- never seeded twice. A settle that lands while the caller was reading the ledger bumps `seq`:
-- the write is then refused (unless forced) so the caller reloads and cannot miss it.
--
-- KEYS[1]   seq   tg:v1:{tag}:seq
-- KEYS[1+k] data  tg:v1:{tag}:c:<id> of the k-th counter to seed
--
-- ARGV[1] n, number of counters to seed
-- ARGV[2] the seq the caller saw before reading the ledger
-- ARGV[3] '1' to write even if seq moved (the caller's last attempt), else '0'
-- then per counter, a kind and its state:
--   'c' start end used          calendar window [start, end) in unix s and its usage
--   'r' bucket_secs m idx1 amount1 ... idxm amountm   non-empty rolling buckets
--   't' used                    lifetime usage
--
-- Time: the server's TIME. Returns:
--   {'RETRY', now, seq}   seq moved since the caller's read; nothing written
--   {'OK', now, written}  counters written (the others were seeded meanwhile)

-- server_time and the other helpers: lua/prelude.lua, sent ahead of this file.
local now_s, now_ms = server_time()

local n = tonumber(ARGV[1])
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARGV[3] ~= '1' and seq ~= tonumber(ARGV[2]) then
  return {'RETRY', now_ms, seq}
end

local written = 0
local p = 4
for k = 1, n do
  local data = KEYS[1 + k]
  local kind = ARGV[p]
  local fresh = redis.call('EXISTS', data) == 0
  if kind == 'c' then
    local s, e, u = ARGV[p + 1], ARGV[p + 2], ARGV[p + 3]
    p = p + 4
    if fresh then
      redis.call('HSET', data, 's', s, 'e', e, 'u', u)
      local len = tonumber(e) - tonumber(s)
      redis.call('PEXPIREAT', data, math.max(tonumber(e) + len, now_s + len) * 1000)
    end
  elseif kind == 'r' then
    local bs, m = tonumber(ARGV[p + 1]), tonumber(ARGV[p + 2])
    if fresh then
      local head = math.floor(now_s / bs)
      for j = 1, m do
        head = math.max(head, tonumber(ARGV[p + 1 + 2 * j]))
      end
      redis.call('HSET', data, 'h', head)
      for j = 1, m do
        redis.call('HSET', data, 'b' .. ARGV[p + 1 + 2 * j], ARGV[p + 2 + 2 * j])
      end
      redis.call('PEXPIRE', data, 61 * bs * 1000)
    end
    p = p + 3 + 2 * m
  else
    local u = ARGV[p + 1]
    p = p + 2
    if fresh then
      redis.call('HSET', data, 'u', u)
    end
  end
  if fresh then
    written = written + 1
  end
end
return {'OK', now_ms, written}
