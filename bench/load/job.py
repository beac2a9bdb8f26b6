"""The work a load benchmark leases: one running sweep job whose round-0 tasks are queued.

The tasks are made and queued through the coordinator's own code, as the reconciler would
have made them, but without waiting for it (in API-only mode none runs):

- a real sweep spec (the built-in tiny Llama, `trials` trials of one round over `shards`
  shards, redundancy off) stored on the job, parsed as the reconciler parses it;
- a synthetic alpaca dataset sharded into the store by the real sharder
  (`data/shardstore.py`), its manifest recorded on the job, which is `running`;
- `trials` trials put in Redis, each with its K round-0 tasks from `pipeline/rounds.py`
  (`round_tasks`) and the trust fields of `pipeline/upload_checks.py` (`check_fields`),
  queued with `State.enqueue_task`.

So the job is one a reconciler, if one runs (`cotune coordinator`), steps without choking:
it finds every trial running with all its tasks queued and waits; it runs the heavy checks
of volunteers' results, and merges a trial's round on Ray once all K of its tasks are
accepted, as in production. Its first pass starts the job's one-off evaluation of the base
model on Ray (the loss the heavy checks compare a volunteer's probe loss with): a benchmark
that runs a reconciler waits for it (`wait_base_eval`) before measuring.

A released lease puts its task back in the queue without counting a failure (lib.lua
`settle` counts only `fail`s and expiries), so a pool a little larger than the number of
workers serves any number of lease + release cycles; a completion uses its task up.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.protocol.wire import ADAPTER_CONFIG, ADAPTER_METRICS, ADAPTER_WEIGHTS


@dataclass(frozen=True)
class SeededJob:
    job_id: str
    trials: int
    shards: int
    tasks: int
    tier: str
    max_steps: int
    seconds: float  # the time seeding took
    base_eval_wait_s: float | None = None  # the wait for a reconciler's base-model evaluation


def sweep_spec(dataset: Path, *, trials: int, shards: int) -> dict[str, Any]:
    """The bench job's spec: tiny Llama, one round, `trials` x `shards` tasks."""
    return {
        "name": "bench",
        "base_model": "cotune://tiny-llama",
        "dataset": {"path": str(dataset), "format": "alpaca", "eval_split": 0.1, "shards": shards},
        "training": {
            "sequence_len": 64,
            "micro_batch_size": 2,
            "max_steps": 8,
            # A dimension to search, so that `trials` trials are not one configuration.
            "learning_rate": {"loguniform": [1.0e-4, 1.0e-2]},
        },
        "lora": {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0},
        "rounds": 1,
        "search": {"method": "random", "n_trials": trials, "max_concurrent_trials": trials},
        # Load workers of one owner would wait forever for another owner's duplicate.
        "trust": {"redundancy": 0.0},
    }


def prepare(coordinator: Any, job_id: str, tasks: int, *, shards: int = 50) -> SeededJob:
    """`tasks` tasks queued for a benchmark on the coordinator under test (bench/load/
    server.py), `shards` a trial (sharding uploads an object per shard, ~25 ms each); where
    a reconciler runs, after its base-model evaluation, so that is not measured."""
    shards = min(tasks, shards)
    context = coordinator.context
    job = seed_job(
        context.state, context.store, job_id=job_id, trials=-(-tasks // shards), shards=shards
    )
    print(f"-- {job.tasks:,} tasks queued in {job.seconds:.1f} s (tier {job.tier})", flush=True)
    if coordinator.runs_reconciler:
        print("-- waiting for the reconciler's base-model evaluation ...", flush=True)
        job = dataclasses.replace(job, base_eval_wait_s=wait_base_eval(context.store, job_id))
    return job


def write_dataset(path: Path, shards: int) -> None:
    """Synthetic alpaca rows: enough for every shard and for the eval split (10 %)."""
    from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl

    write_jsonl(path, generate_rows("alpaca", max(2 * shards, 64), seed=0))


def seed_job(state: Any, store: Any, *, job_id: str, trials: int, shards: int) -> SeededJob:
    """Create the job and queue its trials x shards round-0 tasks (module docstring)."""
    from cotune.orchestrator.data.shardstore import shard_to_store
    from cotune.orchestrator.pipeline.rounds import round_tasks
    from cotune.orchestrator.pipeline.upload_checks import check_fields
    from cotune.orchestrator.protocol.spec import parse_spec_yaml

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cotune-bench-data-") as tmp:
        dataset = Path(tmp) / "bench.jsonl"
        write_dataset(dataset, shards)
        spec_yaml = yaml.safe_dump(sweep_spec(dataset, trials=trials, shards=shards))
        spec = parse_spec_yaml(spec_yaml, "bench spec")
        state.create_job(job_id, spec.name, spec_yaml, trials=trials, rounds=spec.rounds)
        manifest = shard_to_store(
            dataset,
            store=store,
            job_id=job_id,
            fmt=spec.dataset.format,
            shards=spec.dataset.shards,
            eval_split=spec.dataset.eval_split,
            seed=spec.dataset.seed,
        )
    state.transition_job(job_id, "running", expect=["pending"], manifest_json=manifest.to_json())
    count, tier, max_steps = 0, "", 0
    for trial in range(trials):
        params = {"training.learning_rate": 1.0e-4 * (1 + trial % 100)}
        state.put_trial(job_id, trial, params)
        trial_spec = spec.with_params(params)
        if trial == 0:  # the same model and adapter shapes for every trial
            trust = check_fields(store, trial_spec, job_id, 0, 0)
        for task in round_tasks(
            job_id=job_id,
            trial_spec=trial_spec,
            manifest=manifest,
            trial=trial,
            round=0,
            start=None,
            max_attempts=3,
            store=store,
        ):
            state.enqueue_task(dataclasses.replace(task, **trust))
            count += 1
            tier = task.tier
            max_steps = json.loads(task.task_json)["max_steps"]
    return SeededJob(job_id, trials, shards, count, tier, max_steps, time.perf_counter() - began)


def wait_base_eval(store: Any, job_id: str, timeout_s: float = 600.0) -> float:
    """Seconds until the reconciler stored the job's base-model evaluation (its first pass
    starts it on Ray); raises TimeoutError after `timeout_s`."""
    from cotune.orchestrator.data.layout import base_eval_key

    began = time.monotonic()
    while not store.exists(base_eval_key(job_id)):
        if time.monotonic() - began > timeout_s:
            raise TimeoutError(f"{job_id}: no base-model evaluation after {timeout_s:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - began


def adapter_files(task: TrainTask) -> dict[str, bytes]:
    """The files of an honest-looking result for `task`: LoRA factors of exactly the keys and
    shapes the task implies (tests/integration/coordinator_kit.py), small random values.
    Every task of the bench job shares the shapes, so one set serves every upload."""
    from tests.integration.coordinator_kit import adapter_tensors, safetensors_bytes

    return {
        ADAPTER_CONFIG: b'{"peft_type": "LORA"}',
        ADAPTER_WEIGHTS: safetensors_bytes(adapter_tensors(task)),
        ADAPTER_METRICS: b'{"train_loss": 1.0}',
    }


def first_task(state: Any, job_id: str) -> TrainTask:
    """The TrainTask of the job's first task (trial 0, round 0, shard 0)."""
    return TrainTask.model_validate_json(state.tasks_for(job_id, 0, 0)[0].task_json)
