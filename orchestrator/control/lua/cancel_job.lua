-- Cancel a job: its queued tasks are cancelled, its running trials fail.
local job, now, why = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local jk = key('job', job)
local cur = redis.call('HGET', jk, 'state')
if not cur then return {'missing'} end
if TERMINAL[cur] then return {'terminal', cur} end
redis.call('HSET', jk, 'state', 'cancelled', 'updated_at', now)
tally_by('jobs_finished', 'cancelled')
for _, task_id in ipairs(redis.call('SMEMBERS', key('job_tasks', job))) do
  if redis.call('HGET', key('task', task_id), 'state') == 'queued' then
    cancel_task(task_id, why, now)
  end
end
for _, n in ipairs(redis.call('ZRANGE', key('job_trials', job), 0, -1)) do
  local trk = key('trial', job, n)
  if redis.call('HGET', trk, 'state') == 'running' then
    redis.call('HSET', trk, 'state', 'failed', 'error', why, 'updated_at', now)
  end
end
emit(job, 'job_state', {from = cur, to = 'cancelled', error = why}, now)
return {'ok', cur}
