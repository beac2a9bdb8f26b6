"""Helpers for the tests of the reconciler's real loop (test_reconciler.py,
test_sharding_step.py): settings on the real services, a small spec, a local pool, a loop."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.orchestrator.control.state import State
from cotune.orchestrator.pipeline.reconciler import LoopTimes, Reconciler
from cotune.orchestrator.protocol.spec import parse_spec
from cotune.orchestrator.settings import Settings


def loop_setup(
    tmp_path: Path, redis_client: Any, redis_server: str, s3_server: Any, object_store: Any
) -> dict[str, Any]:
    """What a loop needs: settings on the test's Redis and S3, the state, the store."""
    settings = Settings(
        home=tmp_path / "home",
        redis_url=redis_server,
        s3_endpoint=s3_server.endpoint,
        s3_bucket=object_store.bucket,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        max_attempts=2,
    )
    return {"settings": settings, "state": State(redis_client), "store": object_store}


def make_spec(data: Path, **search: Any) -> Any:
    return parse_spec(
        {
            "name": "recon",
            "base_model": "cotune://tiny-llama",
            "dataset": {"path": str(data), "format": "alpaca", "shards": 2, "eval_split": 0.2},
            "training": {"max_steps": 4, "sequence_len": 64, "learning_rate": [1e-3, 3e-3]},
            "lora": {"lora_r": 4, "lora_alpha": 8},
            "rounds": 2,
            "search": {"method": "random", "n_trials": 2, "max_concurrent_trials": 2, **search},
        }
    )


@dataclass(frozen=True)
class Done:
    """A call a local pool ran at once: its first poll answers it."""

    value: Any
    error: BaseException | None


class NoPool:
    """A local pool for the passes that never merge: it refuses merges, starts the base
    model's evaluation but never finishes it, and runs staging + sharding at once (in the
    pass, as a local pool may), so one pass takes a job from pending to running."""

    def submit_merge(self, request: Any) -> Any:
        raise AssertionError("no merge expected in this test")

    def submit_call(self, fn: Any, *args: Any) -> Any:
        return "base-eval"  # the base model's evaluation is started, never awaited here

    def submit_cpu_call(self, fn: Any, *args: Any) -> Any:
        try:
            return Done(fn(*args), None)
        except Exception as exc:
            return Done(None, exc)

    def poll(self, handle: Any) -> tuple[bool, Any, BaseException | None]:
        if isinstance(handle, Done):
            return True, handle.value, handle.error
        return False, None, None

    def follow_queue(self, demand: int) -> None:
        self.demand = demand


def reconciler(setup: dict[str, Any], pool: Any, identity: str = "test-a") -> Reconciler:
    return Reconciler(
        setup["state"],
        setup["store"],
        setup["settings"],
        pool,
        identity=identity,
        times=LoopTimes(interval_s=0.05),
    )


def submit(setup: dict[str, Any], spec: Any, job_id: str = "recon-1") -> str:
    setup["state"].create_job(job_id, spec.name, spec.to_yaml())
    return job_id


class CallPool(NoPool):
    """NoPool that also runs the base model's evaluation at once (a real `cotune evaluate`
    subprocess), so a pass sees its result."""

    def submit_call(self, fn: Any, *args: Any) -> Any:
        return self.submit_cpu_call(fn, *args)
