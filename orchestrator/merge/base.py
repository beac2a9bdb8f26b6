"""The merge plug-in point: the `MergeStrategy` protocol, the factors it merges, its error."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class MergeError(ValueError):
    """Bad merge input or options; the message names the adapter, file, key or option at fault."""


@dataclass(frozen=True)
class LoraFactors:
    """One adapter's LoRA pair for one module: its delta is `scale * b @ a`.

    `a` is (r, d_in) and `b` is (d_out, r), both float32; `scale` is PEFT's lora_alpha / r
    (or lora_alpha / sqrt(r) with use_rslora) for this module.
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class MergedFactors:
    """A merged module: its delta is `b @ a` (scale 1), `b` (d_out, rank), `a` (rank, d_in)."""

    a: torch.Tensor
    b: torch.Tensor


class MergeStrategy(Protocol):
    """How K adapters' factors for one module become one pair of factors.

    Implementations are stateless apart from their options; the driver (merger.py) streams
    modules through `merge` one at a time and pads the result with zero rows/columns up to
    the adapter-wide rank, so `merge` may return fewer than `rank` components.
    """

    @property
    def name(self) -> str:
        """The method's name on the command line (`--method`)."""
        ...

    @property
    def exact(self) -> bool:
        """True when the result is exactly the weighted mean delta or its best rank-r
        approximation; False for the approximations kept for comparison."""
        ...

    @property
    def description(self) -> str:
        """One line for the model card."""
        ...

    def output_rank(self, ranks: Sequence[int]) -> int:
        """The rank this strategy writes for a module whose inputs have `ranks`."""
        ...

    def merge(
        self, factors: Sequence[LoraFactors], weights: Sequence[float], *, rank: int, module: str
    ) -> MergedFactors:
        """Merge one module; `weights` are normalised (they sum to 1) and match `factors`."""
        ...
