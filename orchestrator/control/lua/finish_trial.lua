-- End a running trial (complete, pruned, failed); its queued tasks are cancelled.
local job, n, to, err, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local trk = key('trial', job, n)
local cur = redis.call('HGET', trk, 'state')
if not cur then return 'missing' end
if cur ~= 'running' then return cur end
redis.call('HSET', trk, 'state', to, 'error', err, 'updated_at', now)
local data = {trial = tonumber(n), state = to}
if err ~= '' then data.error = err end
emit(job, 'trial_finished', data, now)
for _, task_id in ipairs(redis.call('SMEMBERS', key('job_tasks', job))) do
  local f = redis.call('HMGET', key('task', task_id), 'trial', 'state')
  if f[1] == n and f[2] == 'queued' then cancel_task(task_id, 'its trial ended', now) end
end
return 'finished'
