"""The merge methods by name, and the checks on the options each one takes."""

from __future__ import annotations

import math

from orchestrator.merge.base import MergeError, MergeStrategy
from orchestrator.merge.cat import CatMerge
from orchestrator.merge.dare import DEFAULT_DENSITY as DARE_DENSITY
from orchestrator.merge.dare import DareMerge
from orchestrator.merge.linear import LinearMerge
from orchestrator.merge.svd import SvdMerge
from orchestrator.merge.ties import DEFAULT_DENSITY as TIES_DENSITY
from orchestrator.merge.ties import TiesMerge

METHODS = ("svd", "cat", "linear", "ties", "dare")
DEFAULT_METHOD = "svd"


def make_strategy(
    method: str, *, rank: int | None = None, density: float | None = None, seed: int = 0
) -> MergeStrategy:
    """The strategy for `method`, with its options checked (errors name the option)."""
    if method not in METHODS:
        raise MergeError(f"--method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeError(f"--rank: must be a positive integer, got {rank!r}")
    if rank is not None and method in ("cat", "linear"):
        raise MergeError(
            f"--rank: method {method} keeps the inputs' rank"
            f"{' sum' if method == 'cat' else ''} and takes no --rank; use svd, ties or dare"
        )
    if density is not None:
        if method not in ("ties", "dare"):
            raise MergeError(f"--density: only ties and dare take a density, not {method}")
        if not (math.isfinite(density) and 0.0 < density <= 1.0):
            raise MergeError(f"--density: must be in (0, 1], got {density!r}")
    if method == "svd":
        return SvdMerge(rank=rank)
    if method == "cat":
        return CatMerge()
    if method == "linear":
        return LinearMerge()
    if method == "ties":
        return TiesMerge(rank=rank, seed=seed, density=density or TIES_DENSITY)
    return DareMerge(rank=rank, seed=seed, density=density or DARE_DENSITY)
