"""Helpers for the coordinator's integration tests (state, queue, leases, API): a clock the
test moves, jobs and tasks with real inputs in the store, uploads through presigned POSTs,
and a snapshot of every Redis key (type, value, expiry) to prove a refused request changed
nothing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cotune.orchestrator.control.records import StoredObject, TaskInputs, TaskRecord
from cotune.orchestrator.control.state import State
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.protocol.wire import (
    ADAPTER_FILES,
    ADAPTER_WEIGHTS,
    ArtifactRef,
    Capabilities,
    CheckpointRef,
    CompleteRequest,
    Hardware,
    PresignedPost,
    TaskLease,
)

PREFIX = "cotune:"
HARDWARE = Hardware(cpu_count=2, memory_bytes=8 << 30, cotune_version="test")
CPU = Capabilities(memory_bytes=4 * 10**9, bf16=False)


@dataclass
class Clock:
    """A clock the test moves by hand (unix seconds)."""

    now: float = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def snapshot(redis: Any, prefix: str = PREFIX) -> dict[bytes, tuple[str, Any, bool]]:
    """Every key under `prefix`: its type, its whole value, whether it expires.

    Values, not DUMP bytes: DUMP serialises a large hash in its hash table's iteration
    order, which Redis's incremental rehashing changes on mere reads (an HGET can move it),
    so equal contents could compare unequal.

    Left out: the rate limiter's buckets (`rate:*`, control/lua/lib.lua `take_token`), which
    count every authorized call, refused or not, by design.
    """
    values: dict[bytes, tuple[str, Any, bool]] = {}
    rate = (prefix + "rate:").encode()
    for key in sorted(redis.scan_iter(match=prefix + "*")):
        if key.startswith(rate):
            continue
        kind = redis.type(key).decode()
        value: Any
        if kind == "string":
            value = redis.get(key)
        elif kind == "hash":
            value = sorted(redis.hgetall(key).items())
        elif kind == "list":
            value = redis.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(redis.smembers(key))
        elif kind == "zset":
            value = redis.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            value = [(i, sorted(f.items())) for i, f in redis.xrange(key)]
        else:
            raise AssertionError(f"{key!r}: unexpected type {kind}")
        values[key] = (kind, value, redis.pttl(key) > 0)
    return values


def train_task(**overrides: Any) -> TrainTask:
    fields: dict[str, Any] = {
        "base_model": "cotune://tiny-llama",
        "max_steps": 4,
        "micro_batch_size": 2,
        "sequence_len": 64,
        "quantization": {"type": "none"},
    }
    fields.update(overrides)
    return TrainTask.model_validate(fields)


def stored_input(store: Any, key: str, data: bytes, name: str | None = None) -> StoredObject:
    info = store.put_bytes(key, data)
    return StoredObject(key=key, sha256=info.sha256, bytes=info.size, name=name)


def stored_file(store: Any, key: str, path: Path) -> StoredObject:
    """Upload a file as a task input, saved by the worker under the file's name."""
    info = store.put_file(key, path)
    assert info.sha256 is not None, f"{key}: the store recorded no sha256"
    return StoredObject(key=key, sha256=info.sha256, bytes=info.size, name=path.name)


def new_job(
    state: State, job_id: str, trials: int = 1, state_name: str = "running", rounds: int = 0
) -> None:
    """A job with `trials` trials put; `rounds` > 0 records its plan (trials x rounds)."""
    plan = {"trials": trials, "rounds": rounds} if rounds else {}
    state.create_job(job_id, job_id.rsplit("-", 1)[0], "name: x\n", **plan)
    if state_name != "pending":
        assert state.transition_job(job_id, state_name, expect=["pending"])  # type: ignore[arg-type]
    for n in range(trials):
        state.put_trial(job_id, n, {"training.learning_rate": 1e-3 * (n + 1)})


def new_task(
    state: State,
    store: Any,
    job_id: str,
    trial: int = 0,
    round: int = 0,
    shard: int = 0,
    *,
    tier: str = "cpu",
    max_attempts: int = 3,
    task: TrainTask | None = None,
) -> TaskRecord:
    data = f'{{"instruction": "shard {shard}", "output": "ok"}}\n'.encode()
    train = stored_input(
        store, f"jobs/{job_id}/data/shard-{shard:05d}.jsonl", data, f"shard-{shard:05d}.jsonl"
    )
    record = TaskRecord.new(
        job_id=job_id,
        trial=trial,
        round=round,
        shard=shard,
        tier=tier,
        task=task or train_task(),
        inputs=TaskInputs(base_model="cotune://tiny-llama", train=[train]),
        max_attempts=max_attempts,
    )
    assert state.enqueue_task(record)
    return record


def upload(post: PresignedPost, data: bytes) -> ArtifactRef:
    """Send `data` through a presigned POST, as a worker does."""
    answer = httpx.post(post.url, data=post.fields, files={"file": ("blob", data)}, timeout=30)
    assert answer.status_code in (200, 201, 204), answer.text
    return ArtifactRef(key=post.key, sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def upload_checkpoint(
    lease: TaskLease, step: int, post: PresignedPost | None = None
) -> CheckpointRef:
    target = post or lease.outputs.checkpoint
    ref = upload(target, f"checkpoint of {lease.task_id} at step {step}".encode())
    return CheckpointRef(step=step, archive=ref)


def adapter_tensors(task: TrainTask, *, seed: int = 0, scale: float = 0.01) -> dict[str, Any]:
    """LoRA factors of exactly the keys and shapes `task` implies for its built-in base model
    (numpy float32), small random values: what an honest upload's header looks like."""
    import numpy as np
    from cotune.orchestrator.protocol.builtin_models import builtin_config
    from cotune.orchestrator.protocol.memory import ModelShape
    from cotune.orchestrator.verify.expected import expected_adapter

    config = builtin_config(task.base_model)
    assert config is not None, f"{task.base_model}: the kit builds adapters of built-in models"
    expected = expected_adapter(ModelShape.from_config(config), task.lora)
    rng = np.random.default_rng(seed)
    return {
        key: (scale * rng.standard_normal(shape)).astype(np.float32)
        for key, shape in expected.shapes.items()
    }


def safetensors_bytes(tensors: dict[str, Any]) -> bytes:
    from safetensors.numpy import save

    return save(tensors, metadata={"format": "pt"})


def result_of(lease: TaskLease, tokens: int = 512, weights: bytes | None = None) -> CompleteRequest:
    """Upload the adapter files of a finished task and build its completion: `weights` as
    adapter_model.safetensors (by default an honest-looking adapter of the task's shape),
    opaque bytes for the other files, `tokens` as the worker's (never trusted) claim."""
    data = {name: f"{name} of {lease.task_id}".encode() for name in ADAPTER_FILES}
    data[ADAPTER_WEIGHTS] = (
        weights if weights is not None else safetensors_bytes(adapter_tensors(lease.task))
    )
    artifacts = {name: upload(lease.outputs.adapter[name], data[name]) for name in ADAPTER_FILES}
    return CompleteRequest(artifacts=artifacts, metrics={"tokens": tokens, "steps": 4})
