"""The K shard tasks of one (trial, round): what each trains, from where, on what it needs.

Task t of round r trains shard s of the job's data, starting from the trial's merged
adapter of round r-1 (a fresh LoRA init in round 0), with the trial's concrete settings
(`SweepSpec.with_params`) and a seed of its own (`seed_for(job, trial, round, shard)`), so
whoever trains it, and however often, it is the same run.

Placement: a task sits in the memory tier (orchestrator/queue.py) of its requirement:
`requirements.gpu_memory_gb` when the spec gives it; else the built-in tiny model needs
under 1 GB, and any other model is given a conservative 16 GB (the memory estimator in
worker/memory.py needs the model's config.json, which the coordinator does not fetch yet).

Object keys (docs/architecture.md, "Storage"):
    jobs/<job>/data/shard-00000.jsonl.zst ...            the inputs (sharding.py)
    jobs/<job>/trials/<t>/r<round>/merged/               the round's merged adapter
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.protocol.task import TrainTask, seed_for
from orchestrator.queue import GB, tier_for
from orchestrator.records import StoredObject, TaskInputs, TaskRecord
from orchestrator.sharding import data_prefix

if TYPE_CHECKING:
    from orchestrator.manifest import Manifest, SplitInfo
    from orchestrator.objectstore import ObjectStore
    from orchestrator.protocol.spec import SweepSpec

# The files of a merged adapter a next round starts from (the rest is for people).
START_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
TINY_MODEL_BYTES = 1 * GB
DEFAULT_TASK_BYTES = 16 * GB


class RoundInputsMissing(RuntimeError):
    """A round's start adapter is not (or not wholly) in the store."""


def trial_prefix(job_id: str, trial: int) -> str:
    return f"jobs/{job_id}/trials/{trial}/"


def merged_prefix(job_id: str, trial: int, round: int) -> str:
    """Where the merged adapter of (trial, round) lives: a PEFT adapter folder."""
    return f"{trial_prefix(job_id, trial)}r{round}/merged/"


def requirement_bytes(spec: SweepSpec) -> int:
    """Accelerator memory one shard task needs (see the module docstring)."""
    if spec.requirements.gpu_memory_gb is not None:
        return int(spec.requirements.gpu_memory_gb * GB)
    if spec.base_model_kind == "builtin":
        return TINY_MODEL_BYTES
    return DEFAULT_TASK_BYTES


def data_object(job_id: str, split: SplitInfo) -> StoredObject:
    """A split of the job's sharded data as a task input."""
    return StoredObject(
        key=data_prefix(job_id) + split.name,
        sha256=split.sha256,
        bytes=split.bytes,
        name=split.name,
    )


def start_adapter(
    store: ObjectStore, job_id: str, trial: int, round: int
) -> dict[str, StoredObject]:
    """The merged adapter of (trial, round) as the next round's start adapter, read from the
    store (size and sha256 as recorded at upload)."""
    prefix = merged_prefix(job_id, trial, round)
    files: dict[str, StoredObject] = {}
    for name in START_ADAPTER_FILES:
        info = store.head(prefix + name)
        if info is None or not info.sha256:
            raise RoundInputsMissing(f"{prefix}{name} is not in the store")
        files[name] = StoredObject(
            key=prefix + name, sha256=info.sha256, bytes=info.size, name=name
        )
    return files


def round_tasks(
    *,
    job_id: str,
    trial_spec: SweepSpec,
    manifest: Manifest,
    trial: int,
    round: int,
    start: dict[str, StoredObject] | None,
    max_attempts: int,
) -> list[TaskRecord]:
    """The K queued tasks of (trial, round); `start` is None in round 0 only."""
    if (start is None) != (round == 0):
        raise ValueError(f"round {round}: a start adapter is needed after round 0, and only then")
    tier = tier_for(requirement_bytes(trial_spec))
    tasks = []
    for shard, split in enumerate(manifest.shards):
        task = TrainTask.from_spec(
            trial_spec, seed=seed_for(job_id, trial, round, shard, trial_spec.training.seed)
        )
        inputs = TaskInputs(
            base_model=trial_spec.base_model,
            train=[data_object(job_id, split)],
            start_adapter=start,
        )
        tasks.append(
            TaskRecord.new(
                job_id=job_id,
                trial=trial,
                round=round,
                shard=shard,
                tier=tier,
                task=task,
                inputs=inputs,
                max_attempts=max_attempts,
            )
        )
    return tasks
