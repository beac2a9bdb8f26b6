"""Caps on what a worker may hold and claim, on a real Redis and SeaweedFS: concurrent leases
per worker (one per GPU), a lease's total age, a checkpoint's step (the task's optimizer
steps, never below where the lease resumed) and size (the task's quota), a call on another
worker's lease; and superseded checkpoints deleted from the store."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from cotune.orchestrator.control.checkpoints import verify_object
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.quotas import (
    CHECKPOINT_ALLOWANCE_BYTES,
    CHECKPOINT_MAX_BYTES,
    checkpoint_quota,
)
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.strikes import Strikes
from cotune.orchestrator.control.tiers import GB
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.data.manifest import (
    BadRows,
    EvalInfo,
    Manifest,
    SourceInfo,
    SplitInfo,
)
from cotune.orchestrator.protocol.problems import Forbidden, LeaseExpired, Rejected
from cotune.orchestrator.protocol.wire import (
    Capabilities,
    CheckpointRef,
    GpuInfo,
    HeartbeatRequest,
    ReleaseRequest,
    TaskLease,
)
from cotune.orchestrator.settings import Settings

from tests.integration.coordinator_kit import (
    CPU,
    HARDWARE,
    Clock,
    new_job,
    new_task,
    train_task,
    upload_checkpoint,
)

pytestmark = pytest.mark.integration
TTL = 30.0
MAX_AGE = 100.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(redis_client: Any, clock: Clock) -> State:
    return State(redis_client, clock=clock)


@pytest.fixture
def leases(state: State, object_store: Any) -> Leases:
    settings = Settings(lease_ttl_s=TTL, heartbeat_interval_s=5, lease_max_age_s=MAX_AGE)
    return Leases(state, object_store, settings)


def enroll(state: State, name: str, gpus: int = 0) -> str:
    token, _ = JoinTokens(state.redis, state.keys, state.clock).create(name)
    cards = [GpuInfo(index=i, name="L4", memory_bytes=24 * GB, bf16=True) for i in range(gpus)]
    record, _ = Workers(state).enroll(token, HARDWARE.model_copy(update={"gpus": cards}))
    return record.worker_id


def beat(step: int, checkpoint: CheckpointRef | None = None) -> HeartbeatRequest:
    return HeartbeatRequest(step=step, max_steps=4, checkpoint=checkpoint)


def test_a_worker_holds_one_lease_per_gpu_and_one_without(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "j-1")
    for shard in range(3):
        new_task(state, object_store, "j-1", shard=shard)
    cpu_box = enroll(state, "alice")
    two_gpus = enroll(state, "bob", gpus=2)
    big = Capabilities(memory_bytes=24 * GB, bf16=True)
    first = leases.offer(cpu_box, CPU)
    capped = leases.offer(cpu_box, CPU)
    assert first.task is not None and capped.task is None
    assert capped.retry_after_s == leases.retry_after_s
    assert "holds 1 active lease(s), its limit" in (capped.reason or "")
    got = [leases.offer(two_gpus, big) for _ in range(3)]
    held = [o.task for o in got if o.task is not None]
    print(f"cpu worker: 1 lease then capped; 2-GPU worker: {len(held)} of 3 asks leased")
    assert len(held) == 2 and "holds 2 active lease(s)" in (got[2].reason or "")
    # Giving one back frees a place; an empty queue is "no work" without a reason.
    leases.release(cpu_box, first.task.lease_id, ReleaseRequest(reason="stopping"))
    assert leases.offer(cpu_box, CPU).task is not None
    idle = leases.offer(enroll(state, "carol"), CPU)
    assert (idle.task, idle.reason) == (None, None)
    assert Workers(state).get(two_gpus).max_leases == 2


def test_a_lease_ends_at_its_maximum_age_however_it_beats(
    state: State, leases: Leases, object_store: Any, clock: Clock
) -> None:
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")
    alice, bob = enroll(state, "alice"), enroll(state, "bob")
    lease = leases.lease(alice, CPU)
    assert lease is not None
    beats = 0
    while clock.now + 25 <= lease.deadline - TTL + MAX_AGE:
        clock.advance(25)
        leases.heartbeat(alice, lease.lease_id, beat(1))
        beats += 1
    clock.advance(MAX_AGE + 1 - 25 * beats)
    with pytest.raises(LeaseExpired, match="maximum age of 100 s") as ended:
        leases.heartbeat(alice, lease.lease_id, beat(3, upload_checkpoint(lease, 3)))
    print(f"{beats} heartbeats kept it alive; at {MAX_AGE + 1:.0f} s: {ended.value.message}")
    assert leases.get_lease(lease.lease_id).state == "expired"
    again = state.get_task(task.task_id)
    assert again.state == "queued" and 0 < again.failures <= 1
    checkpoint = again.checkpoint()
    assert checkpoint is not None and checkpoint.step == 3  # recorded before it ended
    resumed = leases.lease(bob, CPU)
    assert resumed is not None and resumed.inputs.resume_checkpoint is not None
    assert resumed.inputs.resume_checkpoint.step == 3
    kinds = [e.kind for e in state.events.read("j-1")]
    assert kinds.count("lease_expired") == 1


def test_a_forged_checkpoint_step_is_refused_with_a_strike(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")  # max_steps 4
    alice, bob = enroll(state, "alice"), enroll(state, "bob")
    first = leases.lease(alice, CPU)
    assert first is not None
    strikes = Strikes(state)
    with pytest.raises(Rejected, match="step 9 is impossible") as refused:
        leases.heartbeat(alice, first.lease_id, beat(1, upload_checkpoint(first, 9)))
    assert refused.value.field == "checkpoint.step" and strikes.count("alice") == 1
    honest = upload_checkpoint(
        first, 3, leases.heartbeat(alice, first.lease_id, beat(2)).outputs.checkpoint
    )
    leases.release(alice, first.lease_id, ReleaseRequest(reason="stop", checkpoint=honest))
    # The next attempt resumed at step 3: a checkpoint claiming less is forged too.
    second = leases.lease(bob, CPU)
    assert second is not None and second.inputs.resume_checkpoint is not None
    with pytest.raises(Rejected, match="resumed at step 3") as refused:
        leases.heartbeat(bob, second.lease_id, beat(3, upload_checkpoint(second, 2)))
    assert strikes.count("bob") == 1
    fine = leases.heartbeat(bob, second.lease_id, beat(4, upload_checkpoint(second, 4)))
    assert fine.action == "continue" and state.get_task(task.task_id).checkpoint().step == 4  # type: ignore[union-attr]
    print(f"forged steps refused: 2; strikes alice {strikes.count('alice')}, bob 1")


def test_training_by_epochs_bounds_the_step_by_the_shards_rows(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "j-2", state_name="pending")
    by_epochs = train_task(max_steps=None, num_epochs=2.0, micro_batch_size=2)
    task = new_task(state, object_store, "j-2", task=by_epochs)
    shard = task.inputs().train[0]
    manifest = Manifest(
        source=SourceInfo(uri="/data/x.jsonl", sha256="0" * 64, bytes=100, rows=12),
        format="alpaca",
        seed=0,
        eval_split=0.1,
        shards=[
            SplitInfo(
                name="shard-00000.jsonl",
                rows=10,
                bytes=100,
                sha256=shard.sha256,
                tokens_estimate=250,
            )
        ],
        eval=EvalInfo(name="eval.jsonl", rows=2, bytes=10, sha256="1" * 64, tokens_estimate=50),
        bad_rows=BadRows(count=0, first=[]),
    )
    assert state.transition_job(
        "j-2", "running", expect=["pending"], manifest_json=manifest.to_json()
    )
    worker = enroll(state, "carol")
    lease = leases.lease(worker, CPU)
    assert lease is not None
    # 10 rows in batches of 2 for 2 epochs: at most 10 optimizer steps.
    with pytest.raises(Rejected, match="trains 10 steps"):
        leases.heartbeat(worker, lease.lease_id, beat(1, upload_checkpoint(lease, 11)))
    answer = leases.heartbeat(worker, lease.lease_id, beat(10))
    ok = leases.heartbeat(
        worker, lease.lease_id, beat(10, upload_checkpoint(lease, 10, answer.outputs.checkpoint))
    )
    assert ok.action == "continue"
    print("epochs: step 11 of a 10-step task refused, step 10 recorded")


def test_a_checkpoint_is_within_its_tasks_quota(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")  # cotune://tiny-llama, r 8, all-linear
    worker = enroll(state, "dave")
    lease = leases.lease(worker, CPU)
    assert lease is not None
    # 2 layers x r 8 x (4 x (64 + 64) + 2 x (64 + 256) + (256 + 64)) params x 4 bytes.
    adapter = 2 * 8 * (4 * 128 + 3 * 320) * 4
    quota = 4 * adapter + CHECKPOINT_ALLOWANCE_BYTES
    assert lease.outputs.checkpoint.max_bytes == quota  # the POST policy carries it
    ref = upload_checkpoint(lease, 1)
    huge = ref.model_copy(update={"archive": ref.archive.model_copy(update={"bytes": quota + 1})})
    with pytest.raises(Rejected, match=f"quota is {quota} bytes") as refused:
        leases.heartbeat(worker, lease.lease_id, beat(1, huge))
    assert refused.value.field == "checkpoint.archive.bytes"
    # A base model the coordinator cannot read: the task's memory tier bounds it.
    hub = train_task(base_model="org/some-model")
    assert checkpoint_quota(hub, "24g") == 24 * GB + CHECKPOINT_ALLOWANCE_BYTES
    assert checkpoint_quota(hub, "141g") == CHECKPOINT_MAX_BYTES
    # Hashing is bounded: an object over the limit is refused unread.
    data = b"x" * 1000
    object_store.put_bytes("jobs/j-1/big", data)
    digest = hashlib.sha256(data).hexdigest()
    assert "over the limit of 100" in (
        verify_object(object_store, "jobs/j-1/big", digest, 1000, max_bytes=100) or ""
    )
    assert verify_object(object_store, "jobs/j-1/big", digest, 1000, max_bytes=1000) is None
    assert task.tier == "cpu"
    print(f"quota of a tiny-llama task: {quota} bytes ({adapter} adapter bytes)")


def test_superseded_checkpoints_are_deleted_from_the_store(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")
    worker = enroll(state, "erin")
    lease: TaskLease | None = leases.lease(worker, CPU)
    assert lease is not None
    keys = []
    target = lease.outputs.checkpoint
    for step in (1, 2, 3):
        ref = upload_checkpoint(lease, step, target)
        keys.append(ref.archive.key)
        target = leases.heartbeat(worker, lease.lease_id, beat(step, ref)).outputs.checkpoint
    last = upload_checkpoint(lease, 4, target)
    keys.append(last.archive.key)
    leases.release(worker, lease.lease_id, ReleaseRequest(reason="stop", checkpoint=last))
    present = [object_store.exists(k) for k in keys]
    print(f"{len(keys)} checkpoints uploaded, in the store after release: {present}")
    assert present == [False, False, False, True]
    assert state.get_task(task.task_id).checkpoint().key == keys[-1]  # type: ignore[union-attr]


def test_a_call_on_another_workers_lease_is_a_strike(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "j-1")
    new_task(state, object_store, "j-1")
    alice, mallory = enroll(state, "alice"), enroll(state, "mallory")
    lease = leases.lease(alice, CPU)
    assert lease is not None
    for _ in range(2):
        with pytest.raises(Forbidden, match="another worker"):
            leases.heartbeat(mallory, lease.lease_id, beat(1))
    with pytest.raises(Forbidden):
        leases.release(mallory, lease.lease_id, ReleaseRequest(reason="mine now"))
    strikes = Strikes(state)
    print(f"3 calls on another's lease: {strikes.count('mallory')} strikes")
    assert strikes.count("mallory") == 3 and strikes.is_quarantined("mallory")
    assert strikes.count("alice") == 0
    assert leases.get_lease(lease.lease_id).state == "active"
