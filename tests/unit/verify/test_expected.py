"""The key set and shapes a task implies are exactly what PEFT saves for the tiny Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
from cotune.orchestrator.protocol.builtin_models import TINY_LLAMA_CONFIG
from cotune.orchestrator.protocol.memory import ModelShape
from cotune.orchestrator.protocol.task import LoraSettings
from cotune.orchestrator.verify.expected import expected_adapter
from safetensors import safe_open

from tests.unit.verify.conftest import PEFT_SETTINGS, RANK, SMALL


@pytest.mark.parametrize("name", sorted(PEFT_SETTINGS))
def test_keys_and_shapes_match_a_real_peft_adapter(
    peft_adapters: dict[str, Path], name: str
) -> None:
    lora = PEFT_SETTINGS[name]
    expected = expected_adapter(ModelShape.from_config(TINY_LLAMA_CONFIG), lora)
    with safe_open(str(peft_adapters[name] / "adapter_model.safetensors"), "np") as handle:
        saved = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
    assert saved == dict(expected.shapes)
    print(f"{name}: {len(saved)} tensors, as PEFT saved them")


def test_widths_follow_the_model_shape() -> None:
    """Grouped-query attention: k/v project to kv_heads x head_dim, q and o to heads x it."""
    expected = expected_adapter(SMALL, LoraSettings(r=RANK, target_modules="all-linear"))
    shapes = expected.shapes
    layer = "base_model.model.model.layers.1"
    assert shapes[f"{layer}.self_attn.q_proj.lora_B.weight"] == (16, RANK)
    assert shapes[f"{layer}.self_attn.k_proj.lora_B.weight"] == (8, RANK)
    assert shapes[f"{layer}.self_attn.o_proj.lora_A.weight"] == (RANK, 16)
    assert shapes[f"{layer}.mlp.down_proj.lora_A.weight"] == (RANK, 40)
    assert shapes[f"{layer}.mlp.up_proj.lora_B.weight"] == (40, RANK)
    assert len(shapes) == 2 * 7 * SMALL.layers


def test_a_target_list_adapts_only_those_modules() -> None:
    expected = expected_adapter(SMALL, LoraSettings(r=2, target_modules=["v_proj"]))
    assert [m.path for m in expected.modules] == [
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.v_proj",
    ]


def test_an_unknown_target_module_is_named() -> None:
    with pytest.raises(ValueError, match="unknown lm_head"):
        expected_adapter(SMALL, LoraSettings(target_modules=["lm_head"]))
