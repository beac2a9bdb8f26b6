"""Verdicts on volunteer results waiting in `verifying`, and the Redis side of redundancy.

A volunteer's result that passed the cheap checks at `complete` (control/intake.py) waits in
`verifying`, uncredited, for the reconciler's heavy checks (pipeline/verification.py). Their
findings are recorded on the task (`record_check`), and the verdict is one Lua script
(lua/verdict.lua), idempotent: it acts only on a task still in `verifying` at the judged
attempt, so a verdict given twice (a coordinator that died and resumed) changes nothing.

    verdicts = Verdicts(state, store)
    verdicts.record_check(task, CheckRecord(attempt=task.attempt, probe_loss=1.9))
    verdicts.accept(task, cancel=[duplicate ids])    # accepted, its owner credited
    verdicts.reject(task, "NaN in ...")              # queued again (not counted), a strike on
                                                     # the owner, the upload deleted
    verdicts.adopt(task, winner, "outvoted")        # the winning duplicate's result instead
    verdicts.enqueue_duplicate(task, 1)              # <task>.dup1, to an owner with no run of it
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from cotune.orchestrator.control.metrics import REJECTION_REASONS
from cotune.orchestrator.control.records import (
    DUPLICATE_ATTEMPTS,
    CheckRecord,
    TaskRecord,
    duplicate_id,
    text,
)
from cotune.orchestrator.control.strikes import MAX_STRIKES, Strikes
from cotune.orchestrator.protocol.task import TrainTask

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.data.objectstore import ObjectStore

log = logging.getLogger(__name__)


class Verdicts:
    def __init__(
        self,
        state: State,
        store: ObjectStore | None = None,
        *,
        max_strikes: float = MAX_STRIKES,
    ) -> None:
        self.state = state
        self.store = store
        self.strikes = Strikes(state, max_strikes=max_strikes)

    def record_check(self, task: TaskRecord, record: CheckRecord) -> None:
        """The heavy checks' findings on the task's current attempt (kept with the task; a
        record of an older attempt is ignored by `TaskRecord.check`)."""
        self.state.redis.hset(
            self.state.keys.task(task.task_id), "check_json", record.model_dump_json()
        )

    def accept(self, task: TaskRecord, cancel: Iterable[str] = ()) -> bool:
        """Accept the verifying result of the task's current attempt and credit its owner;
        the tasks in `cancel` are cancelled if still queued. False if the task had moved on."""
        got = self.state.scripts(
            "verdict", task.task_id, task.attempt, "ok", "", "", self.state.clock(), *cancel
        )
        return text(got[0]) == "ok"

    def reject(
        self, task: TaskRecord, reason: str, *, strike: bool = True, cause: str = "checks"
    ) -> bool:
        """Reject the verifying result of the task's current attempt: the task is queued again
        (not counted toward max_attempts), a strike goes to the owner unless `strike` is false
        (a quarantined owner's pending result), and the upload is deleted from the store.
        `cause` is the reason's class for `cotune_rejections_total` (one of
        control/metrics.py REJECTION_REASONS). False if the task had moved on (then nothing
        is done)."""
        got = self.state.scripts(
            "verdict",
            task.task_id,
            task.attempt,
            "rejected",
            reason,
            _cause(cause),
            self.state.clock(),
        )
        if text(got[0]) != "ok":
            return False
        self._drop(task, text(got[2]), reason, strike)
        return True

    def adopt(self, task: TaskRecord, winner: TaskRecord, reason: str) -> bool:
        """Reject the original's verifying result as outvoted (a strike) and accept the task
        with `winner`'s accepted result (a duplicate of it) instead: no re-run, no credit
        counted twice. False if either had moved on."""
        got = self.state.scripts(
            "verdict",
            task.task_id,
            task.attempt,
            "adopt",
            reason,
            "redundancy",
            self.state.clock(),
            winner.task_id,
        )
        if text(got[0]) != "ok":
            return False
        self._drop(task, text(got[2]), reason, strike=True)
        return True

    def _drop(self, task: TaskRecord, worker: str, reason: str, strike: bool) -> None:
        if strike:
            once = f"verdict:{task.task_id}:{task.attempt}"
            self.strikes.add(worker, f"result rejected ({task.task_id}): {reason}", once=once)
        result = task.result()
        if self.store is not None and result is not None:
            for ref in result.artifacts.values():
                try:
                    self.store.delete(ref.key)
                except Exception:  # the store's own error family; the verdict stands
                    log.warning("could not delete the rejected upload %s", ref.key, exc_info=True)

    def enqueue_duplicate(self, original: TaskRecord, k: int) -> bool:
        """Queue the k-th redundancy run of `original` (`<task_id>.dup<k>`): the same task and
        inputs, a fresh start (no checkpoint), never leased to an owner with another run of
        the task in flight or in hand (lua/lease.lua looks when it is leased). Its
        attempts count from k x DUPLICATE_ATTEMPTS, so its uploads have keys of their own.
        False if it existed (or the job is over)."""
        train = TrainTask.model_validate_json(original.task_json)
        fields = {
            "task_id": duplicate_id(original.task_id, k),
            "job_id": original.job_id,
            "trial": str(original.trial),
            "round": str(original.round),
            "shard": str(original.shard),
            "state": "queued",
            "attempt": str(k * DUPLICATE_ATTEMPTS),
            "failures": "0",
            "tier": original.tier,
            "format": train.dataset_format,
            "task_json": original.task_json,
            "inputs_json": original.inputs_json,
            "max_attempts": str(original.max_attempts),
            "updated_at": repr(self.state.clock()),
            "duplicate_of": original.task_id,
        }
        for name in ("model_json", "adapter_config_json"):
            value = getattr(original, name)
            if value:
                fields[name] = value
        answer = self.state.scripts(
            "enqueue_task",
            fields["task_id"],
            original.job_id,
            self.state.clock(),
            json.dumps(fields),
        )
        return text(answer) == "queued"

    def owner_of(self, worker_id: str) -> str:
        """The owner (join token name) of a worker; the worker id for one without a record."""
        name = self.state.redis.hget(self.state.keys.worker(worker_id), "name")
        return text(name) if name is not None else worker_id

    def is_trusted(self, worker_id: str) -> bool:
        kind = self.state.redis.hget(self.state.keys.worker(worker_id), "kind")
        return kind is not None and text(kind) == "cluster"


def _cause(cause: str) -> str:
    if cause not in REJECTION_REASONS:
        raise ValueError(
            f"unknown rejection cause {cause!r}; causes: {', '.join(REJECTION_REASONS)}"
        )
    return cause
