-- heartbeat_v1: one instance says it is alive (and whether it has a backlog the shared
-- counters lack), and learns who else is.
--
-- KEYS[1] the fleet hash: field = instance id, value = '<server ms>|<behind 0/1>|<nonce>'
-- ARGV[1] this instance's id
-- ARGV[2] '1' when this instance has journaled counter changes not yet applied to Redis
--         or not yet shipped to the ledger of record (beyond the normal lag), else '0'
-- ARGV[3] forget after (ms): entries older than this are removed
-- ARGV[4] this process's nonce
-- ARGV[5] twin window (ms): an entry under this id with another nonce, younger than this,
--         was written by another process running under the same instance id
--
-- Time: the server's TIME, so every instance ages entries by one clock.
-- Returns {'OK', now_ms, {id, age_ms, behind, ...}, twin 0/1} for every instance still
-- remembered, this one included.

local _, now_ms = server_time()
local forget = tonumber(ARGV[3])

local function parse(v)
  local a = string.find(v, '|', 1, true)
  if not a then
    return nil
  end
  local b = string.find(v, '|', a + 1, true)
  local at = tonumber(string.sub(v, 1, a - 1))
  local behind = tonumber(string.sub(v, a + 1, (b or 0) - 1)) or 1
  local nonce = b and string.sub(v, b + 1) or ''
  return at, behind, nonce
end

local twin = 0
local mine = redis.call('HGET', KEYS[1], ARGV[1])
if mine then
  local at, _, nonce = parse(mine)
  if at and nonce ~= ARGV[4] and now_ms - at < tonumber(ARGV[5]) then
    twin = 1
  end
end

redis.call('HSET', KEYS[1], ARGV[1], now_ms .. '|' .. ARGV[2] .. '|' .. ARGV[4])
redis.call('PEXPIRE', KEYS[1], forget)

local out = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local at, behind = parse(all[i + 1])
  if not at or now_ms - at > forget then
    redis.call('HDEL', KEYS[1], all[i])
  else
    table.insert(out, all[i])
    table.insert(out, now_ms - at)
    table.insert(out, behind)
  end
end
return {'OK', now_ms, out, twin}
