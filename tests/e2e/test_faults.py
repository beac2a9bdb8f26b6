"""Faults: a worker killed mid-task, a coordinator killed mid-sweep (kill -9 both times).

A killed worker's lease expires after the TTL; its task is leased again (attempt 2, from
the latest checkpoint) and the job completes with every task accepted exactly once. A
killed coordinator restarted on the same Redis and S3 carries on: no trial is asked twice
(Optuna's trial count is n_trials), no round is merged or evaluated twice.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from cotune.orchestrator.cli.client import CotuneClient
from cotune.orchestrator.control.state import State
from cotune.orchestrator.pipeline.study import JobStudy
from cotune.orchestrator.protocol.spec import load_spec
from cotune.orchestrator.runtime.coordinator import CoordinatorService
from cotune.orchestrator.runtime.services.ports import free_port

from tests.e2e.sweep_stack import (
    ROOT,
    WorkerProcess,
    service_settings,
    settings_env,
    wait_for,
    wait_for_job,
    write_spec,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.integration]


def events_of(state: State, job_id: str) -> list[Any]:
    return state.events.read(job_id, count=100_000)


def test_a_worker_killed_mid_task_loses_its_lease_and_the_task_resumes_elsewhere(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: Any,
    ray_cluster: str,
    alpaca_dataset: Path,
) -> None:
    home = tmp_path / "home"
    settings = service_settings(home, redis_server, s3_server, lease_ttl_s=8.0)
    spec_path = write_spec(
        tmp_path, alpaca_dataset, name="kill-worker", rounds=1, training={"max_steps": 16}
    )
    with (
        CoordinatorService(settings, workers=0, api_port=0) as service,
        CotuneClient(service.url, service.admin_token) as client,
    ):
        state = service.api_context.state
        token = client.create_join_token("faults").token
        doomed = WorkerProcess(service.url, token, home, "doomed")
        spare: WorkerProcess | None = None
        try:
            job_id = client.submit(spec_path)

            def checkpointed_lease() -> Any:
                leased = [t for t in state.tasks_of(job_id) if t.state == "leased"]
                return next((t for t in leased if t.checkpoint() is not None), None)

            victim = wait_for("a leased task with a checkpoint", checkpointed_lease, 300)
            assert victim.attempt == 1
            doomed.kill()
            killed_at_wall = time.time()
            spare = WorkerProcess(service.url, token, home, "spare")
            job = wait_for_job(client, job_id, 600, [doomed, spare])
            assert job.state == "succeeded", job.error
        finally:
            doomed.kill()
            if spare is not None:
                spare.stop()

        task = state.get_task(victim.task_id)
        result = task.result()
        assert task.state == "accepted" and result is not None
        assert (task.attempt, result.attempt) == (2, 2)
        assert result.worker_id != victim.worker_id
        # The second attempt went on from the first one's checkpoint, not from step 0.
        resumed = re.findall(rf"{re.escape(victim.task_id)}.*resuming at step (\d+)", spare.log())
        assert resumed and int(resumed[0]) >= victim.checkpoint().step > 0  # type: ignore[union-attr]

        events = events_of(state, job_id)
        expired = [e for e in events if e.kind == "lease_expired"]
        assert [e.data["task_id"] for e in expired] == [victim.task_id]
        # Leased again only once the lease had expired (the TTL after the last heartbeat).
        kinds = [
            (e.kind, e.data.get("attempt"))
            for e in events
            if e.data.get("task_id") == victim.task_id
        ]
        assert kinds.index(("lease_expired", 1)) < kinds.index(("task_leased", 2))
        assert (
            expired[0].time - killed_at_wall
            >= settings.lease_ttl_s - settings.heartbeat_interval_s - 1
        )
        accepted = Counter(e.data["task_id"] for e in events if e.kind == "task_accepted")
        tasks = state.tasks_of(job_id)
        assert len(tasks) == 2
        assert accepted == {t.task_id: 1 for t in tasks}, "a task was lost or accepted twice"
        assert {t.state for t in tasks} == {"accepted"}


class CoordinatorProcess:
    """`cotune coordinator` as a process of its own, so that it can be killed with -9."""

    def __init__(self, env: dict[str, str], log_path: Path, url: str) -> None:
        self.env, self.log_path, self.url = env, log_path, url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [sys.executable, "-m", "cotune.orchestrator", "coordinator", "--workers", "0"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"the coordinator exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the coordinator's API", healthy, 90)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.kill()


def test_a_coordinator_killed_mid_sweep_resumes_without_repeating_anything(
    tmp_path: Path,
    redis_client: Any,
    redis_server: str,
    s3_server: Any,
    ray_cluster: str,
    alpaca_dataset: Path,
) -> None:
    home = tmp_path / "home"
    port = free_port()
    settings = service_settings(
        home, redis_server, s3_server, api_port=port, admin_token="admin-token-for-faults"
    )
    env = settings_env(settings)
    env.update(RAY_ADDRESS=ray_cluster, COTUNE_ADMIN_TOKEN="admin-token-for-faults")
    spec_path = write_spec(
        tmp_path,
        alpaca_dataset,
        name="kill-coordinator",
        training={"learning_rate": {"loguniform": [1.0e-3, 1.0e-2]}},
        search={
            "method": "random",
            "n_trials": 3,
            "max_concurrent_trials": 2,
            "pruner": {"type": "median", "n_startup_trials": 1},
        },
    )
    url = f"http://127.0.0.1:{port}"
    coordinator = CoordinatorProcess(env, tmp_path / "coordinator.log", url)
    state = State(redis_client)
    workers: list[WorkerProcess] = []
    kills = 0
    try:
        coordinator.start()
        with CotuneClient(url, "admin-token-for-faults") as client:
            token = client.create_join_token("faults").token
            workers = [WorkerProcess(url, token, home, f"worker-{i}") for i in range(2)]
            job_id = client.submit(spec_path)

            def merge_in_flight() -> bool:
                claims = state.redis.keys(f"cotune:merge:{job_id}:*:claim")
                for claim in claims:
                    trial, rnd = re.findall(r":(\d+):(\d+):claim$", claim.decode())[0]
                    if state.get_merge(job_id, int(trial), int(rnd)) is None:
                        return True
                return False

            # Kill 1: while a round's merge is in flight (claimed, not recorded).
            wait_for("a merge in flight", merge_in_flight, 400, every_s=0.1)
            coordinator.kill()
            kills += 1
            time.sleep(2)
            coordinator.start()
            # Kill 2: right after the next trial is asked (its record may not be written yet).
            started = len(state.get_trials(job_id))
            wait_for(
                "another trial",
                lambda: (
                    len(state.get_trials(job_id)) > started
                    or client.job(job_id).state in ("merging", "succeeded")
                ),
                400,
                every_s=0.05,
            )
            coordinator.kill()
            kills += 1
            time.sleep(2)
            coordinator.start()
            job = wait_for_job(client, job_id, 900, workers)
            assert job.state == "succeeded", job.error
    finally:
        for worker in workers:
            worker.stop()
        coordinator.stop()
    assert kills == 2

    spec = load_spec(spec_path)
    study = JobStudy.open(redis_server, state.keys.optuna(job_id), job_id, spec)
    assert study.asked() == 3, "a trial was asked twice (or lost)"
    events = events_of(state, job_id)
    started = Counter(e.data["trial"] for e in events if e.kind == "trial_started")
    assert started == {0: 1, 1: 1, 2: 1}
    trials = state.get_trials(job_id)
    assert {t.state for t in trials} <= {"complete", "pruned"}
    merged = Counter((e.data["trial"], e.data["round"]) for e in events if e.kind == "round_merged")
    evaluated = Counter(
        (e.data["trial"], e.data["round"]) for e in events if e.kind == "round_evaluated"
    )
    expected = {(t.number, r): 1 for t in trials for r in range(t.rounds_done)}
    assert merged == expected, "a round was merged twice (or not recorded)"
    assert evaluated == expected, "a round was evaluated twice"
    for t in trials:  # Optuna saw each round once, and agrees on how each trial ended
        frozen = study.frozen(t.number)
        assert sorted(frozen.intermediate_values) == list(range(1, t.rounds_done + 1))
        assert study.state_of(t.number) == {"complete": "complete", "pruned": "pruned"}[t.state]
    tasks = state.tasks_of(job_id)
    accepted = Counter(e.data["task_id"] for e in events if e.kind == "task_accepted")
    assert all(n == 1 for n in accepted.values()), "a task was accepted twice"
    per_round = Counter((t.trial, t.round) for t in tasks)
    assert all(n == 2 for n in per_round.values())
    assert {(t.number, r) for t in trials for r in range(t.rounds_done)} <= set(per_round)
