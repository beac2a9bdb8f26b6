-- The merged adapter of (trial, round) and its eval loss (once), with the durations of the
-- merge and the evaluation that made them ('' for one done by an earlier run).
local job, trial, round, prefix, loss, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local mk = key('merge', job, trial, round)
if redis.call('EXISTS', mk) == 1 then return 0 end
if ARGV[8] ~= '' then observe('merge_duration_seconds', ARGV[8]) end
if ARGV[9] ~= '' then observe('evaluation_duration_seconds', ARGV[9]) end
redis.call('HSET', mk, 'merged_prefix', prefix, 'eval_loss', loss, 'merged_at', now)
emit(job, 'round_merged', {trial = tonumber(trial), round = tonumber(round),
  merged_prefix = prefix, eval_loss = tonumber(loss)}, tonumber(now))
return 1
