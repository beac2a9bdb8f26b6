"""Per-task limits on what a worker claims: the checkpoint quota, and the steps a task has.

Checkpoint quota. A checkpoint archive (worker/checkpoint.py) holds the LoRA adapter (fp32:
4 bytes a parameter), the optimizer's state (AdamW: two fp32 moments, 8 bytes a parameter;
the 8-bit optimizers less), the LR scheduler, RNG states, the trainer's state and the
tokenizer files. Its quota is

    4 x adapter bytes + CHECKPOINT_ALLOWANCE_BYTES (256 MiB)

(the adapter once, its two moments, and one adapter's worth of slack for the optimizer's
bookkeeping and the tar framing; the allowance for tokenizer files, a few MB to ~40 MB,
RNG and trainer state). The adapter's size needs the base model's shape: the config.json
the reconciler recorded with the task (TaskRecord.model_json), else the one the
coordinator has for a built-in model (protocol/builtin_models.py) or a local folder. For
any other base model (a hub id) the task's memory tier bounds it: the adapter, its
gradients and the optimizer state (16 bytes a parameter, of which a checkpoint holds 12)
live in the accelerator memory the task was placed by. Every quota is capped at
CHECKPOINT_MAX_BYTES. The presigned POST of a checkpoint carries the quota, and the
coordinator checks the claimed size against it before it reads (and hashes) a byte, so
hashing a checkpoint costs at most the quota.

Steps. A checkpoint's claimed step is at most the optimizer steps the task trains:
`max_steps`, or with `num_epochs` an upper bound from the shard's rows (each row is at
most one sequence; packing only joins rows): ceil(epochs x ceil(ceil(rows / micro_batch) /
grad_accum)). Without max_steps or a manifest there is no upper bound (None).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.tiers import TIERS
from cotune.orchestrator.data.manifest import Manifest, ManifestError
from cotune.orchestrator.protocol.builtin_models import builtin_config
from cotune.orchestrator.protocol.memory import PROJECTIONS, ModelShape, adapted_modules
from cotune.orchestrator.protocol.task import TrainTask

if TYPE_CHECKING:
    from cotune.orchestrator.control.records import TaskRecord

MiB = 1 << 20
CHECKPOINT_MAX_BYTES = 32 << 30  # adapter + optimizer state (two moments) + RNG, as a tar
CHECKPOINT_ALLOWANCE_BYTES = 256 * MiB  # tokenizer files, RNG, scheduler, trainer state
ADAPTER_BYTES_PER_PARAM = 4  # LoRA factors train (and are saved) in fp32


def adapter_params(shape: ModelShape, task: TrainTask) -> int:
    """The LoRA parameters `task` adds to a Llama-family model of shape `shape`."""
    per_layer = sum(
        task.lora.r * (shape.width(PROJECTIONS[m][0]) + shape.width(PROJECTIONS[m][1]))
        for m in adapted_modules(task.lora.target_modules)
    )
    return per_layer * shape.layers


def checkpoint_quota(task: TrainTask, tier: str, config: Mapping[str, Any] | None = None) -> int:
    """The largest checkpoint archive a task may upload (module docstring). `config` is
    the base model's config.json where the reconciler recorded it with the task."""
    config = config if config is not None else model_config(task.base_model)
    try:
        shape = ModelShape.from_config(config) if config is not None else None
        adapter = adapter_params(shape, task) * ADAPTER_BYTES_PER_PARAM if shape else None
    except (ValueError, KeyError, TypeError):  # an architecture the estimator does not know
        adapter = None
    if adapter is not None:
        quota = 4 * adapter + CHECKPOINT_ALLOWANCE_BYTES
    else:
        ceiling = {t.name: t.ceiling_bytes for t in TIERS}.get(tier, CHECKPOINT_MAX_BYTES)
        quota = ceiling + CHECKPOINT_ALLOWANCE_BYTES
    return min(quota, CHECKPOINT_MAX_BYTES)


def max_steps(task: TrainTask, rows: int | None) -> int | None:
    """The optimizer steps `task` trains at most on a shard of `rows` rows (None: unknown)."""
    if task.max_steps is not None:
        return task.max_steps
    if rows is None:
        return None
    batches = math.ceil(rows / task.micro_batch_size)
    per_epoch = max(math.ceil(batches / task.gradient_accumulation_steps), 1)
    return math.ceil(task.num_epochs * per_epoch)


def task_rows(
    train: TrainTask, task: TaskRecord, manifest_json: Callable[[], str | None]
) -> int | None:
    """The rows of a task training by epochs (its train files' in the job's manifest); None
    for one training max_steps (then `manifest_json` is never called) or when not known."""
    if train.max_steps is not None:
        return None
    return shard_rows(manifest_json(), (o.sha256 for o in task.inputs().train))


def shard_rows(manifest_json: str | None, sha256s: Iterable[str]) -> int | None:
    """The rows of the manifest's shards with these sha256s (a task's train files); None if
    there is no manifest or one of the files is not in it."""
    if not manifest_json:
        return None
    try:
        manifest = Manifest.from_json(manifest_json)
    except ManifestError:
        return None
    shards = {split.sha256: split.rows for split in manifest.shards}
    wanted = list(sha256s)
    if not wanted or any(sha not in shards for sha in wanted):
        return None
    return sum(shards[sha] for sha in wanted)


@functools.lru_cache(maxsize=64)
def model_config(base_model: str) -> Mapping[str, Any] | None:
    """The base model's config.json where the coordinator has it: a built-in model, or a
    local folder (read once per process); None otherwise."""
    builtin = builtin_config(base_model)
    if builtin is not None:
        return builtin
    if "://" in base_model:
        return None
    try:
        loaded = json.loads((Path(base_model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return loaded if isinstance(loaded, dict) else None
