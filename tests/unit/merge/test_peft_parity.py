"""cotune's merges next to PEFT's `add_weighted_adapter` (peft 0.21) on the same adapters.

What is the same and what differs on purpose (also in docs/merging.md):

- Weights: cotune normalises them to sum to 1 (a weighted mean); PEFT uses them as given. Each
  comparison passes PEFT cotune's normalised weights.
- `svd`: the same delta. PEFT forms every dense delta and runs a full SVD of their weighted
  sum; cotune computes the same truncation in factored form. Output rank defaults to the
  largest input rank in both. One intended difference: with rsLoRA inputs PEFT's merged config
  keeps `use_rslora=True` while setting `lora_alpha = r`, so PEFT scales its merged delta by
  r / sqrt(r) = sqrt(r) on load; cotune writes `use_rslora=False`, scale 1, the exact delta.
- `cat`: the same delta. PEFT folds w_k s_k into A_k only; cotune splits sqrt(w_k s_k) over
  both factors (better conditioned in bf16). Same rank: the sum of the input ranks.
- `linear`: PEFT multiplies sqrt(w_k s_k) into BOTH A_k and B_k before summing, so its result
  is (sum_k sqrt(w_k s_k) B_k)(sum_k sqrt(w_k s_k) A_k): K identical adapters with weights
  summing to 1 come out (sum_k sqrt(w_k))^2 times too large (K times for equal weights).
  cotune's `linear` averages each factor with the weights themselves, sqrt(s_k) carried on
  each side, so identical adapters merge to themselves; it equals PEFT's `linear` called with
  weights w_k^2.
- `ties`: cotune's works on the deltas like PEFT's `ties_svd` (not PEFT's `ties`, which trims
  A and B separately). cotune elects signs from the weighted sum and takes a weighted mean of
  the agreeing entries; PEFT elects from the unweighted sum and divides the weighted sum by the
  number agreeing. They coincide for equal weights (cotune) against unit weights (PEFT).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from cotune.orchestrator.merge.merger import merge_adapters
from torch import nn

peft = pytest.importorskip("peft", reason="the PEFT comparison needs the worker extra")

TARGETS = ["embed_tokens", "q_proj", "up_proj", "down_proj"]


class Toy(nn.Module):
    """An Embedding and three Linear layers of different shapes, to host LoRA adapters."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed_tokens = nn.Embedding(50, 16)
        self.q_proj = nn.Linear(16, 24, bias=False)
        self.up_proj = nn.Linear(16, 40, bias=False)
        self.down_proj = nn.Linear(40, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.up_proj(x)) + self.q_proj(x)[:, :16]


def _peft_adapter(folder: Path, seed: int, r: int, alpha: float, **config: Any) -> Path:
    torch.manual_seed(seed)
    lora = peft.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False, **config
    )
    model = peft.get_peft_model(Toy(), lora)
    with torch.no_grad():  # unit-Gaussian B: deltas of order 1, far from any tolerance
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.normal_()
    model.save_pretrained(str(folder), save_embedding_layers=False)  # LoRA factors only
    (folder / "metrics.json").write_text(json.dumps({"tokens": 1000 * (seed + 1)}))
    return folder


def _deltas(model: Any, adapter: str) -> dict[str, torch.Tensor]:
    return {
        name.rsplit(".", 1)[-1]: module.get_delta_weight(adapter).detach().double()
        for name, module in model.named_modules()
        if adapter in getattr(module, "lora_A", {})
        or adapter in getattr(module, "lora_embedding_A", {})
    }


def _compare(
    adapters: list[Path],
    out: Path,
    *,
    method: str,
    peft_type: str,
    peft_weights: list[float] | None = None,
    rank: int | None = None,
    density: float | None = None,
    weights: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], tuple[float, ...]]:
    """(cotune's merged deltas as PEFT loads them, PEFT's add_weighted_adapter deltas, w)."""
    report = merge_adapters(
        adapters, out, method=method, rank=rank, density=density, weights=weights
    )
    model = peft.PeftModel.from_pretrained(Toy(), str(adapters[0]), adapter_name="a0")
    for index, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{index}")
    model.load_adapter(str(out), adapter_name="cotune")
    model.add_weighted_adapter(
        [f"a{i}" for i in range(len(adapters))],
        peft_weights if peft_weights is not None else list(report.summary.weights),
        "peft",
        combination_type=peft_type,
        svd_rank=rank,
        density=density,
    )
    return _deltas(model, "cotune"), _deltas(model, "peft"), report.summary.weights


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


@pytest.fixture
def mixed_ranks(tmp_path: Path) -> list[Path]:
    """Three adapters with different ranks and alphas (PEFT's svd and cat accept that)."""
    specs = [(4, 8.0), (8, 4.0), (4, 32.0)]
    return [_peft_adapter(tmp_path / f"a{i}", i, r, a) for i, (r, a) in enumerate(specs)]


@pytest.fixture
def same_ranks(tmp_path: Path) -> list[Path]:
    specs = [(4, 8.0), (4, 4.0), (4, 16.0)]
    return [_peft_adapter(tmp_path / f"s{i}", i, r, a) for i, (r, a) in enumerate(specs)]


def test_svd_matches_peft_svd(mixed_ranks: list[Path], tmp_path: Path) -> None:
    ours, theirs, _ = _compare(mixed_ranks, tmp_path / "out", method="svd", peft_type="svd")
    assert ours.keys() == theirs.keys() == set(TARGETS)
    for name in TARGETS:
        assert _rel(ours[name], theirs[name]) < 1e-5, name


def test_svd_at_a_chosen_rank_matches_peft_svd_rank(
    mixed_ranks: list[Path], tmp_path: Path
) -> None:
    ours, theirs, _ = _compare(mixed_ranks, tmp_path / "out", method="svd", peft_type="svd", rank=6)
    for name in TARGETS:
        assert _rel(ours[name], theirs[name]) < 1e-5, name


def test_cat_matches_peft_cat(mixed_ranks: list[Path], tmp_path: Path) -> None:
    ours, theirs, _ = _compare(mixed_ranks, tmp_path / "out", method="cat", peft_type="cat")
    for name in TARGETS:
        assert _rel(ours[name], theirs[name]) < 1e-6, name


def test_linear_equals_peft_linear_with_squared_weights(
    same_ranks: list[Path], tmp_path: Path
) -> None:
    weights = "1,2,5"
    squared = [(w / 8) ** 2 for w in (1, 2, 5)]
    ours, theirs, _ = _compare(
        same_ranks,
        tmp_path / "out",
        method="linear",
        peft_type="linear",
        weights=weights,
        peft_weights=squared,
    )
    for name in TARGETS:
        assert _rel(ours[name], theirs[name]) < 1e-6, name


def test_linear_differs_from_peft_linear_on_identical_adapters(tmp_path: Path) -> None:
    # The documented difference: PEFT's linear returns K x the delta of K identical adapters.
    one = _peft_adapter(tmp_path / "one", 0, 4, 8.0)
    ours, theirs, _ = _compare(
        [one, one, one], tmp_path / "out", method="linear", peft_type="linear"
    )
    model = peft.PeftModel.from_pretrained(Toy(), str(one), adapter_name="one")
    original = _deltas(model, "one")
    for name in TARGETS:
        assert _rel(ours[name], original[name]) < 1e-6
        assert _rel(theirs[name], 3 * original[name]) < 1e-6


def test_ties_matches_peft_ties_svd_for_equal_weights(
    same_ranks: list[Path], tmp_path: Path
) -> None:
    ours, theirs, _ = _compare(
        same_ranks,
        tmp_path / "out",
        method="ties",
        peft_type="ties_svd",
        weights="1,1,1",
        peft_weights=[1.0, 1.0, 1.0],
        density=0.3,
        rank=4,
    )
    for name in TARGETS:
        assert _rel(ours[name], theirs[name]) < 1e-5, name


def test_svd_with_rslora_inputs_is_exact_where_peft_scales_by_sqrt_r(tmp_path: Path) -> None:
    adapters = [_peft_adapter(tmp_path / f"r{i}", i, 4, 8.0, use_rslora=True) for i in range(2)]
    ours, theirs, weights = _compare(adapters, tmp_path / "out", method="svd", peft_type="svd")
    model = peft.PeftModel.from_pretrained(Toy(), str(adapters[0]), adapter_name="a0")
    model.load_adapter(str(adapters[1]), adapter_name="a1")
    inputs = [_deltas(model, "a0"), _deltas(model, "a1")]
    for name in TARGETS:
        dense = sum(w * d[name] for w, d in zip(weights, inputs, strict=True))
        assert isinstance(dense, torch.Tensor)
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        oracle = (u[:, :4] * s[:4]) @ vh[:4]
        assert _rel(ours[name], oracle) < 1e-5, name
        assert _rel(theirs[name], math.sqrt(4) * oracle) < 1e-5, name
