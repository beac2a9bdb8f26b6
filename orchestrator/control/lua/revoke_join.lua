-- Revoke join tokens, and the worker tokens enrolled with them: those workers' next call is
-- refused (401) and their active leases are revoked, the tasks queued again without a
-- failure counted (as a quarantine does: strike.lua). Idempotent: a token revoked before
-- keeps its first revocation time, and its workers have no active lease left.
-- ARGV: a join token's name or sha256, now.
-- Returns {tokens revoked now, workers revoked now, leases revoked}; tokens revoked now is
-- -1 when no token has that name or hash.
local target, now = ARGV[2], tonumber(ARGV[3])
local digests = {}
local owners = {}
local found = false
for _, digest in ipairs(redis.call('ZRANGE', key('join_tokens'), 0, -1)) do
  local name = redis.call('HGET', key('join_token', digest), 'name')
  if name and (digest == target or name == target) then
    found = true
    digests[digest] = true
    owners[name] = true
  end
end
if not found then return {-1, 0, 0} end
local tokens, workers, leases = 0, 0, 0
for digest in pairs(digests) do
  local jk = key('join_token', digest)
  local at = redis.call('HGET', jk, 'revoked_at')
  if (not at) or at == '' then
    redis.call('HSET', jk, 'revoked_at', now)
    tokens = tokens + 1
  end
end
for owner in pairs(owners) do
  for _, member in ipairs(redis.call('SMEMBERS', key('owner_workers', owner))) do
    local wk = key('worker', member)
    local w = redis.call('HMGET', wk, 'join_token', 'revoked_at')
    if w[1] and digests[w[1]] then
      if (not w[2]) or w[2] == '' then
        redis.call('HSET', wk, 'revoked_at', now)
        local kind = redis.call('HGET', wk, 'kind')
        if kind then redis.call('ZREM', key('workers_seen', kind), member) end  -- not online
        workers = workers + 1
      end
      for _, lease_id in ipairs(redis.call('SMEMBERS', key('worker_leases', member))) do
        local f = redis.call('HMGET', key('lease', lease_id), 'state', 'task_id', 'attempt')
        if f[1] == 'active' then
          end_lease(lease_id, 'revoked', now)
          tally_by('task_attempts', 'revoked')
          local job = redis.call('HGET', key('task', f[2]), 'job_id')
          emit(job, 'lease_revoked', {task_id = f[2], attempt = tonumber(f[3]),
            worker_id = member, reason = 'join token revoked'}, now)
          settle(f[2], 'the lease was revoked: its join token was revoked', false, true, now)
          leases = leases + 1
        end
      end
    end
  end
end
return {tokens, workers, leases}
