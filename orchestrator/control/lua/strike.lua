-- A strike against a volunteer worker's owner; at the limit the owner is quarantined: its
-- workers' active leases are revoked (their tasks queued again, not counted) and it gets no
-- more work. Cluster workers are trusted: a strike against one is recorded but never
-- quarantines (their rejected results count against the task's attempts instead).
-- ARGV: worker, weight, reason, now, max_strikes, once (the offense's id, or ''; an id seen
-- in the last day is not counted again: a resent call strikes once).
-- Returns {strikes (string), quarantined now or before ('1'/'0'), revoked lease count}.
local worker, weight, reason, now = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local max_strikes = tonumber(ARGV[6])
local wk = key('worker', worker)
local w = redis.call('HMGET', wk, 'name', 'kind')
local owner = w[1]
if not owner then return {'0', '0', 0} end
local once = ARGV[7] or ''
if once ~= '' then
  local seen = key('strike_seen')
  redis.call('ZREMRANGEBYSCORE', seen, '-inf', now - 86400)
  if redis.call('ZADD', seen, 'NX', now, once) == 0 then
    local so_far = redis.call('HGET', key('strikes'), owner) or '0'
    return {so_far, redis.call('SISMEMBER', key('quarantined'), owner) == 1 and '1' or '0', 0}
  end
end
local total = redis.call('HINCRBYFLOAT', key('strikes'), owner, weight)
redis.call('HINCRBYFLOAT', wk, 'strikes', weight)
redis.call('XADD', key('strike_log'), 'MAXLEN', '~', C.max_events, '*', 'owner', owner,
  'worker', worker, 'weight', tostring(weight), 'reason', reason, 'time', tostring(now))
if w[2] == 'cluster' or tonumber(total) < max_strikes then
  return {total, redis.call('SISMEMBER', key('quarantined'), owner) == 1 and '1' or '0', 0}
end
local revoked = 0
if redis.call('SADD', key('quarantined'), owner) == 1 then
  for _, member in ipairs(redis.call('SMEMBERS', key('owner_workers', owner))) do
    redis.call('HSET', key('worker', member), 'quarantined', '1')
    local kind = redis.call('HGET', key('worker', member), 'kind')
    if kind then redis.call('ZREM', key('workers_seen', kind), member) end  -- not online
    for _, lease_id in ipairs(redis.call('SMEMBERS', key('worker_leases', member))) do
      local f = redis.call('HMGET', key('lease', lease_id), 'state', 'task_id', 'attempt')
      if f[1] == 'active' then
        end_lease(lease_id, 'revoked', now)
        tally_by('task_attempts', 'revoked')
        local job = redis.call('HGET', key('task', f[2]), 'job_id')
        emit(job, 'lease_revoked', {task_id = f[2], attempt = tonumber(f[3]), worker_id = member,
          reason = 'owner quarantined'}, now)
        settle(f[2], 'the lease was revoked: its owner was quarantined', false, true, now)
        revoked = revoked + 1
      end
    end
  end
end
return {total, '1', revoked}
