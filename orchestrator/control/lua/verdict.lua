-- The heavy checks' verdict on a volunteer's result (pipeline/verification.py), for a task in
-- `verifying` at that attempt only: a second verdict, or one on a task that moved on, changes
-- nothing. ok: the task is accepted and its owner credited the tokens the coordinator counted
-- (nothing while the owner is quarantined: its credit is frozen), and the given duplicates
-- still queued are cancelled (on a task already accepted, only that: duplicates re-queued
-- since). rejected: the result is dropped (and the checkpoint its attempt left) and the task
-- queued again, not counted toward max_attempts; the caller adds the strike
-- (control/strikes.py). adopt: an original outvoted by its duplicates (pipeline/redundancy.py)
-- takes the winning duplicate's accepted result instead of its own, which is dropped: the
-- task is accepted without a second run and nobody is credited again (the winner's owner was
-- credited for the duplicate).
-- ARGV: task_id, attempt, verdict ('ok'/'rejected'/'adopt'), reason, its class (one of
-- control/metrics.py REJECTION_REASONS; '' for ok), now, then the ids of tasks to cancel if
-- queued (an accepted original's redundancy duplicates), or for adopt the winning
-- duplicate's id.
-- Returns {'ok', 'accepted' or settle's answer, worker_id} or {'skip', the task's state}.
local task_id, attempt, verdict, reason, cause = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local now = tonumber(ARGV[7])
local tk = key('task', task_id)
local f = redis.call('HMGET', tk, 'state', 'attempt', 'worker_id', 'job_id', 'result_json')
local function cancel_given()
  for i = 8, #ARGV do
    if redis.call('HGET', key('task', ARGV[i]), 'state') == 'queued' then
      cancel_task(ARGV[i], 'the task it duplicates was accepted', now)
    end
  end
end
if verdict == 'ok' and f[1] == 'accepted' then  -- again: only the duplicates queued since
  cancel_given()
  return {'skip', 'accepted'}
end
if f[1] ~= 'verifying' or f[2] ~= attempt then return {'skip', f[1] or 'missing'} end
local worker, job = f[3], f[4]
local wk = key('worker', worker)
if verdict == 'ok' then
  local tokens = tonumber(cjson.decode(f[5]).tokens) or 0
  tally_by('task_attempts', 'accepted')
  tally_by('tokens_trained', redis.call('HGET', wk, 'kind'), tokens)
  local owner = redis.call('HGET', wk, 'name') or worker
  local frozen = redis.call('SISMEMBER', key('quarantined'), owner) == 1
  count_task_state(tk, 'accepted')
  redis.call('HSET', tk, 'state', 'accepted', 'updated_at', now)
  if frozen then
    tokens = 0
  else
    redis.call('ZINCRBY', key('leaderboard'), tokens, owner)
    redis.call('ZINCRBY', key('leaderboard_tasks'), 1, owner)
    redis.call('HINCRBYFLOAT', wk, 'tokens', tokens)
  end
  redis.call('HINCRBY', wk, 'tasks_accepted', 1)
  emit(job, 'task_accepted', {task_id = task_id, attempt = tonumber(attempt), worker_id = worker,
    tokens = tokens, verified = true}, now)
  cancel_given()
  return {'ok', 'accepted', worker}
end
redis.call('HINCRBY', wk, 'tasks_rejected', 1)
if verdict == 'adopt' then
  local winner = ARGV[8]
  local w = redis.call('HMGET', key('task', winner), 'state', 'result_json', 'check_json',
    'worker_id')
  if w[1] ~= 'accepted' or not w[2] then
    redis.call('HINCRBY', wk, 'tasks_rejected', -1)
    return {'skip', 'winner ' .. (w[1] or 'missing')}
  end
  local result = cjson.decode(w[2])
  result.adopted_from = winner
  local fields = {'state', 'accepted', 'result_json', cjson.encode(result), 'updated_at', now}
  if w[3] then
    local check = cjson.decode(w[3])
    check.attempt = tonumber(attempt)
    check.issues = nil  -- none (the winner passed); an empty table would encode as {}
    table.insert(fields, 'check_json')
    table.insert(fields, cjson.encode(check))
  end
  drop_checkpoint(tk, attempt)
  count_task_state(tk, 'accepted')
  redis.call('HSET', tk, unpack(fields))
  tally_by('task_attempts', 'rejected')
  tally_by('rejections', cause)
  emit(job, 'task_rejected', {task_id = task_id, attempt = tonumber(attempt), worker_id = worker,
    reason = reason}, now)
  emit(job, 'task_accepted', {task_id = task_id, attempt = tonumber(attempt),
    worker_id = w[4], tokens = 0, adopted_from = winner, verified = true}, now)
  return {'ok', 'adopted', worker}
end
redis.call('HDEL', tk, 'result_json')
drop_checkpoint(tk, attempt)
tally_by('task_attempts', 'rejected')
tally_by('rejections', cause)
emit(job, 'task_rejected', {task_id = task_id, attempt = tonumber(attempt), worker_id = worker,
  reason = reason}, now)
return {'ok', settle(task_id, 'result rejected: ' .. reason, false, true, now), worker}
