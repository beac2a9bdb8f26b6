"""Helpers for the merge tests: random LoRA factors and PEFT-format adapter folders on disk."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from cotune.orchestrator.merge.base import LoraFactors

#: A small model's LoRA targets: module path -> (d_out, d_in); non-square on purpose.
MODULES: dict[str, tuple[int, int]] = {
    "model.layers.0.self_attn.q_proj": (24, 16),
    "model.layers.0.mlp.up_proj": (40, 16),
    "model.layers.0.mlp.down_proj": (16, 40),
}
BASE = "example/base-model"


def random_factors(
    generator: torch.Generator,
    d_out: int,
    d_in: int,
    ranks: Sequence[int],
    scales: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> list[LoraFactors]:
    """Gaussian LoRA pairs (not PEFT's zero-B init: a zero delta would test nothing)."""
    return [
        LoraFactors(
            a=torch.randn(r, d_in, generator=generator, dtype=dtype),
            b=torch.randn(d_out, r, generator=generator, dtype=dtype),
            scale=s,
        )
        for r, s in zip(ranks, scales, strict=True)
    ]


def lora_key(module: str, part: str) -> str:
    return f"base_model.model.{module}.lora_{part}.weight"


def write_adapter(
    folder: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    r: int,
    alpha: float,
    base: str | None = BASE,
    tokens: int | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """A PEFT-format adapter folder (config, safetensors, optional metrics.json)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    targets = sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in tensors})
    body: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": None,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "base_model_name_or_path": base,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "fan_in_fan_out": False,
    }
    body.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(body))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors")
    )
    if tokens is not None:
        (folder / "metrics.json").write_text(json.dumps({"tokens": tokens, "loss": 1.0}))
    return folder


def random_adapter(
    folder: Path,
    seed: int,
    *,
    r: int = 4,
    alpha: float = 8.0,
    modules: Mapping[str, tuple[int, int]] = MODULES,
    dtype: torch.dtype = torch.float32,
    tokens: int | None = 1000,
    **kwargs: Any,
) -> Path:
    """An adapter with seeded Gaussian factors for every module in `modules`."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, (d_out, d_in) in modules.items():
        tensors[lora_key(module, "A")] = torch.randn(r, d_in, generator=generator).to(dtype)
        tensors[lora_key(module, "B")] = torch.randn(d_out, r, generator=generator).to(dtype)
    return write_adapter(folder, tensors, r=r, alpha=alpha, tokens=tokens, **kwargs)


@pytest.fixture
def two_adapters(tmp_path: Path) -> list[Path]:
    """Two valid, compatible adapters with token counts 1000 and 3000."""
    return [
        random_adapter(tmp_path / "a", 1, tokens=1000),
        random_adapter(tmp_path / "b", 2, tokens=3000),
    ]
