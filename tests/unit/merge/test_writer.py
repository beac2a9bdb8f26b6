"""The streaming safetensors writer produces files the safetensors library reads back."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from cotune.orchestrator.merge.writer import StreamingSafetensorsWriter, TensorSlot
from safetensors import safe_open
from safetensors.torch import load_file


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F64"])
def test_round_trip_in_every_float_dtype(tmp_path: Path, dtype: str) -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "x.lora_A.weight": torch.randn(3, 5, generator=generator),
        "x.lora_B.weight": torch.randn(7, 3, generator=generator),
        "y.lora_A.weight": torch.randn(1, 1, generator=generator),
    }
    slots = [TensorSlot(name, dtype, tuple(t.shape)) for name, t in tensors.items()]
    path = tmp_path / "out.safetensors"
    with StreamingSafetensorsWriter(path, slots, {"format": "pt"}) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    loaded = load_file(str(path))
    torch_dtype = loaded["x.lora_A.weight"].dtype
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(loaded[name], tensor.to(torch_dtype))
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_out_of_order_or_missing_tensors_are_refused(tmp_path: Path) -> None:
    slots = [TensorSlot("a", "F32", (2,)), TensorSlot("b", "F32", (2,))]
    writer = StreamingSafetensorsWriter(tmp_path / "f.safetensors", slots, {})
    with pytest.raises(ValueError, match="expected tensor 'a' next, got 'b'"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(ValueError, match="has shape"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="closed after 1 of 2 tensors"):
        writer.close()
