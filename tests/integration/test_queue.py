"""The queue on a real Redis: best-fit tiers, round robin across jobs, cancelled work skipped."""

from __future__ import annotations

from typing import Any

import pytest
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.queue import Queue
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.tiers import GB
from cotune.orchestrator.protocol.wire import Capabilities
from cotune.orchestrator.settings import Settings

from tests.integration.coordinator_kit import Clock, new_job, new_task, train_task

pytestmark = pytest.mark.integration


@pytest.fixture
def state(redis_client: Any) -> State:
    return State(redis_client, clock=Clock())


@pytest.fixture
def leases(state: State, object_store: Any) -> Leases:
    return Leases(state, object_store, Settings(lease_ttl_s=60))


def taken(leases: Leases, memory_bytes: int, n: int, formats: list[str] | None = None) -> list[str]:
    """Task ids leased, one by one, by a worker offering `memory_bytes`."""
    got = []
    for _ in range(n):
        lease = leases.lease(
            "w-1", Capabilities(memory_bytes=memory_bytes, bf16=True, formats=formats)
        )
        if lease is None:
            break
        got.append(lease.task_id)
    return got


def test_big_workers_take_big_work_first_and_small_ones_only_what_fits(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "j-1")
    small = new_task(state, object_store, "j-1", shard=0, tier="cpu").task_id
    medium = new_task(state, object_store, "j-1", shard=1, tier="16g").task_id
    large = new_task(state, object_store, "j-1", shard=2, tier="80g").task_id
    queue = Queue(state)
    assert queue.depths() == {
        "cpu": 1, "8g": 0, "16g": 1, "24g": 0, "40g": 0, "80g": 1, "141g": 0
    }  # fmt: skip
    # Too small for anything (a 1 GB machine): nothing, and nothing moves.
    assert taken(leases, 1 * GB, 1) == []
    # A 24 GB card (25.8e9 bytes) takes the 16g task before the cpu one, never the 80g one.
    assert taken(leases, 25_769_803_776, 3) == [medium, small]
    assert queue.depths()["80g"] == 1
    # An H100 (85.5e9 bytes) takes the 80g task.
    assert taken(leases, 85_520_000_000, 1) == [large]
    assert sum(queue.depths().values()) == 0


def test_jobs_take_turns_within_a_tier(state: State, leases: Leases, object_store: Any) -> None:
    new_job(state, "a-1")
    new_job(state, "b-1")
    a = [new_task(state, object_store, "a-1", shard=i).task_id for i in range(5)]
    b = [new_task(state, object_store, "b-1", shard=i).task_id for i in range(2)]
    # Job a queued five tasks before job b queued any; still they alternate, then a goes on.
    assert taken(leases, 4 * GB, 10) == [a[0], b[0], a[1], b[1], a[2], a[3], a[4]]
    assert Queue(state).jobs_in("cpu") == []


def test_a_worker_gets_only_formats_it_renders(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "a-1")
    new_job(state, "b-1")
    chat = new_task(state, object_store, "a-1", task=train_task(dataset_format="chat")).task_id
    alpaca = new_task(state, object_store, "b-1").task_id
    assert taken(leases, 4 * GB, 2, formats=["alpaca"]) == [alpaca]
    assert taken(leases, 4 * GB, 1, formats=["text"]) == []
    assert taken(leases, 4 * GB, 1) == [chat]


def test_work_of_a_cancelled_job_or_failed_trial_is_never_leased(
    state: State, leases: Leases, object_store: Any, redis_client: Any
) -> None:
    new_job(state, "a-1", trials=2)
    new_job(state, "b-1")
    new_task(state, object_store, "a-1", trial=0, shard=0)
    dead_trial = new_task(state, object_store, "a-1", trial=1, shard=1).task_id
    keep = new_task(state, object_store, "b-1").task_id
    state.finish_trial("a-1", 1, "failed", "diverged")
    state.cancel_job("a-1")
    assert taken(leases, 4 * GB, 3) == [keep]
    assert state.get_task(dead_trial).state == "cancelled"
    # The task hash kept its place: a stale queue entry (here planted by hand) is dropped.
    redis_client.rpush(state.keys.queue("cpu", "a-1"), dead_trial)
    redis_client.rpush(state.keys.rotation("cpu"), "a-1")
    assert taken(leases, 4 * GB, 1) == []
    assert Queue(state).depths()["cpu"] == 0


def test_a_worker_without_a_gpu_takes_only_cpu_work(
    state: State, leases: Leases, object_store: Any
) -> None:
    from cotune.orchestrator.control.tokens import JoinTokens
    from cotune.orchestrator.control.workers import Workers
    from cotune.orchestrator.protocol.wire import GpuInfo

    from tests.integration.coordinator_kit import HARDWARE

    new_job(state, "j-1")
    tiny = new_task(state, object_store, "j-1", shard=0, tier="cpu").task_id
    gpu_sized = new_task(state, object_store, "j-1", shard=1, tier="16g").task_id
    join, _ = JoinTokens(state.redis, state.keys).create("alice")
    cpu_box, _ = Workers(state).enroll(join, HARDWARE)
    gpu = GpuInfo(index=0, name="RTX 4090", memory_bytes=25_757_220_864, bf16=True)
    gpu_box, _ = Workers(state).enroll(join, HARDWARE.model_copy(update={"gpus": [gpu]}))
    lots_of_ram = Capabilities(memory_bytes=64 * GB, bf16=False)
    first = leases.lease(cpu_box.worker_id, lots_of_ram)
    assert first is not None and first.task_id == tiny
    assert leases.lease(cpu_box.worker_id, lots_of_ram) is None  # 64 GB of RAM, still no GPU
    second = leases.lease(gpu_box.worker_id, Capabilities(memory_bytes=gpu.memory_bytes, bf16=True))
    assert second is not None and second.task_id == gpu_sized
