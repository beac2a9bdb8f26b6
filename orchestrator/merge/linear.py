"""`linear`: averages the A's and the B's separately, an approximation kept for comparison.

The product of the averages is not the average of the products (factored.average_factors),
so this is not the weighted mean delta; use `svd` or `cat` for that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from cotune.orchestrator.merge.base import LoraFactors, MergedFactors, MergeError
from cotune.orchestrator.merge.factored import average_factors


@dataclass(frozen=True)
class LinearMerge:
    """A' = sum_k w_k sqrt(s_k) A_k, B' = sum_k w_k sqrt(s_k) B_k; all ranks must agree."""

    name: ClassVar[str] = "linear"
    exact: ClassVar[bool] = False
    description: ClassVar[str] = (
        "APPROXIMATION: weighted means of the A factors and of the B factors taken separately "
        "(not the mean of the deltas; kept for comparison with PEFT's `linear`)"
    )

    def output_rank(self, ranks: Sequence[int]) -> int:
        if len(set(ranks)) != 1:
            raise MergeError(
                f"method linear needs every adapter to have the same rank per module, got ranks "
                f"{list(ranks)}; use --method svd (exact, any ranks)"
            )
        return ranks[0]

    def merge(
        self, factors: Sequence[LoraFactors], weights: Sequence[float], *, rank: int, module: str
    ) -> MergedFactors:
        return average_factors(factors, weights)
