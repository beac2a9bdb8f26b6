-- A worker fails or releases its lease; the task is settled.
-- ARGV: lease_id, now, kind ('fail'/'release'), reason, retryable ('1'/'0'), checkpoint
-- (seq, step, JSON; '' for none).
-- Returns {'ok', how the task settled, the superseded checkpoint's JSON or ''}, {'done'}
-- for a retried report, or a check_lease status.
local lease_id, now, kind, reason = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local lk = key('lease', lease_id)
local ended = (kind == 'fail') and 'failed' or 'released'
if redis.call('HGET', lk, 'state') == ended then return {'done'} end
local status = check_lease(lease_id, now)
if status ~= 'ok' then return {status} end
local f = redis.call('HMGET', lk, 'task_id', 'worker_id', 'attempt')
local tk = key('task', f[1])
local before = redis.call('HGET', tk, 'checkpoint_json') or ''
record_checkpoint(lease_id, 7, now)
local after = redis.call('HGET', tk, 'checkpoint_json') or ''
local superseded = ''
if before ~= '' and after ~= before then superseded = before end
redis.call('HSET', lk, 'reason', reason)
if kind == 'fail' then redis.call('HSET', lk, 'fail_reason', reason) end
end_lease(lease_id, ended, now)
local wk = key('worker', f[2])
touch_worker(f[2], now)
if kind == 'fail' then redis.call('HINCRBY', wk, 'tasks_failed', 1) end
tally_by('task_attempts', ended)
local job = redis.call('HGET', key('task', f[1]), 'job_id')
emit(job, (kind == 'fail') and 'task_attempt_failed' or 'task_released',
  {task_id = f[1], attempt = tonumber(f[3]), worker_id = f[2], reason = reason}, now)
return {'ok', settle(f[1], reason, kind == 'fail', ARGV[6] == '1', now), superseded}
