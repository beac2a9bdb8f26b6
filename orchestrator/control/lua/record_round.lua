-- A trial's eval loss of one round (once).
local job, n, round, loss, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local trk = key('trial', job, n)
if redis.call('EXISTS', trk) == 0 then return 'missing' end
if redis.call('HSETNX', key('trial_losses', job, n), round, loss) == 0 then return 'exists' end
redis.call('HSET', trk, 'updated_at', now)
emit(job, 'round_evaluated', {trial = tonumber(n), round = tonumber(round),
  eval_loss = tonumber(loss)}, now)
return 'recorded'
