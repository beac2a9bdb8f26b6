"""`cat`: the exact weighted mean delta as one adapter of rank sum_k r_k (FLoRA-style stacking)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from cotune.orchestrator.merge.base import LoraFactors, MergedFactors
from cotune.orchestrator.merge.factored import concat_factors


@dataclass(frozen=True)
class CatMerge:
    """Stacks the B's and the A's with the weights and scales folded in: no approximation."""

    name: ClassVar[str] = "cat"
    exact: ClassVar[bool] = True
    description: ClassVar[str] = (
        "exact weighted mean delta, stacking every adapter's factors (rank = sum of the ranks)"
    )

    def output_rank(self, ranks: Sequence[int]) -> int:
        return sum(ranks)

    def merge(
        self, factors: Sequence[LoraFactors], weights: Sequence[float], *, rank: int, module: str
    ) -> MergedFactors:
        return concat_factors(factors, weights)
