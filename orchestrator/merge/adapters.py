"""Reading PEFT LoRA adapter folders: validation up front, then one module's tensors at a time.

`read_adapter` parses adapter_config.json and the safetensors header (no tensor data), and
`check_compatible` compares K adapters, so every structural error surfaces before a merge
writes anything. `load_module` then reads one module's factors from every adapter. Each file
is opened per module because safetensors memory-maps it: a handle held open for the whole
merge keeps every page it touched resident, and peak memory would grow to all inputs.
Only safetensors is read; pickle-based checkpoints are refused, never loaded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from cotune.orchestrator.merge.base import LoraFactors, MergeError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
METRICS_FILE = "metrics.json"
#: Weight files that would need unpickling to read; cotune refuses them by name.
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth", "pytorch_model.bin")
#: PEFT's key prefix in front of the base model's module path.
KEY_PREFIX = "base_model.model."
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
TOKEN_KEYS = ("tokens", "train_tokens")

_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_EMBEDDING_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<part>[AB])$")


class AdapterConfig(BaseModel):
    """The fields of PEFT's adapter_config.json that a merge depends on.

    Unknown fields are ignored rather than forbidden: this is PEFT's format, whose dozens of
    version-dependent fields say nothing about the factors; the output copies them through.
    """

    model_config = ConfigDict(extra="ignore")

    peft_type: str = "LORA"
    r: int = Field(gt=0)
    lora_alpha: float
    use_rslora: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    base_model_name_or_path: str | None = None
    revision: str | None = None
    fan_in_fan_out: bool = False
    use_dora: bool = False
    lora_bias: bool = False

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return {} if value is None else value

    @field_validator("peft_type")
    @classmethod
    def _lora_only(cls, value: str) -> str:
        if value != "LORA":
            raise ValueError(f"only LoRA adapters can be merged, this one is {value}")
        return value

    @field_validator("lora_alpha")
    @classmethod
    def _finite_alpha(cls, value: float) -> float:
        if not math.isfinite(value) or value == 0:
            raise ValueError(f"must be a finite non-zero number, got {value}")
        return value

    @field_validator("use_dora")
    @classmethod
    def _no_dora(cls, value: bool) -> bool:
        if value:
            raise ValueError("DoRA adapters (magnitude vectors) cannot be merged as LoRA factors")
        return value

    @field_validator("lora_bias")
    @classmethod
    def _no_bias(cls, value: bool) -> bool:
        if value:
            raise ValueError("adapters with a trained lora_B bias cannot be merged")
        return value

    def scale(self, module: str, rank: int) -> float:
        """PEFT's scaling for `module` (lora_alpha / r, or / sqrt(r) with use_rslora)."""
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def rank_of(self, module: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    # The same matching as peft.utils.other.get_pattern_key: a pattern matches a suffix of
    # the module path at a dot boundary (or the whole path).
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA module of an adapter, from the safetensors header (no data read)."""

    name: str
    key_a: str
    key_b: str
    rank: int
    d_in: int
    d_out: int
    dtype: str
    scale: float


@dataclass(frozen=True)
class Adapter:
    """A validated PEFT LoRA adapter folder."""

    path: Path
    config: AdapterConfig
    raw_config: dict[str, Any]
    modules: tuple[ModuleSpec, ...]
    tokens: int | None

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE

    def module(self, name: str) -> ModuleSpec:
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, ModuleSpec]:
        return {m.name: m for m in self.modules}


def read_adapter(path: Path) -> Adapter:
    """Validate one adapter folder's files, config and tensor header; read no tensor data."""
    if not path.exists():
        raise MergeError(f"adapter {path}: no such folder")
    if not path.is_dir():
        raise MergeError(f"adapter {path}: not a folder (give the PEFT adapter's folder)")
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise MergeError(f"adapter {path}: missing {CONFIG_FILE}")
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        pickled = [name for name in PICKLE_FILES if (path / name).exists()]
        if pickled:
            raise MergeError(
                f"adapter {path}: {pickled[0]} is a pickle-based checkpoint, which cotune never "
                f"loads (unpickling runs arbitrary code); re-save the adapter as {WEIGHTS_FILE} "
                "(PEFT's save_pretrained does by default)"
            )
        raise MergeError(f"adapter {path}: missing {WEIGHTS_FILE}")
    raw = _read_json(config_file)
    try:
        config = AdapterConfig.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in err.errors()
        )
        raise MergeError(f"adapter {path}: {CONFIG_FILE}: {problems}") from None
    modules = _read_modules(weights_file, config)
    return Adapter(
        path=path, config=config, raw_config=raw, modules=modules, tokens=_read_tokens(path)
    )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise MergeError(f"{file}: not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise MergeError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise MergeError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_tokens(path: Path) -> int | None:
    file = path / METRICS_FILE
    if not file.exists():
        return None
    data = _read_json(file)
    for key in TOKEN_KEYS:
        if key in data:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise MergeError(f"{file}: {key}: must be a non-negative number, got {value!r}")
            if not math.isfinite(value):
                raise MergeError(f"{file}: {key}: must be finite, got {value!r}")
            return int(value)
    return None


def _read_modules(file: Path, config: AdapterConfig) -> tuple[ModuleSpec, ...]:
    from safetensors import SafetensorError, safe_open

    parts: dict[str, dict[str, tuple[str, list[int], str]]] = {}
    try:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                match = _LINEAR_KEY.match(key) or _EMBEDDING_KEY.match(key)
                if match is None:
                    raise MergeError(
                        f"adapter {file.parent}: tensor {key!r} is not a LoRA factor "
                        "(lora_A/lora_B); modules_to_save, DoRA magnitudes, biases and "
                        "trainable tokens cannot be merged"
                    )
                view = handle.get_slice(key)
                entry = (key, list(view.get_shape()), str(view.get_dtype()))
                parts.setdefault(match["module"], {})[match["part"]] = entry
    except SafetensorError as err:
        raise MergeError(
            f"adapter {file.parent}: {WEIGHTS_FILE} is not valid safetensors: {err}"
        ) from None
    if not parts:
        raise MergeError(f"adapter {file.parent}: {WEIGHTS_FILE} holds no LoRA factors")
    return tuple(_module_spec(file.parent, module, pair, config) for module, pair in parts.items())


def _module_spec(
    path: Path, module: str, pair: dict[str, tuple[str, list[int], str]], config: AdapterConfig
) -> ModuleSpec:
    for part in ("A", "B"):
        if part not in pair:
            other = next(iter(pair.values()))[0]
            raise MergeError(f"adapter {path}: tensor {other!r} has no matching lora_{part}")
    (key_a, shape_a, dtype_a), (key_b, shape_b, dtype_b) = pair["A"], pair["B"]
    for key, shape, dtype in ((key_a, shape_a, dtype_a), (key_b, shape_b, dtype_b)):
        if len(shape) != 2:
            raise MergeError(
                f"adapter {path}: tensor {key!r} has shape {shape}; only 2-D factors "
                "(Linear and Embedding layers) can be merged"
            )
        if dtype not in FLOAT_DTYPES:
            raise MergeError(
                f"adapter {path}: tensor {key!r} has dtype {dtype}; expected one of "
                f"{', '.join(FLOAT_DTYPES)}"
            )
    if shape_a[0] != shape_b[1]:
        raise MergeError(
            f"adapter {path}: tensors {key_a!r} {shape_a} and {key_b!r} {shape_b} disagree on "
            "the rank (A is r x d_in, B is d_out x r)"
        )
    name = module.removeprefix(KEY_PREFIX)
    rank = shape_a[0]
    expected = config.rank_of(name)
    if rank != expected:
        raise MergeError(
            f"adapter {path}: tensor {key_a!r} has rank {rank} but {CONFIG_FILE} says "
            f"r={expected} for this module"
        )
    return ModuleSpec(
        name=name,
        key_a=key_a,
        key_b=key_b,
        rank=rank,
        d_in=shape_a[1],
        d_out=shape_b[0],
        dtype=dtype_a,
        scale=config.scale(name, rank),
    )


def check_compatible(adapters: Sequence[Adapter]) -> None:
    """The adapters share a base model, layout, module set and module shapes (ranks may differ)."""
    first = adapters[0]
    for other in adapters[1:]:
        for field in ("base_model_name_or_path", "revision", "fan_in_fan_out"):
            mine, theirs = getattr(first.config, field), getattr(other.config, field)
            if mine != theirs:
                raise MergeError(
                    f"adapter {other.path}: {CONFIG_FILE} {field} is {theirs!r} but adapter "
                    f"{first.path} has {mine!r}; only adapters of the same base model merge"
                )
        names, other_names = set(first._by_name), set(other._by_name)
        if names != other_names:
            missing, extra = sorted(names - other_names), sorted(other_names - names)
            if missing:
                spec = first.module(missing[0])
                raise MergeError(
                    f"adapter {other.path}: lacks tensor {spec.key_a!r} that adapter "
                    f"{first.path} has (target modules differ: {len(missing)} missing)"
                )
            spec = other.module(extra[0])
            raise MergeError(
                f"adapter {other.path}: has tensor {spec.key_a!r} that adapter {first.path} "
                f"lacks (target modules differ: {len(extra)} extra)"
            )
        for spec in first.modules:
            theirs = other.module(spec.name)
            if (spec.d_out, spec.d_in) != (theirs.d_out, theirs.d_in):
                raise MergeError(
                    f"adapter {other.path}: tensors {theirs.key_b!r} @ {theirs.key_a!r} make a "
                    f"{theirs.d_out} x {theirs.d_in} delta, but adapter {first.path}'s make "
                    f"{spec.d_out} x {spec.d_in}"
                )


def load_module(adapters: Sequence[Adapter], name: str) -> list[LoraFactors]:
    """Every adapter's factors for module `name`, as float32, checked finite."""
    from safetensors import safe_open

    factors: list[LoraFactors] = []
    with ExitStack() as stack:
        for adapter in adapters:
            spec = adapter.module(name)
            handle = stack.enter_context(safe_open(str(adapter.weights_file), framework="pt"))
            a = _finite(adapter, spec.key_a, handle.get_tensor(spec.key_a))
            b = _finite(adapter, spec.key_b, handle.get_tensor(spec.key_b))
            factors.append(LoraFactors(a=a, b=b, scale=spec.scale))
    return factors


def _finite(adapter: Adapter, key: str, tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.to(torch.float32)
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise MergeError(
            f"adapter {adapter.path}: tensor {key!r} has {bad} NaN/Inf value(s) of "
            f"{tensor.numel()}; this adapter's training diverged or the file is corrupt"
        )
    return tensor
