-- Enroll a worker with a join token, atomically: the token must be known, unrevoked,
-- unexpired, with uses left (max_uses) and of an owner not quarantined; then its use is
-- counted and the worker recorded under the token's name and kind.
-- ARGV: join token sha256, worker id, the worker's fields (JSON object), now.
-- Returns {'ok', name, kind} or the refusal: {'unknown'}, {'revoked', at}, {'expired', at},
-- {'used_up', uses, max_uses}, {'quarantined', name}.
local digest, worker, now = ARGV[2], ARGV[3], tonumber(ARGV[5])
local jk = key('join_token', digest)
local j = redis.call('HMGET', jk, 'name', 'kind', 'expires_at', 'revoked_at', 'uses', 'max_uses')
if not j[1] then return {'unknown'} end
if j[4] and j[4] ~= '' then return {'revoked', j[4]} end
if j[3] and j[3] ~= '' and tonumber(j[3]) < now then return {'expired', j[3]} end
local uses = tonumber(j[5] or '0') or 0
if j[6] and j[6] ~= '' and uses >= tonumber(j[6]) then
  return {'used_up', tostring(uses), j[6]}
end
if redis.call('SISMEMBER', key('quarantined'), j[1]) == 1 then return {'quarantined', j[1]} end
redis.call('HINCRBY', jk, 'uses', 1)
local wk = key('worker', worker)
local fields = cjson.decode(ARGV[4])
for name, value in pairs(fields) do redis.call('HSET', wk, name, value) end
redis.call('HSET', wk, 'name', j[1], 'kind', j[2], 'join_token', digest)
redis.call('ZADD', key('workers'), now, worker)
-- workers:seen:<kind> (the online count) forgets workers silent for a week.
redis.call('ZREMRANGEBYSCORE', key('workers_seen', j[2]), '-inf', now - 7 * 86400)
redis.call('ZADD', key('workers_seen', j[2]), now, worker)
redis.call('SADD', key('owner_workers', j[1]), worker)
return {'ok', j[1], j[2]}
