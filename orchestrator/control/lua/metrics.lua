-- The state gauges and the kept counters, for one scrape (control/metrics.py
-- StateCollector). Reads only. ARGV: now, the online window (s), the tiers (JSON list), how
-- many contributors to list, the worker kinds (JSON list).
-- Returns JSON: jobs, trials, tasks ({state: n}; trials and tasks of unfinished jobs only),
-- queue ({tier: n}), workers ({'<kind>:busy'|'<kind>:idle': n} over the workers seen within
-- the window), quarantined (n), losses ([[job, trial, latest round's eval loss, rounds
-- with an eval loss], ...] of unfinished jobs), per_job ([[job, 'trial'|'task', state, n],
-- ...]), progress ([[job, fraction of trial-rounds done, created_at], ...]; jobs whose plan
-- is known), training ({kind: [tokens/s, largest memory, steps, max_steps]} over active
-- leases), contributors ([name, tokens, ...], the leaderboard's top), counters and
-- histograms (HGETALL replies).
local now, window, tiers = tonumber(ARGV[2]), tonumber(ARGV[3]), cjson.decode(ARGV[4])
local top_n, kinds = tonumber(ARGV[5]), cjson.decode(ARGV[6])
local out = {jobs = {}, trials = {}, tasks = {}, queue = {}, workers = {}, losses = {},
  per_job = {}, progress = {}, training = {}, histograms = {}}
local function inc(t, k) t[k] = (t[k] or 0) + 1 end
for _, job in ipairs(redis.call('ZRANGE', key('jobs'), 0, -1)) do
  local s = redis.call('HGET', key('job', job), 'state')
  if s then
    inc(out.jobs, s)
    if not TERMINAL[s] then
      local plan = redis.call('HMGET', key('job', job), 'plan_trials', 'plan_rounds',
        'created_at')
      local rounds = tonumber(plan[2]) or 0
      local trial_states, task_states, done = {}, {}, 0
      for _, n in ipairs(redis.call('ZRANGE', key('job_trials', job), 0, -1)) do
        local ts = redis.call('HGET', key('trial', job, n), 'state')
        if ts then
          inc(out.trials, ts)
          inc(trial_states, ts)
        end
        local losses = redis.call('HGETALL', key('trial_losses', job, n))
        local last, loss = -1, nil
        for i = 1, #losses, 2 do
          local r = tonumber(losses[i])
          if r and r > last then last, loss = r, losses[i + 1] end
        end
        local rounds_done = #losses / 2
        if loss then table.insert(out.losses, {job, tonumber(n), loss, rounds_done}) end
        -- An ended trial (pruned, complete, failed) has done all it will.
        done = done + ((ts and ts ~= 'running') and rounds or math.min(rounds_done, rounds))
      end
      -- The job's count per task state (lib.lua count_task_state keeps it), not its tasks.
      local counts = redis.call('HGETALL', key('job_task_states', job))
      for i = 1, #counts, 2 do
        local n = tonumber(counts[i + 1])
        if n > 0 then
          out.tasks[counts[i]] = (out.tasks[counts[i]] or 0) + n
          task_states[counts[i]] = n
        end
      end
      for st, n in pairs(trial_states) do table.insert(out.per_job, {job, 'trial', st, n}) end
      for st, n in pairs(task_states) do table.insert(out.per_job, {job, 'task', st, n}) end
      local planned = (tonumber(plan[1]) or 0) * rounds
      if planned > 0 then
        table.insert(out.progress, {job, math.min(done / planned, 1), tonumber(plan[3]) or 0})
      end
    end
  end
end
for _, tier in ipairs(tiers) do
  local n = 0
  for _, job in ipairs(redis.call('LRANGE', key('rotation', tier), 0, -1)) do
    n = n + redis.call('LLEN', key('queue', tier, job))
  end
  out.queue[tier] = n
end
-- The workers seen within the window per kind (workers:seen:<kind> holds no revoked or
-- quarantined ones), of them the busy ones (holding an active lease), and what the active
-- leases report: sums lib.lua keeps as leases change, so nothing here reads a worker or
-- a lease.
local kept = {}
local fields = redis.call('HGETALL', key('metric_training'))
for i = 1, #fields, 2 do kept[fields[i]] = math.max(tonumber(fields[i + 1]) or 0, 0) end
for _, kind in ipairs(kinds) do
  local online = redis.call('ZCOUNT', key('workers_seen', kind), now - window, '+inf')
  local busy = math.min(kept[kind .. ':busy'] or 0, online)
  out.workers[kind .. ':busy'] = busy
  out.workers[kind .. ':idle'] = online - busy
  local top = redis.call('ZREVRANGE', key('metric_memory', kind), 0, 0, 'WITHSCORES')
  out.training[kind] = {kept[kind .. ':tokens_per_s'] or 0, tonumber(top[2]) or 0,
    kept[kind .. ':step'] or 0, kept[kind .. ':max_steps'] or 0}
end
out.contributors = redis.call('ZREVRANGE', key('leaderboard'), 0, top_n - 1, 'WITHSCORES')
out.quarantined = redis.call('SCARD', key('quarantined'))
out.counters = redis.call('HGETALL', key('metrics'))
for name in pairs(C.histograms) do
  out.histograms[name] = redis.call('HGETALL', key('metric_histogram', name))
end
return cjson.encode(out)
