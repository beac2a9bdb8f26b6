"""A volunteer joins a running `cotune up` with a join token and takes its work.

`cotune up --workers 0` runs the embedded stack, Ray, the API and the reconciler, and no
worker of its own; the only worker is a separate `cotune worker --coordinator URL
--join-token T` process, so every task of the job is trained by it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cotune.orchestrator.cli.client import CotuneClient
from cotune.orchestrator.runtime.services.ports import free_port

from tests.e2e.sweep_stack import ROOT, WorkerProcess, wait_for, wait_for_job, write_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def read_until(proc: subprocess.Popen[bytes], log: Path, marker: str, timeout_s: float) -> str:
    give_up_at = time.monotonic() + timeout_s
    while True:
        seen = log.read_text(errors="replace")
        if marker in seen:
            return seen
        if proc.poll() is not None or time.monotonic() > give_up_at:
            pytest.fail(f"`cotune up` did not print {marker!r}:\n{seen}")
        time.sleep(0.2)


def test_a_volunteer_with_a_join_token_joins_cotune_up_and_trains_its_tasks(
    tmp_path: Path, alpaca_dataset: Path
) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
    env.pop("RAY_ADDRESS", None)
    env.update(COTUNE_API_PORT=str(free_port()), PYTHONUNBUFFERED="1")
    log = tmp_path / "up.log"
    with log.open("wb") as sink:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cotune.orchestrator",
                "up",
                "--home",
                str(home),
                "--workers",
                "0",
            ],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    volunteer: WorkerProcess | None = None
    try:
        out = read_until(up, log, "Ctrl-C or SIGTERM stops it", timeout_s=120)
        assert "up to 0 local worker(s)" in out
        url = json.loads((home / "api.json").read_text())["url"]
        admin = (home / "admin-token").read_text().strip()
        spec = write_spec(tmp_path, alpaca_dataset, name="volunteer", rounds=1)
        with CotuneClient(url, admin) as client:
            token = client.create_join_token("alice").token
            job_id = client.submit(spec)
            time.sleep(3)  # no worker yet: the tasks wait in the queue
            assert client.job(job_id).tasks.queued == 2
            volunteer = WorkerProcess(url, token, tmp_path / "volunteer", "alice")
            job = wait_for_job(client, job_id, 600, [volunteer])
            assert job.state == "succeeded", job.error
            [worker] = client.workers()
            assert (worker.name, worker.kind, worker.tasks_accepted) == ("alice", "volunteer", 2)
            board = {e.name: e for e in client.leaderboard()}
            assert board["alice"].tasks == 2 and board["alice"].tokens > 0
            client.download(job_id, tmp_path / "best")
        assert (tmp_path / "best" / "adapter_model.safetensors").is_file()
        assert "enrolled with" in volunteer.log()
    finally:
        if volunteer is not None:
            volunteer.stop()
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait()
    assert up.returncode == 0, log.read_text()
    assert "stopped" in log.read_text()
    wait_for("api.json removed", lambda: not (home / "api.json").exists(), 5)
