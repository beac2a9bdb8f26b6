"""`cotune up` supervises what it started: a redis-server or weed that dies is restarted from
its data on the same ports (one line printed per restart), at most five times a minute each;
the coordinator beside them keeps running and answers again once Redis is back."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from cotune.orchestrator.data.objectstore import ObjectStore
from cotune.orchestrator.runtime.services.ports import free_port
from cotune.orchestrator.runtime.services.supervisor import Restart, RestartBudget, describe_exit
from cotune.orchestrator.runtime.stack import find_running, settings_for_stack

from tests.reliability.processes import Up, clean_env


def test_the_restart_budget_allows_five_a_minute_then_refuses_until_one_ages_out() -> None:
    now = [0.0]
    budget = RestartBudget(limit=5, window_s=60.0, clock=lambda: now[0])
    taken = []
    for _ in range(7):
        taken.append(budget.take())
        now[0] += 10.0
    print(f"restarts allowed 10 s apart: {taken}")
    assert taken == [True] * 5 + [False, True]  # at t=60 the first one aged out
    assert budget.used == 5
    line = Restart("redis", 11, -9, 12, "its AOF", "port 6379", 0.25, 1, 5, 60.0).line()
    assert line == (
        "redis (pid 11) was killed by SIGKILL; restarted from its AOF on port 6379 as pid 12 "
        "in 0.2 s (restart 1 of at most 5 in 60 s)"
    )
    assert describe_exit(1) == "exited with code 1" and describe_exit(None) == "stopped"


@pytest.fixture
def stack_only(tmp_path: Path) -> Iterator[Up]:
    up = Up(tmp_path / "home", tmp_path / "up.log", "--stack-only", env=clean_env())
    try:
        up.wait_for("Ctrl-C or SIGTERM stops it", 60)
        yield up
    finally:
        up.stop()


@pytest.mark.integration
def test_a_killed_redis_and_weed_come_back_with_their_data_on_the_same_ports(
    stack_only: Up,
) -> None:
    before = find_running(stack_only.home)
    assert before is not None
    client = redis.Redis.from_url(before.redis_url)
    client.set("kept", "yes")
    store = ObjectStore.from_settings(settings_for_stack(before))
    store.put_bytes("kept/object", b"data")
    time.sleep(1.5)  # the AOF is fsynced every second
    os.kill(before.pids["redis"], signal.SIGKILL)
    stack_only.wait_for("restarted from its AOF", 30)
    os.kill(before.pids["seaweed"], signal.SIGKILL)
    out = stack_only.wait_for("restarted from its data folder", 60)
    restarts = [line for line in out.splitlines() if " restarted from " in line]
    print("\n".join(restarts))
    assert len(restarts) == 2
    assert f"redis (pid {before.pids['redis']}) was killed by SIGKILL" in restarts[0]
    after = find_running(stack_only.home)
    assert after is not None, "stack.json names the new processes"
    assert (after.redis_url, after.s3_endpoint) == (before.redis_url, before.s3_endpoint)
    assert set(after.pids.values()).isdisjoint(before.pids.values())
    assert client.get("kept") == b"yes"  # the same client: it reconnects by itself
    assert store.get_bytes("kept/object") == b"data"
    assert stack_only.proc.poll() is None


@pytest.mark.integration
def test_a_service_that_keeps_dying_stops_the_stack_with_a_clear_error(
    stack_only: Up,
) -> None:
    for n in range(1, 6):
        os.kill(stack_only.pid_of("redis"), signal.SIGKILL)
        stack_only.wait_for("restarted from its AOF", 30, count=n)
    os.kill(stack_only.pid_of("redis"), signal.SIGKILL)
    assert stack_only.proc.wait(60) == 1
    out = stack_only.output()
    print(out[out.index("Ctrl-C") :])
    assert "redis was killed by SIGKILL after 5 restarts within 60 s; not restarting" in out
    assert "(restart 5 of at most 5 in 60 s)" in out
    assert not (stack_only.home / "stack.json").exists()


@pytest.mark.integration
@pytest.mark.slow
def test_the_coordinator_of_cotune_up_keeps_running_while_redis_restarts(
    tmp_path: Path,
) -> None:
    env = dict(clean_env(), COTUNE_API_PORT=str(free_port()))
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, as `cotune up` starts on a machine
    up = Up(tmp_path / "home", tmp_path / "up.log", "--workers", "0", env=env)
    try:
        up.wait_for("Ctrl-C or SIGTERM stops it", 180)
        url = json.loads((up.home / "api.json").read_text())["url"]
        admin = {"Authorization": f"Bearer {(up.home / 'admin-token').read_text().strip()}"}
        assert httpx.get(f"{url}/v1/jobs", headers=admin, timeout=30).status_code == 200
        os.kill(up.pid_of("redis"), signal.SIGKILL)
        up.wait_for("restarted from its AOF", 30)
        answers = [httpx.get(f"{url}/readyz", timeout=30).status_code for _ in range(3)]
        jobs = httpx.get(f"{url}/v1/jobs", headers=admin, timeout=30)
        print(f"after the restart: readyz {answers}, jobs {jobs.status_code}")
        assert answers == [200, 200, 200] and jobs.status_code == 200
        time.sleep(2)  # the reconciler's passes go on (its failed one was retried)
        assert up.proc.poll() is None, up.output()
        assert "stopped unexpectedly" not in up.output()
    finally:
        up.stop()
    assert up.proc.returncode == 0, up.output()
