"""A lease's heartbeat: a background thread that reports progress and keeps the lease alive.

Every `heartbeat_interval_s` (and at once when a checkpoint is uploaded) it sends the latest
progress, the per-step losses since the last acknowledged beat, and any new checkpoint. The
answers renew the deadline, carry fresh upload targets (held here for the rest of the
agent) and may say `stop`.

When the coordinator cannot be reached, training goes on: the thread retries with backoff
(never slower than the normal cadence) until the lease's deadline passes; only then is the
lease counted as lost. A 404/409/401/403 answer loses it at once.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import threading
import time
from collections.abc import Collection
from typing import Protocol

from cotune.orchestrator.protocol.wire import (
    MAX_STEP_LOSSES,
    CheckpointRef,
    HeartbeatRequest,
    Phase,
    PresignedPost,
    StepLoss,
    TaskLease,
    TaskOutputs,
)
from cotune.worker.client import CoordinatorClient, CoordinatorError, LeaseGone, Refused, Rejected

log = logging.getLogger(__name__)


class ProgressLike(Protocol):
    """What training reports after each optimizer step (worker.training.Progress)."""

    @property
    def step(self) -> int: ...
    @property
    def max_steps(self) -> int: ...
    @property
    def loss(self) -> float | None: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def tokens_per_s(self) -> float: ...
    @property
    def tokens_seen(self) -> int: ...
    @property
    def memory_bytes(self) -> int: ...


class Heartbeat:
    """Heartbeats for one lease; `stop_requested` is set on a `stop` answer or a lost lease."""

    def __init__(
        self,
        client: CoordinatorClient,
        worker_id: str,
        lease: TaskLease,
        *,
        start_step: int = 0,
        retry_initial_s: float = 0.5,
    ) -> None:
        self._client = client
        self._worker_id = worker_id
        self._lease = lease
        self._interval = lease.heartbeat_interval_s
        self._retry_initial = min(retry_initial_s, self._interval)
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self.stop_requested = threading.Event()
        self._lost: str | None = None
        self._outputs = lease.outputs
        self._local_deadline = time.monotonic() + (lease.deadline - lease.server_time)
        self._phase: Phase = "downloading"
        self._request = HeartbeatRequest(
            phase="downloading", step=start_step, max_steps=lease.task.max_steps or 0
        )
        self._losses: collections.deque[StepLoss] = collections.deque(maxlen=MAX_STEP_LOSSES)
        self._pending_checkpoint: CheckpointRef | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{lease.lease_id}", daemon=True
        )

    # --- what the agent reads ---------------------------------------------------------

    @property
    def lost(self) -> str | None:
        """Why the lease is lost (the task must be dropped), or None while it is held."""
        with self._cond:
            return self._lost

    @property
    def outputs(self) -> TaskOutputs:
        with self._cond:
            return self._outputs

    def remaining_s(self) -> float:
        """Seconds until the lease deadline, by this machine's monotonic clock."""
        with self._cond:
            return self._local_deadline - time.monotonic()

    def checkpoint_target(
        self, used: Collection[str], timeout_s: float, cancel: threading.Event | None = None
    ) -> PresignedPost | None:
        """The newest checkpoint target whose key is not in `used`, asking for one if needed;
        None after `timeout_s`, once `cancel` is set, or when the lease is over."""
        give_up_at = time.monotonic() + timeout_s
        with self._cond:
            while True:
                target = self._outputs.checkpoint
                if target.key not in used:
                    return target
                left = give_up_at - time.monotonic()
                if self._lost or self._closed.is_set() or left <= 0:
                    return None
                if cancel is not None and cancel.is_set():
                    return None
                self._wake.set()
                self._cond.wait(min(left, self._interval, 0.5))

    # --- what the agent tells it ------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop beating. A beat in flight is not waited for beyond `timeout_s` (daemon)."""
        self._closed.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def set_phase(self, phase: Phase) -> None:
        with self._cond:
            self._phase = phase
        self._wake.set()

    def update(self, progress: ProgressLike) -> None:
        loss = progress.loss if progress.loss is not None and math.isfinite(progress.loss) else None
        with self._cond:
            if loss is not None and (not self._losses or progress.step > self._losses[-1].step):
                self._losses.append(StepLoss(step=progress.step, loss=loss))
            self._request = HeartbeatRequest(
                phase=self._phase,
                step=progress.step,
                max_steps=progress.max_steps,
                loss=loss,
                learning_rate=max(progress.learning_rate, 0.0),
                tokens_per_s=max(progress.tokens_per_s, 0.0),
                tokens_seen=progress.tokens_seen,
                memory_bytes=progress.memory_bytes,
            )

    def report_checkpoint(self, checkpoint: CheckpointRef) -> None:
        """Tell the coordinator about an uploaded checkpoint with the next beat (sent now)."""
        with self._cond:
            self._pending_checkpoint = checkpoint
        self._wake.set()

    def beat(self, *, retry_for_s: float = 0.0) -> bool:
        """One heartbeat now, on the caller's thread, retried for up to `retry_for_s` while
        the coordinator cannot be reached; False when it did not get through."""
        return self._beat(retry_for_s)

    # --- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._closed.is_set():
            self._wake.clear()
            if self._beat():
                failures = 0
                pause = self._interval
            else:
                if self.lost:
                    return
                failures += 1
                # Back off, but never wait longer than the normal cadence: once the
                # coordinator is back, the lease must be renewed before its deadline.
                pause = min(self._interval, self._retry_initial * 2 ** (failures - 1))
                pause *= 0.75 + 0.5 * random.random()
            self._wake.wait(pause)

    def _beat(self, retry_for_s: float = 0.0) -> bool:
        with self._cond:
            request = self._request.model_copy(
                update={
                    "phase": self._phase,
                    "losses": list(self._losses),
                    "checkpoint": self._pending_checkpoint,
                }
            )
        sent_at = time.monotonic()
        try:
            answer = self._client.heartbeat(
                self._worker_id,
                self._lease.lease_id,
                request,
                retry_for_s=retry_for_s,
                timeout_s=max(2.0, min(10.0, self._interval)),
            )
        except (LeaseGone, Refused) as e:
            self._lose(f"the coordinator no longer honours this lease ({e})")
            return False
        except Rejected as e:
            log.error("heartbeat refused: %s", e)
            with self._cond:
                # A report the coordinator refuses would be refused again: do not resend it.
                if self._pending_checkpoint is request.checkpoint:
                    self._pending_checkpoint = None
            return False
        except CoordinatorError as e:
            left = self.remaining_s()
            if left <= 0:
                self._lose(f"no answer from the coordinator before the lease deadline ({e})")
            else:
                log.warning(
                    "heartbeat failed (%s); training goes on, %.0f s of lease left", e, left
                )
            return False
        with self._cond:
            sent_up_to = request.losses[-1].step if request.losses else None
            while sent_up_to is not None and self._losses and self._losses[0].step <= sent_up_to:
                self._losses.popleft()
            if self._pending_checkpoint is request.checkpoint:
                self._pending_checkpoint = None
            self._local_deadline = sent_at + (answer.deadline - answer.server_time)
            self._outputs = answer.outputs
            self._cond.notify_all()
        if answer.action == "stop" and not self.stop_requested.is_set():
            log.info("the coordinator asked to stop task %s", self._lease.task_id)
            self.stop_requested.set()
        return True

    def _lose(self, reason: str) -> None:
        if self._closed.is_set():
            return  # a beat that was in flight when the lease ended: nothing is lost
        log.error("lease %s lost: %s", self._lease.lease_id, reason)
        with self._cond:
            self._lost = reason
            self._cond.notify_all()
        self.stop_requested.set()
