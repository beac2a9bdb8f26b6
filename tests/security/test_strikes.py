"""Strikes and quarantine on a real Redis: an owner (a join token's name) that collects
`max_strikes` strikes is quarantined in one script: its workers' leases are revoked (their
tasks queued again, not counted against max_attempts), its workers get no more work and
cannot enroll again; a pardon lets them back. Cluster workers are never quarantined."""

from __future__ import annotations

from typing import Any

import pytest
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.state import State
from cotune.orchestrator.control.strikes import Strikes
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.protocol.problems import Forbidden, StaleLease
from cotune.orchestrator.protocol.wire import HeartbeatRequest
from cotune.orchestrator.settings import Settings

from tests.integration.coordinator_kit import CPU, HARDWARE, Clock, new_job, new_task

pytestmark = pytest.mark.integration


@pytest.fixture
def state(redis_client: Any) -> State:
    return State(redis_client, clock=Clock())


@pytest.fixture
def leases(state: State, object_store: Any) -> Leases:
    return Leases(state, object_store, Settings(lease_ttl_s=30, heartbeat_interval_s=5))


def enroll(state: State, name: str, kind: str = "volunteer") -> tuple[str, str]:
    token, _ = JoinTokens(state.redis, state.keys).create(name, kind=kind)  # type: ignore[arg-type]
    record, _ = Workers(state).enroll(token, HARDWARE)
    return record.worker_id, token


def test_three_strikes_quarantine_the_owner_and_revoke_its_leases(
    state: State, leases: Leases, object_store: Any
) -> None:
    new_job(state, "j-1")
    tasks = [new_task(state, object_store, "j-1", shard=s) for s in range(3)]
    mallory_1, token = enroll(state, "mallory")
    mallory_2, _ = enroll(state, "mallory")  # a second account of the same owner
    honest, _ = enroll(state, "alice")
    held = [leases.lease(mallory_1, CPU), leases.lease(mallory_2, CPU)]
    assert all(lease is not None for lease in held)
    strikes = Strikes(state)
    first = strikes.add(mallory_1, "result rejected: NaN")
    second = strikes.add(mallory_2, "result rejected: replay")
    assert (first.strikes, first.quarantined, second.strikes, second.quarantined) == (
        1.0, False, 2.0, False,
    )  # fmt: skip
    third = strikes.add(mallory_1, "result rejected: scaled delta")
    print(
        f"strikes {third.strikes}, quarantined {third.quarantined}, revoked {third.revoked_leases}"
    )
    assert (third.quarantined, third.revoked_leases) == (True, 2)
    assert strikes.is_quarantined("mallory") and not strikes.is_quarantined("alice")
    # The revoked tasks are queued again, with no failure counted.
    for task in tasks[:2]:
        again = state.get_task(task.task_id)
        assert (again.state, again.failures) == ("queued", 0)
    # The revoked leases are over for their holders; no more work, no new account.
    assert held[0] is not None
    with pytest.raises(StaleLease):
        leases.heartbeat(mallory_1, held[0].lease_id, HeartbeatRequest(step=1, max_steps=4))
    with pytest.raises(Forbidden, match="quarantined"):
        leases.lease(mallory_2, CPU)
    with pytest.raises(Forbidden, match="quarantined"):
        Workers(state).enroll(token, HARDWARE)
    # Honest workers take the revoked work.
    assert leases.lease(honest, CPU) is not None
    # A pardon lets the owner back.
    strikes.pardon("mallory")
    assert not strikes.is_quarantined("mallory") and strikes.count("mallory") == 0
    assert leases.lease(mallory_2, CPU) is not None


def test_cluster_workers_are_never_quarantined(state: State) -> None:
    worker, _ = enroll(state, "cluster", kind="cluster")
    strikes = Strikes(state, max_strikes=1)
    outcome = strikes.add(worker, "a bug, not a cheat")
    assert (outcome.strikes, outcome.quarantined) == (1.0, False)


def test_an_offense_resent_strikes_once(state: State) -> None:
    """A strike with an offense id (a task and attempt) counts once however often it is sent
    (a call resent after a dropped connection); the same kind of offense at another attempt
    counts again."""
    worker, _ = enroll(state, "resender")
    strikes = Strikes(state)
    for _ in range(3):
        outcome = strikes.add(worker, "result rejected (t): NaN", once="verdict:t:1")
    assert (outcome.strikes, outcome.quarantined) == (1.0, False)
    assert strikes.add(worker, "result rejected (t): NaN", once="verdict:t:2").strikes == 2.0
    assert strikes.add(worker, "a call on another worker's lease").strikes == 3.0
    assert strikes.is_quarantined("resender")


def test_an_admin_quarantines_by_hand(state: State, leases: Leases, object_store: Any) -> None:
    new_job(state, "j-2")
    new_task(state, object_store, "j-2")
    worker, _ = enroll(state, "eve")
    assert leases.lease(worker, CPU) is not None
    assert Strikes(state).quarantine("eve") == 1
    with pytest.raises(Forbidden):
        leases.lease(worker, CPU)
