"""check_adapter: an honest adapter passes with its factors; every kind of wrong tensor is
named; the coordinator's own adapter_config.json loads the checked weights through PEFT."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cotune.orchestrator.protocol.builtin_models import TINY_LLAMA_CONFIG
from cotune.orchestrator.protocol.memory import ModelShape
from cotune.orchestrator.protocol.task import LoraSettings
from cotune.orchestrator.verify.adapter import Limits, check_adapter, coordinator_config
from cotune.orchestrator.verify.expected import ExpectedAdapter, expected_adapter
from safetensors.numpy import load_file

from tests.unit.verify.conftest import (
    PEFT_SETTINGS,
    RANK,
    SMALL,
    forge,
    honest_tensors,
    layout,
    tiny_task,
    write_tensors,
)

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"


def _messages(path: Path, expected: ExpectedAdapter, limits: Limits | None = None) -> list[str]:
    check = check_adapter(path, expected, limits=limits)
    assert check.ok is (not check.issues)
    assert (check.factors is None) is (not check.ok)
    return [str(issue) for issue in check.issues]


def test_an_honest_adapter_passes_with_its_factors(
    tmp_path: Path, expected: ExpectedAdapter
) -> None:
    tensors = honest_tensors(expected)
    check = check_adapter(write_tensors(tmp_path / "a.safetensors", tensors), expected)
    assert check.ok, check.issues
    assert check.factors is not None
    assert set(check.factors) == {m.path for m in expected.modules}
    for module in expected.modules:
        factors = check.factors[module.path]
        assert factors.a.dtype == np.float32
        np.testing.assert_array_equal(factors.a, tensors[module.key_a])
        np.testing.assert_array_equal(factors.b, tensors[module.key_b])


def test_half_precision_adapters_pass_and_widen_exactly(
    tmp_path: Path, expected: ExpectedAdapter
) -> None:
    tensors = honest_tensors(expected, dtype=np.float16)
    check = check_adapter(write_tensors(tmp_path / "f16.safetensors", tensors), expected)
    assert check.ok and check.factors is not None
    np.testing.assert_array_equal(
        check.factors[expected.modules[0].path].a, tensors[KEY_A].astype(np.float32)
    )
    # bfloat16 (numpy has none): the top 16 bits of float32 values that fit in it exactly.
    f32 = honest_tensors(expected, seed=1)
    exact = {k: (v.view(np.uint32) & 0xFFFF0000).view(np.float32) for k, v in f32.items()}
    header, _ = layout(write_tensors(tmp_path / "f32.safetensors", exact))
    data, offset = b"", 0
    for key in sorted(exact, key=lambda k: header[k]["data_offsets"]):
        half = (exact[key].view(np.uint32) >> 16).astype("<u2").tobytes()
        header[key].update(dtype="BF16", data_offsets=[offset, offset + len(half)])
        data, offset = data + half, offset + len(half)
    check = check_adapter(forge(tmp_path / "bf16.safetensors", header, data), expected)
    assert check.ok and check.factors is not None, check.issues
    np.testing.assert_array_equal(check.factors[expected.modules[0].path].a, exact[KEY_A])


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_wrong_dtype(tmp_path: Path, expected: ExpectedAdapter, dtype: type) -> None:
    tensors = honest_tensors(expected)
    tensors[KEY_A] = tensors[KEY_A].astype(dtype)
    name = {np.int32: "I32", np.float64: "F64"}[dtype]
    issues = _messages(write_tensors(tmp_path / "d.safetensors", tensors), expected)
    assert issues == [f"{KEY_A}: dtype '{name}': expected one of F32, F16, BF16"]


def test_wrong_shape(tmp_path: Path, expected: ExpectedAdapter) -> None:
    tensors = honest_tensors(expected)
    tensors[KEY_B] = np.zeros((17, RANK), np.float32)
    issues = _messages(write_tensors(tmp_path / "s.safetensors", tensors), expected)
    assert issues == [f"{KEY_B}: shape [17, {RANK}], expected [16, {RANK}]"]


def test_wrong_rank(tmp_path: Path, expected: ExpectedAdapter) -> None:
    """An adapter trained at another rank: every factor is named with the task's r."""
    other = expected_adapter(SMALL, LoraSettings(r=RANK + 2, target_modules="all-linear"))
    issues = _messages(write_tensors(tmp_path / "r.safetensors", honest_tensors(other)), expected)
    assert len(issues) == len(expected.shapes)
    assert all(f"rank {RANK + 2}, but the task's r is {RANK}" in i for i in issues), issues
    assert any(
        i.startswith(KEY_A) and f"[{RANK + 2}, 16], expected [{RANK}, 16]" in i for i in issues
    )


def test_missing_and_unexpected_keys(tmp_path: Path, expected: ExpectedAdapter) -> None:
    tensors = honest_tensors(expected)
    del tensors[KEY_A]
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((RANK, 16), np.float32)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.magnitude"] = np.zeros(16, "f4")
    issues = _messages(write_tensors(tmp_path / "k.safetensors", tensors), expected)
    assert issues == [
        f"{KEY_A}: missing: the task's LoRA config implies this tensor, of shape ({RANK}, 16)",
        "base_model.model.lm_head.lora_A.weight: unexpected tensor: the task's LoRA config "
        "implies no such factor",
        "base_model.model.model.layers.0.self_attn.q_proj.magnitude: unexpected tensor: the "
        "task's LoRA config implies no such factor",
    ]


def test_too_many_extra_tensors_refuse_the_header(
    tmp_path: Path, expected: ExpectedAdapter
) -> None:
    tensors = honest_tensors(expected)
    tensors.update({f"junk.{i}": np.zeros(1, np.float32) for i in range(3)})
    issues = _messages(
        write_tensors(tmp_path / "j.safetensors", tensors), expected, limits=Limits(extra_tensors=2)
    )
    assert issues == [
        f"header: declares {len(expected.shapes) + 3} tensors; at most "
        f"{len(expected.shapes) + 2} are expected"
    ]


@pytest.mark.parametrize(("value", "name"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_values_are_named_with_the_key(
    tmp_path: Path, expected: ExpectedAdapter, value: float, name: str
) -> None:
    tensors = honest_tensors(expected)
    tensors[KEY_B][0, :2] = value
    issues = _messages(write_tensors(tmp_path / "n.safetensors", tensors), expected)
    size = tensors[KEY_B].size
    assert issues == [
        f"{KEY_B}: 2 {name} of {size} values: training diverged or the file is corrupt"
    ]


def test_header_issues_come_through(tmp_path: Path, expected: ExpectedAdapter) -> None:
    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(pickle.dumps({"x": 1}))
    issues = _messages(path, expected)
    assert len(issues) == 1 and "a pickle, not safetensors" in issues[0]


@pytest.mark.parametrize("name", sorted(PEFT_SETTINGS))
def test_a_real_peft_adapter_passes(peft_adapters: dict[str, Path], name: str) -> None:
    expected = expected_adapter(ModelShape.from_config(TINY_LLAMA_CONFIG), PEFT_SETTINGS[name])
    weights = peft_adapters[name] / "adapter_model.safetensors"
    check = check_adapter(weights, expected)
    assert check.ok and check.factors is not None, check.issues
    saved = load_file(str(weights))
    for module in expected.modules:
        np.testing.assert_array_equal(check.factors[module.path].b, saved[module.key_b])


@pytest.mark.parametrize("name", sorted(PEFT_SETTINGS))
def test_the_coordinator_config_loads_through_peft(
    peft_adapters: dict[str, Path], tiny_model_dir: Path, tmp_path: Path, name: str
) -> None:
    """The checked weights beside the coordinator's config load into PEFT exactly: every
    factor lands in its module, and the output moves off the base model's."""
    peft = pytest.importorskip("peft", reason="loading adapters needs the worker extra")
    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "checked"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(
        (peft_adapters[name] / "adapter_model.safetensors").read_bytes()
    )
    task = tiny_task(PEFT_SETTINGS[name], "cotune://tiny-llama")
    config = coordinator_config(task, str(tiny_model_dir))
    (folder / "adapter_config.json").write_text(json.dumps(config))

    def base() -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)

    model = peft.PeftModel.from_pretrained(base(), str(folder)).eval()
    loaded = peft.get_peft_model_state_dict(model)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value)
    assert model.peft_config["default"].r == PEFT_SETTINGS[name].r
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        moved = (model(input_ids=ids).logits - base().eval()(input_ids=ids).logits).abs().max()
    assert moved > 1e-3


def test_the_library_imports_no_torch() -> None:
    """The coordinator's request path stays light: verify/ loads numpy, never torch."""
    probe = (
        "import sys\n"
        "import cotune.orchestrator.verify.adapter, cotune.orchestrator.verify.review\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"
