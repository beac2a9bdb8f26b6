"""Helpers for the verify tests: a small model shape, its expected adapter, and safetensors
files written honestly (safetensors.numpy) or byte by byte (to forge hostile ones)."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cotune.orchestrator.protocol.memory import ModelShape
from cotune.orchestrator.protocol.task import LoraSettings, TrainTask
from cotune.orchestrator.verify.expected import ExpectedAdapter, expected_adapter
from safetensors.numpy import save_file

#: Grouped-query attention (kv_heads < heads) so q and k/v widths differ; non-square MLP.
SMALL = ModelShape(hidden=16, intermediate=40, layers=2, heads=4, kv_heads=2, vocab=64)
RANK = 3


@pytest.fixture
def expected() -> ExpectedAdapter:
    return expected_adapter(SMALL, LoraSettings(r=RANK, target_modules="all-linear"))


def honest_tensors(
    expected: ExpectedAdapter, seed: int = 0, dtype: Any = np.float32
) -> dict[str, np.ndarray]:
    """Gaussian factors of exactly the expected keys and shapes."""
    rng = np.random.default_rng(seed)
    return {key: rng.standard_normal(shape).astype(dtype) for key, shape in expected.shapes.items()}


def write_tensors(path: Path, tensors: Mapping[str, np.ndarray]) -> Path:
    save_file(dict(tensors), str(path), metadata={"format": "pt"})
    return path


def forge(path: Path, header: Any, data: bytes, *, length: int | None = None) -> Path:
    """A file of an 8-byte length, `header` (JSON-encoded unless bytes) and `data`."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    declared = len(raw) if length is None else length
    path.write_bytes(struct.pack("<Q", declared) + raw + data)
    return path


def layout(path: Path) -> tuple[dict[str, Any], bytes]:
    """The (header, data) of a safetensors file, to alter and `forge` again."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


#: LoRA settings of the real PEFT adapters: every projection, and a few at another rank.
PEFT_SETTINGS: dict[str, LoraSettings] = {
    "all-linear": LoraSettings(r=4, alpha=8, target_modules="all-linear"),
    "three": LoraSettings(r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
}


def tiny_task(lora: LoraSettings, base_model: str) -> TrainTask:
    return TrainTask(
        base_model=base_model,
        quantization={"type": "none"},
        gradient_checkpointing=False,
        lora=lora,
    )


@pytest.fixture(scope="session")
def peft_adapters(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """Adapters of the tiny Llama saved by PEFT through the worker's own code path
    (worker/training.py `peft_model`), with B filled with noise so loading them is visible."""
    pytest.importorskip("peft", reason="saving a PEFT adapter needs the worker extra")
    import torch
    from cotune.worker.training import peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("peft-adapters")
    folders = {}
    for index, (name, lora) in enumerate(PEFT_SETTINGS.items()):
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
        model = peft_model(tiny_task(lora, str(tiny_model_dir)), base, None)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if "lora_B" in key:
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(str(root / name), safe_serialization=True)
        folders[name] = root / name
    return folders
