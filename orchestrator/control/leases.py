"""Leases: the worker side of a task (lease, heartbeat, complete, fail, release, expiry).

A lease is one attempt at a task by one worker, until a deadline that heartbeats push
forward. Its transitions run as Lua scripts (orchestrator/control/scripts.py); this module adds what
needs the object store: presigned URLs out, verification of what came back in.

- `lease` takes the next task that fits the worker (orchestrator/control/queue.py), attempt + 1,
  with presigned GETs for its inputs (and its latest checkpoint to resume from, whichever
  attempt made it) and presigned POSTs for its outputs, at keys unique to (task, attempt):
  jobs/<job>/trials/<t>/r<round>/s<shard>/a<attempt>/{adapter/<file>, ckpt/<seq>/...}.
- `heartbeat` renews the deadline, records a reported checkpoint (control/checkpoints.py:
  issued key, quota, step range, size and sha256 in the store) and answers `stop` once the
  job or trial is over; a lease older than `lease_max_age_s` ends there (409).
- `complete` runs the cheap checks (control/intake.py: issued keys, sizes, sha256, the
  weights' safetensors header against the tensors the task implies). A cluster worker's
  result is then accepted and credited; a volunteer's waits in `verifying`, uncredited, for
  the reconciler's heavy checks (pipeline/verification.py, control/verdicts.py). A result
  that fails is rejected: the task is queued again (a volunteer's rejection is a strike on
  its owner, not a failed attempt) and the upload deleted. Credit is the coordinator's count
  (`intake.task_tokens`), never the worker's metrics. A retried completion gets the same
  answer and no second credit; a completion on an expired or superseded lease gets 409.
- `fail` and `release` end the lease; the task is queued again (the next attempt resumes
  from the latest checkpoint) or, after max_attempts failures, fails with its trial.
- `reclaim_expired` ends every lease past its deadline (the API runs it every second).
- Caps: a worker holds at most `max_leases` at once (one per GPU; lease.lua), answered as
  "no work" with the reason (`offer`), since a worker that lost a lease's answer must wait
  for it to expire rather than stop; a call on another worker's lease is a strike.

Every refusal raises an cotune.orchestrator.protocol.problems error before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from typing import TYPE_CHECKING

from cotune.orchestrator.control.checkpoints import Checkpoints, verify_object
from cotune.orchestrator.control.intake import Intake
from cotune.orchestrator.control.records import (
    LeaseRecord,
    StoredObject,
    TaskRecord,
    decode_hash,
    text,
)
from cotune.orchestrator.control.strikes import Strikes
from cotune.orchestrator.control.tiers import tiers_for
from cotune.orchestrator.data.layout import adapter_key, checkpoint_key
from cotune.orchestrator.protocol.problems import (
    Forbidden,
    LeaseExpired,
    NotFound,
    Rejected,
    StaleLease,
)
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.protocol.wire import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    CHECKPOINT_ARCHIVE,
    Capabilities,
    CheckpointRef,
    CompleteRequest,
    CompleteResponse,
    FailRequest,
    HeartbeatRequest,
    HeartbeatResponse,
    LeaseResponse,
    PresignedGet,
    PresignedPost,
    ReleaseRequest,
    ResumeCheckpoint,
    TaskInputs,
    TaskLease,
    TaskOutputs,
)

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.settings import Settings

MiB = 1 << 20
ADAPTER_MAX_BYTES = 8 << 30  # adapter weights: rank 256 on a 70B model stays well below
SMALL_FILE_MAX_BYTES = 16 * MiB  # adapter_config.json, metrics.json
GET_EXPIRY_S = 6 * 3600  # long enough to download a staged base model on a slow link
RETRY_AFTER_S = 2.0
_GPU_CACHE_SIZE = 100_000


class Leases:
    """Lease operations for authenticated workers (the API checks their tokens first)."""

    def __init__(
        self,
        state: State,
        store: ObjectStore,
        settings: Settings,
        *,
        retry_after_s: float = RETRY_AFTER_S,
    ) -> None:
        self.state = state
        self.store = store
        self.redis = state.redis
        self.keys = state.keys
        self.scripts = state.scripts
        self.clock = state.clock
        self.ttl_s = settings.lease_ttl_s
        self.heartbeat_interval_s = min(settings.heartbeat_interval_s, settings.lease_ttl_s / 3)
        self.max_age_s = settings.lease_max_age_s
        self.retry_after_s = retry_after_s
        self.strikes = Strikes(state, max_strikes=settings.max_strikes)
        self.checkpoints = Checkpoints(state, store, self.strikes)
        self.intake = Intake(state, store, self.strikes)
        self._gpus: dict[str, bool] = {}  # worker id -> has a GPU (`_has_gpus`)

    # --- the protocol -----------------------------------------------------------------------

    def lease(self, worker_id: str, capabilities: Capabilities) -> TaskLease | None:
        """The next task that fits this worker, leased to it; None if there is none for it
        now (`offer` says why and for how long)."""
        return self.offer(worker_id, capabilities).task

    def offer(self, worker_id: str, capabilities: Capabilities) -> LeaseResponse:
        """The lease answer: the next task that fits this worker, or how long to wait (and
        why, when it is the worker's lease cap rather than an empty queue)."""
        tiers = tiers_for(capabilities.memory_bytes, gpu=self._has_gpus(worker_id))
        now = self.clock()
        if not tiers:
            return LeaseResponse(retry_after_s=self.retry_after_s)
        lease_id = "l-" + secrets.token_hex(8)
        deadline = now + self.ttl_s
        formats = json.dumps(capabilities.formats)
        got = self.scripts("lease", worker_id, lease_id, now, deadline, formats, *tiers)
        status = text(got[0])
        if status == "quarantined":
            raise Forbidden(
                f"contributor {text(got[1])!r} is quarantined: no more work", "worker_id"
            )
        if status != "leased":
            reason = None  # lease.lua counted the worker as alive (lib.lua touch_worker)
            if status == "capped":
                reason = (
                    f"worker {worker_id} holds {int(got[1])} active lease(s), its limit (one "
                    "per GPU, one without a GPU): finish, release or let one expire first"
                )
            return LeaseResponse(retry_after_s=self.retry_after_s, reason=reason)
        flat = got[3]
        task = TaskRecord.from_hash(decode_hash(dict(zip(flat[::2], flat[1::2], strict=True))))
        attempt = int(got[2])
        try:
            return LeaseResponse(task=self._task_lease(task, lease_id, attempt, deadline, now))
        except Exception:
            # The worker never hears of this lease: give it back at once rather than let it
            # expire (which would count as a failed attempt).
            self.scripts("give_up", lease_id, self.clock(), "release", "not handed out", "0", "")
            raise

    def _has_gpus(self, worker_id: str) -> bool:
        """Whether the worker reported a GPU at enrollment (a worker id never enrolled, as
        in tests, counts as one). Fixed for a worker id's life, so asked once per process."""
        known = self._gpus.get(worker_id)
        if known is None:
            gpus = self.redis.hget(self.keys.worker(worker_id), "gpus")
            known = gpus is None or int(gpus) > 0
            if len(self._gpus) >= _GPU_CACHE_SIZE:
                self._gpus.clear()  # a new epoch: the workers still calling are asked again
            self._gpus[worker_id] = known
        return known

    def heartbeat(self, worker_id: str, lease_id: str, body: HeartbeatRequest) -> HeartbeatResponse:
        lease = self._own_lease(worker_id, lease_id)
        self._precheck(lease)
        task = self.state.get_task(lease.task_id)
        checkpoint = self._checkpoint_args(lease, task, body.checkpoint, "checkpoint")
        progress: dict[str, object] = {
            "phase": body.phase,
            "step": body.step,
            "max_steps": body.max_steps,
            "learning_rate": body.learning_rate,
            "tokens_per_s": body.tokens_per_s,
            "tokens_seen": body.tokens_seen,
            "memory_bytes": body.memory_bytes,
        }
        if body.loss is not None:
            progress["loss"] = body.loss
        now = self.clock()
        deadline = now + self.ttl_s
        answer = self.scripts(
            "heartbeat", lease_id, now, deadline, json.dumps(progress), self.max_age_s, *checkpoint
        )
        status = text(answer[0])
        if status in ("ok", "too_old"):
            self.checkpoints.delete_superseded(answer[3] if status == "ok" else answer[2])
        if status == "too_old":
            raise LeaseExpired(
                f"lease {lease_id} (attempt {lease.attempt}) reached its maximum age of "
                f"{self.max_age_s:.0f} s (COTUNE_LEASE_MAX_AGE_S); its task was queued again "
                "and resumes from its latest checkpoint"
            )
        self._raise_for(status, lease)
        action = "stop" if text(answer[1]) == "stop" else "continue"
        outputs = self._outputs(task, lease.attempt, int(answer[2]), deadline, now)
        return HeartbeatResponse(action=action, deadline=deadline, server_time=now, outputs=outputs)

    def complete(self, worker_id: str, lease_id: str, body: CompleteRequest) -> CompleteResponse:
        lease = self._own_lease(worker_id, lease_id)
        digest = _digest(body)
        if lease.completion_json is not None:  # a retried completion: the same answer
            return self._repeated(lease, lease.completion_json, lease.completion_digest, digest)
        self._precheck(lease)
        task = self.state.get_task(lease.task_id)
        for name in ADAPTER_FILES:
            field = f"artifacts.{name}"
            if name not in body.artifacts:
                raise Rejected(f"no {name} in the result", field)
            if body.artifacts[name].key != adapter_key(task, lease.attempt, name):
                raise Rejected(f"{name}: not the key issued to this lease", field + ".key")
        extra = sorted(set(body.artifacts) - set(ADAPTER_FILES))
        if extra:
            raise Rejected(f"unexpected files {extra}; send {list(ADAPTER_FILES)}", "artifacts")
        judged = self.intake.judge(task, lease.attempt, worker_id, body)
        got = self.scripts(
            "complete",
            lease_id,
            self.clock(),
            judged.outcome,
            judged.result.model_dump_json(),
            judged.answer.model_dump_json(),
            judged.credit,
            judged.result.owner or worker_id,
            judged.answer.reason or "",
            digest,
        )
        status = text(got[0])
        if status == "done":
            stored_digest = text(got[2]) if len(got) > 2 and got[2] is not None else None
            return self._repeated(lease, text(got[1]), stored_digest, digest)
        self._raise_for(status, lease)
        if judged.outcome == "rejected":
            self.intake.rejected(judged, task)
        return judged.answer

    def fail(self, worker_id: str, lease_id: str, body: FailRequest) -> None:
        self._give_up(worker_id, lease_id, "fail", body.reason, body.retryable, body.checkpoint)

    def release(self, worker_id: str, lease_id: str, body: ReleaseRequest) -> None:
        self._give_up(worker_id, lease_id, "release", body.reason, True, body.checkpoint)

    def reclaim_expired(self, limit: int = 1000) -> int:
        """End every lease past its deadline; their tasks are queued again (or fail)."""
        return int(self.scripts("reclaim", self.clock(), limit))

    def get_lease(self, lease_id: str) -> LeaseRecord:
        raw = decode_hash(self.redis.hgetall(self.keys.lease(lease_id)))
        if not raw:
            raise NotFound(f"no lease {lease_id}", "lease_id")
        return LeaseRecord.from_hash(raw)

    # --- internals --------------------------------------------------------------------------

    def _give_up(
        self,
        worker_id: str,
        lease_id: str,
        kind: str,
        reason: str,
        retryable: bool,
        ref: CheckpointRef | None,
    ) -> None:
        lease = self._own_lease(worker_id, lease_id)
        if lease.state == ("failed" if kind == "fail" else "released"):
            return  # a retried report
        self._precheck(lease)
        checkpoint: tuple[object, ...] = ("",)
        if ref is not None:  # the task is read only to check the checkpoint against it
            task = self.state.get_task(lease.task_id)
            checkpoint = self._checkpoint_args(lease, task, ref, "checkpoint")
        answer = self.scripts(
            "give_up", lease_id, self.clock(), kind, reason, "1" if retryable else "0", *checkpoint
        )
        if text(answer[0]) == "ok" and len(answer) > 2:
            self.checkpoints.delete_superseded(answer[2])
        self._raise_for(text(answer[0]), lease)

    def _repeated(
        self, lease: LeaseRecord, answer: str, stored: str | None, digest: str
    ) -> CompleteResponse:
        """A completion again: the same answer if it reports the same artifacts."""
        if stored is not None and stored != digest:
            raise StaleLease(
                f"lease {lease.lease_id} was already completed with other artifacts; "
                "nothing was recorded"
            )
        return CompleteResponse.model_validate_json(answer)

    def _own_lease(self, worker_id: str, lease_id: str) -> LeaseRecord:
        lease = self.get_lease(lease_id)
        if lease.worker_id != worker_id:
            # Lease ids are random and only their holder hears them: no honest mistake.
            self.strikes.add(worker_id, f"a call on another worker's lease ({lease_id})")
            raise Forbidden("this lease belongs to another worker", "lease_id")
        return lease

    def _precheck(self, lease: LeaseRecord) -> None:
        """Refuse a report on an ended lease before any work (the scripts check again)."""
        if lease.state == "active" and lease.deadline < self.clock():
            self.reclaim_expired()
            lease = self.get_lease(lease.lease_id)
        if lease.state != "active":
            self._raise_for(
                "expired" if lease.state == "expired" else "stale:" + lease.state, lease
            )

    def _raise_for(self, status: str, lease: LeaseRecord) -> None:
        if status in ("ok", "done"):
            return
        if status == "missing":
            raise NotFound(f"no lease {lease.lease_id}", "lease_id")
        if status == "expired":
            raise LeaseExpired(
                f"lease {lease.lease_id} (attempt {lease.attempt}) expired; its task was queued "
                "again"
            )
        what = status.removeprefix("stale:")
        raise StaleLease(
            f"lease {lease.lease_id} (attempt {lease.attempt} of task {lease.task_id}) is over "
            f"({what}); nothing was recorded"
        )

    def _checkpoint_args(
        self, lease: LeaseRecord, task: TaskRecord, ref: CheckpointRef | None, where: str
    ) -> tuple[object, ...]:
        """(seq, step, CheckpointRecord JSON) of a verified checkpoint; ('',) for none."""
        return self.checkpoints.args(lease, task, ref, where)

    def _verify(self, key: str, sha256: str, size: int) -> str | None:
        """What is wrong with the object at `key` compared with the claim, or None."""
        return verify_object(self.store, key, sha256, size)

    def _task_lease(
        self, task: TaskRecord, lease_id: str, attempt: int, deadline: float, now: float
    ) -> TaskLease:
        stored = task.inputs()
        resume = None
        checkpoint = task.checkpoint()
        if checkpoint is not None:
            archive = StoredObject(
                key=checkpoint.key,
                sha256=checkpoint.sha256,
                bytes=checkpoint.bytes,
                name=CHECKPOINT_ARCHIVE,
            )
            resume = ResumeCheckpoint(step=checkpoint.step, archive=self._get(archive))
        base = stored.base_model
        inputs = TaskInputs(
            base_model=base if isinstance(base, str) else self._get(base),
            train=[self._get(o) for o in stored.train],
            eval=self._get(stored.eval) if stored.eval else None,
            start_adapter=(
                {n: self._get(o) for n, o in stored.start_adapter.items()}
                if stored.start_adapter
                else None
            ),
            resume_checkpoint=resume,
        )
        return TaskLease(
            task_id=task.task_id,
            attempt=attempt,
            lease_id=lease_id,
            deadline=deadline,
            server_time=now,
            task=TrainTask.model_validate_json(task.task_json),
            inputs=inputs,
            outputs=self._outputs(task, attempt, 0, deadline, now),
            heartbeat_interval_s=self.heartbeat_interval_s,
        )

    def _get(self, obj: StoredObject) -> PresignedGet:
        name = obj.name or obj.key.rsplit("/", 1)[-1]
        return PresignedGet(
            url=self.store.presign_get(obj.key, GET_EXPIRY_S),
            sha256=obj.sha256,
            bytes=obj.bytes,
            name=name,
        )

    def _outputs(
        self, task: TaskRecord, attempt: int, seq: int, deadline: float, now: float
    ) -> TaskOutputs:
        # A POST policy lives no longer than the lease: a lost worker cannot write later.
        expires = max(math.ceil(deadline - now), 1)
        adapter = {
            name: self._post(
                adapter_key(task, attempt, name),
                ADAPTER_MAX_BYTES if name == ADAPTER_WEIGHTS else SMALL_FILE_MAX_BYTES,
                expires,
            )
            for name in ADAPTER_FILES
        }
        quota = self.checkpoints.quota(task)
        checkpoint = self._post(checkpoint_key(task, attempt, seq), quota, expires)
        return TaskOutputs(adapter=adapter, checkpoint=checkpoint)

    def _post(self, key: str, max_bytes: int, expires_s: int) -> PresignedPost:
        post = self.store.presign_post(key, max_bytes=max_bytes, expires_s=expires_s)
        return PresignedPost(url=post.url, fields=post.fields, key=key, max_bytes=max_bytes)


def _digest(body: CompleteRequest) -> str:
    """The sha256 of the reported artifacts (canonical JSON): a retry reports the same."""
    canonical = json.dumps(
        {name: ref.model_dump() for name, ref in body.artifacts.items()}, sort_keys=True
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
