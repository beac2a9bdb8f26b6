"""The merge methods by name (one table), and the checks on the options each one takes.

The sweep spec names the same methods (`MergeSpec.method` in protocol/spec/sections.py);
tests/unit/merge/test_registry.py keeps the two lists equal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from cotune.orchestrator.merge.base import MergeError, MergeStrategy
from cotune.orchestrator.merge.cat import CatMerge
from cotune.orchestrator.merge.dare import DEFAULT_DENSITY as DARE_DENSITY
from cotune.orchestrator.merge.dare import DareMerge
from cotune.orchestrator.merge.linear import LinearMerge
from cotune.orchestrator.merge.svd import SvdMerge
from cotune.orchestrator.merge.ties import DEFAULT_DENSITY as TIES_DENSITY
from cotune.orchestrator.merge.ties import TiesMerge


@dataclass(frozen=True)
class Method:
    """How to build one strategy from the options it takes (rank, density, seed)."""

    build: Callable[[int | None, float | None, int], MergeStrategy]
    takes_rank: bool
    takes_density: bool


REGISTRY: dict[str, Method] = {
    "svd": Method(lambda rank, density, seed: SvdMerge(rank=rank), True, False),
    "cat": Method(lambda rank, density, seed: CatMerge(), False, False),
    "linear": Method(lambda rank, density, seed: LinearMerge(), False, False),
    "ties": Method(
        lambda rank, density, seed: TiesMerge(
            rank=rank, seed=seed, density=density or TIES_DENSITY
        ),
        True,
        True,
    ),
    "dare": Method(
        lambda rank, density, seed: DareMerge(
            rank=rank, seed=seed, density=density or DARE_DENSITY
        ),
        True,
        True,
    ),
}
METHODS = tuple(REGISTRY)
DEFAULT_METHOD = "svd"


def make_strategy(
    method: str, *, rank: int | None = None, density: float | None = None, seed: int = 0
) -> MergeStrategy:
    """The strategy for `method`, with its options checked (errors name the option)."""
    entry = REGISTRY.get(method)
    if entry is None:
        raise MergeError(f"--method: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise MergeError(f"--rank: must be a positive integer, got {rank!r}")
    if rank is not None and not entry.takes_rank:
        raise MergeError(
            f"--rank: method {method} keeps the inputs' rank"
            f"{' sum' if method == 'cat' else ''} and takes no --rank; use svd, ties or dare"
        )
    if density is not None:
        if not entry.takes_density:
            raise MergeError(f"--density: only ties and dare take a density, not {method}")
        if not (math.isfinite(density) and 0.0 < density <= 1.0):
            raise MergeError(f"--density: must be in (0, 1], got {density!r}")
    return entry.build(rank, density, seed)
