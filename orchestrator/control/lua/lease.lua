-- Lease the next wanted task, from the first of the tiers that has one.
-- ARGV: worker, lease_id, now, deadline, formats (JSON list or null), tiers (largest first).
local worker, lease_id, now, deadline = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local formats = nil
local wanted = cjson.decode(ARGV[6])
if type(wanted) == 'table' then
  formats = {}
  for _, f in ipairs(wanted) do formats[f] = true end
end
for i = 7, #ARGV do
  while true do
    local task_id = queue_pop(ARGV[i], formats)
    if not task_id then break end
    local tk = key('task', task_id)
    if redis.call('HGET', tk, 'state') == 'queued' then
      if task_wanted(tk) then
        local attempt = redis.call('HINCRBY', tk, 'attempt', 1)
        local job = redis.call('HGET', tk, 'job_id')
        redis.call('HSET', tk, 'state', 'leased', 'worker_id', worker, 'lease_id', lease_id,
          'updated_at', now, 'step', 0, 'max_steps', 0, 'loss', '')
        redis.call('HSET', key('lease', lease_id), 'lease_id', lease_id, 'task_id', task_id,
          'worker_id', worker, 'attempt', attempt, 'state', 'active', 'deadline', deadline,
          'leased_at', now, 'ckpt_seq', 0)
        redis.call('ZADD', key('deadlines'), deadline, lease_id)
        redis.call('SADD', key('worker_leases', worker), lease_id)
        redis.call('HSET', key('worker', worker), 'last_seen', now)
        emit(job, 'task_leased', {task_id = task_id, attempt = attempt, worker_id = worker}, now)
        return {task_id, attempt}
      end
      cancel_task(task_id, 'its job or trial is over', now)
    end
  end
end
return false
