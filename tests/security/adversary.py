"""What the trust tests' workers upload: honest-looking adapters of a task and the forgeries
the issue lists, built as real safetensors files of the tiny model's exact keys and shapes.

Honest runs of a round share a direction (one common change plus a run's own noise), as
trained shards of one data set do, so the round review sees peers that agree; a second run
of the same task (`honest(..., run=k)`) differs from the first by a little noise only, as a
re-run with the same seed and data does on other hardware. Every honest-looking upload stays
within what the task's optimizer steps can reach (verify/bounds.py): A within PEFT's init
range, B at most half the step bound; only the forgeries meant to exceed it do.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
from cotune.orchestrator.protocol.builtin_models import builtin_config
from cotune.orchestrator.protocol.memory import ModelShape
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.verify.bounds import StepBudget
from cotune.orchestrator.verify.expected import ExpectedAdapter, expected_adapter
from safetensors.numpy import save

Tensors = dict[str, np.ndarray]
SIZE = 0.05  # factor entries of the forgeries that need no budget


def reach(task: TrainTask) -> float:
    """The most the task's steps can move a value from a fresh B (verify/bounds.py)."""
    budget = StepBudget(
        learning_rate=task.learning_rate,
        lr_scheduler=task.lr_scheduler,
        steps=task.max_steps or 1,
        warmup_steps=task.warmup_steps,
        warmup_ratio=task.warmup_ratio,
        weight_decay=task.weight_decay,
    )
    return budget.reach(0.0)


def _init_a(rng: np.random.Generator, r: int, d_in: int) -> np.ndarray:
    """A as PEFT draws it: kaiming_uniform(a=sqrt(5)), within 1/sqrt(d_in)."""
    bound = 1.0 / np.sqrt(d_in)
    return rng.uniform(-bound, bound, (r, d_in))


def expected_of(task: TrainTask, rank: int | None = None) -> ExpectedAdapter:
    config = builtin_config(task.base_model)
    assert config is not None
    lora = task.lora if rank is None else task.lora.model_copy(update={"r": rank})
    return expected_adapter(ModelShape.from_config(config), lora)


def honest(
    task: TrainTask,
    shard: int,
    *,
    run: int = 0,
    start: Mapping[str, np.ndarray] | None = None,
) -> Tensors:
    """An honest-looking upload of shard `shard`: A shared by the round, B = a common change
    + this shard's own (30 %) + this run's (1 %). With `start` (a later round), the start's
    factors with that change added to B."""
    expected = expected_of(task, None if start is None else _rank(start))
    common = np.random.default_rng(1000)
    mine = np.random.default_rng(2000 + shard)
    again = np.random.default_rng(3000 + 17 * shard + run)
    size = 0.5 * reach(task)
    out: Tensors = {}
    for module in expected.modules:
        r = expected.rank
        a = _init_a(common, r, module.d_in)
        change = size * np.tanh(
            common.standard_normal((module.d_out, r))
            + 0.3 * mine.standard_normal((module.d_out, r))
            + 0.01 * again.standard_normal((module.d_out, r))
        )
        if start is not None:
            a = start[module.key_a].astype(np.float64)
            change = start[module.key_b].astype(np.float64) + change
        out[module.key_a] = a.astype(np.float32)
        out[module.key_b] = change.astype(np.float32)
    return out


def plausible(task: TrainTask, seed: int) -> Tensors:
    """Honest-looking in every single check (shapes, values, size, a harmless loss) but not
    the task's run: a change in a direction of its own, as a worker that skipped the work
    and sent something small would upload."""
    expected = expected_of(task)
    rng = np.random.default_rng(5000 + seed)
    size = 0.5 * reach(task)
    out: Tensors = {}
    for module in expected.modules:
        out[module.key_a] = _init_a(rng, expected.rank, module.d_in).astype(np.float32)
        b = size * np.tanh(rng.standard_normal((module.d_out, expected.rank)))
        out[module.key_b] = b.astype(np.float32)
    return out


def scaled(tensors: Tensors, factor: float) -> Tensors:
    """Every lora_B times `factor`: the change scaled up to dominate a merge."""
    return {
        k: (v * factor if ".lora_B." in k else v).astype(np.float32) for k, v in tensors.items()
    }


def random_weights(task: TrainTask, seed: int = 7) -> Tensors:
    """Noise of the right shapes, large enough to wreck the model's loss."""
    rng = np.random.default_rng(seed)
    return {
        key: (3.0 * rng.standard_normal(shape)).astype(np.float32)
        for key, shape in expected_of(task).shapes.items()
    }


def with_nan(tensors: Tensors) -> Tensors:
    out = {k: v.copy() for k, v in tensors.items()}
    first = sorted(out)[0]
    out[first].flat[3] = np.nan
    return out


def encode(tensors: Mapping[str, np.ndarray]) -> bytes:
    return save(dict(tensors), metadata={"format": "pt"})


def forged(header: Any, data: bytes, *, length: int | None = None) -> bytes:
    """A file of an 8-byte length, `header` (JSON-encoded unless bytes) and `data`."""
    import json

    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def load(data: bytes) -> Tensors:
    from safetensors.numpy import load as load_bytes

    return dict(load_bytes(data))


def _rank(start: Mapping[str, np.ndarray]) -> int:
    key = next(k for k in start if k.endswith(".lora_A.weight"))
    return int(start[key].shape[0])
