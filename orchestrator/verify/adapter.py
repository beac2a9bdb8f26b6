"""Check an uploaded adapter_model.safetensors against what its task implies, and write the
adapter_config.json the coordinator trusts in place of the uploaded one.

`check_adapter` runs the header checks (header.py), then compares the tensors with the
expected set (expected.py): exactly the expected keys, each of the expected shape, every
value finite. Only then are the factors returned, as float32 numpy arrays. Shapes and rank
come from the task, never from the upload; the upload's own adapter_config.json is never
read, `coordinator_config` writes the one that goes next to the checked weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cotune.orchestrator.protocol.memory import adapted_modules
from cotune.orchestrator.protocol.task import TrainTask
from cotune.orchestrator.verify.expected import AdapterFactors, ExpectedAdapter, Factors
from cotune.orchestrator.verify.header import MAX_HEADER_BYTES, Header, TensorEntry, parse_header
from cotune.orchestrator.verify.issues import Issue

#: Little-endian numpy dtypes of the safetensors dtypes read directly (BF16 is widened by hand).
_NUMPY_DTYPES = {"F32": "<f4", "F16": "<f2"}


@dataclass(frozen=True)
class Limits:
    """Bounds on what an upload may declare before it is refused unread.

    `extra_tensors` unexpected entries are named one by one; more than that and the header
    is refused as a whole, so a header of a million entries costs no more than its bytes.
    """

    max_header_bytes: int = MAX_HEADER_BYTES
    extra_tensors: int = 16


@dataclass(frozen=True)
class AdapterCheck:
    """The verdict on one upload: its issues, and its factors when there are none."""

    issues: tuple[Issue, ...]
    factors: AdapterFactors | None = None

    @property
    def ok(self) -> bool:
        return not self.issues


def check_adapter(
    weights_path: Path, expected: ExpectedAdapter, *, limits: Limits | None = None
) -> AdapterCheck:
    """Check the safetensors file at `weights_path` against `expected`; never raises on its
    content. Reads the header, then each tensor once."""
    limits = limits or Limits()
    shapes = expected.shapes
    parsed = parse_header(
        weights_path,
        max_tensors=len(shapes) + limits.extra_tensors,
        max_header_bytes=limits.max_header_bytes,
    )
    if parsed.header is None:
        return AdapterCheck(parsed.issues)
    header = parsed.header
    issues = _key_issues(header, shapes) + _shape_issues(header, shapes, expected.rank)
    sound = {
        key: entry
        for key, entry in header.tensors.items()
        if key in shapes and entry.shape == shapes[key]
    }
    values, read_issues = _read_values(weights_path, header, sound)
    issues += read_issues
    if issues:
        return AdapterCheck(tuple(issues))
    factors = {
        module.path: Factors(a=values[module.key_a], b=values[module.key_b])
        for module in expected.modules
    }
    return AdapterCheck((), factors)


def _key_issues(header: Header, shapes: Mapping[str, tuple[int, int]]) -> list[Issue]:
    issues = [
        Issue(key, f"missing: the task's LoRA config implies this tensor, of shape {shape}")
        for key, shape in shapes.items()
        if key not in header.tensors
    ]
    issues += [
        Issue(key, "unexpected tensor: the task's LoRA config implies no such factor")
        for key in sorted(header.tensors)
        if key not in shapes
    ]
    return issues


def _shape_issues(header: Header, shapes: Mapping[str, tuple[int, int]], rank: int) -> list[Issue]:
    issues = []
    for key, want in shapes.items():
        entry = header.tensors.get(key)
        if entry is None or entry.shape == want:
            continue
        got = entry.shape
        message = f"shape {list(got)}, expected {list(want)}"
        # The rank is lora_A's first and lora_B's second dimension.
        rank_axis = 0 if key.endswith(".lora_A.weight") else 1
        if len(got) == 2 and got[rank_axis] != rank and got[1 - rank_axis] == want[1 - rank_axis]:
            message += f": rank {got[rank_axis]}, but the task's r is {rank}"
        issues.append(Issue(key, message))
    return issues


def _read_values(
    path: Path, header: Header, entries: Mapping[str, TensorEntry]
) -> tuple[dict[str, np.ndarray], list[Issue]]:
    """Each entry's values as float32, and an issue for each one not all finite."""
    values: dict[str, np.ndarray] = {}
    issues: list[Issue] = []
    try:
        with open(path, "rb") as handle:
            for key, entry in entries.items():
                handle.seek(header.data_start + entry.begin)
                raw = handle.read(entry.end - entry.begin)
                if len(raw) != entry.end - entry.begin:
                    # The header matched the file's size when parsed: it changed since.
                    issues.append(Issue("file", f"truncated while reading {key!r}"))
                    return values, issues
                array = _decode(raw, entry)
                bad = _non_finite(key, array)
                if bad:
                    issues.append(bad)
                values[key] = array
    except OSError as err:
        issues.append(Issue("file", f"cannot be read: {err.strerror or err}"))
    return values, issues


def _decode(raw: bytes, entry: TensorEntry) -> np.ndarray:
    if entry.dtype == "BF16":
        # bfloat16 is the top half of a float32: widen the bits, then reinterpret.
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        array = bits.view(np.float32)
    else:
        array = np.frombuffer(raw, dtype=_NUMPY_DTYPES[entry.dtype]).astype(np.float32)
    return array.reshape(entry.shape)


def _non_finite(key: str, array: np.ndarray) -> Issue | None:
    nan = int(np.isnan(array).sum())
    inf = int(np.isinf(array).sum())
    if not nan and not inf:
        return None
    counts = " and ".join(f"{n} {name}" for n, name in ((nan, "NaN"), (inf, "Inf")) if n)
    return Issue(key, f"{counts} of {array.size} values: training diverged or the file is corrupt")


def coordinator_config(task: TrainTask, base_model_name_or_path: str) -> dict[str, Any]:
    """The adapter_config.json for a checked upload of `task`, written from the task alone.

    PEFT LoraConfig fields. target_modules lists the projections by name (what the keys were
    checked against) rather than "all-linear", whose meaning depends on the model PEFT loads
    it into. The fields merge/card.py's `merged_config` reads or overrides are all present,
    so a merge of checked uploads takes its config from here. init_lora_weights True: a
    module PEFT would target but the file lacked starts at a zero delta, not at random.
    """
    lora = task.lora
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": task.base_model_revision,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": adapted_modules(lora.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
