"""Chaos: a sweep through volunteer workers that keep being killed, on a coordinator killed
twice and a Redis killed once, completes with every task accepted once, every round merged
once and every token credited once.

The stack is `cotune up --stack-only` (its supervisor restarts the redis-server killed with
-9, from its AOF); the coordinator is a `cotune coordinator` process of its own against that
stack's Redis and S3 (killed with -9 twice and started again); the workers are `cotune worker
--cpu` processes with a join token, one of them killed with -9 every few seconds and
replaced by a new process. 2 trials x 2 shards x 2 rounds of the tiny model.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from cotune.orchestrator.cli.client import CotuneClient
from cotune.orchestrator.control.state import State, connect
from cotune.orchestrator.control.workers import Workers
from cotune.orchestrator.runtime.services.ports import free_port
from cotune.orchestrator.runtime.stack import find_running, settings_for_stack
from cotune.orchestrator.settings import Settings

from tests.e2e.sweep_stack import WorkerProcess, settings_env, write_spec
from tests.reliability.processes import (
    CoordinatorProcess,
    Up,
    clean_env,
    job_state,
    wait_finished,
)

# About 5 minutes on a quiet 2-core machine; the timeout leaves room for a busy one.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(1800)]

ADMIN = "admin-token-for-chaos"
WORKERS = 3
KILLS = 20
KILL_EVERY_S = 3.0
COORDINATOR_KILLS_AT = (5, 14)  # after these worker kills
REDIS_KILL_AT = 9
LEASE_TTL_S = 8.0


def test_a_sweep_survives_killed_workers_a_killed_coordinator_and_a_killed_redis(
    tmp_path: Path, ray_cluster: str, alpaca_dataset: Path
) -> None:
    began = time.monotonic()
    stack = Up(tmp_path / "stack", tmp_path / "up.log", "--stack-only", env=clean_env())
    coordinator: CoordinatorProcess | None = None
    workers: list[WorkerProcess] = []
    logs = [tmp_path / "up.log", tmp_path / "coordinator.log"]
    try:
        stack.wait_for("Ctrl-C or SIGTERM stops it", 60)
        info = find_running(stack.home)
        assert info is not None
        port = free_port()
        settings = replace(
            settings_for_stack(info, Settings()),
            home=tmp_path / "coordinator",
            api_port=port,
            lease_ttl_s=LEASE_TTL_S,
            heartbeat_interval_s=1.0,
        )
        env = settings_env(settings)
        # Expired attempts count (half when they left a newer checkpoint): a task may meet
        # many kills here, and the point is that the job completes, not that it gives up.
        env.update(RAY_ADDRESS=ray_cluster, COTUNE_ADMIN_TOKEN=ADMIN, COTUNE_MAX_ATTEMPTS="40")
        url = f"http://127.0.0.1:{port}"
        coordinator = CoordinatorProcess(env, tmp_path / "coordinator.log", url)
        coordinator.start()
        spec = write_spec(
            tmp_path,
            alpaca_dataset,
            name="chaos",
            training={
                "max_steps": 6,
                "checkpoint_steps": 2,
                "learning_rate": {"loguniform": [3.0e-3, 1.0e-2]},
            },
            search={"method": "random", "n_trials": 2, "max_concurrent_trials": 2},
            trust={"redundancy": 0.0},
        )
        state = State(connect(info.redis_url))
        with CotuneClient(url, ADMIN) as client:
            token = client.create_join_token("chaos").token
            serial = 0

            def new_worker() -> WorkerProcess:
                nonlocal serial
                serial += 1
                worker = WorkerProcess(url, token, tmp_path / "volunteers", f"w{serial}")
                logs.append(worker.log_path)
                return worker

            workers = [new_worker() for _ in range(WORKERS)]
            job_id = client.submit(spec)
            # The kills start once training does (the first lease: the workers have built
            # the tiny model into their shared cache by then).
            while not any(t.state == "leased" for t in state.tasks_of(job_id)):
                assert time.monotonic() - began < 240, "no task was leased"
                time.sleep(0.5)
            rng = random.Random(0)
            busy_kills = 0
            for kill in range(1, KILLS + 1):
                time.sleep(KILL_EVERY_S)
                victim = rng.choice(workers)
                leased = {t.worker_id for t in state.tasks_of(job_id) if t.state == "leased"}
                busy_kills += any(f"as worker {w}" in victim.log() for w in leased if w)
                victim.kill()
                workers[workers.index(victim)] = new_worker()
                if kill in COORDINATOR_KILLS_AT:
                    coordinator.kill()
                    restart_s = coordinator.start()
                    print(f"coordinator killed and back in {restart_s:.1f} s")
                if kill == REDIS_KILL_AT:
                    os.kill(stack.pid_of("redis"), signal.SIGKILL)
                    stack.wait_for("restarted from its AOF", 30)
                job = job_state(client, job_id)
                if job is not None and job.state != "running":
                    break
            job = wait_finished(client, job_id, 1500, logs)
            assert job.state == "succeeded", job.error
        took = time.monotonic() - began
        # What happened, read while the stack still runs.
        events = state.events.read(job_id, count=100_000)
        tasks = state.tasks_of(job_id)
        rounds = {(t.trial, t.round) for t in tasks}
        merges = {where: state.get_merge(job_id, *where) for where in rounds}
        board = Workers(state).leaderboard()
    finally:
        for worker in workers:
            worker.stop(timeout_s=30)
        if coordinator is not None:
            coordinator.stop()
        stack.stop()

    kinds = Counter(e.kind for e in events)
    restarts = [line for line in stack.output().splitlines() if " restarted from " in line]
    print(
        f"{took:.0f} s: {kill} worker kills ({busy_kills} holding a lease), "
        f"{coordinator.starts - 1} coordinator kills, {len(restarts)} Redis restart(s); "
        f"{len(tasks)} tasks, attempts {sorted(t.attempt for t in tasks)}, "
        f"failures {sorted(t.failures for t in tasks)}; events {dict(kinds)}"
    )
    assert kill == KILLS, "the job finished before the chaos did: make it longer"
    assert coordinator.starts == 1 + len(COORDINATOR_KILLS_AT)
    assert len(restarts) == 1 and restarts[0].startswith("redis (pid ")

    # Every task accepted, exactly once.
    assert len(tasks) == 2 * 2 * 2 and {t.state for t in tasks} == {"accepted"}
    accepted = Counter(e.data["task_id"] for e in events if e.kind == "task_accepted")
    assert accepted == {t.task_id: 1 for t in tasks}, "a task was accepted twice (or never)"
    # Every round merged exactly once: one merge record, one event.
    assert all(merge is not None for merge in merges.values()), merges
    merged = Counter((e.data["trial"], e.data["round"]) for e in events if e.kind == "round_merged")
    assert merged == dict.fromkeys(rounds, 1), "a round was merged twice (or never)"
    # Every token credited exactly once: the leaderboard holds what the accepted tasks train.
    credited = sum(tokens for _, tokens, _ in board)
    trained = sum(t.result().tokens for t in tasks)  # type: ignore[union-attr]
    counted = sum(n for _, _, n in board)
    print(f"credited {credited:.0f} tokens for {counted} tasks; accepted tasks train {trained:.0f}")
    assert credited == pytest.approx(trained) and counted == len(tasks)
