"""Merge weights: given by the user or each adapter's trained tokens, normalised to a mean."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cotune.orchestrator.merge.adapters import METRICS_FILE, Adapter
from cotune.orchestrator.merge.base import MergeError


@dataclass(frozen=True)
class Weights:
    """Normalised weights (summing to 1), where they came from, and any warning to show."""

    values: tuple[float, ...]
    source: str
    warning: str | None = None


def parse_weights(text: str) -> list[float]:
    """`"1,2.5,3"` -> [1.0, 2.5, 3.0]; the error names the item that is not a number."""
    items = [item.strip() for item in text.split(",")]
    values: list[float] = []
    for index, item in enumerate(items, start=1):
        try:
            values.append(float(item))
        except ValueError:
            raise MergeError(f"--weights: item {index} ({item!r}) is not a number") from None
    return values


def resolve_weights(adapters: Sequence[Adapter], given: str | Sequence[float] | None) -> Weights:
    """The weights of a weighted MEAN: explicit ones, else trained tokens, else equal."""
    if given is not None:
        raw = parse_weights(given) if isinstance(given, str) else [float(w) for w in given]
        if len(raw) != len(adapters):
            raise MergeError(
                f"--weights: got {len(raw)} weight(s) for {len(adapters)} adapter(s); give one "
                "per adapter, in the same order"
            )
        return Weights(values=_normalise(raw, "--weights"), source="given")
    tokens = [a.tokens for a in adapters]
    if all(t is not None for t in tokens):
        counts = [float(t) for t in tokens if t is not None]
        if sum(counts) > 0:
            return Weights(values=_normalise(counts, "tokens"), source="trained tokens")
        warning = "every adapter reports 0 trained tokens; merging with equal weights"
    else:
        missing = [str(a.path) for a in adapters if a.tokens is None]
        warning = (
            f"no trained token count ({METRICS_FILE} with 'tokens') for {', '.join(missing)}; "
            "merging with equal weights (pass --weights to choose)"
        )
    equal = [1.0] * len(adapters)
    return Weights(values=_normalise(equal, "equal"), source="equal", warning=warning)


def _normalise(raw: Sequence[float], what: str) -> tuple[float, ...]:
    for index, value in enumerate(raw, start=1):
        if not math.isfinite(value):
            raise MergeError(f"{what}: weight {index} is {value}; weights must be finite")
        if value < 0:
            raise MergeError(
                f"{what}: weight {index} is negative ({value}); a merge is a weighted mean of "
                "adapters, so weights must be >= 0"
            )
    total = math.fsum(raw)
    if total <= 0:
        raise MergeError(f"{what}: the weights sum to {total}; at least one must be positive")
    return tuple(value / total for value in raw)
