-- A new task, queued at the back of its (tier, job) queue (once).
local task_id, job, now, fields = ARGV[2], ARGV[3], tonumber(ARGV[4]), cjson.decode(ARGV[5])
local tk = key('task', task_id)
if redis.call('EXISTS', tk) == 1 then return 'exists' end
local state = redis.call('HGET', key('job', job), 'state')
if not state then return 'missing' end
if TERMINAL[state] then return 'terminal:' .. state end
for f, v in pairs(fields) do redis.call('HSET', tk, f, v) end
redis.call('HINCRBY', key('job_task_states', job), fields.state, 1)
redis.call('SADD', key('round_tasks', job, fields.trial, fields.round), task_id)
redis.call('SADD', key('job_tasks', job), task_id)
queue_push(task_id, false)
emit(job, 'task_queued', {task_id = task_id, attempt = 0}, now)
return 'queued'
