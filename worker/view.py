"""What the volunteer's terminal shows, as state: the agent updates a `WorkerView` at each event.

The agent (lease, progress, task end), the coordinator client (each answer, each failed
attempt) and the transfers (bytes moved) call its methods from whichever thread they run
on; a renderer reads `snapshot()`, a frozen `ViewState`. Two renderers exist: the live
panel on a terminal (worker/live.py), and the log lines the agent writes anyway, which
need no view at all (without a terminal the view is updated and never drawn).

The last event line is the agent's newest log line: `event_handler()` is a logging
handler that feeds it, so the view repeats what the log says rather than a second wording.

Numbers the view shows are the worker's own measurements (step, loss, tokens/s, memory),
except credit: that is the coordinator's `credit` from each CompleteResponse, summed.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from cotune.orchestrator.protocol.wire import TaskLease
from cotune.worker.hardware import Hardware
from cotune.worker.heartbeat import ProgressLike

# A task id is the coordinator's `<job>.t<trial>.r<round>.s<shard>`, with `.dup<k>` for a
# redundancy duplicate (orchestrator/control/records.py). Read for display only: an id
# of another shape is shown as it is.
_TASK_ID = re.compile(
    r"^(?P<job>.+)\.t(?P<trial>\d+)\.r(?P<round>\d+)\.s(?P<shard>\d+)(?:\.dup(?P<dup>\d+))?$"
)


class Link(enum.StrEnum):
    """How the coordinator answers: by the outcome of the latest call."""

    CONNECTING = "connecting"  # no answer yet
    CONNECTED = "connected"  # the latest call got an answer (a refusal counts)
    UNREACHABLE = "unreachable, retrying"  # the latest attempt got none


@dataclass(frozen=True)
class TaskState:
    task_id: str
    attempt: int
    job: str | None = None  # job .. shard: None when the id is not the coordinator's layout
    trial: int | None = None
    round: int | None = None
    shard: int | None = None
    duplicate: int | None = None
    phase: str = "downloading"
    step: int = 0
    max_steps: int = 0  # 0: not known yet (a task of num_epochs learns it at its first step)
    loss: float | None = None
    tokens_per_s: float = 0.0
    memory_bytes: int = 0


@dataclass(frozen=True)
class TransferState:
    label: str
    done: int
    total: int


@dataclass(frozen=True)
class ViewState:
    coordinator: str
    machine: str
    device: str
    on_gpu: bool  # memory is the GPU's peak allocation, else this process's resident memory
    log_file: Path | None = None
    worker_id: str | None = None
    link: Link = Link.CONNECTING
    link_reason: str | None = None  # why the latest attempt got no answer
    stopping: bool = False  # Ctrl-C / SIGTERM: the task is finished off, then the worker exits
    stopped: bool = False
    task: TaskState | None = None
    transfers: tuple[TransferState, ...] = ()
    completed: int = 0
    rejected: int = 0
    failed: int = 0  # failed or lost
    released: int = 0
    credit: float = 0.0  # the coordinator's, summed over this session's accepted results
    uncredited: int = 0  # accepted with no credit yet: a volunteer's wait for the heavy checks
    last_event: str | None = None


def coordinator_state(state: ViewState) -> str:
    """How the coordinator answers: connecting, connected, unreachable (why), retrying."""
    if state.link is Link.UNREACHABLE and state.link_reason:
        return f"unreachable ({state.link_reason}), retrying"
    return str(state.link)


def stop_state(state: ViewState) -> str | None:
    """Where stopping stands: draining (a task is being finished off and given back),
    stopping (no task left), stopped; None while the worker takes work."""
    if state.stopped:
        return "stopped"
    if not state.stopping:
        return None
    if state.task is not None:
        return (
            f"draining: finishing task {state.task.task_id}, then stopping "
            "(Ctrl-C again quits at once)"
        )
    return "stopping"


class WorkerView:
    """The view model of one agent. Thread-safe; every method is one event."""

    def __init__(
        self,
        coordinator: str,
        hardware: Hardware,
        *,
        log_file: Path | None = None,
        machine: str | None = None,
    ) -> None:
        # Reentrant: a signal handler (request_stop, and its log line) runs on the main
        # thread, possibly while that thread is inside one of these methods.
        self._lock = threading.RLock()
        self._state = ViewState(
            coordinator=coordinator,
            machine=machine or socket.gethostname(),
            device=hardware.label,
            on_gpu=bool(hardware.devices),
            log_file=log_file,
        )
        self._transfers: dict[int, TransferState] = {}
        self._next_transfer = 0
        self._milestone_listeners: list[Callable[[], None]] = []

    def on_milestone(self, listener: Callable[[], None]) -> None:
        """Call `listener` after each change a screen must not miss between its redraws: a
        new task, a phase, a task's end, the stop. It runs on the changing thread, with the
        view unlocked (so it may take `snapshot()` and a renderer's own lock)."""
        self._milestone_listeners.append(listener)

    def _milestone(self) -> None:
        for listener in self._milestone_listeners:
            listener()

    def snapshot(self) -> ViewState:
        with self._lock:
            return self._state

    def _update(self, **changes: object) -> None:
        with self._lock:
            self._state = replace(self._state, **changes)  # type: ignore[arg-type]

    # --- the coordinator (worker/client.py calls these) ---------------------------------

    def reached(self) -> None:
        if self._state.link is not Link.CONNECTED:
            self._update(link=Link.CONNECTED, link_reason=None)

    def unreachable(self, reason: str) -> None:
        self._update(link=Link.UNREACHABLE, link_reason=reason)

    # --- the agent --------------------------------------------------------------------

    def enrolled(self, worker_id: str) -> None:
        self._update(worker_id=worker_id)

    def leased(self, lease: TaskLease) -> None:
        parts = _TASK_ID.match(lease.task_id)
        numbers = {}
        if parts:
            numbers = {k: int(v) for k, v in parts.groupdict().items() if k != "job" and v}
        resume = lease.inputs.resume_checkpoint
        self._update(
            task=TaskState(
                task_id=lease.task_id,
                attempt=lease.attempt,
                job=parts["job"] if parts else None,
                trial=numbers.get("trial"),
                round=numbers.get("round"),
                shard=numbers.get("shard"),
                duplicate=numbers.get("dup"),
                step=resume.step if resume else 0,
                max_steps=lease.task.max_steps or 0,
            )
        )
        self._milestone()

    def phase(self, phase: str) -> None:
        with self._lock:
            if self._state.task is None:
                return
            self._update(task=replace(self._state.task, phase=phase))
        self._milestone()  # the step the phase ended on is drawn before the next phase runs

    def progress(self, progress: ProgressLike) -> None:
        with self._lock:
            if self._state.task is None:
                return
            task = replace(
                self._state.task,
                step=progress.step,
                max_steps=progress.max_steps,
                loss=progress.loss if progress.loss is not None else self._state.task.loss,
                tokens_per_s=progress.tokens_per_s,
                memory_bytes=progress.memory_bytes,
            )
            self._update(task=task)

    def credited(self, credit: float) -> None:
        """An accepted result: `credit` is the coordinator's CompleteResponse.credit."""
        with self._lock:
            self._update(
                credit=self._state.credit + credit,
                uncredited=self._state.uncredited + (credit == 0),
            )

    def task_ended(self, outcome: str) -> None:
        """`outcome`: one of agent.Outcome (completed, rejected, released, failed, lost)."""
        counter = {
            "completed": "completed",
            "rejected": "rejected",
            "released": "released",
            "failed": "failed",
            "lost": "failed",
        }[outcome]
        with self._lock:
            self._update(task=None, **{counter: getattr(self._state, counter) + 1})
        self._milestone()

    def stop_requested(self) -> None:
        self._update(stopping=True)

    def stopped(self) -> None:
        self._update(stopped=True, task=None)
        self._milestone()

    def event(self, line: str) -> None:
        self._update(last_event=line)

    def event_handler(self) -> logging.Handler:
        """A logging handler that makes each record it gets the last event line."""
        return _EventLine(self)

    # --- transfers (a worker.transfer.TransferDisplay) --------------------------------

    @contextlib.contextmanager
    def track(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        with self._lock:
            key = self._next_transfer
            self._next_transfer += 1
            self._transfers[key] = TransferState(label, 0, total)
            self._publish_transfers()

        def advance(n: int) -> None:
            with self._lock:
                moving = self._transfers[key]
                self._transfers[key] = replace(moving, done=moving.done + n)
                self._publish_transfers()

        try:
            yield advance
        finally:
            with self._lock:
                del self._transfers[key]
                self._publish_transfers()

    def _publish_transfers(self) -> None:
        self._update(transfers=tuple(self._transfers.values()))


class _EventLine(logging.Handler):
    def __init__(self, view: WorkerView) -> None:
        super().__init__(logging.INFO)
        self._view = view

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = record.getMessage()
        except Exception:  # a bad format string must not break the agent
            self.handleError(record)
            return
        self._view.event(line.splitlines()[0] if line else line)
