-- A new running trial of a job (once).
local job, n, params, now = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if redis.call('EXISTS', key('job', job)) == 0 then return 'missing' end
local trk = key('trial', job, n)
if redis.call('EXISTS', trk) == 1 then return 'exists' end
redis.call('HSET', trk, 'number', n, 'params', params, 'state', 'running', 'error', '',
  'created_at', now, 'updated_at', now)
redis.call('ZADD', key('job_trials', job), tonumber(n), n)
emit(job, 'trial_started', {trial = tonumber(n), params = cjson.decode(params)}, now)
return 'created'
