"""No volunteer, and no handful of one owner's accounts, can fail a trial (real Redis): a
volunteer's `fail` is always retryable, and its failures and expiries count toward
max_attempts once per owner; failures of distinct owners still fail a task that nobody can
train."""

from __future__ import annotations

from typing import Any

import pytest
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.protocol.wire import FailRequest
from cotune.orchestrator.settings import Settings

from tests.integration.coordinator_kit import CPU, HARDWARE, Clock, new_job, new_task

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


def enroll(state: State, name: str) -> str:
    token, _ = JoinTokens(state.redis, state.keys).create(name)
    return Workers(state).enroll(token, HARDWARE)[0].worker_id


def test_one_owners_accounts_fail_a_task_once_and_never_for_good(
    state: State, leases: Leases, object_store: Any, clock: Clock
) -> None:
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1", max_attempts=2)
    sybils = [enroll(state, "mallory") for _ in range(4)]
    for n, worker in enumerate(sybils):
        lease = leases.lease(worker, CPU)
        assert lease is not None and lease.task_id == task.task_id
        if n % 2:
            clock.advance(TTL + 1)  # gone silent: the lease expires
            assert leases.reclaim_expired() == 1
        else:  # "not retryable": a volunteer's word does not end a task
            leases.fail(worker, lease.lease_id, FailRequest(reason="no", retryable=False))
    again = state.get_task(task.task_id)
    print(f"after 4 attempts by one owner: {again.state}, failures {again.failures}")
    assert (again.state, again.failures) == ("queued", 1)
    assert state.get_trials("j-1")[0].state == "running"
    # A second owner's failure is a second failed attempt: max_attempts (2) is reached.
    other = enroll(state, "alice")
    lease = leases.lease(other, CPU)
    assert lease is not None
    leases.fail(other, lease.lease_id, FailRequest(reason="CUDA out of memory", retryable=True))
    failed = state.get_task(task.task_id)
    print(f"after a second owner: {failed.state}, failures {failed.failures}")
    assert failed.state == "failed" and state.get_trials("j-1")[0].state == "failed"
