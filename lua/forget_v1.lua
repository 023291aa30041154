-- forget_v1: drop counters so that they are reseeded from the ledger on their next use
-- (`tollgate reconcile --fix`). Holds of requests in flight live in separate keys and stay.
--
-- KEYS[1]     the tag's seq key (bumped, so a seed racing this call reloads)
-- KEYS[2..n]  the counters' data keys
-- ARGV        none
-- returns     the number of counters dropped
local dropped = 0
for i = 2, #KEYS do
  dropped = dropped + redis.call('DEL', KEYS[i])
end
redis.call('INCR', KEYS[1])
return dropped
