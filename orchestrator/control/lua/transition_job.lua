-- Move a job to `to` if its state is one of `expect`, setting fields (null deletes one).
local job, to, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local expect, fields = cjson.decode(ARGV[5]), cjson.decode(ARGV[6])
local jk = key('job', job)
local cur = redis.call('HGET', jk, 'state')
if not cur then return {'missing'} end
local ok = false
for _, s in ipairs(expect) do if s == cur then ok = true end end
if not ok then return {'refused', cur} end
redis.call('HSET', jk, 'state', to, 'updated_at', now)
if TERMINAL[to] then tally_by('jobs_finished', to) end
local data = {from = cur, to = to}
for f, v in pairs(fields) do
  if v == cjson.null then redis.call('HDEL', jk, f) else redis.call('HSET', jk, f, v) end
  if f == 'error' or f == 'best_trial' then data[f] = v end
end
emit(job, 'job_state', data, now)
return {'ok', cur}
