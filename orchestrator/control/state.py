"""The coordinator's state in Redis: jobs, trials, tasks, merges, the leader lock, events.

Every transition is one Lua script (orchestrator/control/scripts.py) or one atomic command, and
idempotent: calling it again changes nothing and answers the same, so the reconciler can
retry anything after a crash. Records are in orchestrator/control/records.py; key names in
orchestrator/control/keys.py; the lease side of tasks (lease, heartbeat, complete, ...) in
orchestrator/control/leases.py.

    state = State(redis.Redis.from_url(url))
    state.create_job("tiny-1a2b3c4d", "tiny", spec_yaml)            # -> JobRecord (pending)
    state.transition_job(job_id, "sharding", expect=["pending"])     # -> True / False (CAS)
    state.put_trial(job_id, 0, {"training.learning_rate": 1e-3})     # -> TrialRecord
    state.enqueue_task(TaskRecord.new(job_id=..., tier=tier_for(est), task=..., inputs=...))
    state.record_round(job_id, 0, round=0, eval_loss=1.23)           # once per (trial, round)
    state.finish_trial(job_id, 0, "complete")

API for the reconciler (all raise NotFound for an unknown job where noted):
    create_job(job_id, name, spec_yaml) -> JobRecord        idempotent on job_id
    get_job(job_id) -> JobRecord                            NotFound
    list_jobs(states=None) -> list[JobRecord]               oldest first
    transition_job(job_id, to, *, expect, error=, manifest_json=, best_trial=) -> bool
    cancel_job(job_id) -> JobRecord                         Conflict if finished
    put_trial(job_id, number, params) -> TrialRecord        idempotent; NotFound
    get_trial(job_id, number) / get_trials(job_id)
    record_round(job_id, number, round, eval_loss) -> TrialRecord   first value wins
    finish_trial(job_id, number, state, error=None) -> TrialRecord  only from running
    enqueue_task(task) -> bool                              False if it existed
    get_task(task_id) / tasks_for(job_id, trial, round) / tasks_of(job_id)
    claim_merge / record_merge / get_merge                  one merge per round
    acquire_leader / renew_leader / release_leader          one active coordinator
    emit(job_id, kind, **data) -> event id                  orchestrator/control/events.py
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.events import Events
from cotune.orchestrator.control.keys import Keys, check_id
from cotune.orchestrator.control.records import (
    JobRecord,
    TaskRecord,
    TrialRecord,
    decode_hash,
    text,
)
from cotune.orchestrator.control.scripts import Scripts
from cotune.orchestrator.control.tiers import TIER_NAMES
from cotune.orchestrator.protocol.problems import Conflict, NotFound
from cotune.orchestrator.protocol.states import (
    JOB_STATES,
    TRIAL_STATES,
    JobState,
    TaskState,
    TrialState,
)
from cotune.orchestrator.protocol.task import TrainTask

if TYPE_CHECKING:
    import redis as redis_lib

__all__ = [
    "Conflict",
    "JobRecord",
    "JobState",
    "NotFound",
    "State",
    "TaskRecord",
    "TaskState",
    "TrialRecord",
    "TrialState",
]

_JOB_FIELDS = ("error", "manifest_json", "best_trial")
_MERGE_CLAIM_TTL_S = 900.0


# A call that finds Redis away (restarting from its AOF: about a second under `cotune up`)
# reconnects and is sent again, backing off with jitter for about 4 s in all before the
# error reaches the caller (the API then answers 503, which workers retry).
_RETRIES = 8
_RETRY_BASE_S = 0.05
_RETRY_CAP_S = 1.0


def connect(url: str) -> redis_lib.Redis:
    """A client for the Redis at `url` (the one place outside tests that makes one) that
    rides out a Redis restart: on a dropped connection or a timeout it reconnects and
    sends the command again.

    Sending again is safe because every transition is a Lua script that is idempotent
    (a second run of one that did run, its answer lost with the connection, changes nothing
    and answers the same; see the module docstring; lease.lua keys on its lease id), and
    the rest are reads, idempotent writes (SET, HSET, SADD, ZADD) or error events, where a
    repeat only says the same thing twice.
    """
    import redis
    from redis.backoff import EqualJitterBackoff
    from redis.exceptions import ConnectionError as RedisDown
    from redis.exceptions import TimeoutError as RedisSlow
    from redis.retry import Retry

    retry = Retry(
        EqualJitterBackoff(cap=_RETRY_CAP_S, base=_RETRY_BASE_S),
        _RETRIES,
        supported_errors=(RedisDown, RedisSlow, TimeoutError),
    )
    return redis.Redis.from_url(url, retry=retry, socket_connect_timeout=5.0)


def is_unavailable(exc: BaseException) -> bool:
    """True when `exc` means Redis did not answer (the API turns it into a 503)."""
    from redis.exceptions import ConnectionError as RedisDown
    from redis.exceptions import TimeoutError as RedisSlow

    return isinstance(exc, RedisDown | RedisSlow)


class State:
    """Jobs, trials, tasks and merges in one Redis (see the module docstring)."""

    def __init__(
        self,
        redis: redis_lib.Redis,
        *,
        prefix: str = "cotune:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis: Any = redis
        self.keys = Keys(prefix)
        self.clock = clock
        self.scripts = Scripts(redis, self.keys)
        self.events = Events(redis, self.keys)

    # --- jobs -------------------------------------------------------------------------------

    def create_job(
        self, job_id: str, name: str, spec_yaml: str, *, trials: int = 0, rounds: int = 0
    ) -> JobRecord:
        """A new job in state `pending`; the existing one if `job_id` is taken. `trials` and
        `rounds` are what the spec implies (metrics.lua counts the job's progress from them;
        0: unknown, no progress reported)."""
        check_id(job_id, "job id")
        now = self.clock()
        fields = {
            "job_id": job_id,
            "name": name,
            "state": "pending",
            "spec_yaml": spec_yaml,
            "created_at": repr(now),
            "updated_at": repr(now),
            "plan_trials": str(trials),
            "plan_rounds": str(rounds),
        }
        self.scripts("create_job", job_id, now, json.dumps(fields))
        return self.get_job(job_id)

    def get_job(self, job_id: str) -> JobRecord:
        raw = self.redis.hgetall(self.keys.job(job_id))
        if not raw:
            raise NotFound(f"no job {job_id!r}", "job_id")
        return JobRecord.from_hash(decode_hash(raw))

    def list_jobs(self, states: Iterable[JobState] | None = None) -> list[JobRecord]:
        """Jobs, oldest first; only those in `states` if given."""
        wanted = set(states) if states is not None else None
        ids = [text(i) for i in self.redis.zrange(self.keys.jobs(), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self.keys.job(job_id))
        jobs = [JobRecord.from_hash(decode_hash(raw)) for raw in pipe.execute() if raw]
        return [j for j in jobs if wanted is None or j.state in wanted]

    def transition_job(
        self, job_id: str, to: JobState, *, expect: Iterable[JobState], **fields: Any
    ) -> bool:
        """Move the job to `to` if it is in one of `expect` (compare and set); else False.

        `fields` may set error, manifest_json and best_trial (None removes one). Raises
        NotFound for an unknown job.
        """
        unknown = sorted(set(fields) - set(_JOB_FIELDS))
        if unknown:
            raise TypeError(f"transition_job: unknown fields {unknown}; known: {_JOB_FIELDS}")
        for s in (to, *expect):
            if s not in JOB_STATES:
                raise ValueError(f"unknown job state {s!r}; states: {', '.join(JOB_STATES)}")
        values = {k: (None if v is None else str(v)) for k, v in fields.items()}
        answer = self.scripts(
            "transition_job",
            job_id,
            to,
            self.clock(),
            json.dumps(list(expect)),
            json.dumps(values),
        )
        status = text(answer[0])
        if status == "missing":
            raise NotFound(f"no job {job_id!r}", "job_id")
        return status == "ok"

    def record_base_model(self, job_id: str, staged_json: str) -> str:
        """Keep a sharding job's staged base model (StoredObject JSON): the first one stays."""
        answer = self.scripts("record_base_model", job_id, staged_json, self.clock())
        status, value = text(answer[0]), text(answer[1])
        if status != "ok":
            raise (NotFound if status == "missing" else Conflict)(value, "job_id")
        return value

    def cancel_job(self, job_id: str, reason: str = "the job was cancelled") -> JobRecord:
        """Cancel a job: its queued tasks are cancelled, running trials marked failed, live
        leases told to stop at their next heartbeat. Conflict if it already finished."""
        answer = self.scripts("cancel_job", job_id, self.clock(), reason)
        status = text(answer[0])
        if status == "missing":
            raise NotFound(f"no job {job_id!r}", "job_id")
        if status == "terminal":
            raise Conflict(
                f"job {job_id} already finished ({text(answer[1])}); only a pending or "
                "running job can be cancelled",
                "job_id",
            )
        return self.get_job(job_id)

    # --- trials -----------------------------------------------------------------------------

    def put_trial(self, job_id: str, number: int, params: dict[str, Any]) -> TrialRecord:
        """A running trial with these params; the existing one if the number is taken."""
        if number < 0:
            raise ValueError(f"trial numbers are >= 0, got {number}")
        answer = text(self.scripts("put_trial", job_id, number, json.dumps(params), self.clock()))
        if answer == "missing":
            raise NotFound(f"no job {job_id!r}", "job_id")
        return self.get_trial(job_id, number)

    def get_trial(self, job_id: str, number: int) -> TrialRecord:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.trial(job_id, number))
        pipe.hgetall(self.keys.trial_losses(job_id, number))
        raw, losses = pipe.execute()
        if not raw:
            raise NotFound(f"no trial {number} in job {job_id!r}", "trial")
        return TrialRecord.from_hash(job_id, decode_hash(raw), decode_hash(losses))

    def get_trials(self, job_id: str) -> list[TrialRecord]:
        """The job's trials by number ([] for a job without trials, or no such job)."""
        numbers = [int(text(n)) for n in self.redis.zrange(self.keys.job_trials(job_id), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for n in numbers:
            pipe.hgetall(self.keys.trial(job_id, n))
            pipe.hgetall(self.keys.trial_losses(job_id, n))
        replies = pipe.execute()
        return [
            TrialRecord.from_hash(job_id, decode_hash(h), decode_hash(losses))
            for h, losses in zip(replies[::2], replies[1::2], strict=True)
            if h
        ]

    def record_round(self, job_id: str, number: int, round: int, eval_loss: float) -> TrialRecord:
        """The eval loss of the trial's merged adapter after `round`; the first value stays."""
        if not math.isfinite(eval_loss):
            raise ValueError(f"eval_loss must be finite, got {eval_loss}")
        answer = text(
            self.scripts("record_round", job_id, number, round, float(eval_loss), self.clock())
        )
        if answer == "missing":
            raise NotFound(f"no trial {number} in job {job_id!r}", "trial")
        return self.get_trial(job_id, number)

    def finish_trial(
        self, job_id: str, number: int, state: TrialState, error: str | None = None
    ) -> TrialRecord:
        """End a running trial (pruned, complete or failed). A trial that already ended is
        left as it is: compare the returned record's state with the one asked for."""
        if state not in TRIAL_STATES or state == "running":
            raise ValueError(f"a trial finishes as pruned, complete or failed, not {state!r}")
        answer = text(
            self.scripts("finish_trial", job_id, number, state, error or "", self.clock())
        )
        if answer == "missing":
            raise NotFound(f"no trial {number} in job {job_id!r}", "trial")
        return self.get_trial(job_id, number)

    # --- tasks ------------------------------------------------------------------------------

    def enqueue_task(self, task: TaskRecord) -> bool:
        """Store a task and queue it in its tier; False (and nothing changed) if it existed.

        The record's state, attempt and result fields are ignored: a new task is queued at
        attempt 0. Its inputs_json must parse as records.TaskInputs and task_json as a
        TrainTask (checked here, so a lease never hands out something unusable).
        """
        check_id(task.task_id, "task id")
        if task.tier not in TIER_NAMES:
            raise ValueError(f"task {task.task_id}: unknown tier {task.tier!r}; see queue.tier_for")
        if task.max_attempts < 1:
            raise ValueError(f"task {task.task_id}: max_attempts must be >= 1")
        train = TrainTask.model_validate_json(task.task_json)
        task.inputs()  # raises a ValidationError naming the bad field
        fields = {
            "task_id": task.task_id,
            "job_id": task.job_id,
            "trial": str(task.trial),
            "round": str(task.round),
            "shard": str(task.shard),
            "state": "queued",
            "attempt": "0",
            "failures": "0",
            "tier": task.tier,
            "format": train.dataset_format,
            "task_json": task.task_json,
            "inputs_json": task.inputs_json,
            "max_attempts": str(task.max_attempts),
            "updated_at": repr(self.clock()),
        }
        # What the trust checks compare an upload with (records.TaskRecord), when known.
        for name in ("model_json", "adapter_config_json"):
            if getattr(task, name):
                fields[name] = getattr(task, name)
        answer = text(
            self.scripts(
                "enqueue_task", task.task_id, task.job_id, self.clock(), json.dumps(fields)
            )
        )
        if answer == "missing":
            raise NotFound(f"no job {task.job_id!r}", "job_id")
        if answer.startswith("terminal:"):
            raise Conflict(f"job {task.job_id} is {answer.split(':', 1)[1]}: no new tasks")
        return answer == "queued"

    def get_task(self, task_id: str) -> TaskRecord:
        raw = self.redis.hgetall(self.keys.task(task_id))
        if not raw:
            raise NotFound(f"no task {task_id!r}", "task_id")
        return TaskRecord.from_hash(decode_hash(raw))

    def tasks_for(self, job_id: str, trial: int, round: int) -> list[TaskRecord]:
        """The shard tasks of one (trial, round), by shard."""
        ids = self.redis.smembers(self.keys.round_tasks(job_id, trial, round))
        return sorted(self._tasks(text(i) for i in ids), key=lambda t: t.shard)

    def tasks_of(self, job_id: str) -> list[TaskRecord]:
        """Every task of a job, by (trial, round, shard)."""
        ids = self.redis.smembers(self.keys.job_tasks(job_id))
        tasks = self._tasks(text(i) for i in ids)
        return sorted(tasks, key=lambda t: (t.trial, t.round, t.shard))

    def trial_count(self, job_id: str) -> int:
        """Trials recorded for a job (any state)."""
        return int(self.redis.zcard(self.keys.job_trials(job_id)))

    def leased_count(self) -> int:
        """Tasks held by an active lease, over every job."""
        return int(self.redis.zcard(self.keys.deadlines()))

    def ping(self) -> None:
        """Raise unless Redis answers (readiness checks)."""
        self.redis.ping()

    def _tasks(self, ids: Iterable[str]) -> list[TaskRecord]:
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self.keys.task(task_id))
        return [TaskRecord.from_hash(decode_hash(raw)) for raw in pipe.execute() if raw]

    # --- merges -----------------------------------------------------------------------------

    def claim_merge(
        self, job_id: str, trial: int, round: int, owner: str, ttl_s: float = _MERGE_CLAIM_TTL_S
    ) -> bool:
        """True if `owner` may merge this round: nobody holds the claim, or `owner` does.

        The claim lapses after `ttl_s` so a coordinator that died mid-merge does not block
        the round forever; a recorded merge is final whoever holds the claim.
        """
        key = self.keys.merge_claim(job_id, trial, round)
        if self.redis.set(key, owner, nx=True, px=int(ttl_s * 1000)):
            return True
        holder = self.redis.get(key)
        return holder is not None and text(holder) == owner

    def record_merge(
        self,
        job_id: str,
        trial: int,
        round: int,
        merged_prefix: str,
        eval_loss: float,
        *,
        merge_s: float | None = None,
        eval_s: float | None = None,
    ) -> None:
        """The merged adapter of (trial, round); the first record stays. `merge_s` and
        `eval_s` (the durations of the run that made it, None for steps an earlier run did)
        go into the merge and evaluation histograms with the first record only."""
        if not math.isfinite(eval_loss):
            raise ValueError(f"eval_loss must be finite, got {eval_loss}")
        self.scripts(
            "record_merge",
            job_id,
            trial,
            round,
            merged_prefix,
            float(eval_loss),
            self.clock(),
            "" if merge_s is None else float(merge_s),
            "" if eval_s is None else float(eval_s),
        )

    def get_merge(self, job_id: str, trial: int, round: int) -> dict[str, Any] | None:
        raw = decode_hash(self.redis.hgetall(self.keys.merge(job_id, trial, round)))
        if not raw:
            return None
        return {
            "merged_prefix": raw["merged_prefix"],
            "eval_loss": float(raw["eval_loss"]),
            "merged_at": float(raw["merged_at"]),
        }

    # --- leader lock ------------------------------------------------------------------------

    def acquire_leader(self, owner: str, ttl_s: float) -> bool:
        """True if `owner` now holds the lock (taken, or renewed because it held it)."""
        if self.redis.set(self.keys.leader(), owner, nx=True, px=int(ttl_s * 1000)):
            return True
        return self.renew_leader(owner, ttl_s)

    def renew_leader(self, owner: str, ttl_s: float) -> bool:
        return bool(self._leader_script("renew", owner, int(ttl_s * 1000)))

    def release_leader(self, owner: str) -> None:
        self._leader_script("release", owner, 0)

    def _leader_script(self, what: str, owner: str, ttl_ms: int) -> Any:
        script = self.redis.register_script(
            "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end "
            "if ARGV[2] == 'renew' then return redis.call('PEXPIRE', KEYS[1], ARGV[3]) end "
            "return redis.call('DEL', KEYS[1])"
        )
        return script(keys=[self.keys.leader()], args=[owner, what, ttl_ms])

    # --- events -----------------------------------------------------------------------------

    def emit(self, job_id: str, kind: str, **data: Any) -> str:
        """Append an event to the job's stream (capped); its id."""
        return self.events.append(job_id, kind, data, now=self.clock())
