"""A whole job for the trust tests: the real reconciler (Ray for the heavy checks and the
merges, `cotune evaluate` subprocesses for the probe losses) on real Redis and SeaweedFS, and
scripted volunteers that lease through the real Leases API and upload what the test says."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.records import TaskRecord
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.pipeline.reconciler import LoopTimes, Reconciler
from cotune.orchestrator.protocol.spec import parse_spec
from cotune.orchestrator.protocol.wire import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    Capabilities,
    CompleteRequest,
    CompleteResponse,
    Hardware,
    TaskLease,
)
from cotune.orchestrator.settings import Settings

from tests.integration.coordinator_kit import upload
from tests.security import adversary

JOB = "trust-1"


def make_settings(tmp_path: Path, redis_server: str, s3_server: Any, store: Any) -> Settings:
    return Settings(
        home=tmp_path / "home",
        redis_url=redis_server,
        s3_endpoint=s3_server.endpoint,
        s3_bucket=store.bucket,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        max_attempts=2,
    )


def submit(state: State, data: Path, *, shards: int, rounds: int, trust: dict[str, Any]) -> str:
    spec = parse_spec(
        {
            "name": "trust",
            "base_model": "cotune://tiny-llama",
            "dataset": {"path": str(data), "format": "alpaca", "shards": shards, "eval_split": 0.2},
            "training": {"max_steps": 4, "sequence_len": 64, "learning_rate": 1e-3},
            "lora": {"lora_r": 4, "lora_alpha": 8},
            "rounds": rounds,
            "search": {"method": "random", "n_trials": 1},
            "trust": trust,
        }
    )
    state.create_job(JOB, spec.name, spec.to_yaml())
    return JOB


def reconciler(state: State, store: Any, settings: Settings, pool: Any) -> Reconciler:
    return Reconciler(
        state, store, settings, pool, identity="trust-test", times=LoopTimes(interval_s=0.05)
    )


class Volunteer:
    """One enrolled volunteer worker of owner `name`."""

    def __init__(self, state: State, store: Any, settings: Settings, name: str) -> None:
        self.state, self.store, self.name = state, store, name
        self.leases = Leases(state, store, settings)
        token, _ = JoinTokens(state.redis, state.keys).create(name)
        hardware = Hardware(cpu_count=1, memory_bytes=8 << 30, cotune_version="0")
        self.worker_id = Workers(state).enroll(token, hardware)[0].worker_id

    def take(self) -> TaskLease | None:
        return self.leases.lease(self.worker_id, Capabilities(memory_bytes=8 << 30, bf16=False))

    def must_take(self) -> TaskLease:
        lease = self.take()
        assert lease is not None, f"{self.name}: no task to lease"
        return lease

    def complete(self, lease: TaskLease, tensors: Any, *, tokens: float = 1e12) -> CompleteResponse:
        """Upload `tensors` (or raw bytes) as the weights, claim `tokens`, complete."""
        weights = tensors if isinstance(tensors, bytes) else adversary.encode(tensors)
        data = {name: f"{name} by {self.name}".encode() for name in ADAPTER_FILES}
        data[ADAPTER_WEIGHTS] = weights
        artifacts = {n: upload(lease.outputs.adapter[n], data[n]) for n in ADAPTER_FILES}
        body = CompleteRequest(artifacts=artifacts, metrics={"tokens": tokens, "loss": 0.01})
        return self.leases.complete(self.worker_id, lease.lease_id, body)


def drive(
    loop: Reconciler, state: State, until: Callable[[], bool], what: str, timeout_s: float = 300
) -> None:
    """Reconciler passes until `until()` holds; fails on a coordinator error or a timeout."""
    give_up_at = time.monotonic() + timeout_s
    while not until():
        errors = [e for e in state.events.read(JOB, count=10_000) if e.kind == "coordinator_error"]
        assert not errors, f"while waiting for {what}: {errors[-1].data}"
        assert time.monotonic() < give_up_at, f"timed out waiting for {what}: {history(state)}"
        loop.run(once=True)
        time.sleep(0.1)


def tasks(state: State) -> list[tuple[str, str, int]]:
    return [(t.task_id, t.state, t.attempt) for t in state.tasks_of(JOB)]


def history(state: State) -> str:
    """The tasks now and the job's events that matter (for a failing test's message)."""
    shown = ("task_rejected", "task_accepted", "task_verifying", "coordinator_error", "job_state")
    lines = [f"tasks: {tasks(state)}"]
    for e in state.events.read(JOB, count=10_000):
        if e.kind in shown:
            lines.append(f"{e.kind}: {str(e.data)[:400]}")
    return "\n".join(lines)


def task(state: State, task_id: str) -> TaskRecord:
    return state.get_task(task_id)


def rejections(state: State, task_id: str) -> list[str]:
    """The reasons of the task's rejections so far, oldest first."""
    return [
        str(e.data.get("reason"))
        for e in state.events.read(JOB, count=10_000)
        if e.kind == "task_rejected" and e.data.get("task_id") == task_id
    ]
