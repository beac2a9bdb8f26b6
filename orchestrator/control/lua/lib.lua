-- The library every script starts with (scripts.py prepends it): the config from Python in
-- ARGV[1] (key templates, limits; each script's own arguments start at ARGV[2]), the task
-- fate rules and the queue.
local C = cjson.decode(ARGV[1])
local K = C.k
local function key(name, ...) return string.format(K[name], ...) end
-- The job states that end a job: protocol/states.py's list, passed in the config.
local TERMINAL = {}
for _, s in ipairs(C.terminal_job_states) do TERMINAL[s] = true end

local function emit(job, kind, data, now)
  return redis.call('XADD', key('events', job), 'MAXLEN', '~', C.max_events, '*',
    'kind', kind, 'time', tostring(now), 'data', cjson.encode(data))
end

-- metrics: control/metrics.py declares every counter and histogram (COUNTERS, HISTOGRAMS)
-- and says what each means; they are counted here, in the step that makes the transition.
local function number_text(n)
  if type(n) == 'number' then return string.format('%.17g', n) end
  return n
end

-- Add to a counter without labels (its field in metrics:counters is its name). Not called
-- `count`: settle's argument of that name would hide it.
local function tally(name, n)
  redis.call('HINCRBYFLOAT', key('metrics'), name, number_text(n or 1))
end

-- Add to a counter with one label (field `name:label`); nothing for an unknown label (nil
-- or false: Redis answers false for a missing hash field).
local function tally_by(name, label, n)
  if label then tally(name .. ':' .. label, n) end
end

-- An observation of a histogram: bucket i holds values in (bounds[i-1], bounds[i]], bucket
-- #bounds + 1 the rest; `sum` their sum.
local function observe(name, value)
  local bounds = C.histograms[name]
  value = math.max(tonumber(value) or 0, 0)  -- a clock stepped back counts as 0 s
  local i = #bounds + 1
  for j, b in ipairs(bounds) do
    if value <= b then
      i = j
      break
    end
  end
  local h = key('metric_histogram', name)
  redis.call('HINCRBY', h, tostring(i), 1)
  redis.call('HINCRBYFLOAT', h, 'sum', number_text(value))
end

-- A worker called in: its last_seen, and its place in workers:seen:<kind> (the online
-- count per kind, metrics.lua). A revoked or quarantined worker is not online: strike.lua
-- and revoke_join.lua take it out, and it is not put back.
local function touch_worker(worker, now)
  local wk = key('worker', worker)
  redis.call('HSET', wk, 'last_seen', now)
  local f = redis.call('HMGET', wk, 'kind', 'revoked_at', 'quarantined')
  if f[1] and not ((f[2] and f[2] ~= '') or f[3] == '1') then
    redis.call('ZADD', key('workers_seen', f[1]), now, worker)
  end
end

-- The training figures of the active leases, summed per worker kind as they change (one
-- hash read per scrape instead of one per lease): `training_moved` when a heartbeat
-- reports new ones, `end_lease` takes a lease's out. Busy workers (holding an active lease)
-- are counted per kind alongside (lease.lua, end_lease).
local FIGURES = {'tokens_per_s', 'step', 'max_steps'}
local function training_add(kind, figure, delta)
  if delta ~= 0 then
    redis.call('HINCRBYFLOAT', key('metric_training'), kind .. ':' .. figure, number_text(delta))
  end
end
local function training_moved(lease_id, kind, p)
  local lk = key('lease', lease_id)
  local old = redis.call('HMGET', lk, unpack(FIGURES))
  for i, f in ipairs(FIGURES) do
    training_add(kind, f, (tonumber(p[f]) or 0) - (tonumber(old[i]) or 0))
  end
  redis.call('ZADD', key('metric_memory', kind), tonumber(p.memory_bytes) or 0, lease_id)
end

local function job_live(job)
  local s = redis.call('HGET', key('job', job), 'state')
  return s and not TERMINAL[s]
end

local function task_wanted(tk)
  local f = redis.call('HMGET', tk, 'job_id', 'trial')
  if not job_live(f[1]) then return false end
  local ts = redis.call('HGET', key('trial', f[1], f[2]), 'state')
  return (not ts) or ts == 'running'
end

-- queue ---------------------------------------------------------------------------------
local function queue_push(task_id, front)
  local f = redis.call('HMGET', key('task', task_id), 'tier', 'job_id')
  local q = key('queue', f[1], f[2])
  if front then redis.call('LPUSH', q, task_id) else redis.call('RPUSH', q, task_id) end
  local rot = key('rotation', f[1])
  if not redis.call('LPOS', rot, f[2]) then redis.call('RPUSH', rot, f[2]) end
end

local function queue_drop(task_id)
  local f = redis.call('HMGET', key('task', task_id), 'tier', 'job_id')
  local q = key('queue', f[1], f[2])
  redis.call('LREM', q, 0, task_id)
  if redis.call('LLEN', q) == 0 then redis.call('LREM', key('rotation', f[1]), 0, f[2]) end
end

-- The next task of a tier: jobs take turns (the head of the rotation moves to its tail).
-- `formats` (a set, or nil for all) skips a job whose next task has another data format.
local function queue_pop(tier, formats)
  local rot = key('rotation', tier)
  for _ = 1, redis.call('LLEN', rot) do
    local job = redis.call('LMOVE', rot, rot, 'LEFT', 'RIGHT')
    if not job then return nil end
    local q = key('queue', tier, job)
    local head = redis.call('LINDEX', q, 0)
    if not head then
      redis.call('LREM', rot, 0, job)
    elseif (not formats) or formats[redis.call('HGET', key('task', head), 'format') or ''] then
      redis.call('LPOP', q)
      if redis.call('LLEN', q) == 0 then redis.call('LREM', rot, 0, job) end
      return head
    end
  end
  return nil
end

-- task fate -----------------------------------------------------------------------------
-- Every change of a task's state goes through here, before the HSET that makes it: the
-- job's count of tasks per state (job:<job>:task_states) follows, so a scrape reads one
-- hash per job instead of every task (metrics.lua).
local function count_task_state(tk, new)
  local f = redis.call('HMGET', tk, 'state', 'job_id')
  if f[1] == new or not f[2] then return end
  local counts = key('job_task_states', f[2])
  if f[1] then redis.call('HINCRBY', counts, f[1], -1) end
  redis.call('HINCRBY', counts, new, 1)
end

local function cancel_task(task_id, why, now)
  local tk = key('task', task_id)
  local f = redis.call('HMGET', tk, 'state', 'job_id')
  if f[1] == 'queued' then queue_drop(task_id) end
  count_task_state(tk, 'cancelled')
  redis.call('HSET', tk, 'state', 'cancelled', 'error', why, 'updated_at', now,
    'lease_id', '', 'worker_id', '')
  emit(f[2], 'task_cancelled', {task_id = task_id, reason = why}, now)
end

local function fail_trial(job, trial, round, why, now)
  local trk = key('trial', job, trial)
  if redis.call('HGET', trk, 'state') ~= 'running' then return end
  redis.call('HSET', trk, 'state', 'failed', 'error', why, 'updated_at', now)
  emit(job, 'trial_finished', {trial = tonumber(trial), state = 'failed', error = why}, now)
  for _, other in ipairs(redis.call('SMEMBERS', key('round_tasks', job, trial, round))) do
    if redis.call('HGET', key('task', other), 'state') == 'queued' then
      cancel_task(other, 'its trial failed', now)
    end
  end
end

-- `count`: false (not counted), true (one failed attempt) or the attempt's weight (a number;
-- expire_lease counts an attempt that made progress as half). `failures` is a float.
local function settle(task_id, why, count, retryable, now)
  local tk = key('task', task_id)
  if not task_wanted(tk) then
    cancel_task(task_id, 'its job or trial is over', now)
    return 'cancelled'
  end
  local failures = tonumber(redis.call('HGET', tk, 'failures') or '0')
  -- Trust: no volunteer, and no handful of one owner's accounts, can fail a trial. A
  -- volunteer's `fail` is always retryable, and its failures and expiries count only once
  -- per owner (the owners that failed the task: its `failed_owners` field); rejections and
  -- revocations are never counted (their callers pass count false). Cluster workers, and
  -- workers without a record, keep the rule above.
  if count then
    local worker = redis.call('HGET', tk, 'worker_id') or ''
    local w = redis.call('HMGET', key('worker', worker), 'kind', 'name')
    if w[1] == 'volunteer' then
      retryable = true
      local owners = cjson.decode(redis.call('HGET', tk, 'failed_owners') or '{}')
      if owners[w[2]] then
        count = false
      else
        owners[w[2]] = true
        redis.call('HSET', tk, 'failed_owners', cjson.encode(owners))
      end
    end
  end
  if count then
    local weight = (count == true) and 1 or count
    failures = tonumber(redis.call('HINCRBYFLOAT', tk, 'failures', tostring(weight)))
  end
  local f = redis.call('HMGET', tk, 'max_attempts', 'job_id', 'trial', 'round', 'attempt')
  if count and ((not retryable) or failures >= tonumber(f[1])) then
    local msg = string.format('task %s failed (%g failed attempt(s) of %s allowed): %s',
      task_id, failures, f[1], why)
    count_task_state(tk, 'failed')
    redis.call('HSET', tk, 'state', 'failed', 'error', msg, 'updated_at', now,
      'lease_id', '', 'worker_id', '')
    tally('tasks_failed')
    emit(f[2], 'task_failed', {task_id = task_id, attempt = tonumber(f[5]), error = msg}, now)
    -- A redundancy duplicate that fails leaves its original to its own checks
    -- (pipeline/verification.py): it never fails the trial.
    if not redis.call('HGET', tk, 'duplicate_of') then fail_trial(f[2], f[3], f[4], msg, now) end
    return 'failed'
  end
  count_task_state(tk, 'queued')
  redis.call('HSET', tk, 'state', 'queued', 'updated_at', now, 'lease_id', '', 'worker_id', '')
  queue_push(task_id, true)
  tally('task_retries')
  emit(f[2], 'task_queued', {task_id = task_id, attempt = tonumber(f[5]), reason = why}, now)
  return 'queued'
end

-- leases --------------------------------------------------------------------------------
local function end_lease(lease_id, state, now)
  local lk = key('lease', lease_id)
  local f = redis.call('HMGET', lk, 'worker_id', 'kind', unpack(FIGURES))
  local worker, kind = f[1], f[2]
  redis.call('HSET', lk, 'state', state, 'ended_at', now)
  redis.call('ZREM', key('deadlines'), lease_id)
  local held = redis.call('SREM', key('worker_leases', worker), lease_id)
  if kind and kind ~= '' then
    for i, figure in ipairs(FIGURES) do training_add(kind, figure, -(tonumber(f[i + 2]) or 0)) end
    redis.call('ZREM', key('metric_memory', kind), lease_id)
    if held == 1 and redis.call('SCARD', key('worker_leases', worker)) == 0 then
      training_add(kind, 'busy', -1)
    end
  end
  redis.call('EXPIRE', lk, C.lease_keep_s)
end

local function expire_lease(lease_id, now)
  local f = redis.call('HMGET', key('lease', lease_id), 'state', 'task_id', 'worker_id', 'attempt')
  if f[1] ~= 'active' then
    redis.call('ZREM', key('deadlines'), lease_id)
    return false
  end
  end_lease(lease_id, 'expired', now)
  redis.call('HINCRBY', key('worker', f[3]), 'tasks_expired', 1)
  tally_by('task_attempts', 'expired')
  local job = redis.call('HGET', key('task', f[2]), 'job_id')
  emit(job, 'lease_expired', {task_id = f[2], attempt = tonumber(f[4]), worker_id = f[3]}, now)
  -- A worker that died after leaving a newer checkpoint than the attempt started from made
  -- progress the next attempt resumes: that attempt counts half toward max_attempts, so
  -- workers that keep dying mid-task slow a task down before they fail it.
  local progressed = redis.call('HGET', key('lease', lease_id), 'progressed') == '1'
  settle(f[2], string.format('the lease of attempt %s expired (worker %s stopped reporting)',
    f[4], f[3]), progressed and 0.5 or true, true, now)
  return true
end

-- 'ok', 'missing', 'expired' or 'stale:<state>' for a report on this lease.
local function check_lease(lease_id, now)
  local f = redis.call('HMGET', key('lease', lease_id), 'state', 'deadline', 'task_id')
  if not f[1] then return 'missing' end
  if f[1] == 'active' and tonumber(f[2]) < now then
    expire_lease(lease_id, now)
    return 'expired'
  end
  if f[1] == 'expired' then return 'expired' end
  if f[1] ~= 'active' then return 'stale:' .. f[1] end
  local t = redis.call('HMGET', key('task', f[3]), 'state', 'lease_id')
  if t[1] ~= 'leased' or t[2] ~= lease_id then return 'stale:' .. (t[1] or 'gone') end
  return 'ok'
end

-- A verified checkpoint (ARGV from `ci`: seq of its key, step, CheckpointRecord JSON).
local function record_checkpoint(lease_id, ci, now)
  if ARGV[ci] == '' then return end
  local lk = key('lease', lease_id)
  local f = redis.call('HMGET', lk, 'task_id', 'ckpt_seq')
  if tonumber(ARGV[ci]) == tonumber(f[2]) then  -- first report of this checkpoint
    redis.call('HINCRBY', lk, 'ckpt_seq', 1)
    tally_by('artifact_bytes', 'upload', cjson.decode(ARGV[ci + 2]).bytes)
  end
  local tk = key('task', f[1])
  local step = tonumber(ARGV[ci + 1])
  local have = redis.call('HGET', tk, 'checkpoint_step')
  -- Newer than every checkpoint before it: this attempt made progress (see expire_lease).
  if (not have) or have == '' or tonumber(have) < step then
    redis.call('HSET', lk, 'progressed', 1)
  end
  if (not have) or have == '' or tonumber(have) <= step then
    redis.call('HSET', tk, 'checkpoint_step', step, 'checkpoint_json', ARGV[ci + 2])
  end
end

-- A rejected attempt's checkpoint is not resumed from: its worker's work is not trusted.
local function drop_checkpoint(tk, attempt)
  local cp = redis.call('HGET', tk, 'checkpoint_json')
  if cp and cp ~= '' and tostring(cjson.decode(cp).attempt) == tostring(attempt) then
    redis.call('HDEL', tk, 'checkpoint_json', 'checkpoint_step')
  end
end

-- One call of a worker against its token bucket: `rate` calls a second on average, bursts
-- of up to `burst`. The bucket is refilled by the time passed since its last call and
-- forgotten once it would be full again; its clock is real time (not the state's clock,
-- which tests move by hand). The defaults (settings.py: 20 a second, bursts of 60) are far
-- above an honest worker's needs, so only a flood is slowed; the buckets live in Redis, so
-- every API process counts against the same one. Returns 0 when the call may go ahead,
-- else the seconds until one may (authorize.lua; the API answers 429 with Retry-After).
local function take_token(worker, rate, burst, now)
  local bk = key('rate', worker)
  local b = redis.call('HMGET', bk, 'tokens', 'at')
  local tokens = tonumber(b[1]) or burst
  local at = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(now - at, 0) * rate)
  local wait = 0
  if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
  redis.call('HSET', bk, 'tokens', tostring(tokens), 'at', tostring(now))
  redis.call('PEXPIRE', bk, math.ceil(burst / rate * 1000) + 1000)
  return wait
end
