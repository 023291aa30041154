-- heartbeat_v1: one instance says it is alive (and whether it has a backlog the shared
-- counters lack), and learns who else is.
--
-- KEYS[1] the fleet hash: field = instance id, value = '<server ms>|<behind 0/1>'
-- ARGV[1] this instance's id
-- ARGV[2] '1' when this instance has journaled counter changes not yet applied to Redis
--         or not yet shipped to the ledger of record (beyond the normal lag), else '0'
-- ARGV[3] forget after (ms): entries older than this are removed
--
-- Time: the server's TIME, so every instance ages entries by one clock.
-- Returns {'OK', now_ms, {id, age_ms, behind, ...}} for every instance still remembered,
-- this one included.

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local forget = tonumber(ARGV[3])

redis.call('HSET', KEYS[1], ARGV[1], now_ms .. '|' .. ARGV[2])
redis.call('PEXPIRE', KEYS[1], forget)

local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local v = all[i + 1]
  local sep = string.find(v, '|', 1, true)
  local at = sep and tonumber(string.sub(v, 1, sep - 1))
  if not at or now_ms - at > forget then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, now_ms - at)
    table.insert(out, tonumber(string.sub(v, sep + 1)) or 1)
  end
end
return {'OK', now_ms, out}
