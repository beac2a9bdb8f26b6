-- A new job record and its job_created event; 0 if the job exists already.
local job, now, fields = ARGV[2], tonumber(ARGV[3]), cjson.decode(ARGV[4])
local jk = key('job', job)
if redis.call('EXISTS', jk) == 1 then return 0 end
for f, v in pairs(fields) do redis.call('HSET', jk, f, v) end
redis.call('ZADD', key('jobs'), now, job)
emit(job, 'job_created', {name = fields.name, state = fields.state}, now)
return 1
