-- Lease the next wanted task, from the first of the tiers that has one.
-- ARGV: worker, lease_id, now, deadline, formats (JSON list or null), tiers (largest first).
-- Returns {'leased', task_id, attempt, the task's hash as HGETALL gives it} (one round trip
-- for the API's lease answer), {'none'} when no task is there for the worker, {'capped',
-- held, cap} when it holds as many active leases as it may, {'quarantined', owner} when
-- its owner is quarantined (control/strikes.py).
local worker, lease_id, now, deadline = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local function leased(task_id, attempt)
  return {'leased', task_id, tonumber(attempt), redis.call('HGETALL', key('task', task_id))}
end
-- Run again with the same lease id (a client resending after a dropped connection): the
-- same answer, and no second task taken (control/state.py `connect` resends).
local given = redis.call('HMGET', key('lease', lease_id), 'task_id', 'attempt')
if given[1] then return leased(given[1], given[2]) end
-- A quarantined owner's workers get no work.
local owner = redis.call('HGET', key('worker', worker), 'name')
if owner and redis.call('SISMEMBER', key('quarantined'), owner) == 1 then
  return {'quarantined', owner}
end
-- A revoked worker token gets no work either (control/workers.py refuses it first).
local wk = key('worker', worker)
local w = redis.call('HMGET', wk, 'revoked_at', 'max_leases', 'kind')
if w[1] and w[1] ~= '' then return {'none'} end
local kind = w[3] or ''  -- '' for a worker id never enrolled (tests)
-- An enrolled worker asking for work is alive, whatever the answer (lib.lua touch_worker).
local function alive()
  if kind ~= '' then touch_worker(worker, now) end
end
-- A worker holds at most `max_leases` at once: one per GPU it reported at enrollment, one
-- without a GPU (control/workers.py). A worker id never enrolled (tests) has no cap.
local cap = tonumber(w[2] or '')
if cap then
  local held = redis.call('SCARD', key('worker_leases', worker))
  if held >= cap then
    alive()
    return {'capped', held, cap}
  end
end
local formats = nil
local wanted = cjson.decode(ARGV[6])
if type(wanted) == 'table' then
  formats = {}
  for _, f in ipairs(wanted) do formats[f] = true end
end
-- Trust (pipeline/verification.py, redundancy.py): the runs of one task (the original and
-- its duplicates `<id>.dup<k>`) vote, so none of them goes to an owner that holds or has sent
-- another run of it: the owner is looked up when the task is leased, not when it was queued.
-- Such a task is set aside while looking and put back at the front of its queue, in order.
local function runs_owned(task_id, original)
  if not owner then return false end
  local family = {original}
  local k = 1
  while redis.call('EXISTS', key('task', original .. '.dup' .. k)) == 1 do
    table.insert(family, original .. '.dup' .. k)
    k = k + 1
  end
  if #family == 1 then return false end
  for _, other in ipairs(family) do
    if other ~= task_id then
      local o = redis.call('HMGET', key('task', other), 'state', 'worker_id')
      if (o[1] == 'leased' or o[1] == 'verifying' or o[1] == 'accepted') and o[2] then
        local name = redis.call('HGET', key('worker', o[2]), 'name') or o[2]
        if name == owner then return true end
      end
    end
  end
  return false
end
-- The bytes of what the lease hands out as presigned GETs (the inputs, the resume point).
local function input_bytes(tk)
  local f = redis.call('HMGET', tk, 'inputs_json', 'checkpoint_json')
  local n = 0
  local function add(o)
    if type(o) == 'table' and tonumber(o.bytes) then n = n + tonumber(o.bytes) end
  end
  local inputs = cjson.decode(f[1] or '{}')
  add(inputs.base_model)
  if type(inputs.train) == 'table' then
    for _, o in ipairs(inputs.train) do add(o) end
  end
  add(inputs.eval)
  if type(inputs.start_adapter) == 'table' then
    for _, o in pairs(inputs.start_adapter) do add(o) end
  end
  if f[2] and f[2] ~= '' then add(cjson.decode(f[2])) end
  return n
end
local set_aside = {}
local function put_back()
  for j = #set_aside, 1, -1 do queue_push(set_aside[j], true) end
end
for i = 7, #ARGV do
  while true do
    local task_id = queue_pop(ARGV[i], formats)
    if not task_id then break end
    local tk = key('task', task_id)
    if redis.call('HGET', tk, 'state') == 'queued' then
      local original = redis.call('HGET', tk, 'duplicate_of') or task_id
      if runs_owned(task_id, original) then
        table.insert(set_aside, task_id)
      elseif task_wanted(tk) then
        local attempt = redis.call('HINCRBY', tk, 'attempt', 1)
        local job = redis.call('HGET', tk, 'job_id')
        -- A queued task's updated_at is when it was queued (enqueue_task, settle).
        local queued_at = tonumber(redis.call('HGET', tk, 'updated_at') or now)
        observe('task_queue_wait_seconds', now - queued_at)
        tally_by('artifact_bytes', 'download', input_bytes(tk))
        count_task_state(tk, 'leased')
        redis.call('HSET', tk, 'state', 'leased', 'worker_id', worker, 'lease_id', lease_id,
          'updated_at', now, 'step', 0, 'max_steps', 0, 'loss', '')
        redis.call('HSET', key('lease', lease_id), 'lease_id', lease_id, 'task_id', task_id,
          'worker_id', worker, 'attempt', attempt, 'state', 'active', 'deadline', deadline,
          'leased_at', now, 'ckpt_seq', 0,
          'resume_step', redis.call('HGET', tk, 'checkpoint_step') or '',
          'kind', kind)
        redis.call('ZADD', key('deadlines'), deadline, lease_id)
        redis.call('SADD', key('worker_leases', worker), lease_id)
        if kind ~= '' and redis.call('SCARD', key('worker_leases', worker)) == 1 then
          training_add(kind, 'busy', 1)  -- lib.lua: the worker is busy now
        end
        touch_worker(worker, now)
        emit(job, 'task_leased', {task_id = task_id, attempt = attempt, worker_id = worker}, now)
        put_back()
        return leased(task_id, attempt)
      else
        cancel_task(task_id, 'its job or trial is over', now)
      end
    end
  end
end
put_back()
alive()
return {'none'}
