-- Renew a lease, record progress and a verified checkpoint; 'stop' once unwanted. A lease
-- older than max_age_s ends here instead (state expired, its task queued again, counted as
-- an expiry), after recording the checkpoint it reported, so the next attempt resumes.
-- max_age_s is COTUNE_LEASE_MAX_AGE_S, the same for every task (6 h by default: a task
-- that needs longer is resumed by the next attempt from its latest checkpoint).
-- ARGV: lease_id, now, deadline, progress JSON, max_age_s, checkpoint (seq, step, JSON; ''
-- for none).
-- Returns {'ok', action, next checkpoint seq, the superseded checkpoint's JSON or ''},
-- {'too_old', leased_at, the superseded checkpoint's JSON or ''} or a check_lease status.
local lease_id, now, deadline = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local max_age = tonumber(ARGV[6])
local status = check_lease(lease_id, now)
if status ~= 'ok' then return {status} end
local lk = key('lease', lease_id)
local f = redis.call('HMGET', lk, 'task_id', 'worker_id', 'attempt', 'last_event', 'leased_at')
local tk = key('task', f[1])
local before = redis.call('HGET', tk, 'checkpoint_json') or ''
record_checkpoint(lease_id, 7, now)
local after = redis.call('HGET', tk, 'checkpoint_json') or ''
local superseded = ''
if before ~= '' and after ~= before then superseded = before end
local job = redis.call('HGET', tk, 'job_id')
if now - tonumber(f[5]) > max_age then
  end_lease(lease_id, 'expired', now)
  redis.call('HINCRBY', key('worker', f[2]), 'tasks_expired', 1)
  tally_by('task_attempts', 'expired')
  emit(job, 'lease_expired', {task_id = f[1], attempt = tonumber(f[3]), worker_id = f[2],
    reason = 'maximum age'}, now)
  -- Counted as an expiry is (lib.lua expire_lease): half when the attempt made progress.
  local progressed = redis.call('HGET', lk, 'progressed') == '1'
  settle(f[1], string.format('the lease of attempt %s reached its maximum age (%s s)', f[3],
    ARGV[6]), progressed and 0.5 or true, true, now)
  return {'too_old', f[5], superseded}
end
local p = cjson.decode(ARGV[5])
-- tokens_per_s and memory_bytes are the worker's claims: shown (summed per worker kind for
-- metrics.lua), never counted or credited.
local kind = redis.call('HGET', lk, 'kind')
if kind and kind ~= '' then training_moved(lease_id, kind, p) end
redis.call('HSET', lk, 'deadline', deadline, 'last_heartbeat', now,
  'tokens_per_s', tonumber(p.tokens_per_s) or 0, 'memory_bytes', tonumber(p.memory_bytes) or 0,
  'step', p.step, 'max_steps', p.max_steps)
redis.call('ZADD', key('deadlines'), deadline, lease_id)
redis.call('HSET', tk, 'step', p.step, 'max_steps', p.max_steps, 'loss', p.loss or '',
  'updated_at', now)
touch_worker(f[2], now)
if (not f[4]) or now - tonumber(f[4]) >= C.progress_every_s then
  redis.call('HSET', lk, 'last_event', now)
  p.task_id = f[1]
  p.attempt = tonumber(f[3])
  emit(job, 'progress', p, now)
end
local action = 'continue'
if not task_wanted(tk) then action = 'stop' end
return {'ok', action, redis.call('HGET', lk, 'ckpt_seq'), superseded}
