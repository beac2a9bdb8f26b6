"""`ties`: TIES-merging (Yadav et al. 2023) on the deltas, re-compressed to rank r (inexact).

Per module: trim each adapter's dense delta s_k B_k A_k to its `density` largest magnitudes,
elect each entry's sign from the weighted sum of the trimmed deltas, average (weighted) only
the entries that agree with it, then factor the result to rank r (factored.compress_dense).
Memory: one module's dense deltas are formed one adapter at a time, about six d_out x d_in
float32 matrices at once (~1 GiB at 11008 x 4096), never all K.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from cotune.orchestrator.merge.base import LoraFactors, MergedFactors
from cotune.orchestrator.merge.factored import compress_dense, dense_delta, module_seed

DEFAULT_DENSITY = 0.2  # the TIES paper keeps the top 20%


def trim_threshold(delta: torch.Tensor, density: float) -> float:
    """The magnitude of the `density` fraction's smallest kept entry (inf keeps nothing)."""
    n = delta.numel()
    keep = int(density * n)  # rounds down, as PEFT's magnitude pruning does
    if keep >= n:
        return 0.0
    if keep == 0:
        return float("inf")
    return float(torch.kthvalue(delta.abs().flatten(), n - keep + 1).values)


def trimmed(delta: torch.Tensor, threshold: float) -> torch.Tensor:
    return delta * (delta.abs() >= threshold)


def ties_delta(
    factors: Sequence[LoraFactors], weights: Sequence[float], density: float
) -> torch.Tensor:
    """The dense TIES merge of one module: trim, elect sign, disjoint weighted mean.

    Two passes over the adapters (the deltas are recomputed, cheap next to holding K of
    them): the first finds each trim threshold and the weighted sign mass, the second sums
    the agreeing entries.
    """
    thresholds: list[float] = []
    mass: torch.Tensor | None = None
    for f, w in zip(factors, weights, strict=True):
        delta = dense_delta(f)
        thresholds.append(trim_threshold(delta, density))
        part = trimmed(delta, thresholds[-1]).mul_(w)
        mass = part if mass is None else mass.add_(part)
        del delta
    assert mass is not None
    # Ties in the vote go to +1, as in PEFT's calculate_majority_sign_mask.
    elected = torch.where(mass >= 0, 1.0, -1.0).to(mass.dtype)
    del mass
    total = torch.zeros_like(elected)
    weight_sum = torch.zeros_like(elected)
    for f, w, threshold in zip(factors, weights, thresholds, strict=True):
        kept = trimmed(dense_delta(f), threshold)
        agree = kept.sign() == elected  # trimmed-away zeros have sign 0: never agree
        total.add_(kept.mul_(agree), alpha=w)
        weight_sum.add_(agree.to(total.dtype), alpha=w)
        del kept, agree
    return torch.where(weight_sum > 0, total / weight_sum.clamp_min(1e-30), 0.0)


@dataclass(frozen=True)
class TiesMerge:
    """TIES on the dense deltas of one module at a time, then rank-r re-compression."""

    rank: int | None = None
    density: float = DEFAULT_DENSITY
    seed: int = 0
    name: ClassVar[str] = "ties"
    exact: ClassVar[bool] = False
    description: ClassVar[str] = (
        "TIES on the deltas (trim to the largest magnitudes, elect signs, disjoint weighted "
        "mean), re-compressed to rank r by SVD (exact SVD up to 1024 wide, randomized above)"
    )

    def output_rank(self, ranks: Sequence[int]) -> int:
        return self.rank if self.rank is not None else max(ranks)

    def merge(
        self, factors: Sequence[LoraFactors], weights: Sequence[float], *, rank: int, module: str
    ) -> MergedFactors:
        delta = ties_delta(factors, weights, self.density)
        merged, _ = compress_dense(delta, rank, generator_seed=module_seed(self.seed, module))
        return merged
