"""Checkpoints a worker reports (heartbeat, fail, release): checked before they are recorded,
and the one each supersedes deleted from the store.

A reported checkpoint must be at a key issued to its lease, no larger than the task's
checkpoint quota (control/quotas.py), at a step no lower than the one the lease resumed
from and no higher than the optimizer steps the task trains, and match its claimed size
and sha256 in the store. A key never issued or a step out of range is a forgery: refused
(422), with a strike on the worker's owner (control/strikes.py). The size is checked
against the quota before a byte is read, so hashing a checkpoint on the request thread
reads at most the quota (the tiny model's: ~256 MiB at most, in practice a few MB; a 7B
model at rank 16: ~0.9 GB, a few seconds at S3 and sha256 speeds).

The Lua scripts record a checkpoint only if it is the task's newest, and answer the one it
replaced; that one is deleted from the store after the script (`delete_superseded`):
failures are only logged, since a leftover object costs space, never correctness.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING

from cotune.orchestrator.control.quotas import checkpoint_quota, max_steps, task_rows
from cotune.orchestrator.control.records import CheckpointRecord, LeaseRecord, TaskRecord, text
from cotune.orchestrator.data.layout import checkpoint_key
from cotune.orchestrator.protocol.problems import Rejected
from cotune.orchestrator.protocol.task import TrainTask

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.control.strikes import Strikes
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.protocol.wire import CheckpointRef

log = logging.getLogger(__name__)
MiB = 1 << 20


class Checkpoints:
    def __init__(self, state: State, store: ObjectStore, strikes: Strikes) -> None:
        self.state = state
        self.store = store
        self.strikes = strikes

    def quota(self, task: TaskRecord) -> int:
        config = json.loads(task.model_json) if task.model_json else None
        train = TrainTask.model_validate_json(task.task_json)
        return checkpoint_quota(train, task.tier, config)

    def args(
        self, lease: LeaseRecord, task: TaskRecord, ref: CheckpointRef | None, where: str
    ) -> tuple[object, ...]:
        """(seq, step, CheckpointRecord JSON) of a verified checkpoint for the Lua scripts;
        ('',) for none. Rejected (and a strike for a forgery) if it does not check out."""
        if ref is None:
            return ("",)
        issued = [checkpoint_key(task, lease.attempt, s) for s in range(lease.checkpoint_seq + 1)]
        if ref.archive.key not in issued:
            self._strike(lease, f"checkpoint at a key never issued to it: {ref.archive.key!r}")
            raise Rejected("not a checkpoint key issued to this lease", f"{where}.archive.key")
        quota = self.quota(task)
        if ref.archive.bytes > quota:
            raise Rejected(
                f"a checkpoint of {ref.archive.bytes} bytes; this task's quota is {quota} bytes",
                f"{where}.archive.bytes",
            )
        low, high = self._step_range(lease, task)
        if ref.step < low or (high is not None and ref.step > high):
            bound = f"{low}..{high}" if high is not None else f">= {low}"
            self._strike(lease, f"forged checkpoint step {ref.step} (the task's range: {bound})")
            raise Rejected(
                f"checkpoint step {ref.step} is impossible for this lease: it resumed at step "
                f"{low} and the task trains "
                + (f"{high} steps" if high is not None else "an unknown number of steps"),
                f"{where}.step",
            )
        problem = verify_object(
            self.store, ref.archive.key, ref.archive.sha256, ref.archive.bytes, max_bytes=quota
        )
        if problem is not None:
            raise Rejected(problem, f"{where}.archive")
        record = CheckpointRecord(
            step=ref.step,
            key=ref.archive.key,
            sha256=ref.archive.sha256,
            bytes=ref.archive.bytes,
            attempt=lease.attempt,
        )
        return (issued.index(ref.archive.key), ref.step, record.model_dump_json())

    def delete_superseded(self, superseded_json: object) -> None:
        """Delete the checkpoint a script replaced ('' or None: none was)."""
        raw = text(superseded_json) if superseded_json is not None else ""
        if not raw:
            return
        try:
            key = CheckpointRecord.model_validate_json(raw).key
            self.store.delete(key)
        except Exception:  # space, not correctness: the next cleanup is the operator's
            log.warning("deleting a superseded checkpoint failed", exc_info=True)

    def _step_range(self, lease: LeaseRecord, task: TaskRecord) -> tuple[int, int | None]:
        """(the step the lease resumed from, the task's optimizer steps or None)."""
        redis = self.state.redis
        resumed = redis.hget(self.state.keys.lease(lease.lease_id), "resume_step")
        low = int(float(text(resumed))) if resumed else 0
        train = TrainTask.model_validate_json(task.task_json)
        rows = task_rows(train, task, lambda: self.state.get_job(task.job_id).manifest_json)
        return low, max_steps(train, rows)

    def _strike(self, lease: LeaseRecord, reason: str) -> None:
        # The same forgery resent on one lease (a retried heartbeat) is one offense.
        outcome = self.strikes.add(lease.worker_id, reason, once=f"{lease.lease_id}:{reason}")
        log.warning(
            "strike on worker %s (%s): %s; %.1f strike(s)%s",
            lease.worker_id,
            lease.task_id,
            reason,
            outcome.strikes,
            ", quarantined" if outcome.quarantined else "",
        )


def verify_object(
    store: ObjectStore, key: str, sha256: str, size: int, *, max_bytes: int | None = None
) -> str | None:
    """What is wrong with the object at `key` compared with the claim, or None. With
    `max_bytes`, an object larger than that is refused unread (hashing is bounded)."""
    info = store.head(key)
    if info is None:
        return f"{key}: nothing was uploaded there"
    if info.size != size:
        return f"{key}: {info.size} bytes stored, {size} claimed"
    if max_bytes is not None and info.size > max_bytes:
        return f"{key}: {info.size} bytes, over the limit of {max_bytes}"
    digest = hashlib.sha256()
    with store.open_stream(key) as stream:
        while chunk := stream.read(MiB):
            digest.update(chunk)
    got = digest.hexdigest()
    return None if got == sha256 else f"{key}: sha256 {got}, {sha256} claimed"
