"""Forged uploads for the cheaters of tests/security/cheaters.py: the bytes each kind of cheat
sends as adapter_model.safetensors or adapter_config.json.

Everything is built from a template of the right layout (`Tensors`: key -> float32 array):
for round 0 a fresh LoRA init of the task's tensors (A uniform like PEFT's kaiming init, B
zero: the "delta" B A is zero), for later rounds the start adapter the lease hands out. The
forgeries change one thing each (the format, the header, a key, a shape, the dtype, a value,
the scale), so a refusal says which check caught it.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cotune.orchestrator.protocol.builtin_models import builtin_config
from cotune.orchestrator.protocol.memory import ModelShape
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.verify.expected import expected_adapter
from safetensors.numpy import load_file, save

Tensors = dict[str, np.ndarray]

#: GPT-2's attention module names: the keys and target_modules of another architecture.
FOREIGN_MODULES = ("attn.c_attn", "attn.c_proj")


def expected_shapes(task: TrainTask, rank: int | None = None) -> Mapping[str, tuple[int, int]]:
    """Every tensor key and shape an upload of `task` must have (the built-in model's)."""
    config = builtin_config(task.base_model)
    if config is None:
        raise ValueError(f"the cheaters know only built-in models, not {task.base_model!r}")
    lora = task.lora if rank is None else task.lora.model_copy(update={"r": rank})
    return expected_adapter(ModelShape.from_config(config), lora).shapes


def fresh_init(shapes: Mapping[str, tuple[int, int]], seed: int) -> Tensors:
    """What PEFT saves before training: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), B = 0."""
    rng = np.random.default_rng(seed)
    tensors: Tensors = {}
    for key, shape in shapes.items():
        if key.endswith(".lora_A.weight"):
            bound = 1.0 / np.sqrt(shape[1])
            tensors[key] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            tensors[key] = np.zeros(shape, np.float32)
    return tensors


def load(path: Path) -> Tensors:
    return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}


def safetensors_bytes(tensors: Mapping[str, np.ndarray], dtype: Any = np.float32) -> bytes:
    return save({k: np.ascontiguousarray(v.astype(dtype)) for k, v in tensors.items()})


# --- (a) not safetensors ---------------------------------------------------------------------


def pickle_bytes(tensors: Mapping[str, np.ndarray]) -> bytes:
    """`torch.save` of the state dict: a zip of pickles, what `adapter_model.bin` holds."""
    import torch

    buffer = io.BytesIO()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, buffer)
    return buffer.getvalue()


# --- (b) broken safetensors ---------------------------------------------------------------


def truncated(data: bytes) -> bytes:
    """The first half of a good file: the header promises tensors that are not there."""
    return data[: len(data) // 2]


def garbage(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def header_claims_a_terabyte() -> bytes:
    """A header length of 1 TiB in front of a few bytes: a reader that trusts it allocates."""
    return struct.pack("<Q", 1 << 40) + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets"'


def header_of_megabytes(tensors: int = 40_000) -> bytes:
    """A well-formed header of ~2 MiB (tens of thousands of one-element tensors)."""
    entries = {
        f"base_model.model.bomb.{i}.lora_A.weight": {
            "dtype": "F32",
            "shape": [1],
            "data_offsets": [4 * i, 4 * i + 4],
        }
        for i in range(tensors)
    }
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header)) + header + bytes(4 * tensors)


# --- (c) the wrong layout -------------------------------------------------------------------


def foreign_keys(tensors: Tensors) -> Tensors:
    """The same arrays under another architecture's module names (Llama's q_proj and o_proj
    renamed GPT-2's c_attn and c_proj)."""
    renames = {"self_attn.q_proj": FOREIGN_MODULES[0], "self_attn.o_proj": FOREIGN_MODULES[1]}
    out: Tensors = {}
    for key, value in tensors.items():
        for old, new in renames.items():
            key = key.replace(old, new)
        out[key] = value
    return out


def transposed(tensors: Tensors) -> Tensors:
    return {k: np.ascontiguousarray(v.T) for k, v in tensors.items()}


def of_rank(shapes: Mapping[str, tuple[int, int]], seed: int) -> Tensors:
    """Small random factors of the shapes given (another rank's), as if trained."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.02, s).astype(np.float32) for k, s in shapes.items()}


# --- (d), (e), (f) wrong values -------------------------------------------------------------


def trained_looking(template: Tensors, seed: int) -> Tensors:
    """The template with B moved off zero a little, as a few steps of training would."""
    rng = np.random.default_rng(seed)
    return {
        k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) if k.endswith("lora_B.weight") else v
        for k, v in template.items()
    }


def with_value(tensors: Tensors, value: float) -> Tensors:
    """One element of one B factor set to `value` (NaN, Inf)."""
    out = {k: v.copy() for k, v in tensors.items()}
    key = next(k for k in sorted(out) if k.endswith("lora_B.weight"))
    out[key].flat[0] = value
    return out


def scaled(tensors: Tensors, factor: float) -> Tensors:
    """Every B factor times `factor`: the adapter's delta B A scaled by it."""
    return {k: v * factor if k.endswith("lora_B.weight") else v for k, v in tensors.items()}


def random_like(template: Tensors, seed: int, *, camouflaged: bool) -> Tensors:
    """Random factors of the template's shapes: N(0, 1) everywhere (naive), or an init-like A
    with a B of a trained adapter's size (camouflaged: no norm check can tell it apart)."""
    rng = np.random.default_rng(seed)
    if not camouflaged:
        return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in template.items()}
    out: Tensors = {}
    for key, value in template.items():
        if key.endswith("lora_A.weight"):
            bound = 1.0 / np.sqrt(value.shape[1])
            out[key] = rng.uniform(-bound, bound, value.shape).astype(np.float32)
        else:
            out[key] = rng.normal(0, 0.01, value.shape).astype(np.float32)
    return out


# --- adapter_config.json --------------------------------------------------------------------


def adapter_config(
    task: TrainTask, *, r: int | None = None, target_modules: list[str] | None = None
) -> bytes:
    """A PEFT adapter_config.json for `task`, or one that lies about its rank or modules."""
    modules = target_modules or task.lora.target_modules
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": task.base_model,
        "r": r or task.lora.r,
        "lora_alpha": task.lora.alpha,
        "lora_dropout": task.lora.dropout,
        "target_modules": modules if isinstance(modules, list) else "all-linear",
        "bias": "none",
    }
    return (json.dumps(config, indent=2) + "\n").encode()
