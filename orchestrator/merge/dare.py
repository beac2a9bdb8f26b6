"""`dare`: DARE (Yu et al. 2024) on the deltas, seeded, re-compressed to rank r (inexact).

Per module: drop each entry of each adapter's dense delta with probability 1 - density,
rescale the survivors by 1/density (so the expectation is unchanged), take the weighted sum,
then factor it to rank r. The masks come from a generator seeded by (seed, module, adapter),
so the same seed gives the same merge. Memory: three d_out x d_in float32 matrices at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from cotune.orchestrator.merge.base import LoraFactors, MergedFactors
from cotune.orchestrator.merge.factored import compress_dense, dense_delta, module_seed

DEFAULT_DENSITY = 0.5


def dare_delta(
    factors: Sequence[LoraFactors],
    weights: Sequence[float],
    density: float,
    *,
    seed: int,
    module: str,
) -> torch.Tensor:
    """sum_k w_k (mask_k * s_k B_k A_k) / density with Bernoulli(density) masks."""
    total: torch.Tensor | None = None
    for index, (f, w) in enumerate(zip(factors, weights, strict=True)):
        delta = dense_delta(f)
        if density < 1.0:
            generator = torch.Generator().manual_seed(module_seed(seed, module, index))
            keep = torch.rand(delta.shape, generator=generator) < density
            delta.mul_(keep).div_(density)
            del keep
        total = delta.mul_(w) if total is None else total.add_(delta, alpha=w)
    assert total is not None
    return total


@dataclass(frozen=True)
class DareMerge:
    """DARE (drop and rescale) on the dense deltas of one module at a time, then rank r."""

    rank: int | None = None
    density: float = DEFAULT_DENSITY
    seed: int = 0
    name: ClassVar[str] = "dare"
    exact: ClassVar[bool] = False
    description: ClassVar[str] = (
        "DARE on the deltas (random drop with rescale, seeded, then the weighted sum), "
        "re-compressed to rank r by SVD (exact SVD up to 1024 wide, randomized above)"
    )

    def output_rank(self, ranks: Sequence[int]) -> int:
        return self.rank if self.rank is not None else max(ranks)

    def merge(
        self, factors: Sequence[LoraFactors], weights: Sequence[float], *, rank: int, module: str
    ) -> MergedFactors:
        delta = dare_delta(factors, weights, self.density, seed=self.seed, module=module)
        merged, _ = compress_dense(delta, rank, generator_seed=module_seed(self.seed, module))
        return merged
