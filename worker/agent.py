"""The worker agent: enroll, then lease -> download -> train -> upload -> complete, in a loop.

One agent trains one task at a time on one device (`cotune worker` starts one per GPU).
While a task runs, a heartbeat thread reports progress and renews the lease, and every
checkpoint the trainer writes is uploaded in the background, so an agent killed outright
(kill -9, power loss) loses only the steps since the last checkpoint: the coordinator leases
the task again, with that checkpoint to resume from.

A task ends in one of these ways:

    completed   adapter files uploaded, the coordinator accepted them
    rejected    uploaded, the coordinator refused them (its checks failed)
    released    stopped midway (SIGTERM / Ctrl-C, or the coordinator said stop): the stop
                checkpoint is uploaded and the lease given back with it
    failed      inputs or training failed; the coordinator hears why (and may retry it)
    lost        the lease is gone (expired while the coordinator was unreachable, or leased
                again): the task is dropped, nothing is reported

Example (a test drives one task through the real loop):
    agent = Agent(AgentConfig(coordinator=url, join_token=token, work_dir=tmp, once=True),
                  detect_hardware())
    assert agent.run() == EXIT_OK
"""

from __future__ import annotations

import enum
import json
import logging
import math
import shutil
import threading
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from cotune.orchestrator.protocol.wire import (
    ADAPTER_CONFIG,
    ADAPTER_METRICS,
    ADAPTER_WEIGHTS,
    Capabilities,
    CheckpointRef,
    CompleteRequest,
    EnrollRequest,
    FailRequest,
    GpuInfo,
    LeaseRequest,
    ReleaseRequest,
    TaskLease,
)
from cotune.orchestrator.protocol.wire import Hardware as WireHardware
from cotune.worker.checkpoint_sync import CheckpointSync
from cotune.worker.client import CoordinatorClient, CoordinatorError, Refused, Stopping
from cotune.worker.data import DataError
from cotune.worker.hardware import Hardware
from cotune.worker.heartbeat import Heartbeat
from cotune.worker.inputs import fetch_inputs
from cotune.worker.transfer import TransferCancelled, TransferDisplay, TransferError, Transfers
from cotune.worker.view import WorkerView

if TYPE_CHECKING:
    from cotune.worker.training import Progress, TrainResult

log = logging.getLogger(__name__)

EXIT_OK = 0  # work done, or stopped cleanly (SIGTERM / Ctrl-C)
EXIT_ERROR = 1  # refused token, unreachable coordinator at enroll, a failed --once task
EXIT_USAGE = 2  # bad flags
EXIT_NO_WORK = 3  # --once: no work offered within --wait seconds


class Outcome(enum.StrEnum):
    COMPLETED = "completed"
    REJECTED = "rejected"
    RELEASED = "released"
    FAILED = "failed"
    LOST = "lost"


@dataclass(frozen=True)
class AgentConfig:
    coordinator: str
    join_token: str
    work_dir: Path
    once: bool = False
    wait_for_work_s: float = 300.0  # --once: give up (EXIT_NO_WORK) after this long without work
    max_memory_bytes: int | None = None  # offer at most this much device memory
    enroll_retry_s: float = 20.0  # an unreachable coordinator at start is an error after this
    stop_budget_s: float = 27.0  # SIGTERM: checkpoint uploaded and lease given back within this
    models_dir: Path | None = None  # cache of built-in base models [default: $COTUNE_HOME/models]


class Agent:
    """The loop of one worker on one device. `request_stop` is the SIGTERM / Ctrl-C path;
    `view` (worker/view.py) hears of every event, for `cotune worker` to draw."""

    def __init__(
        self,
        config: AgentConfig,
        hardware: Hardware,
        *,
        display: TransferDisplay | None = None,
        view: WorkerView | None = None,
    ) -> None:
        self.config = config
        self.hardware = hardware
        self.worker_id: str | None = None
        self.view = view or WorkerView(config.coordinator, hardware)
        self._stop = threading.Event()
        self._stop_since: float | None = None
        self._client = CoordinatorClient(config.coordinator, stop=self._stop, link=self.view)
        self._transfers = Transfers(display=display)

    def request_stop(self) -> None:
        """Finish the current step, upload a checkpoint, give the lease back, then return."""
        if self._stop_since is None:
            self._stop_since = time.monotonic()
        self._stop.set()
        self.view.stop_requested()

    def _stop_budget_left(self) -> float:
        """Seconds left to finish stopping (SIGTERM), or a plain upload's patience."""
        if self._stop_since is None:
            return self.config.stop_budget_s
        return self.config.stop_budget_s - (time.monotonic() - self._stop_since)

    def close(self) -> None:
        self._client.close()
        self._transfers.close()

    # --- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Enroll, then take tasks until stopped (or one task with `once`); an exit code."""
        try:
            self.enroll()
        except Stopping:
            return EXIT_OK
        except Refused as e:
            log.error(
                "the coordinator refused the join token: %s. Ask its operator for a valid one.", e
            )
            return EXIT_ERROR
        except CoordinatorError as e:
            log.error("cannot enroll with the coordinator at %s: %s", self.config.coordinator, e)
            return EXIT_ERROR
        idle_since = time.monotonic()
        troubles = 0
        while not self._stop.is_set():
            try:
                lease = self._next_lease(idle_since)
            except Stopping:
                break
            except Refused as e:
                log.error("the coordinator no longer accepts this worker: %s", e)
                return EXIT_ERROR
            if lease is None:
                if (
                    self.config.once
                    and time.monotonic() - idle_since >= self.config.wait_for_work_s
                ):
                    log.error(
                        "no work offered by the coordinator within %.0f s (--wait); exiting",
                        self.config.wait_for_work_s,
                    )
                    return EXIT_NO_WORK
                continue
            outcome = self.run_lease(lease)
            if self.config.once:
                return EXIT_OK if outcome in (Outcome.COMPLETED, Outcome.RELEASED) else EXIT_ERROR
            # A machine that fails task after task must not burn through the queue: back
            # off (2 s, 4 s, ... 5 min) until a task succeeds again.
            troubles = 0 if outcome in (Outcome.COMPLETED, Outcome.RELEASED) else troubles + 1
            if troubles:
                self._stop.wait(min(2.0**troubles, 300.0))
            idle_since = time.monotonic()
        log.info("worker stopped")
        return EXIT_OK

    def enroll(self) -> str:
        request = EnrollRequest(join_token=self.config.join_token, hardware=self._wire_hardware())
        answer = self._client.enroll(request, retry_for_s=self.config.enroll_retry_s)
        self.worker_id = answer.worker_id
        self.view.enrolled(answer.worker_id)
        log.info("enrolled with %s as worker %s", self.config.coordinator, answer.worker_id)
        return answer.worker_id

    def _next_lease(self, idle_since: float) -> TaskLease | None:
        assert self.worker_id is not None
        wait = 60.0
        if self.config.once:
            wait = max(self.config.wait_for_work_s - (time.monotonic() - idle_since), 0.0)
        try:
            answer = self._client.lease(
                self.worker_id, LeaseRequest(capabilities=self._capabilities()), retry_for_s=wait
            )
        except (Refused, Stopping):
            raise
        except CoordinatorError as e:
            # Unreachable (after backing off) or a refusal of this one request: ask again.
            log.warning("asking for work failed: %s", e)
            self._stop.wait(min(wait, 5.0))
            return None
        if answer.task is None:
            pause = answer.retry_after_s or 1.0
            if self.config.once:
                pause = min(pause, max(wait, 0.0))
            self._stop.wait(pause)
            return None
        return answer.task

    # --- one task ---------------------------------------------------------------------

    def run_lease(self, lease: TaskLease) -> Outcome:
        """Run one leased task to its end (see the module docstring for the outcomes)."""
        assert self.worker_id is not None
        log.info(
            "task %s attempt %d%s",
            lease.task_id,
            lease.attempt,
            f", resuming at step {lease.inputs.resume_checkpoint.step}"
            if lease.inputs.resume_checkpoint
            else "",
        )
        self.view.leased(lease)
        task_dir = self.config.work_dir / "tasks" / f"{lease.task_id}-a{lease.attempt}"
        shutil.rmtree(task_dir, ignore_errors=True)
        task_dir.mkdir(parents=True)
        start = lease.inputs.resume_checkpoint.step if lease.inputs.resume_checkpoint else 0
        heartbeat = Heartbeat(self._client, self.worker_id, lease, start_step=start)
        heartbeat.start()
        try:
            outcome = self._run_lease(lease, task_dir, heartbeat)
        except Exception as e:
            # A fault of this machine (disk full, a bug): report it and go on with the next
            # task rather than die and come back in a crash loop.
            log.exception("task %s: unexpected error", lease.task_id)
            outcome = self._fail(
                lease, heartbeat, f"worker error: {type(e).__name__}: {e}", retryable=True
            )
        finally:
            heartbeat.close()
            shutil.rmtree(task_dir, ignore_errors=True)
        self.view.task_ended(outcome)
        log.info("task %s attempt %d: %s", lease.task_id, lease.attempt, outcome)
        return outcome

    def _run_lease(self, lease: TaskLease, task_dir: Path, heartbeat: Heartbeat) -> Outcome:
        try:
            inputs = fetch_inputs(
                lease,
                task_dir,
                self._transfers,
                models=self.config.work_dir / "models",
                cancel=self._stop,
            )
        except TransferCancelled:
            return self._release(lease, heartbeat, "the worker is stopping", None)
        except (TransferError, ValueError) as e:
            return self._fail(lease, heartbeat, f"inputs: {e}", retryable=True)
        if heartbeat.lost:
            return Outcome.LOST
        if self._stop.is_set():
            return self._release(lease, heartbeat, "the worker is stopping", None)

        from cotune.worker.training import run_training

        heartbeat.set_phase("training")
        self.view.phase("training")
        abort = threading.Event()  # abandons checkpoint uploads no longer needed
        sync = CheckpointSync(self._transfers, heartbeat, task_dir / "staging", abort=abort)
        try:
            try:
                result = run_training(
                    inputs.task,
                    task_dir / "run",
                    train_files=inputs.train_files,
                    eval_file=inputs.eval_file,
                    start_adapter=inputs.start_adapter,
                    resume_from=inputs.resume_from,
                    hooks=_Hooks(self._stop, heartbeat, sync, self.view),
                    models_dir=self.config.models_dir,
                )
            except Exception as e:
                if heartbeat.lost:
                    return Outcome.LOST
                log.exception("training task %s failed", lease.task_id)
                return self._fail(
                    lease,
                    heartbeat,
                    f"training failed: {type(e).__name__}: {e}",
                    # Unusable data fails the same way anywhere; anything else (memory,
                    # device, a flaky disk) may pass on another worker.
                    retryable=not isinstance(e, DataError),
                    checkpoint=sync.latest,
                )
            if heartbeat.lost:
                return Outcome.LOST
            if result.stopped:
                # Leave a few seconds of the stop budget for giving the lease back.
                checkpoint = sync.flush(max(self._stop_budget_left() - 5.0, 1.0))
                why = (
                    "the worker is stopping" if self._stop.is_set() else "the coordinator said stop"
                )
                self.view.phase(f"giving the task back: {why}")
                return self._release(lease, heartbeat, why, checkpoint)
        finally:
            abort.set()
            sync.close()
        heartbeat.set_phase("uploading")
        self.view.phase("uploading")
        return self._deliver(lease, heartbeat, result, task_dir / "run")

    def _deliver(
        self, lease: TaskLease, heartbeat: Heartbeat, result: TrainResult, run_dir: Path
    ) -> Outcome:
        assert self.worker_id is not None
        metrics = {k: v for k, v in result.metrics.items() if math.isfinite(v)}
        metrics_file = run_dir / "metrics.json"
        if not metrics_file.is_file():
            metrics_file.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        files = {
            ADAPTER_CONFIG: result.adapter_dir / ADAPTER_CONFIG,
            ADAPTER_WEIGHTS: result.adapter_dir / ADAPTER_WEIGHTS,
            ADAPTER_METRICS: metrics_file,
        }
        # One last beat delivers the losses of steps trained while the coordinator was away
        # and renews the upload targets (a long run may outlast the first ones).
        if not heartbeat.beat(retry_for_s=heartbeat.remaining_s()) and heartbeat.lost:
            return Outcome.LOST
        artifacts = {}
        try:
            for name, path in files.items():
                target = heartbeat.outputs.adapter[name]
                artifacts[name] = self._transfers.upload(target, path, label=f"upload {name}")
        except TransferError as e:
            return self._fail(lease, heartbeat, f"upload: {e}", retryable=True)
        request = CompleteRequest(artifacts=artifacts, metrics=metrics)
        heartbeat.close()  # the lease ends with this report
        try:
            answer = self._client.complete(
                self.worker_id,
                lease.lease_id,
                request,
                retry_for_s=max(heartbeat.remaining_s(), 10.0),
            )
        except CoordinatorError as e:
            log.error("task %s: completion not recorded: %s", lease.task_id, e)
            return Outcome.LOST
        if not answer.accepted:
            log.warning("task %s: result not accepted: %s", lease.task_id, answer.reason)
            return Outcome.REJECTED
        self.view.credited(answer.credit)
        log.info("task %s accepted, credit %.1f", lease.task_id, answer.credit)
        return Outcome.COMPLETED

    def _release(
        self, lease: TaskLease, heartbeat: Heartbeat, reason: str, checkpoint: CheckpointRef | None
    ) -> Outcome:
        assert self.worker_id is not None
        # One last beat (one try) delivers the last steps' losses before the lease ends.
        _ = heartbeat.lost or heartbeat.beat()
        heartbeat.close()  # the lease ends with this report
        if heartbeat.lost:
            return Outcome.LOST
        try:
            self._client.release(
                self.worker_id,
                lease.lease_id,
                ReleaseRequest(reason=reason, checkpoint=checkpoint),
                retry_for_s=min(heartbeat.remaining_s(), self._stop_budget_left() - 1.0),
                interruptible=False,  # stopping is why we are here: retry all the same
            )
        except CoordinatorError as e:
            log.warning("lease %s not given back (%s); it will expire instead", lease.lease_id, e)
        at = f" with the checkpoint of step {checkpoint.step}" if checkpoint else ""
        log.info("task %s given back%s: %s", lease.task_id, at, reason)
        return Outcome.RELEASED

    def _fail(
        self,
        lease: TaskLease,
        heartbeat: Heartbeat,
        reason: str,
        *,
        retryable: bool,
        checkpoint: CheckpointRef | None = None,
    ) -> Outcome:
        assert self.worker_id is not None
        log.error("task %s failed: %s", lease.task_id, reason)
        heartbeat.close()  # the lease ends with this report
        if heartbeat.lost:
            return Outcome.LOST
        try:
            self._client.fail(
                self.worker_id,
                lease.lease_id,
                FailRequest(reason=reason[:4000], retryable=retryable, checkpoint=checkpoint),
                retry_for_s=min(heartbeat.remaining_s(), 60.0),
                interruptible=False,
            )
        except CoordinatorError as e:
            log.warning("failure of task %s not reported (%s)", lease.task_id, e)
        return Outcome.FAILED

    # --- what this worker offers --------------------------------------------------------

    def _capabilities(self) -> Capabilities:
        memory = self.hardware.memory_bytes
        if self.config.max_memory_bytes is not None:
            memory = min(memory, self.config.max_memory_bytes)
        return Capabilities(memory_bytes=memory, bf16=self.hardware.bf16)

    def _wire_hardware(self) -> WireHardware:
        return WireHardware(
            gpus=[
                GpuInfo(index=d.index, name=d.name, memory_bytes=d.total_memory_bytes, bf16=d.bf16)
                for d in self.hardware.devices
            ],
            cpu_count=self.hardware.cpu_count,
            memory_bytes=self.hardware.ram_bytes,
            cotune_version=_cotune_version(),
        )


@dataclass(frozen=True)
class _Hooks:
    """Training's view of the agent: report each step, stop when asked, ship checkpoints."""

    stop: threading.Event
    heartbeat: Heartbeat
    sync: CheckpointSync
    view: WorkerView

    def on_progress(self, progress: Progress) -> bool:
        self.heartbeat.update(progress)
        self.view.progress(progress)
        return not (self.stop.is_set() or self.heartbeat.stop_requested.is_set())

    def on_checkpoint(self, checkpoint_dir: Path, step: int) -> None:
        self.sync.submit(checkpoint_dir, step)


def _cotune_version() -> str:
    try:
        return version("cotune")
    except PackageNotFoundError:
        return "0+unknown"
