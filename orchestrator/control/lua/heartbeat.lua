-- Renew a lease, record progress and a verified checkpoint; 'stop' once unwanted.
-- ARGV: lease_id, now, deadline, progress JSON, checkpoint (seq, step, JSON; '' for none).
local lease_id, now, deadline = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local status = check_lease(lease_id, now)
if status ~= 'ok' then return {status} end
local lk = key('lease', lease_id)
local f = redis.call('HMGET', lk, 'task_id', 'worker_id', 'attempt', 'last_event')
local tk = key('task', f[1])
record_checkpoint(lease_id, 6, now)
redis.call('HSET', lk, 'deadline', deadline, 'last_heartbeat', now)
redis.call('ZADD', key('deadlines'), deadline, lease_id)
local p = cjson.decode(ARGV[5])
redis.call('HSET', tk, 'step', p.step, 'max_steps', p.max_steps, 'loss', p.loss or '',
  'updated_at', now)
redis.call('HSET', key('worker', f[2]), 'last_seen', now)
if (not f[4]) or now - tonumber(f[4]) >= C.progress_every_s then
  redis.call('HSET', lk, 'last_event', now)
  p.task_id = f[1]
  p.attempt = tonumber(f[3])
  emit(redis.call('HGET', tk, 'job_id'), 'progress', p, now)
end
local action = 'continue'
if not task_wanted(tk) then action = 'stop' end
return {'ok', action, redis.call('HGET', lk, 'ckpt_seq')}
