"""End to end on the tiny Llama: a merged adapter loaded through PEFT gives the logits of the
base model with the oracle delta (computed densely in float64) added to its weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from cotune.orchestrator.merge.merger import merge_adapters

peft = pytest.importorskip("peft", reason="loading adapters needs the worker extra")
transformers = pytest.importorskip("transformers", reason="the tiny model needs the worker extra")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANKS = [(4, 8.0), (8, 8.0), (4, 2.0)]


def _base(model_dir: Path) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def tiny_adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three adapters of the tiny Llama with random (non-zero) factors and token counts."""
    root = tmp_path_factory.mktemp("tiny-adapters")
    folders = []
    for index, (r, alpha) in enumerate(RANKS):
        torch.manual_seed(100 + index)
        config = peft.LoraConfig(
            r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False
        )
        model = peft.get_peft_model(_base(tiny_model_dir), config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(std=0.1)
        folder = root / f"adapter{index}"
        model.save_pretrained(str(folder))
        (folder / "metrics.json").write_text(json.dumps({"tokens": 500 * (index + 1)}))
        folders.append(folder)
    return folders


def _oracle_logits(
    model_dir: Path, adapters: list[Path], weights: tuple[float, ...], rank: int | None
) -> torch.Tensor:
    """Base weights + the dense float64 weighted delta (truncated to `rank` by a full SVD)."""
    model = peft.PeftModel.from_pretrained(_base(model_dir), str(adapters[0]), adapter_name="a0")
    for index, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{index}")
    names = [f"a{i}" for i in range(len(adapters))]
    deltas: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "a0" in module.lora_A:
            dense = sum(
                w * module.get_delta_weight(n).double() for w, n in zip(weights, names, strict=True)
            )
            assert isinstance(dense, torch.Tensor)
            if rank is not None:
                u, s, vh = torch.linalg.svd(dense, full_matrices=False)
                dense = (u[:, :rank] * s[:rank]) @ vh[:rank]
            deltas[name.removeprefix("base_model.model.") + ".weight"] = dense
    base = _base(model_dir)
    state = base.state_dict()
    with torch.no_grad():
        for key, delta in deltas.items():
            state[key].add_(delta.to(state[key].dtype))
    return _logits(base)


def _logits(model: Any) -> torch.Tensor:
    ids = torch.arange(3, 35).reshape(2, 16)
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


@pytest.mark.parametrize(("method", "truncate"), [("svd", True), ("cat", False)])
def test_merged_adapter_gives_the_oracle_logits(
    tiny_model_dir: Path, tiny_adapters: list[Path], tmp_path: Path, method: str, truncate: bool
) -> None:
    out = tmp_path / method
    report = merge_adapters(tiny_adapters, out, method=method)
    assert report.summary.weight_source == "trained tokens"
    assert report.summary.weights == pytest.approx((1 / 6, 2 / 6, 3 / 6))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == report.summary.rank
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert set(config["target_modules"]) == set(TARGETS)
    card = (out / "README.md").read_text()
    assert f"method `{method}` (exact)" in card
    assert all(f"`{path}`" in card for path in tiny_adapters)

    merged = _logits(peft.PeftModel.from_pretrained(_base(tiny_model_dir), str(out)))
    base = _logits(_base(tiny_model_dir))
    oracle = _oracle_logits(
        tiny_model_dir,
        tiny_adapters,
        report.summary.weights,
        report.summary.rank if truncate else None,
    )
    change = float((oracle - base).norm())
    assert change > 0.1 * float(base.norm()), "the adapters must move the logits visibly"
    error = float((merged - oracle).norm())
    print(f"{method}: |merged - oracle| / |oracle - base| = {error / change:.2e}")
    assert error <= 1e-4 * change
