"""The Lua scripts behind every state transition: each runs atomically inside Redis.

Redis runs a script to its end before serving anything else, so a transition (lease a
task, settle an expired lease, cancel a job) is never seen half done and never races
another; a coordinator killed between two scripts leaves consistent state. Every script is
idempotent: run again, it changes nothing and answers the same.

Scripts get their key templates from orchestrator/keys.py (ARGV[1], with a few limits) and
the caller's clock (`now`, unix seconds), so tests can drive time. They use one Redis
instance (keys are built inside the scripts: not for Redis Cluster).

The shared library (`_LIB`) holds the task fate rules used by several scripts:
- `task_wanted`: a task is wanted while its job is not finished and its trial (if any)
  still runs; unwanted queued tasks are cancelled instead of leased or re-queued;
- `settle`: a lease ended without an accepted result: the task is queued again at the
  front of its queue (an expiry, a failure, a rejected result count toward max_attempts; a
  release does not), or fails for good (max attempts reached, or a non-retryable failure),
  failing its trial and cancelling that round's queued siblings, or is cancelled;
- the queue (see orchestrator/queue.py for the design): per (tier, job) lists and a per
  tier rotation of jobs for round robin.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.events import MAX_EVENTS
from orchestrator.keys import Keys

_LIB = r"""
local C = cjson.decode(ARGV[1])
local K = C.k
local function key(name, ...) return string.format(K[name], ...) end
local TERMINAL = {succeeded = true, failed = true, cancelled = true}

local function emit(job, kind, data, now)
  return redis.call('XADD', key('events', job), 'MAXLEN', '~', C.max_events, '*',
    'kind', kind, 'time', tostring(now), 'data', cjson.encode(data))
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
local function cancel_task(task_id, why, now)
  local tk = key('task', task_id)
  local f = redis.call('HMGET', tk, 'state', 'job_id')
  if f[1] == 'queued' then queue_drop(task_id) end
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

local function settle(task_id, why, count, retryable, now)
  local tk = key('task', task_id)
  if not task_wanted(tk) then
    cancel_task(task_id, 'its job or trial is over', now)
    return 'cancelled'
  end
  local failures = tonumber(redis.call('HGET', tk, 'failures') or '0')
  if count then failures = redis.call('HINCRBY', tk, 'failures', 1) end
  local f = redis.call('HMGET', tk, 'max_attempts', 'job_id', 'trial', 'round', 'attempt')
  if count and ((not retryable) or failures >= tonumber(f[1])) then
    local msg = string.format('task %s failed (%d failed attempt(s) of %s allowed): %s',
      task_id, failures, f[1], why)
    redis.call('HSET', tk, 'state', 'failed', 'error', msg, 'updated_at', now,
      'lease_id', '', 'worker_id', '')
    emit(f[2], 'task_failed', {task_id = task_id, attempt = tonumber(f[5]), error = msg}, now)
    fail_trial(f[2], f[3], f[4], msg, now)
    return 'failed'
  end
  redis.call('HSET', tk, 'state', 'queued', 'updated_at', now, 'lease_id', '', 'worker_id', '')
  queue_push(task_id, true)
  emit(f[2], 'task_queued', {task_id = task_id, attempt = tonumber(f[5]), reason = why}, now)
  return 'queued'
end

-- leases --------------------------------------------------------------------------------
local function end_lease(lease_id, state, now)
  local lk = key('lease', lease_id)
  local worker = redis.call('HGET', lk, 'worker_id')
  redis.call('HSET', lk, 'state', state, 'ended_at', now)
  redis.call('ZREM', key('deadlines'), lease_id)
  redis.call('SREM', key('worker_leases', worker), lease_id)
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
  local job = redis.call('HGET', key('task', f[2]), 'job_id')
  emit(job, 'lease_expired', {task_id = f[2], attempt = tonumber(f[4]), worker_id = f[3]}, now)
  settle(f[2], string.format('the lease of attempt %s expired (worker %s stopped reporting)',
    f[4], f[3]), true, true, now)
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
  if tonumber(ARGV[ci]) == tonumber(f[2]) then redis.call('HINCRBY', lk, 'ckpt_seq', 1) end
  local tk = key('task', f[1])
  local step = tonumber(ARGV[ci + 1])
  local have = redis.call('HGET', tk, 'checkpoint_step')
  if (not have) or have == '' or tonumber(have) <= step then
    redis.call('HSET', tk, 'checkpoint_step', step, 'checkpoint_json', ARGV[ci + 2])
  end
end
"""

# --- jobs, trials, tasks (orchestrator/state.py) -------------------------------------------

CREATE_JOB = r"""
local job, now, fields = ARGV[2], tonumber(ARGV[3]), cjson.decode(ARGV[4])
local jk = key('job', job)
if redis.call('EXISTS', jk) == 1 then return 0 end
for f, v in pairs(fields) do redis.call('HSET', jk, f, v) end
redis.call('ZADD', key('jobs'), now, job)
emit(job, 'job_created', {name = fields.name, state = fields.state}, now)
return 1
"""

TRANSITION_JOB = r"""
local job, to, now = ARGV[2], ARGV[3], tonumber(ARGV[4])
local expect, fields = cjson.decode(ARGV[5]), cjson.decode(ARGV[6])
local jk = key('job', job)
local cur = redis.call('HGET', jk, 'state')
if not cur then return {'missing'} end
local ok = false
for _, s in ipairs(expect) do if s == cur then ok = true end end
if not ok then return {'refused', cur} end
redis.call('HSET', jk, 'state', to, 'updated_at', now)
local data = {from = cur, to = to}
for f, v in pairs(fields) do
  if v == cjson.null then redis.call('HDEL', jk, f) else redis.call('HSET', jk, f, v) end
  if f == 'error' or f == 'best_trial' then data[f] = v end
end
emit(job, 'job_state', data, now)
return {'ok', cur}
"""

CANCEL_JOB = r"""
local job, now, why = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local jk = key('job', job)
local cur = redis.call('HGET', jk, 'state')
if not cur then return {'missing'} end
if TERMINAL[cur] then return {'terminal', cur} end
redis.call('HSET', jk, 'state', 'cancelled', 'updated_at', now)
for _, task_id in ipairs(redis.call('SMEMBERS', key('job_tasks', job))) do
  if redis.call('HGET', key('task', task_id), 'state') == 'queued' then
    cancel_task(task_id, why, now)
  end
end
for _, n in ipairs(redis.call('ZRANGE', key('job_trials', job), 0, -1)) do
  local trk = key('trial', job, n)
  if redis.call('HGET', trk, 'state') == 'running' then
    redis.call('HSET', trk, 'state', 'failed', 'error', why, 'updated_at', now)
  end
end
emit(job, 'job_state', {from = cur, to = 'cancelled', error = why}, now)
return {'ok', cur}
"""

PUT_TRIAL = r"""
local job, n, params, now = ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if redis.call('EXISTS', key('job', job)) == 0 then return 'missing' end
local trk = key('trial', job, n)
if redis.call('EXISTS', trk) == 1 then return 'exists' end
redis.call('HSET', trk, 'number', n, 'params', params, 'state', 'running', 'error', '',
  'created_at', now, 'updated_at', now)
redis.call('ZADD', key('job_trials', job), tonumber(n), n)
emit(job, 'trial_started', {trial = tonumber(n), params = cjson.decode(params)}, now)
return 'created'
"""

RECORD_ROUND = r"""
local job, n, round, loss, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local trk = key('trial', job, n)
if redis.call('EXISTS', trk) == 0 then return 'missing' end
if redis.call('HSETNX', key('trial_losses', job, n), round, loss) == 0 then return 'exists' end
redis.call('HSET', trk, 'updated_at', now)
emit(job, 'round_evaluated', {trial = tonumber(n), round = tonumber(round),
  eval_loss = tonumber(loss)}, now)
return 'recorded'
"""

FINISH_TRIAL = r"""
local job, n, to, err, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local trk = key('trial', job, n)
local cur = redis.call('HGET', trk, 'state')
if not cur then return 'missing' end
if cur ~= 'running' then return cur end
redis.call('HSET', trk, 'state', to, 'error', err, 'updated_at', now)
local data = {trial = tonumber(n), state = to}
if err ~= '' then data.error = err end
emit(job, 'trial_finished', data, now)
for _, task_id in ipairs(redis.call('SMEMBERS', key('job_tasks', job))) do
  local f = redis.call('HMGET', key('task', task_id), 'trial', 'state')
  if f[1] == n and f[2] == 'queued' then cancel_task(task_id, 'its trial ended', now) end
end
return 'finished'
"""

ENQUEUE_TASK = r"""
local task_id, job, now, fields = ARGV[2], ARGV[3], tonumber(ARGV[4]), cjson.decode(ARGV[5])
local tk = key('task', task_id)
if redis.call('EXISTS', tk) == 1 then return 'exists' end
local state = redis.call('HGET', key('job', job), 'state')
if not state then return 'missing' end
if TERMINAL[state] then return 'terminal:' .. state end
for f, v in pairs(fields) do redis.call('HSET', tk, f, v) end
redis.call('SADD', key('round_tasks', job, fields.trial, fields.round), task_id)
redis.call('SADD', key('job_tasks', job), task_id)
queue_push(task_id, false)
emit(job, 'task_queued', {task_id = task_id, attempt = 0}, now)
return 'queued'
"""

RECORD_MERGE = r"""
local job, trial, round, prefix, loss, now = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local mk = key('merge', job, trial, round)
if redis.call('EXISTS', mk) == 1 then return 0 end
redis.call('HSET', mk, 'merged_prefix', prefix, 'eval_loss', loss, 'merged_at', now)
emit(job, 'round_merged', {trial = tonumber(trial), round = tonumber(round),
  merged_prefix = prefix, eval_loss = tonumber(loss)}, tonumber(now))
return 1
"""

# --- leases (orchestrator/leases.py) -------------------------------------------------------

# ARGV: worker, lease_id, now, deadline, formats (JSON list or null), tiers (largest first).
LEASE = r"""
local worker, lease_id, now, deadline = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local formats = nil
local wanted = cjson.decode(ARGV[6])
if type(wanted) == 'table' then
  formats = {}
  for _, f in ipairs(wanted) do formats[f] = true end
end
for i = 7, #ARGV do
  while true do
    local task_id = queue_pop(ARGV[i], formats)
    if not task_id then break end
    local tk = key('task', task_id)
    if redis.call('HGET', tk, 'state') == 'queued' then
      if task_wanted(tk) then
        local attempt = redis.call('HINCRBY', tk, 'attempt', 1)
        local job = redis.call('HGET', tk, 'job_id')
        redis.call('HSET', tk, 'state', 'leased', 'worker_id', worker, 'lease_id', lease_id,
          'updated_at', now, 'step', 0, 'max_steps', 0, 'loss', '')
        redis.call('HSET', key('lease', lease_id), 'lease_id', lease_id, 'task_id', task_id,
          'worker_id', worker, 'attempt', attempt, 'state', 'active', 'deadline', deadline,
          'leased_at', now, 'ckpt_seq', 0)
        redis.call('ZADD', key('deadlines'), deadline, lease_id)
        redis.call('SADD', key('worker_leases', worker), lease_id)
        redis.call('HSET', key('worker', worker), 'last_seen', now)
        emit(job, 'task_leased', {task_id = task_id, attempt = attempt, worker_id = worker}, now)
        return {task_id, attempt}
      end
      cancel_task(task_id, 'its job or trial is over', now)
    end
  end
end
return false
"""

# ARGV: lease_id, now, deadline, progress JSON, checkpoint (seq, step, JSON; '' for none).
HEARTBEAT = r"""
local lease_id, now, deadline = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local status = check_lease(lease_id, now)
if status ~= 'ok' then return {status} end
local lk = key('lease', lease_id)
local f = redis.call('HMGET', lk, 'task_id', 'worker_id', 'attempt', 'last_event')
local tk = key('task', f[1])
record_checkpoint(lease_id, 6, now)
redis.call('HSET', lk, 'deadline', deadline, 'last_heartbeat', now)
redis.call('ZADD', key('deadlines'), deadline, lease_id)
local p = cjson.decode(ARGV[5])
redis.call('HSET', tk, 'step', p.step, 'max_steps', p.max_steps, 'loss', p.loss or '',
  'updated_at', now)
redis.call('HSET', key('worker', f[2]), 'last_seen', now)
if (not f[4]) or now - tonumber(f[4]) >= C.progress_every_s then
  redis.call('HSET', lk, 'last_event', now)
  p.task_id = f[1]
  p.attempt = tonumber(f[3])
  emit(redis.call('HGET', tk, 'job_id'), 'progress', p, now)
end
local action = 'continue'
if not task_wanted(tk) then action = 'stop' end
return {'ok', action, redis.call('HGET', lk, 'ckpt_seq')}
"""

# ARGV: lease_id, now, accepted ('1'/'0'), result JSON, answer JSON, credit, contributor,
# reason, digest of the reported artifacts (a retry must report the same).
COMPLETE = r"""
local lease_id, now, accepted = ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local lk = key('lease', lease_id)
local done = redis.call('HMGET', lk, 'completion', 'completion_digest')
if done[1] then return {'done', done[1], done[2]} end
local status = check_lease(lease_id, now)
if status ~= 'ok' then return {status} end
local f = redis.call('HMGET', lk, 'task_id', 'worker_id', 'attempt')
local tk = key('task', f[1])
local job = redis.call('HGET', tk, 'job_id')
local wk = key('worker', f[2])
redis.call('HSET', lk, 'completion', ARGV[6], 'completion_digest', ARGV[10])
redis.call('HSET', wk, 'last_seen', now)
if accepted then
  end_lease(lease_id, 'completed', now)
  redis.call('HSET', tk, 'state', 'accepted', 'result_json', ARGV[5], 'updated_at', now,
    'lease_id', '')
  redis.call('ZINCRBY', key('leaderboard'), ARGV[7], ARGV[8])
  redis.call('ZINCRBY', key('leaderboard_tasks'), 1, ARGV[8])
  redis.call('HINCRBYFLOAT', wk, 'tokens', ARGV[7])
  redis.call('HINCRBY', wk, 'tasks_accepted', 1)
  emit(job, 'task_accepted', {task_id = f[1], attempt = tonumber(f[3]), worker_id = f[2],
    tokens = tonumber(ARGV[7])}, now)
  return {'ok', 'accepted'}
end
end_lease(lease_id, 'failed', now)
redis.call('HINCRBY', wk, 'tasks_rejected', 1)
emit(job, 'task_rejected', {task_id = f[1], attempt = tonumber(f[3]), worker_id = f[2],
  reason = ARGV[9]}, now)
return {'ok', settle(f[1], 'result rejected: ' .. ARGV[9], true, true, now)}
"""

# ARGV: lease_id, now, kind ('fail'/'release'), reason, retryable ('1'/'0'), checkpoint
# (seq, step, JSON; '' for none).
GIVE_UP = r"""
local lease_id, now, kind, reason = ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local lk = key('lease', lease_id)
local ended = (kind == 'fail') and 'failed' or 'released'
if redis.call('HGET', lk, 'state') == ended then return {'done'} end
local status = check_lease(lease_id, now)
if status ~= 'ok' then return {status} end
local f = redis.call('HMGET', lk, 'task_id', 'worker_id', 'attempt')
record_checkpoint(lease_id, 7, now)
redis.call('HSET', lk, 'reason', reason)
if kind == 'fail' then redis.call('HSET', lk, 'fail_reason', reason) end
end_lease(lease_id, ended, now)
local wk = key('worker', f[2])
redis.call('HSET', wk, 'last_seen', now)
if kind == 'fail' then redis.call('HINCRBY', wk, 'tasks_failed', 1) end
local job = redis.call('HGET', key('task', f[1]), 'job_id')
emit(job, (kind == 'fail') and 'task_attempt_failed' or 'task_released',
  {task_id = f[1], attempt = tonumber(f[3]), worker_id = f[2], reason = reason}, now)
return {'ok', settle(f[1], reason, kind == 'fail', ARGV[6] == '1', now)}
"""

# ARGV: now, limit.
RECLAIM = r"""
local now = tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', key('deadlines'), '-inf', now, 'LIMIT', 0, ARGV[3])
local n = 0
for _, lease_id in ipairs(due) do
  if expire_lease(lease_id, now) then n = n + 1 end
end
return n
"""

_SCRIPTS = {
    "create_job": CREATE_JOB,
    "transition_job": TRANSITION_JOB,
    "cancel_job": CANCEL_JOB,
    "put_trial": PUT_TRIAL,
    "record_round": RECORD_ROUND,
    "finish_trial": FINISH_TRIAL,
    "enqueue_task": ENQUEUE_TASK,
    "record_merge": RECORD_MERGE,
    "lease": LEASE,
    "heartbeat": HEARTBEAT,
    "complete": COMPLETE,
    "give_up": GIVE_UP,
    "reclaim": RECLAIM,
}


LEASE_KEEP_S = 7 * 24 * 3600  # an ended lease answers retried reports this long
PROGRESS_EVERY_S = 5.0  # heartbeats become progress events at most this often per lease


class Scripts:
    """The scripts registered on one Redis client (EVALSHA, loaded again after a restart)."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        *,
        max_events: int = MAX_EVENTS,
        lease_keep_s: int = LEASE_KEEP_S,
        progress_every_s: float = PROGRESS_EVERY_S,
    ) -> None:
        self._config = json.dumps(
            {
                "k": keys.templates(),
                "max_events": max_events,
                "lease_keep_s": lease_keep_s,
                "progress_every_s": progress_every_s,
            }
        )
        self._scripts = {
            name: redis.register_script(_LIB + body) for name, body in _SCRIPTS.items()
        }

    def __call__(self, name: str, *args: object) -> Any:
        return self._scripts[name](keys=[], args=[self._config, *(_arg(a) for a in args)])


def _arg(value: object) -> str:
    if isinstance(value, float):
        return repr(value)  # every digit: deadlines and losses survive the trip
    return str(value)
