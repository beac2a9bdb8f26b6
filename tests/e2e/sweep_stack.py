"""What the e2e tests put together: specs, a coordinator, worker processes, waiting on a job.

Everything is real: the session's Redis and SeaweedFS (tests/fixtures/services.py), the
session's Ray (tests/fixtures/ray.py), the coordinator's API on uvicorn, and workers
started as `cotune worker` processes exactly as a volunteer starts one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from cotune.orchestrator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def write_spec(folder: Path, dataset: Path, **sections: Any) -> Path:
    """A tiny-model spec (2 shards, 2 rounds, short tasks); `sections` replace its parts."""
    spec: dict[str, Any] = {
        "name": "e2e",
        "base_model": "cotune://tiny-llama",
        "dataset": {"path": str(dataset), "format": "alpaca", "eval_split": 0.1, "shards": 2},
        "training": {
            "sequence_len": 64,
            "micro_batch_size": 8,
            "learning_rate": 5.0e-3,
            "warmup_steps": 2,
            "max_steps": 10,
            "checkpoint_steps": 4,
            "gradient_checkpointing": False,
        },
        "lora": {"lora_r": 4, "lora_alpha": 16, "lora_dropout": 0.0},
        "rounds": 2,
        "search": {"method": "random", "n_trials": 1},
        # The workers of these tests belong to one owner: a redundancy duplicate would wait
        # for another owner's worker (pipeline/redundancy.py); tests/security/ covers it.
        "trust": {"redundancy": 0.0},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    path = folder / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def service_settings(home: Path, redis_url: str, s3: Any, **overrides: Any) -> Settings:
    """Settings of a coordinator on the session's Redis and a fresh bucket of its S3."""
    bucket = f"e2e-{uuid.uuid4().hex[:12]}"
    s3.store(bucket).ensure_bucket()
    settings = Settings(
        home=home,
        redis_url=redis_url,
        s3_endpoint=s3.endpoint,
        s3_bucket=bucket,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        lease_ttl_s=30.0,
        heartbeat_interval_s=1.0,
    )
    return replace(settings, **overrides)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
    env.update(
        COTUNE_HOME=str(settings.home),
        COTUNE_REDIS_URL=settings.redis_url or "",
        COTUNE_S3_ENDPOINT=settings.s3_endpoint or "",
        COTUNE_S3_BUCKET=settings.s3_bucket,
        COTUNE_S3_ACCESS_KEY=settings.s3_access_key or "",
        COTUNE_S3_SECRET_KEY=settings.s3_secret_key or "",
        COTUNE_API_PORT=str(settings.api_port),
        COTUNE_LEASE_TTL_S=str(settings.lease_ttl_s),
        COTUNE_HEARTBEAT_INTERVAL_S=str(settings.heartbeat_interval_s),
        PYTHONUNBUFFERED="1",
    )
    return env


class WorkerProcess:
    """`cotune worker --cpu` as its own process (a volunteer, or a stand-in cluster node)."""

    def __init__(self, url: str, join_token: str, home: Path, name: str) -> None:
        self.log_path = home / "logs" / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
        env.update(COTUNE_HOME=str(home), PYTHONUNBUFFERED="1")
        argv = [sys.executable, "-m", "cotune.orchestrator", "worker", "--coordinator", url]
        argv += ["--join-token", join_token, "--cpu", "--work-dir", str(home / "workers" / name)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9: no cleanup of any kind runs (its whole process group)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def wait_for(what: str, predicate: Any, timeout_s: float, every_s: float = 0.5) -> Any:
    """Poll `predicate` until it returns something truthy; fail the test after timeout_s."""
    give_up_at = time.monotonic() + timeout_s
    while time.monotonic() < give_up_at:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def wait_for_job(client: Any, job_id: str, timeout_s: float, logs: list[WorkerProcess]) -> Any:
    """The job once it has finished; the test fails (with the workers' logs) if it does not."""
    give_up_at = time.monotonic() + timeout_s
    while time.monotonic() < give_up_at:
        job = client.job(job_id)
        if job.state in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(1.0)
    tails = "\n".join(f"--- {w.log_path}\n{w.log()[-3000:]}" for w in logs)
    pytest.fail(f"job {job_id} did not finish within {timeout_s:.0f} s\n{tails}")
