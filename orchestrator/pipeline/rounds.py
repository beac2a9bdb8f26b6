"""The K shard tasks of one (trial, round): what each trains, from where, on what it needs.

Task t of round r trains shard s of the job's data, starting from the trial's merged
adapter of round r-1 (a fresh LoRA init in round 0), with the trial's concrete settings
(`SweepSpec.with_params`) and a seed of its own (`seed_for(job, trial, round, shard)`), so
whoever trains it, and however often, it is the same run. With `training.lr_schedule_span:
trial` its learning rate follows its slice of one schedule over the trial's rounds
(`schedule_steps`, `schedule_offset`), not a warmup and decay of its own.

Placement: a task sits in the memory tier (orchestrator/control/tiers.py) of what it needs:
`requirements.gpu_memory_gb` when the spec gives it, else the memory estimator's figure for
the trial's settings on the base model's architecture (orchestrator/pipeline/placement.py).

Object keys (orchestrator/data/layout.py): the inputs under jobs/<job>/data/, the start
adapter in the previous round's merged/ folder, a staged base model (an s3:// or local-folder
one: pipeline/modelstage.py) at models/<sha256>/model.tar; a hub id or a built-in model is
handed to workers by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cotune.orchestrator.control.records import StoredObject, TaskInputs, TaskRecord
from cotune.orchestrator.control.tiers import tier_for
from cotune.orchestrator.data.layout import data_key, merged_prefix
from cotune.orchestrator.pipeline.placement import requirement_bytes
from cotune.orchestrator.protocol.task import TrainTask, seed_for

if TYPE_CHECKING:
    from cotune.orchestrator.data.manifest import Manifest, SplitInfo
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.protocol.spec import SweepSpec

# The files of a merged adapter a next round starts from (the rest is for people).
START_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class RoundInputsMissing(RuntimeError):
    """A round's start adapter is not (or not wholly) in the store."""


def data_object(job_id: str, split: SplitInfo) -> StoredObject:
    """A split of the job's sharded data as a task input."""
    return StoredObject(
        key=data_key(job_id, split.name),
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
    store: ObjectStore | None = None,
    staged_model: StoredObject | None = None,
) -> list[TaskRecord]:
    """The K queued tasks of (trial, round); `start` is None in round 0 only.

    `store` (the coordinator's) is where an s3:// base model's config.json is read for
    placement; `staged_model` the archive of the spec's s3:// or local-folder base model,
    which every task downloads instead of the name.
    """
    if (start is None) != (round == 0):
        raise ValueError(f"round {round}: a start adapter is needed after round 0, and only then")
    tier = tier_for(requirement_bytes(trial_spec, store))
    steps = trial_spec.training.max_steps
    span: dict[str, int] = {}
    if trial_spec.training.lr_schedule_span == "trial" and isinstance(steps, int):
        # One schedule over the trial: round r trains steps [r * steps, (r + 1) * steps).
        span = {"schedule_steps": steps * trial_spec.rounds, "schedule_offset": steps * round}
    tasks = []
    for shard, split in enumerate(manifest.shards):
        task = TrainTask.from_spec(
            trial_spec,
            seed=seed_for(job_id, trial, round, shard, trial_spec.training.seed),
            **span,
        )
        inputs = TaskInputs(
            base_model=staged_model or trial_spec.base_model,
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
