"""The real coordinator served on a loopback port, for tests that drive it over HTTP as a
worker does (tests/integration/test_agent.py).

`ServedCoordinator` is `ApiContext.create(...)` (orchestrator/api/context.py) on the test's
Redis and SeaweedFS, served by `serve_api` (orchestrator/runtime/apiserver.py), with a join
token to enroll with. Tests queue tasks through the real `State` and read what happened
from the real state: task and lease records, the job's events (a kind per transition), the
objects in the store. `pause()` stops the API server and `resume()` starts it again on the
same port, the state kept in Redis, for outage tests.

One thing the coordinator does not keep is the per-step losses a heartbeat carries: it
stores a task's latest step and loss, and a progress event every few seconds. So the
`Leases` it serves with is the real one behind `HeardLeases`, which notes each heartbeat
the real one accepted, with its answer, for tests that check no step's loss went missing.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.api import ApiContext
from cotune.orchestrator.control.events import Event
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.records import TaskInputs, TaskRecord, decode_hash
from cotune.orchestrator.control.tiers import CPU_TIER
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.protocol.wire import HeartbeatRequest, HeartbeatResponse
from cotune.orchestrator.runtime.apiserver import ApiServer, serve_api
from cotune.orchestrator.settings import Settings

from tests.integration.coordinator_kit import new_job, stored_file

ADMIN_TOKEN = "admin-token-for-tests"


@dataclass(frozen=True)
class Heard:
    """A heartbeat the coordinator accepted: whose, what it said, what it was answered."""

    task_id: str
    attempt: int
    body: HeartbeatRequest
    action: str


class HeardLeases:
    """The real `Leases`, noting every heartbeat it accepted; everything else passes through."""

    def __init__(self, leases: Leases) -> None:
        self._leases = leases
        self._lock = threading.Lock()
        self._heard: list[Heard] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._leases, name)

    def heartbeat(self, worker_id: str, lease_id: str, body: HeartbeatRequest) -> HeartbeatResponse:
        answer = self._leases.heartbeat(worker_id, lease_id, body)
        lease = self._leases.get_lease(lease_id)
        with self._lock:
            self._heard.append(Heard(lease.task_id, lease.attempt, body, answer.action))
        return answer

    def heard(self, task_id: str, attempt: int | None = None) -> list[Heard]:
        """The accepted heartbeats of a task (of one attempt), oldest first."""
        with self._lock:
            return [
                h
                for h in self._heard
                if h.task_id == task_id and (attempt is None or h.attempt == attempt)
            ]

    def losses(self, task_id: str, attempt: int) -> dict[int, float]:
        """step -> training loss, as the attempt's heartbeats delivered them."""
        return {s.step: s.loss for h in self.heard(task_id, attempt) for s in h.body.losses}


class ServedCoordinator:
    """The real API on a free loopback port; see the module docstring."""

    def __init__(
        self,
        redis: Any,
        store: Any,
        home: Path,
        *,
        lease_ttl_s: float = 30.0,
        heartbeat_interval_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        settings = Settings(
            home=home, lease_ttl_s=lease_ttl_s, heartbeat_interval_s=heartbeat_interval_s
        )
        context = ApiContext.create(
            settings,
            redis,
            store,
            ADMIN_TOKEN,
            retry_after_s=0.5,
            reclaim_interval_s=0.2,
            clock=clock,
        )
        self.leases = HeardLeases(context.leases)
        self.context = dataclasses.replace(context, leases=self.leases)  # type: ignore[arg-type]
        self.state = context.state
        self.store = store
        # A cluster worker's token: its results are accepted at `complete` (a volunteer's
        # wait in `verifying` for the reconciler's heavy checks, not run here; tests/security/).
        self.join_token, _ = JoinTokens(redis, self.state.keys).create(
            "agent-tests", kind="cluster"
        )
        self._server: ApiServer | None = None
        self._port = 0
        self._jobs = 0

    # --- the server ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._port, "start() the coordinator first"
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> None:
        """Serve (a free port the first time, the same one after)."""
        self._server = serve_api(self.context, "127.0.0.1", self._port, write_api_file=False)
        self._port = self._server.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def pause(self) -> None:
        """Stop listening (connections are refused); the state stays in Redis."""
        self.stop()

    def resume(self) -> None:
        """Listen again on the same port."""
        self.start()

    # --- work -----------------------------------------------------------------------------

    def add_task(
        self, task: TrainTask, train_files: list[Path], *, base_model_archive: Path | None = None
    ) -> str:
        """A running job of one trial with this one task, its inputs in the store, queued in
        the cpu tier; returns the task id."""
        self._jobs += 1
        job_id = f"agent-{self._jobs}"
        new_job(self.state, job_id)
        train = [stored_file(self.store, f"jobs/{job_id}/data/{p.name}", p) for p in train_files]
        base: Any = task.base_model
        if base_model_archive is not None:
            base = stored_file(self.store, f"models/{base_model_archive.name}", base_model_archive)
        record = TaskRecord.new(
            job_id=job_id,
            trial=0,
            round=0,
            shard=0,
            tier=CPU_TIER,
            task=task,
            inputs=TaskInputs(base_model=base, train=train),
        )
        assert self.state.enqueue_task(record)
        return record.task_id

    # --- what happened ----------------------------------------------------------------------

    def task(self, task_id: str) -> TaskRecord:
        return self.state.get_task(task_id)

    def step(self, task_id: str, attempt: int) -> int:
        """The step the attempt's latest heartbeat reported (0 before the attempt)."""
        task = self.task(task_id)
        return task.step if task.attempt == attempt else 0

    def events(self, task_id: str, kind: str | None = None) -> list[Event]:
        """The events of a task (of one kind), oldest first."""
        job_id = self.task(task_id).job_id
        return [
            e
            for e in self.state.events.read(job_id, count=10_000)
            if e.data.get("task_id") == task_id and (kind is None or e.kind == kind)
        ]

    def transitions(self, task_id: str) -> list[str]:
        """The kinds of the task's events, progress reports left out."""
        return [e.kind for e in self.events(task_id) if e.kind != "progress"]

    def lease(self, task_id: str, attempt: int) -> dict[str, str]:
        """The lease record (a Redis hash) of one attempt at a task."""
        for key in self.state.redis.scan_iter(match=self.state.keys.lease("*")):
            fields = decode_hash(self.state.redis.hgetall(key))
            if fields.get("task_id") == task_id and fields.get("attempt") == str(attempt):
                return fields
        raise AssertionError(f"no lease of attempt {attempt} at task {task_id}")

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout_s: float) -> None:
        """Poll `predicate` until true; fail the test after `timeout_s`."""
        give_up_at = time.monotonic() + timeout_s
        while time.monotonic() < give_up_at:
            if predicate():
                return
            time.sleep(0.05)
        pytest.fail(f"coordinator: timed out after {timeout_s:.0f} s waiting for {what}")
