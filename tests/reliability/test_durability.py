"""Durability on real services: Redis's AOF, a coordinator that rides out a Redis restart,
and attempts that made progress counting half.

- Every Redis cotune runs has AOF on with fsync every second; a write acknowledged a second
  before a kill -9 is there after the restart.
- The coordinator's client (control/state.py `connect`) reconnects and resends when Redis
  restarts under it, Lua scripts included; while Redis stays away the API answers 503.
- An attempt whose worker died after leaving a newer checkpoint counts half toward
  max_attempts (control/lua/lib.lua `expire_lease`).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from cotune.orchestrator.api import ApiContext, create_app
from cotune.orchestrator.control.leases import Leases
from cotune.orchestrator.control.state import State, connect
from cotune.orchestrator.control.tokens import JoinTokens
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.protocol.wire import HeartbeatRequest, TaskLease
from cotune.orchestrator.runtime.services.redis_server import DURABILITY, RedisServer
from cotune.orchestrator.settings import Settings
from fastapi.testclient import TestClient

from tests.integration.coordinator_kit import (
    CPU,
    HARDWARE,
    Clock,
    new_job,
    new_task,
    upload_checkpoint,
)

pytestmark = pytest.mark.integration
TTL = 30.0


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to kill and restart."""
    server = RedisServer(tmp_path / "redis", tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def kill_and_restart(server: RedisServer, after_s: float) -> None:
    """kill -9 the server, then start it again from its AOF `after_s` later.

    On this (the main) thread: a service dies with the thread that started it.
    """
    os.kill(server.ident.pid, signal.SIGKILL)
    time.sleep(after_s)
    server.restart()


def test_every_redis_cotune_runs_has_the_aof_on_with_fsync_every_second(
    redis_server: str, own_redis: RedisServer
) -> None:
    for url in (redis_server, own_redis.url):  # the tests' server and a stack's are one class
        client = redis.Redis.from_url(url)
        config = {name: client.config_get(name)[name] for name, _ in DURABILITY}
        client.close()
        print(f"{url.rsplit('@', 1)[-1]}: {config}")
        assert config == {
            "appendonly": "yes",
            "appendfsync": "everysec",
            "aof-load-truncated": "yes",
        }


def test_writes_acknowledged_a_second_before_a_kill_are_there_after_the_restart(
    own_redis: RedisServer,
) -> None:
    client = connect(own_redis.url)
    client.mset({f"k{i}": i for i in range(1000)})
    client.hset("h", mapping={"state": "leased", "attempt": 2})
    time.sleep(1.5)  # appendfsync everysec: on disk within a second
    kill_and_restart(own_redis, after_s=0.0)
    kept = sum(1 for value in client.mget([f"k{i}" for i in range(1000)]) if value is not None)
    print(f"after kill -9 and restart from the AOF: {kept} of 1000 keys")
    assert kept == 1000
    assert client.hgetall("h") == {b"state": b"leased", b"attempt": b"2"}


def test_the_coordinators_client_rides_out_a_redis_restart_scripts_included(
    own_redis: RedisServer,
) -> None:
    state = State(connect(own_redis.url))
    state.create_job("j-1", "j", "name: x\n")
    assert state.transition_job("j-1", "sharding", expect=["pending"])
    outcome: dict[str, Any] = {}

    def transition() -> None:
        # Issued while Redis is down: the client backs off, reconnects, and this goes
        # through; the script cache died with the server, so the script is loaded again.
        began = time.monotonic()
        outcome["moved"] = state.transition_job("j-1", "running", expect=["sharding"])
        outcome["waited"] = time.monotonic() - began

    os.kill(own_redis.ident.pid, signal.SIGKILL)
    caller = threading.Thread(target=transition)
    caller.start()
    time.sleep(1.0)
    own_redis.restart()
    caller.join(30)
    print(f"a transition issued while Redis restarted: {outcome}")
    assert outcome["moved"] is True and outcome["waited"] >= 0.5
    assert state.get_job("j-1").state == "running"


def test_the_api_answers_503_while_redis_is_away_and_recovers_when_it_is_back(
    own_redis: RedisServer, object_store: Any, tmp_path: Path
) -> None:
    admin = "admin-token-for-tests"
    settings = Settings(home=tmp_path / "home", lease_ttl_s=TTL, heartbeat_interval_s=5)
    context = ApiContext.create(settings, connect(own_redis.url), object_store, admin)
    api = TestClient(create_app(context), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {admin}"}
    assert api.get("/v1/jobs", headers=auth).status_code == 200
    own_redis.stop()
    began = time.monotonic()
    down = api.get("/v1/jobs", headers=auth)
    took = time.monotonic() - began
    print(f"with Redis away: HTTP {down.status_code} after {took:.1f} s of retries")
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "unavailable"
    assert api.get("/readyz").status_code == 503
    own_redis.restart()
    assert api.get("/v1/jobs", headers=auth).status_code == 200
    assert api.get("/readyz").status_code == 200


@pytest.fixture
def leases(redis_client: Any, object_store: Any) -> tuple[State, Leases, Clock]:
    clock = Clock()
    state = State(redis_client, clock=clock)
    return state, Leases(state, object_store, Settings(lease_ttl_s=TTL)), clock


def enrolled(state: State, name: str) -> str:
    token, _ = JoinTokens(state.redis, state.keys).create(name, kind="cluster")
    record, _ = Workers(state).enroll(token, HARDWARE)
    return record.worker_id


def test_an_expired_attempt_that_left_a_newer_checkpoint_counts_half(
    leases: tuple[State, Leases, Clock], object_store: Any
) -> None:
    state, registry, clock = leases
    new_job(state, "j-1")
    task = new_task(state, object_store, "j-1", max_attempts=2)
    tallies = []

    def attempt(worker: str, checkpoint_step: int | None) -> TaskLease:
        lease = registry.lease(worker, CPU)
        assert lease is not None and lease.task_id == task.task_id
        if checkpoint_step is not None:
            ref = upload_checkpoint(lease, checkpoint_step)
            registry.heartbeat(
                worker,
                lease.lease_id,
                HeartbeatRequest(step=checkpoint_step, max_steps=4, checkpoint=ref),
            )
        clock.advance(TTL + 1)  # the worker dies: no more heartbeats
        assert registry.reclaim_expired() == 1
        tallies.append(state.get_task(task.task_id).failures)
        return lease

    # 1: died after a checkpoint at step 2 (it started from none): half.
    attempt(enrolled(state, "node-a"), checkpoint_step=2)
    # 2: resumed at step 2 and died before a newer one (step 2 again is no progress): whole.
    second = attempt(enrolled(state, "node-b"), checkpoint_step=2)
    assert second.inputs.resume_checkpoint is not None
    assert second.inputs.resume_checkpoint.step == 2
    # 3: made progress again (step 3): half, and the tally reaches max_attempts = 2.
    attempt(enrolled(state, "node-c"), checkpoint_step=3)
    print(f"failures after each expired attempt: {tallies}")
    assert tallies == [0.5, 1.5, 2.0]
    failed = state.get_task(task.task_id)
    assert failed.state == "failed"
    assert "2 failed attempt(s) of 2 allowed" in (failed.error or "")
