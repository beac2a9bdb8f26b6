-- A job's data fit: what training.sequence_len keeps of its eval rows, as the coordinator's
-- base evaluation measured it (pipeline/baseeval.py; DataFit JSON). Recorded once, so the
-- data_fit event is emitted once however often a restarted coordinator measures again; the
-- first value stays and is answered. {'missing', why} for an unknown job.
local job, fit, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local jk = key('job', job)
local f = redis.call('HMGET', jk, 'state', 'data_fit_json')
if not f[1] then return {'missing', 'no job ' .. job} end
if f[2] then return {'ok', f[2]} end
redis.call('HSET', jk, 'data_fit_json', fit, 'updated_at', now)
emit(job, 'data_fit', cjson.decode(fit), now)
return {'ok', fit}
