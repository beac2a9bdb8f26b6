-- A job's staged base model (a StoredObject's JSON: pipeline/modelstage.py), recorded once
-- while the job is sharding, so a restart does not stage it again; the first value stays
-- and is answered. {'missing' | 'refused', why} otherwise.
local job, staged, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local jk = key('job', job)
local f = redis.call('HMGET', jk, 'state', 'base_model_json')
if not f[1] then return {'missing', 'no job ' .. job} end
if f[2] then return {'ok', f[2]} end
if f[1] ~= 'sharding' then
  return {'refused', 'job ' .. job .. ' is ' .. f[1] .. ', not sharding'}
end
redis.call('HSET', jk, 'base_model_json', staged, 'updated_at', now)
local archive = cjson.decode(staged)
emit(job, 'base_model_staged', {key = archive.key, sha256 = archive.sha256,
  bytes = archive.bytes}, now)
return {'ok', staged}
