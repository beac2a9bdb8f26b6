-- A lease's result: accepted (credited) or rejected (settled); a retry, the same answer.
-- ARGV: lease_id, now, accepted ('1'/'0'), result JSON, answer JSON, credit, contributor,
-- reason, digest of the reported artifacts (a retry must report the same).
local lease_id, now, accepted = ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local lk = key('lease', lease_id)
local done = redis.call('HMGET', lk, 'completion', 'completion_digest')
if done[1] then return {'done', done[1], done[2]} end
local status = check_lease(lease_id, now)
if status ~= 'ok' then return {status} end
local f = redis.call('HMGET', lk, 'task_id', 'worker_id', 'attempt')
local tk = key('task', f[1])
local job = redis.call('HGET', tk, 'job_id')
local wk = key('worker', f[2])
redis.call('HSET', lk, 'completion', ARGV[6], 'completion_digest', ARGV[10])
redis.call('HSET', wk, 'last_seen', now)
if accepted then
  end_lease(lease_id, 'completed', now)
  redis.call('HSET', tk, 'state', 'accepted', 'result_json', ARGV[5], 'updated_at', now,
    'lease_id', '')
  redis.call('ZINCRBY', key('leaderboard'), ARGV[7], ARGV[8])
  redis.call('ZINCRBY', key('leaderboard_tasks'), 1, ARGV[8])
  redis.call('HINCRBYFLOAT', wk, 'tokens', ARGV[7])
  redis.call('HINCRBY', wk, 'tasks_accepted', 1)
  emit(job, 'task_accepted', {task_id = f[1], attempt = tonumber(f[3]), worker_id = f[2],
    tokens = tonumber(ARGV[7])}, now)
  return {'ok', 'accepted'}
end
end_lease(lease_id, 'failed', now)
redis.call('HINCRBY', wk, 'tasks_rejected', 1)
emit(job, 'task_rejected', {task_id = f[1], attempt = tonumber(f[3]), worker_id = f[2],
  reason = ARGV[9]}, now)
return {'ok', settle(f[1], 'result rejected: ' .. ARGV[9], true, true, now)}
