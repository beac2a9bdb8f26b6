"""`svd` (the default): the exact best rank-r approximation of the weighted mean delta.

Computed in factored form (factored.truncated_svd_factored): QR of the stacked B's and A's
and an SVD of the small R x R core, R = sum of the input ranks. It never forms a dense
d_out x d_in matrix, so a 7B model's 224 modules merge in seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from cotune.orchestrator.merge.base import LoraFactors, MergedFactors
from cotune.orchestrator.merge.factored import stack_factors, truncated_svd_factored


@dataclass(frozen=True)
class SvdMerge:
    """Eckart-Young truncation of sum_k w_k s_k B_k A_k to `rank` (default: the inputs' rank)."""

    rank: int | None = None
    name: ClassVar[str] = "svd"
    exact: ClassVar[bool] = True
    description: ClassVar[str] = (
        "exact best rank-r approximation (Eckart-Young) of the weighted mean delta, "
        "computed in factored form (QR of the stacked factors, SVD of the small core)"
    )

    def output_rank(self, ranks: Sequence[int]) -> int:
        return self.rank if self.rank is not None else max(ranks)

    def merge(
        self, factors: Sequence[LoraFactors], weights: Sequence[float], *, rank: int, module: str
    ) -> MergedFactors:
        b_cat, a_cat, d = stack_factors(factors, weights)
        return truncated_svd_factored(b_cat, a_cat, d, rank)
