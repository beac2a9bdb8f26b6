-- Expire every lease past its deadline, at most `limit` of them.
-- ARGV: now, limit.
local now = tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', key('deadlines'), '-inf', now, 'LIMIT', 0, ARGV[3])
local n = 0
for _, lease_id in ipairs(due) do
  if expire_lease(lease_id, now) then n = n + 1 end
end
return n
