"""The merge driver on adapter folders: dtypes, rank patterns, output metadata, seeded methods."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from cotune.orchestrator.merge.adapters import load_module, read_adapter
from cotune.orchestrator.merge.factored import weighted_delta
from cotune.orchestrator.merge.merger import merge_adapters
from safetensors import safe_open

from tests.unit.merge.conftest import MODULES, lora_key, random_adapter, write_adapter

Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.0.mlp.up_proj"


def _merged_delta(out: Path, module: str) -> torch.Tensor:
    config = json.loads((out / "adapter_config.json").read_text())
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as handle:
        a = handle.get_tensor(lora_key(module, "A")).double()
        b = handle.get_tensor(lora_key(module, "B")).double()
    return (config["lora_alpha"] / config["r"]) * b @ a


def _oracle(adapters: list[Path], module: str, weights: tuple[float, ...]) -> torch.Tensor:
    read = [read_adapter(p) for p in adapters]
    return weighted_delta(load_module(read, module), weights).double()


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def test_bf16_inputs_give_bf16_output_computed_in_fp32(tmp_path: Path) -> None:
    adapters = [random_adapter(tmp_path / f"a{i}", i, dtype=torch.bfloat16) for i in range(3)]
    report = merge_adapters(adapters, tmp_path / "out", method="cat")
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), framework="pt") as handle:
        assert {str(handle.get_slice(k).get_dtype()) for k in handle.keys()} == {"BF16"}  # noqa: SIM118
    for module in MODULES:
        # bf16 keeps 8 bits of mantissa: the stored product is exact to bf16 rounding.
        assert (
            _rel(
                _merged_delta(tmp_path / "out", module),
                _oracle(adapters, module, report.summary.weights),
            )
            < 1e-2
        )


def test_mixed_input_dtypes_give_fp32_output(tmp_path: Path) -> None:
    a = random_adapter(tmp_path / "a", 1, dtype=torch.float16)
    b = random_adapter(tmp_path / "b", 2, dtype=torch.float32)
    merge_adapters([a, b], tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), framework="pt") as handle:
        assert str(handle.get_slice(lora_key(Q, "A")).get_dtype()) == "F32"


def test_rank_and_alpha_patterns_are_honoured(tmp_path: Path) -> None:
    # Adapter b has rank 8 and alpha 2 on q_proj only; its scale there is 2/8, not 8/4.
    a = random_adapter(tmp_path / "a", 1, r=4, alpha=8)
    generator = torch.Generator().manual_seed(7)
    tensors = {}
    for module, (d_out, d_in) in MODULES.items():
        r = 8 if module == Q else 4
        tensors[lora_key(module, "A")] = torch.randn(r, d_in, generator=generator)
        tensors[lora_key(module, "B")] = torch.randn(d_out, r, generator=generator)
    b = write_adapter(
        tmp_path / "b",
        tensors,
        r=4,
        alpha=8,
        tokens=1000,
        config={"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"q_proj": 2}},
    )
    assert read_adapter(b).module(Q).scale == 2 / 8
    report = merge_adapters([a, b], tmp_path / "out", method="svd", rank=12)
    for module in MODULES:
        assert (
            _rel(
                _merged_delta(tmp_path / "out", module),
                _oracle([a, b], module, report.summary.weights),
            )
            < 1e-5
        )
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["rank_pattern"], config["alpha_pattern"]) == (
        12,
        12,
        {},
        {},
    )


def test_output_metadata(tmp_path: Path, two_adapters: list[Path]) -> None:
    report = merge_adapters(two_adapters, tmp_path / "out", method="svd", rank=3)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.json",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["init_lora_weights"] is True
    assert config["base_model_name_or_path"] == "example/base-model"
    assert json.loads((out / "metrics.json").read_text()) == {"tokens": 4000}
    assert report.summary.weights == (0.25, 0.75)
    card = (out / "README.md").read_text()
    assert "base_model: example/base-model" in card and "Output rank: 3" in card
    assert "trained tokens" in card and "| 1 | `" in card and "0.75 |" in card


def test_svd_default_rank_is_the_largest_input_rank(tmp_path: Path) -> None:
    a = random_adapter(tmp_path / "a", 1, r=4)
    b = random_adapter(tmp_path / "b", 2, r=8)
    assert merge_adapters([a, b], tmp_path / "out").summary.rank == 8
    assert merge_adapters([a, b], tmp_path / "cat", method="cat").summary.rank == 12


def test_rank_above_the_total_rank_pads_with_zeros_and_warns(
    tmp_path: Path, two_adapters: list[Path]
) -> None:
    report = merge_adapters(two_adapters, tmp_path / "out", rank=20)
    assert any("above the inputs' total rank (8)" in w for w in report.warnings)
    for module in MODULES:
        oracle = _oracle(two_adapters, module, report.summary.weights)
        assert _rel(_merged_delta(tmp_path / "out", module), oracle) < 1e-5


def test_overwrite_replaces_a_previous_merge(tmp_path: Path, two_adapters: list[Path]) -> None:
    merge_adapters(two_adapters, tmp_path / "out", method="cat")
    report = merge_adapters(two_adapters, tmp_path / "out", method="svd", rank=2, overwrite=True)
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 2
    assert report.summary.method == "svd"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_dare_is_seeded(tmp_path: Path, two_adapters: list[Path]) -> None:
    def run(name: str, seed: int) -> torch.Tensor:
        merge_adapters(two_adapters, tmp_path / name, method="dare", density=0.5, seed=seed)
        return _merged_delta(tmp_path / name, UP)

    first, again, other = run("one", 1), run("two", 1), run("three", 2)
    assert torch.equal(first, again)
    assert _rel(first, other) > 0.05


def test_dare_and_ties_at_full_density_are_the_svd_merge(
    tmp_path: Path, two_adapters: list[Path]
) -> None:
    # Nothing dropped: dare is the weighted sum, re-compressed exactly at these sizes.
    merge_adapters(two_adapters, tmp_path / "svd", rank=4)
    merge_adapters(two_adapters, tmp_path / "dare", method="dare", density=1.0, rank=4)
    for module in MODULES:
        svd = _merged_delta(tmp_path / "svd", module)
        assert _rel(_merged_delta(tmp_path / "dare", module), svd) < 1e-5
    # One adapter at full density: ties keeps every entry, so it returns that delta.
    merge_adapters(two_adapters[:1], tmp_path / "ties", method="ties", density=1.0)
    for module in MODULES:
        oracle = _oracle(two_adapters[:1], module, (1.0,))
        assert _rel(_merged_delta(tmp_path / "ties", module), oracle) < 1e-5


def test_ties_trims_and_elects_signs(tmp_path: Path) -> None:
    from cotune.orchestrator.merge.base import LoraFactors
    from cotune.orchestrator.merge.ties import ties_delta

    # The deltas are B itself (A = I): [[4, -1], [2, 3]] and [[-6, 0.5], [1.5, 0.25]].
    one = LoraFactors(a=torch.eye(2), b=torch.tensor([[4.0, -1.0], [2.0, 3.0]]), scale=1.0)
    two = LoraFactors(a=torch.eye(2), b=torch.tensor([[-6.0, 0.5], [1.5, 0.25]]), scale=1.0)
    merged = ties_delta([one, two], [0.5, 0.5], density=0.5)
    # Trim to 2 of 4 entries: one keeps {4, 3}, two keeps {-6, 1.5}. At [0, 0] the weighted
    # mass 0.5 * 4 - 0.5 * 6 elects "-": only -6 agrees. Elsewhere one survivor or none.
    assert merged.tolist() == [[-6.0, 0.0], [1.5, 3.0]]
    # Unequal weights move the vote: with 0.8 on `one`, [0, 0] elects "+" and keeps 4.
    assert ties_delta([one, two], [0.8, 0.2], density=0.5).tolist() == [[4.0, 0.0], [1.5, 3.0]]


def test_differing_target_module_specs_are_combined(tmp_path: Path) -> None:
    # Same modules in the files, different ways of naming them in the configs.
    a = random_adapter(tmp_path / "a", 1)
    b = random_adapter(
        tmp_path / "b", 2, config={"target_modules": ["q_proj", "up_proj", "down_proj", "o_proj"]}
    )
    merge_adapters([a, b], tmp_path / "lists")
    config = json.loads((tmp_path / "lists" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "o_proj", "q_proj", "up_proj"]
    c = random_adapter(tmp_path / "c", 3, config={"target_modules": r".*\.(q|up|down)_proj"})
    merge_adapters([a, c], tmp_path / "regex")
    config = json.loads((tmp_path / "regex" / "adapter_config.json").read_text())
    pattern = config["target_modules"]
    assert pattern == r"((.*\.)?(down_proj|q_proj|up_proj))|(.*\.(q|up|down)_proj)"
    # PEFT full-matches a string target_modules against each module path.
    assert re.fullmatch(pattern, "model.layers.0.mlp.down_proj")
    assert re.fullmatch(pattern, "q_proj")
    assert not re.fullmatch(pattern, "model.layers.0.mlp.gate_proj")
