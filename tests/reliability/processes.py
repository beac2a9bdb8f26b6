"""What the reliability tests start as processes of their own, so that they can kill them:
`cotune up` (the supervised stack), `cotune coordinator`, and a job poller that keeps
asking while the coordinator is away."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cotune.orchestrator.cli.client import ApiError, CotuneClient

ROOT = Path(__file__).resolve().parents[2]
FINISHED = ("succeeded", "failed", "cancelled")


def clean_env() -> dict[str, str]:
    """This environment without the COTUNE_ settings a developer may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
    env.update(PYTHONUNBUFFERED="1")
    return env


class Up:
    """`cotune up ARGS` as its own process, its output in a log file."""

    def __init__(self, home: Path, log: Path, *args: str, env: dict[str, str]) -> None:
        self.home, self.log = home, log
        argv = [sys.executable, "-m", "cotune.orchestrator", "up", "--home", str(home), *args]
        with log.open("wb") as sink:
            self.proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, marker: str, timeout_s: float, count: int = 1) -> str:
        """The output once `marker` is in it `count` times; the test fails on timeout."""
        give_up_at = time.monotonic() + timeout_s
        while True:
            seen = self.output()
            if seen.count(marker) >= count:
                return seen
            if self.proc.poll() is not None or time.monotonic() > give_up_at:
                pytest.fail(f"`cotune up` did not print {marker!r} x{count}:\n{seen}")
            time.sleep(0.1)

    def pid_of(self, service: str) -> int:
        """The pid of "redis" or "seaweed" as stack.json has it now."""
        record = json.loads((self.home / "stack.json").read_text())
        return int(record["s3" if service == "seaweed" else service]["process"]["pid"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class CoordinatorProcess:
    """`cotune coordinator --workers 0` as its own process, to be killed with -9."""

    def __init__(self, env: dict[str, str], log_path: Path, url: str) -> None:
        self.env, self.log_path, self.url = env, log_path, url
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout_s: float = 120.0) -> float:
        """Start it and wait until its API answers; the seconds that took."""
        began = time.monotonic()
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
        self.starts += 1
        while not self._healthy():
            if time.monotonic() - began > timeout_s:
                pytest.fail(f"the coordinator did not answer within {timeout_s:.0f} s")
            time.sleep(0.2)
        return time.monotonic() - began

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"the coordinator exited:\n{self.log_path.read_text()[-3000:]}")
        try:
            return httpx.get(self.url + "/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

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


def job_state(client: CotuneClient, job_id: str) -> Any | None:
    """The job, or None while the coordinator is away or answers 503."""
    try:
        return client.job(job_id)
    except ApiError as exc:
        if exc.status in (0, 502, 503, 504):
            return None
        raise


def wait_finished(client: CotuneClient, job_id: str, timeout_s: float, logs: list[Path]) -> Any:
    """The job once finished, asking through outages; the test fails (with logs) if not."""
    give_up_at = time.monotonic() + timeout_s
    while time.monotonic() < give_up_at:
        job = job_state(client, job_id)
        if job is not None and job.state in FINISHED:
            return job
        time.sleep(1.0)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs)
    pytest.fail(f"job {job_id} did not finish within {timeout_s:.0f} s\n{tails}")
