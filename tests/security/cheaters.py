"""Simulated volunteers that cheat, for tests/security/test_cheaters.py.

A `Cheater` is a thread that enrolls with its own join token (its owner: one per cheat kind,
two accounts for kind m), leases tasks through the coordinator's real HTTP API with the
worker's own client (worker/client.py, the wire models of orchestrator/protocol/wire.py) and
for each lease performs its kind of cheat (tests/security/cheats.py), until the coordinator
refuses it work (403: its owner is quarantined) or the crew is stopped. Uploads go to the
presigned targets the lease hands out, as an honest worker's do (worker/transfer.py).

What a cheater tried and how each try was answered at once is its `Tally`; what the
coordinator made of it later (verdicts, strikes, quarantine, credit) the test reads from the
coordinator's state. Cheats that need an honest adapter train one for real
(`HonestTraining`: worker/training.py on the lease's inputs, one at a time in this process).

    crew = Crew(url, CHEATS, {"a": token_a, ...}, work_dir, store, foreign_leases, models)
    crew.start(); ...; crew.stop()
    crew.tallies["a"].refused
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cotune.orchestrator.protocol.wire import (
    ADAPTER_CONFIG,
    ADAPTER_METRICS,
    ADAPTER_WEIGHTS,
    ArtifactRef,
    Capabilities,
    CompleteRequest,
    CompleteResponse,
    EnrollRequest,
    GpuInfo,
    Hardware,
    HeartbeatRequest,
    LeaseRequest,
    LeaseResponse,
    PresignedPost,
    ReleaseRequest,
    TaskLease,
    TaskOutputs,
)
from cotune.worker.client import (
    CoordinatorClient,
    CoordinatorError,
    LeaseGone,
    Refused,
    Rejected,
    Unreachable,
)
from cotune.worker.transfer import RetryPolicy, TransferError, Transfers

R = TypeVar("R")
GB = 1_000_000_000
NOTES_KEPT = 40
PAUSE_S = 2.0  # between a cheat and the next lease ask (the coordinator's retry_after_s)
FAIR_WAIT_S = 30.0  # the longest a cheater waits for the others' turns (Crew.my_turn)


@dataclass
class Tally:
    """What the cheaters of one kind tried, and what the coordinator answered at once."""

    kind: str
    attempts: int = 0  # cheating calls made (uploads reported, calls on leases, lease asks)
    refused: int = 0  # answered 4xx, or `accepted: false` at complete
    taken_in: int = 0  # complete answered `accepted` (uncredited until the heavy checks)
    leases: int = 0
    quarantined: str | None = None  # the 403 that ended it
    server_errors: list[str] = field(default_factory=list)  # 5xx or silence: never expected
    most_held: int = 0  # k: leases held at once
    capped: int = 0  # k: lease answers that named the cap
    held_for_s: list[float] = field(default_factory=list)  # k: a kept-alive lease's life
    duplicates: list[str] = field(default_factory=list)  # m: redundancy duplicates leased
    victims: list[str] = field(default_factory=list)  # i: the foreign lease ids it called on
    notes: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def note(self, line: str) -> None:
        with self.lock:
            self.notes.append(line)
            del self.notes[:-NOTES_KEPT]


class KeepAlive:
    """Heartbeats for one lease on a thread (as an honest worker's would be), renewing its
    upload targets, until closed or until the coordinator ends the lease (`ended`)."""

    def __init__(self, cheater: Cheater, lease: TaskLease) -> None:
        self._cheater = cheater
        self._lease = lease
        self.outputs: TaskOutputs = lease.outputs
        self.ended: CoordinatorError | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"beat-{lease.lease_id}")
        self._thread.start()

    def _run(self) -> None:
        c, lease = self._cheater, self._lease
        body = HeartbeatRequest(step=0, max_steps=lease.task.max_steps or 0)
        interval = lease.heartbeat_interval_s
        while not self._closed.wait(interval) and not c.crew.stopping.is_set():
            try:
                answer = c.client.heartbeat(c.worker_id, lease.lease_id, body, retry_for_s=interval)
            except (LeaseGone, Refused, Rejected) as e:
                self.ended = e
                return
            except CoordinatorError:
                continue
            self.outputs = answer.outputs

    def close(self) -> None:
        self._closed.set()
        self._thread.join(30)


class HonestTraining:
    """Real training of a leased task on its inputs (worker/training.py), one at a time:
    training seeds torch's global RNG, so two at once in one process would mix their runs."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._lock = threading.Lock()

    def train(
        self,
        lease: TaskLease,
        folder: Path,
        transfers: Transfers,
        *,
        changes: Mapping[str, Any] | None = None,
        resume: bool = True,
    ) -> Path:
        """The adapter folder of `lease`'s task trained as an honest worker would; with
        `changes` to the task (fewer steps, another seed), a run that only looks like it."""
        import torch
        from cotune.worker.inputs import fetch_inputs
        from cotune.worker.training import run_training

        with self._lock:
            files = fetch_inputs(
                lease, folder, transfers, models=folder / "models", cancel=threading.Event()
            )
            task = files.task
            if changes:
                task = task.model_copy(update=dict(changes))
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # two cores, shared with the coordinator and workers
            try:
                result = run_training(
                    task,
                    folder / "run",
                    train_files=files.train_files,
                    start_adapter=files.start_adapter,
                    resume_from=files.resume_from if resume else None,
                    models_dir=self.models_dir,
                )
            finally:
                torch.set_num_threads(threads)
        return result.adapter_dir


@dataclass(frozen=True)
class Cheat:
    """One kind of cheat: what a cheater does with each lease it gets (`on_lease`), and before
    each time it asks for one (`between`); the GPUs it claims, its number of accounts, and how
    long it waits before it starts."""

    summary: str
    on_lease: Callable[[Cheater, TaskLease], None] | None = None
    between: Callable[[Cheater], None] | None = None
    gpus: int = 0
    accounts: int = 1
    start_after_s: float = 0.0  # after enrolling, before the first lease


class Crew:
    """Every cheater of a run, one thread per account, sharing a stop signal."""

    def __init__(
        self,
        url: str,
        cheats: Mapping[str, Cheat],
        tokens: Mapping[str, str],
        work: Path,
        store: Any,
        foreign_leases: Callable[[str], list[str]],
        models_dir: Path,
    ) -> None:
        self.store = store
        self.foreign_leases = foreign_leases
        self.training = HonestTraining(models_dir)
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.tallies = {kind: Tally(kind) for kind in tokens}
        self.shared: dict[Any, Any] = {}  # what the two accounts of m share
        self.shared_lock = threading.Lock()
        self.cheaters = [
            Cheater(self, kind, f"{kind}{n}", url, token, work, cheats[kind])
            for kind, token in tokens.items()
            for n in range(cheats[kind].accounts)
        ]

    def start(self) -> None:
        for cheater in self.cheaters:
            cheater.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        self.stopping.set()
        give_up_at = time.monotonic() + timeout_s
        for cheater in self.cheaters:
            cheater.join(max(give_up_at - time.monotonic(), 0.1))
        alive = [c.name for c in self.cheaters if c.is_alive()]
        assert not alive, f"cheaters still running after {timeout_s:.0f} s: {alive}"

    def my_turn(self, cheater: Cheater) -> bool:
        """Fair shares among the cheaters still at it: one asks for a lease only once every
        other has had as many, or after waiting FAIR_WAIT_S for a slower one (the honest
        workers are not held back by this). Without it, who gets the few tasks is luck, and
        a cheater that never had three turns could not be quarantined by the job's end."""
        if time.monotonic() - cheater.waiting_since > FAIR_WAIT_S:
            return True
        active = [c.turn for c in self.cheaters if c.active and c.cheat.on_lease is not None]
        return not active or cheater.turn <= min(active)

    def workers(self) -> dict[str, list[str]]:
        """kind -> the worker ids its accounts enrolled as."""
        out: dict[str, list[str]] = {}
        for c in self.cheaters:
            if c.worker_id:
                out.setdefault(c.kind, []).append(c.worker_id)
        return out


class Cheater(threading.Thread):
    """One cheating volunteer: enroll, then lease and cheat until quarantined or stopped."""

    def __init__(
        self,
        crew: Crew,
        kind: str,
        name: str,
        url: str,
        join_token: str,
        work: Path,
        cheat: Cheat,
    ) -> None:
        super().__init__(name=f"cheater-{name}", daemon=True)
        self.crew = crew
        self.kind = kind
        self.tally = crew.tallies[kind]
        self.work = work / name
        self.work.mkdir(parents=True, exist_ok=True)
        self._join_token = join_token
        self.cheat = cheat
        self.gpus = cheat.gpus
        self.worker_id = ""
        self.turn = 0  # leases taken so far: cheats cycle through their variants by it
        self.active = False  # started leasing, and not (yet) quarantined or stopped
        self.waiting_since = time.monotonic()
        self.client = CoordinatorClient(
            url, timeout_s=60, backoff_initial_s=0.2, backoff_max_s=2.0, stop=crew.stopping
        )
        self.transfers = Transfers(retry=RetryPolicy(attempts=2, initial_s=0.2, max_s=1.0))
        self._files = 0

    # --- the loop -----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._enroll()
            self.crew.stopping.wait(self.cheat.start_after_s)
            self.active, self.waiting_since = True, time.monotonic()
            while not self.crew.stopping.is_set():
                if not self.crew.my_turn(self):
                    self.crew.stopping.wait(1.0)
                    continue
                if self.cheat.between is not None:
                    self.cheat.between(self)
                lease = self._next_lease()
                if lease is None:
                    continue
                with self.tally.lock:
                    self.tally.leases += 1
                self.turn += 1
                try:
                    if self.cheat.on_lease is not None:
                        self.cheat.on_lease(self, lease)
                except TransferError as e:  # the store refused an upload: its policy ended
                    with self.tally.lock:
                        self.tally.refused += 1
                    self.tally.note(f"{lease.task_id}: upload refused: {e}")
                finally:
                    self.let_go(lease)
                # As long as a worker waits between asks: asking again at once, a cheater
                # would take back the task it just gave up, turn after turn.
                self.crew.stopping.wait(PAUSE_S)
        except _Quarantined as e:
            self.tally.quarantined = str(e)
        except Exception:
            self.crew.errors.append(f"{self.name}:\n{traceback.format_exc()}")
        finally:
            self.active = False
            self.client.close()
            self.transfers.close()

    def _enroll(self) -> None:
        gpus = [
            GpuInfo(index=n, name="NVIDIA H100 80GB HBM3", memory_bytes=85 * GB, bf16=True)
            for n in range(self.gpus)
        ]
        hardware = Hardware(gpus=gpus, cpu_count=2, memory_bytes=8 * GB, cotune_version="0.1.0")
        answer = self.client.enroll(
            EnrollRequest(join_token=self._join_token, hardware=hardware), retry_for_s=60
        )
        self.worker_id = answer.worker_id

    def capabilities(self) -> Capabilities:
        memory = 85 * GB if self.gpus else 8 * GB
        return Capabilities(memory_bytes=memory, bf16=bool(self.gpus))

    def ask(self) -> LeaseResponse:
        """One lease call: the answer, or _Quarantined when the coordinator says so."""
        try:
            return self.client.lease(
                self.worker_id, LeaseRequest(capabilities=self.capabilities()), retry_for_s=10
            )
        except Refused as e:
            raise _Quarantined(str(e)) from e

    def _next_lease(self) -> TaskLease | None:
        try:
            answer = self.ask()
        except _Quarantined:
            raise
        except Unreachable as e:
            self.tally.server_errors.append(f"lease: {e}")
            self.crew.stopping.wait(1.0)
            return None
        except CoordinatorError as e:
            self.tally.note(f"lease refused: {e}")
            self.crew.stopping.wait(1.0)
            return None
        if answer.task is None:
            self.crew.stopping.wait(min(answer.retry_after_s or 1.0, 2.0))
            return None
        self.waiting_since = time.monotonic()
        return answer.task

    def let_go(self, lease: TaskLease) -> None:
        """Give a lease back if it is still ours (after a cheat that did not end it)."""
        # Refused when it had ended already: completed, rejected, expired or revoked.
        with contextlib.suppress(CoordinatorError):
            self.client.release(
                self.worker_id, lease.lease_id, ReleaseRequest(reason="done cheating"),
                retry_for_s=5, interruptible=False,
            )  # fmt: skip

    # --- tools for the cheats -------------------------------------------------------------

    def attempt(self, what: str, call: Callable[[], R]) -> R | None:
        """Make one cheating call and tally its answer; None when it was refused."""
        with self.tally.lock:
            self.tally.attempts += 1
        try:
            answer = call()
        except Unreachable as e:
            self.tally.server_errors.append(f"{what}: {e}")
            return None
        except (Refused, LeaseGone, Rejected) as e:
            with self.tally.lock:
                self.tally.refused += 1
            self.tally.note(f"{what}: refused: {e}")
            return None
        if isinstance(answer, CompleteResponse):
            with self.tally.lock:
                if answer.accepted:
                    self.tally.taken_in += 1
                else:
                    self.tally.refused += 1
            self.tally.note(f"{what}: accepted={answer.accepted} {answer.reason or ''}")
        return answer

    def file(self, data: bytes | Path) -> Path:
        if isinstance(data, Path):
            return data
        self._files += 1
        path = self.work / "files" / f"{self._files:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def put(self, target: PresignedPost, data: bytes | Path) -> ArtifactRef:
        """Upload to a presigned target (the coordinator's policy decides what may land)."""
        return self.transfers.upload(target, self.file(data), label=f"{self.name} upload")

    def upload(
        self,
        outputs: TaskOutputs,
        weights: bytes | Path,
        config: bytes | Path,
        metrics: bytes | Path = b"{}\n",
    ) -> dict[str, ArtifactRef]:
        """The three adapter files at the keys issued to the lease."""
        files = {ADAPTER_CONFIG: config, ADAPTER_WEIGHTS: weights, ADAPTER_METRICS: metrics}
        return {name: self.put(outputs.adapter[name], data) for name, data in files.items()}

    def complete(
        self,
        lease: TaskLease,
        artifacts: Mapping[str, ArtifactRef],
        what: str,
        metrics: Mapping[str, float | int] | None = None,
    ) -> CompleteResponse | None:
        request = CompleteRequest(artifacts=dict(artifacts), metrics=dict(metrics or {}))
        return self.attempt(
            f"complete ({what}) {lease.task_id}",
            lambda: self.client.complete(self.worker_id, lease.lease_id, request, retry_for_s=10),
        )

    def heartbeat(self, lease_id: str, body: HeartbeatRequest, what: str) -> Any:
        return self.attempt(
            f"heartbeat ({what})",
            lambda: self.client.heartbeat(self.worker_id, lease_id, body, retry_for_s=10),
        )

    def download(self, src: Any, name: str) -> Path:
        self._files += 1
        dest = self.work / "downloads" / f"{self._files:05d}-{name}"
        return self.transfers.download(src, dest, label=f"{self.name} download {name}")


class _Quarantined(Exception):
    """The coordinator refused this cheater work (403): its owner is quarantined."""
