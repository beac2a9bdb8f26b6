"""Leases on a real Redis and a real S3 (SeaweedFS): presigned uploads, verification, expiry
with resume, stale and duplicate reports, max attempts. The clock is the test's."""

from __future__ import annotations

from typing import Any

import pytest
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.protocol.problems import (
    Forbidden,
    LeaseExpired,
    NotFound,
    Rejected,
    StaleLease,
)
from cotune.orchestrator.protocol.wire import (
    ArtifactRef,
    CompleteRequest,
    FailRequest,
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
    result_of,
    snapshot,
    upload_checkpoint,
)

pytestmark = pytest.mark.integration
TTL = 30.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(redis_client: Any, clock: Clock) -> State:
    return State(redis_client, clock=clock)


@pytest.fixture
def leases(state: State, object_store: Any) -> Leases:
    return Leases(state, object_store, Settings(lease_ttl_s=TTL, heartbeat_interval_s=5))


@pytest.fixture
def workers(state: State) -> list[str]:
    """Two enrolled volunteers, credited to alice and bob."""
    registry = Workers(state)
    ids = []
    for name in ("alice", "bob"):
        token, _ = JoinTokens(state.redis, state.keys).create(name)
        record, _ = registry.enroll(token, HARDWARE)
        ids.append(record.worker_id)
    return ids


@pytest.fixture
def cluster(state: State) -> str:
    """A trusted cluster worker (its results are accepted at once; today's failure rules)."""
    token, _ = JoinTokens(state.redis, state.keys).create("cluster", kind="cluster")
    record, _ = Workers(state).enroll(token, HARDWARE)
    return record.worker_id


def lease_one(leases: Leases, worker: str) -> TaskLease:
    lease = leases.lease(worker, CPU)
    assert lease is not None
    return lease


def test_heartbeats_renew_and_an_expired_lease_resumes_from_the_checkpoint(
    state: State, leases: Leases, object_store: Any, clock: Clock, workers: list[str]
) -> None:
    alice, bob = workers
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")
    first = lease_one(leases, alice)
    assert (first.attempt, first.deadline, first.heartbeat_interval_s) == (1, clock.now + TTL, 5)
    assert first.inputs.resume_checkpoint is None
    assert first.outputs.checkpoint.key.endswith("/s0/a1/ckpt/0000/checkpoint.tar")
    # A heartbeat with a checkpoint: recorded, and the next checkpoint gets a fresh key.
    clock.advance(20)
    checkpoint = upload_checkpoint(first, step=2)
    beat = leases.heartbeat(
        alice,
        first.lease_id,
        HeartbeatRequest(step=2, max_steps=4, loss=1.5, checkpoint=checkpoint),
    )
    assert beat.action == "continue" and beat.deadline == clock.now + TTL
    assert beat.outputs.checkpoint.key.endswith("/a1/ckpt/0001/checkpoint.tar")
    stored = state.get_task(task.task_id)
    assert (stored.step, stored.loss, stored.checkpoint().step) == (2, 1.5, 2)  # type: ignore[union-attr]
    # Renewed: past the first deadline but not the second, the lease holds.
    clock.advance(TTL - 1)
    assert leases.reclaim_expired() == 0
    clock.advance(2)
    assert leases.reclaim_expired() == 1
    again = state.get_task(task.task_id)
    # Half a failure: the attempt left a newer checkpoint than it started from (progress).
    assert (again.state, again.failures, again.attempt) == ("queued", 0.5, 1)
    # The next lease is attempt 2, resuming from attempt 1's checkpoint at step 2.
    second = lease_one(leases, bob)
    assert second.attempt == 2 and second.task_id == task.task_id
    resume = second.inputs.resume_checkpoint
    assert (
        resume is not None
        and resume.step == 2
        and resume.archive.sha256 == checkpoint.archive.sha256
    )
    assert "/a2/" in second.outputs.checkpoint.key
    # The stale attempt hears that its lease expired, whatever it reports.
    with pytest.raises(LeaseExpired):
        leases.heartbeat(alice, first.lease_id, HeartbeatRequest(step=3, max_steps=4))
    with pytest.raises(LeaseExpired):
        leases.complete(alice, first.lease_id, result_of(first))
    assert state.get_task(task.task_id).state == "leased"
    events = [e.kind for e in state.events.read("j-1")]
    assert events.count("lease_expired") == 1 and events.count("task_leased") == 2


def test_completion_is_verified_credited_once_and_idempotent(
    state: State,
    leases: Leases,
    object_store: Any,
    redis_client: Any,
    workers: list[str],
    cluster: str,
) -> None:
    alice, bob = workers
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")
    lease = lease_one(leases, cluster)
    result = result_of(lease, tokens=10**9)  # the worker's claim: never read
    answer = leases.complete(cluster, lease.lease_id, result)
    assert answer.accepted and answer.credit == 4 * 2 * 64  # what the task trains
    done = state.get_task(task.task_id)
    assert done.state == "accepted" and done.result().artifacts == result.artifacts  # type: ignore[union-attr]
    assert Workers(state).leaderboard() == [("cluster", 512.0, 1)]
    before = snapshot(redis_client)
    assert leases.complete(cluster, lease.lease_id, result) == answer  # a retry: same answer
    assert snapshot(redis_client) == before  # ... and no second credit
    other = CompleteRequest(artifacts={**result.artifacts}, metrics={"tokens": 1})
    assert leases.complete(cluster, lease.lease_id, other) == answer  # same artifacts
    moved = dict(result.artifacts)
    moved["metrics.json"] = ArtifactRef(key=moved["metrics.json"].key, sha256="0" * 64, bytes=1)
    with pytest.raises(StaleLease, match="other artifacts"):
        leases.complete(cluster, lease.lease_id, CompleteRequest(artifacts=moved))
    with pytest.raises(StaleLease):
        leases.heartbeat(cluster, lease.lease_id, HeartbeatRequest(step=4, max_steps=4))
    assert snapshot(redis_client) == before
    with pytest.raises(Forbidden):  # another worker's lease (a strike: tests/security/)
        leases.complete(bob, lease.lease_id, result)
    # A volunteer's result passes the cheap checks and waits, uncredited, for the heavy
    # checks (pipeline/verification.py): its lease is over, its task `verifying`.
    second = new_task(state, object_store, "j-1", shard=1)
    held = lease_one(leases, alice)
    pending = leases.complete(alice, held.lease_id, result_of(held, tokens=10**9))
    assert (pending.accepted, pending.credit) == (True, 0.0)
    waiting = state.get_task(second.task_id)
    assert waiting.state == "verifying" and waiting.result().tokens == 512  # type: ignore[union-attr]
    assert leases.get_lease(held.lease_id).state == "completed"
    assert Workers(state).leaderboard() == [("cluster", 512.0, 1)]


def test_bad_results_are_refused_or_rejected(
    state: State, leases: Leases, object_store: Any, redis_client: Any, workers: list[str]
) -> None:
    alice, _ = workers
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")
    lease = lease_one(leases, alice)
    result = result_of(lease)
    before = snapshot(redis_client)
    # Malformed claims are refused (422) without a trace.
    missing = CompleteRequest(
        artifacts={k: v for k, v in result.artifacts.items() if k != "metrics.json"}
    )
    with pytest.raises(Rejected, match=r"no metrics\.json") as refused:
        leases.complete(alice, lease.lease_id, missing)
    assert refused.value.field == "artifacts.metrics.json"
    elsewhere = dict(result.artifacts)
    elsewhere["metrics.json"] = ArtifactRef(key="jobs/other/key", sha256="0" * 64, bytes=1)
    with pytest.raises(Rejected, match="not the key issued"):
        leases.complete(alice, lease.lease_id, CompleteRequest(artifacts=elsewhere))
    bogus = upload_checkpoint(lease, 1).model_copy(update={"step": 1})
    bogus = bogus.model_copy(
        update={
            "archive": ArtifactRef(
                key="jobs/j-1/else.tar", sha256=bogus.archive.sha256, bytes=bogus.archive.bytes
            )
        }
    )
    with pytest.raises(Rejected, match="not a checkpoint key issued") as refused:
        leases.heartbeat(
            alice, lease.lease_id, HeartbeatRequest(step=1, max_steps=4, checkpoint=bogus)
        )
    assert refused.value.field == "checkpoint.archive.key"
    with pytest.raises(NotFound):
        leases.heartbeat(alice, "l-nope", HeartbeatRequest(step=1, max_steps=4))
    after = snapshot(redis_client)
    written = {k for k in after if k not in before or after[k] != before[k]}
    # Nothing but the strike the forged checkpoint key earned alice's owner.
    keys = state.keys
    struck = {keys.strikes(), keys.strike_log(), keys.strike_seen(), keys.worker(alice)}
    assert written == {k.encode() for k in struck}
    # A claim the store contradicts is a processed result: not accepted, the task goes back,
    # not counted against it (a volunteer's rejection is a strike on its owner instead). A
    # file this small is read whole at complete; a large one's sha256 is checked where it is
    # downloaded (tests/security/test_cheap_checks.py).
    lying = dict(result.artifacts)
    real = lying["adapter_config.json"]
    lying["adapter_config.json"] = real.model_copy(update={"sha256": "f" * 64})
    answer = leases.complete(alice, lease.lease_id, CompleteRequest(artifacts=lying))
    assert not answer.accepted and "sha256" in (answer.reason or "")
    again = state.get_task(task.task_id)
    assert (again.state, again.failures) == ("queued", 0)
    assert Workers(state).leaderboard() == []
    assert leases.complete(alice, lease.lease_id, CompleteRequest(artifacts=lying)) == answer


def test_max_attempts_fail_the_task_and_its_trial_while_the_job_goes_on(
    state: State, leases: Leases, object_store: Any, clock: Clock, cluster: str
) -> None:
    alice = cluster  # trusted: a volunteer's failures count once per owner (tests/security/)
    new_job(state, "j-1", trials=2)
    doomed = new_task(state, object_store, "j-1", trial=0, shard=0, max_attempts=2)
    sibling = new_task(state, object_store, "j-1", trial=0, shard=1)
    other = new_task(state, object_store, "j-1", trial=1, shard=0)
    first = lease_one(leases, alice)
    assert first.task_id == doomed.task_id
    leases.fail(alice, first.lease_id, FailRequest(reason="CUDA out of memory", retryable=True))
    leases.fail(
        alice, first.lease_id, FailRequest(reason="again", retryable=True)
    )  # a retry: no-op
    assert state.get_task(doomed.task_id).failures == 1
    second = lease_one(leases, alice)
    assert (second.task_id, second.attempt) == (doomed.task_id, 2)  # re-queued at the front
    clock.advance(TTL + 1)
    assert leases.reclaim_expired() == 1
    failed = state.get_task(doomed.task_id)
    assert failed.state == "failed" and "2 failed attempt(s) of 2" in (failed.error or "")
    trial = state.get_trials("j-1")[0]
    assert trial.state == "failed" and doomed.task_id in (trial.error or "")
    assert state.get_task(sibling.task_id).state == "cancelled"
    assert state.get_job("j-1").state == "running"  # the job goes on ...
    assert lease_one(leases, alice).task_id == other.task_id  # ... with its other trial


def test_non_retryable_failure_fails_at_once_and_release_is_free(
    state: State, leases: Leases, object_store: Any, workers: list[str], cluster: str
) -> None:
    alice, bob = workers[0], cluster  # a volunteer's `fail` is always retryable
    new_job(state, "j-1", trials=2)
    task = new_task(state, object_store, "j-1", trial=0)
    lease = lease_one(leases, alice)
    checkpoint = upload_checkpoint(lease, 3)
    leases.release(
        alice,
        lease.lease_id,
        ReleaseRequest(reason="the worker is stopping", checkpoint=checkpoint),
    )
    leases.release(alice, lease.lease_id, ReleaseRequest(reason="retry"))  # idempotent
    released = state.get_task(task.task_id)
    assert (released.state, released.failures, released.checkpoint().step) == ("queued", 0, 3)  # type: ignore[union-attr]
    again = lease_one(leases, bob)
    assert again.attempt == 2 and again.inputs.resume_checkpoint.step == 3  # type: ignore[union-attr]
    with pytest.raises(StaleLease):
        leases.fail(alice, lease.lease_id, FailRequest(reason="late", retryable=True))
    leases.fail(
        bob, again.lease_id, FailRequest(reason="no row matches the format", retryable=False)
    )
    assert state.get_task(task.task_id).state == "failed"
    assert state.get_trials("j-1")[0].state == "failed"


def test_a_cancelled_job_stops_its_leases_and_they_end_cancelled(
    state: State, leases: Leases, object_store: Any, workers: list[str]
) -> None:
    alice, _ = workers
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1")
    lease = lease_one(leases, alice)
    state.cancel_job("j-1")
    beat = leases.heartbeat(alice, lease.lease_id, HeartbeatRequest(step=1, max_steps=4))
    assert beat.action == "stop"
    leases.release(alice, lease.lease_id, ReleaseRequest(reason="the coordinator said stop"))
    assert state.get_task(task.task_id).state == "cancelled"
    assert leases.lease(alice, CPU) is None
