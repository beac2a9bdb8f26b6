"""Robust statistics across the K uploads of a round: which shards look wrong, and why.

Every upload of (trial, round) starts from the same adapter and trains on a shard of the
same data, so honest changes have similar sizes and share a direction; a shard that did no
work, replayed another's upload, scaled its change up to dominate the merge, or sent noise
stands out against its peers. `review_round` computes every statistic from one Gram matrix
of the uploads' and the start's products (deltas.py) and flags, per shard:

    zero_change  its change is ~0 next to the round's scale (the start adapter, or in round 0
                 an untrained fresh init, sent back): ||c|| <= replay_distance x
                 max(||start||, the lower median of the others' ||c||; K = 2: ||start||
                 alone), or exactly 0.
    fresh_init   its own delta is ~0 although the start's is not (an untrained init sent in a
                 later round): ||B A|| <= replay_distance x ||start||.
    replay       its change is another upload's: cosine > replay_cosine, or
                 ||c_i - c_j|| <= replay_distance x max(||c_i||, ||c_j||). Both are flagged;
                 which one was first is not in the files.
    norm_high    K >= 3 working shards (those not flagged zero_change; the median and MAD
                 are theirs): ||c|| > median + mad_k x spread, spread = max(1.4826 x MAD,
                 spread_floor x median) (1.4826 x MAD estimates a normal spread's sigma; the
                 floor keeps a round of near-equal norms from flagging a 1.2x one). K <= 2:
                 ||c|| > start_ratio x ||start|| only (which of two is off, two cannot tell;
                 a scaled-up delta meets verify/bounds.py's hard limit instead).
    norm_low     K >= 3: ||c|| < low_fraction x median (most of the work not done).
    direction    K >= 3 and the peers agree (the median over shards of each one's median
                 cosine to the others is > 0): its median cosine to the others is below
                 direction_fraction x that. Catches noise scaled to an honest norm.

Every constant is relative (to the peers or to the start), never an absolute size, so they
hold for any model, rank and learning rate; the defaults are in `Thresholds`. A flag is
evidence for the caller's decision (refuse, re-run, down-weight), not a verdict by itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from typing import Literal

import numpy as np
from cotune.orchestrator.verify.deltas import cosines, distances, norms, product_gram
from cotune.orchestrator.verify.expected import AdapterFactors
from cotune.orchestrator.verify.issues import VerifyError

FlagKind = Literal["zero_change", "fresh_init", "replay", "norm_high", "norm_low", "direction"]
#: 1.4826 x MAD is a consistent estimate of a normal distribution's standard deviation.
MAD_SCALE = 1.4826


@dataclass(frozen=True)
class Thresholds:
    """The review's constants, all relative (see the module docstring for each rule)."""

    replay_cosine: float = 0.999
    replay_distance: float = 1e-3
    mad_k: float = 5.0
    spread_floor: float = 0.1
    low_fraction: float = 0.1
    start_ratio: float = 10.0
    direction_fraction: float = 0.25

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:
                raise VerifyError(f"thresholds: {name} must be > 0, got {value}")
        if self.replay_cosine >= 1 or self.low_fraction >= 1 or self.direction_fraction >= 1:
            raise VerifyError(
                "thresholds: replay_cosine, low_fraction and direction_fraction must be < 1"
            )


@dataclass(frozen=True)
class Flag:
    """One reason to distrust the upload at index `shard` of the reviewed round."""

    shard: int
    kind: FlagKind
    message: str


@dataclass(frozen=True)
class RoundReview:
    """The round's statistics (for logs and metrics) and its flags, by shard index."""

    norms: tuple[float, ...]
    start_norm: float
    median: float
    mad: float
    agreement: tuple[float, ...]
    flags: tuple[Flag, ...]

    @property
    def flagged(self) -> frozenset[int]:
        return frozenset(flag.shard for flag in self.flags)

    def flags_of(self, shard: int) -> tuple[Flag, ...]:
        return tuple(flag for flag in self.flags if flag.shard == shard)


def review_round(
    uploads: Sequence[AdapterFactors],
    start: AdapterFactors | None,
    *,
    thresholds: Thresholds | None = None,
) -> RoundReview:
    """Review the K checked uploads of one round against each other and their common start
    (None: a fresh init, whose delta is zero). Indices in the flags are positions in
    `uploads`. Raises VerifyError only if the adapters have different layouts."""
    t = thresholds or Thresholds()
    gram = product_gram([start, *uploads])
    own = norms(gram)
    start_norm = float(own[0])
    change = gram[1:, 1:] - gram[1:, :1] - gram[:1, 1:] + gram[0, 0]
    n, cos, dist = norms(change), cosines(change), distances(change)
    k = len(uploads)
    flags: list[Flag] = []
    zero = _zero_work(n, own[1:], start_norm, t, flags)
    # The spread is the working shards': zero-work ones are flagged already and would drag
    # the median down.
    live = [i for i in range(k) if i not in zero]
    median = float(np.median(n[live])) if live else 0.0
    mad = float(np.median(np.abs(n[live] - median))) if live else 0.0
    _replays(live, n, cos, dist, t, flags)
    if len(live) >= 3:
        _norm_outliers(live, n, median, mad, t, flags)
    else:
        _few_peers(live, n, start_norm, t, flags)
    agreement = _direction(live, k, cos, t, flags)
    return RoundReview(
        norms=tuple(float(x) for x in n),
        start_norm=start_norm,
        median=median,
        mad=mad,
        agreement=agreement,
        flags=tuple(sorted(flags, key=lambda f: (f.shard, f.kind))),
    )


def _zero_work(
    n: np.ndarray, own: np.ndarray, start_norm: float, t: Thresholds, flags: list[Flag]
) -> set[int]:
    zero: set[int] = set()
    for i in range(len(n)):
        others = np.sort(np.delete(n, i))
        # The lower median: with two others (K = 3) the plain median is their mean, and one
        # huge upload would make its honest peers look like zero work. With one other (K = 2)
        # there is no median to trust: the start's scale alone.
        lower = float(others[(others.size - 1) // 2]) if others.size >= 2 else 0.0
        reference = max(start_norm, lower)
        if n[i] == 0 or n[i] <= t.replay_distance * reference:
            zero.add(i)
            flags.append(
                Flag(
                    i,
                    "zero_change",
                    f"change norm {n[i]:.4g} is ~0 next to the round's scale {reference:.4g}: "
                    "the start adapter (or an untrained fresh init) sent back",
                )
            )
        elif start_norm > 0 and own[i] <= t.replay_distance * start_norm:
            flags.append(
                Flag(
                    i,
                    "fresh_init",
                    f"its delta's norm {own[i]:.4g} is ~0 although the start adapter's is "
                    f"{start_norm:.4g}: an untrained fresh init",
                )
            )
    return zero


def _replays(
    live: list[int],
    n: np.ndarray,
    cos: np.ndarray,
    dist: np.ndarray,
    t: Thresholds,
    flags: list[Flag],
) -> None:
    for i, j in combinations(live, 2):
        relative = dist[i, j] / max(n[i], n[j])
        if cos[i, j] > t.replay_cosine or relative <= t.replay_distance:
            for me, other in ((i, j), (j, i)):
                detail = (
                    f"cosine {cos[i, j]:.6f}, relative distance {relative:.3g}, "
                    f"{n[me] / n[other]:.3g}x its size"
                )
                flags.append(
                    Flag(me, "replay", f"its change is shard {other}'s ({detail}): a replay")
                )


def _norm_outliers(
    live: list[int], n: np.ndarray, median: float, mad: float, t: Thresholds, flags: list[Flag]
) -> None:
    spread = max(MAD_SCALE * mad, t.spread_floor * median)
    high, low = median + t.mad_k * spread, t.low_fraction * median
    for i in live:
        if n[i] > high:
            flags.append(
                Flag(
                    i,
                    "norm_high",
                    f"change norm {n[i]:.4g} ({n[i] / median:.3g}x the median {median:.4g}) is "
                    f"over median + {t.mad_k:g} x spread = {high:.4g}",
                )
            )
        elif n[i] < low:
            flags.append(
                Flag(
                    i,
                    "norm_low",
                    f"change norm {n[i]:.4g} is under {t.low_fraction:g} x the median "
                    f"{median:.4g}: most of the work not done",
                )
            )


def _few_peers(
    live: list[int], n: np.ndarray, start_norm: float, t: Thresholds, flags: list[Flag]
) -> None:
    """K <= 2: no robust spread exists; compare with the start's scale only. (Not with the
    other shard: which of two is off cannot be told, and flagging the larger would punish an
    honest shard beside a lazy one. A scaled-up delta meets verify/bounds.py's hard limit.)"""
    for i in live:
        if start_norm > 0 and n[i] > t.start_ratio * start_norm:
            flags.append(
                Flag(
                    i,
                    "norm_high",
                    f"change norm {n[i]:.4g} is over {t.start_ratio:g} x the start adapter's "
                    f"norm {start_norm:.4g}",
                )
            )


def _direction(
    live: list[int], k: int, cos: np.ndarray, t: Thresholds, flags: list[Flag]
) -> tuple[float, ...]:
    """Each shard's median cosine to the other live shards (0 for the rest); flags those
    far below the round's typical agreement."""
    agreement = [0.0] * k
    if len(live) < 3:
        return tuple(agreement)
    for i in live:
        agreement[i] = float(np.median([cos[i, j] for j in live if j != i]))
    typical = float(np.median([agreement[i] for i in live]))
    if typical > 0:
        limit = t.direction_fraction * typical
        for i in live:
            if agreement[i] < limit:
                flags.append(
                    Flag(
                        i,
                        "direction",
                        f"its change points away from its peers': median cosine "
                        f"{agreement[i]:.3g} to them, the round's typical is {typical:.3g} "
                        f"(limit {limit:.3g})",
                    )
                )
    return tuple(agreement)
