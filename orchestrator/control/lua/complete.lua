-- A lease's result after the checks at `complete` (control/intake.py): accepted (a trusted
-- cluster worker's result: credited now), verifying (a volunteer's: the lease ends and the
-- result waits, uncredited, for the heavy checks' verdict, verdict.lua) or rejected (the
-- task is queued again). A retry gets the same answer.
-- ARGV: lease_id, now, outcome ('accepted'/'verifying'/'rejected'), result JSON, answer
-- JSON, credit, contributor, reason, digest of the reported artifacts (a retry must report
-- the same).
local lease_id, now, outcome = ARGV[2], tonumber(ARGV[3]), ARGV[4]
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
touch_worker(f[2], now)
observe('task_duration_seconds', now - tonumber(redis.call('HGET', lk, 'leased_at') or now))
if outcome ~= 'rejected' then  -- the artifacts' sizes were checked in the store
  for _, a in pairs(cjson.decode(ARGV[5]).artifacts) do
    tally_by('artifact_bytes', 'upload', a.bytes)
  end
end
if outcome == 'accepted' then
  end_lease(lease_id, 'completed', now)
  count_task_state(tk, 'accepted')
  redis.call('HSET', tk, 'state', 'accepted', 'result_json', ARGV[5], 'updated_at', now,
    'lease_id', '')
  redis.call('ZINCRBY', key('leaderboard'), ARGV[7], ARGV[8])
  redis.call('ZINCRBY', key('leaderboard_tasks'), 1, ARGV[8])
  redis.call('HINCRBYFLOAT', wk, 'tokens', ARGV[7])
  redis.call('HINCRBY', wk, 'tasks_accepted', 1)
  tally_by('task_attempts', 'accepted')
  tally_by('tokens_trained', redis.call('HGET', wk, 'kind'), ARGV[7])
  emit(job, 'task_accepted', {task_id = f[1], attempt = tonumber(f[3]), worker_id = f[2],
    tokens = tonumber(ARGV[7])}, now)
  return {'ok', 'accepted'}
end
if outcome == 'verifying' then
  end_lease(lease_id, 'completed', now)
  count_task_state(tk, 'verifying')
  redis.call('HSET', tk, 'state', 'verifying', 'result_json', ARGV[5], 'updated_at', now,
    'lease_id', '')
  emit(job, 'task_verifying', {task_id = f[1], attempt = tonumber(f[3]), worker_id = f[2]},
    now)
  return {'ok', 'verifying'}
end
end_lease(lease_id, 'failed', now)
redis.call('HINCRBY', wk, 'tasks_rejected', 1)
tally_by('task_attempts', 'rejected')
tally_by('rejections', 'intake')
drop_checkpoint(tk, f[3])
emit(job, 'task_rejected', {task_id = f[1], attempt = tonumber(f[3]), worker_id = f[2],
  reason = ARGV[9]}, now)
-- A volunteer's rejected result is a strike on its owner (the caller adds it), never a
-- failed attempt of the task; a trusted cluster worker's counts (it is a bug to look into).
local trusted = redis.call('HGET', wk, 'kind') == 'cluster'
return {'ok', settle(f[1], 'result rejected: ' .. ARGV[9], trusted, true, now)}
