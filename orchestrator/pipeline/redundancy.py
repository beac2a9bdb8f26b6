"""Redundancy: a fraction of volunteer tasks is trained again by workers of other owners, and
the runs are compared; a majority of agreeing runs, of distinct owners, decides.

Which tasks: `chosen(task_id, fraction)`, a hash of the task id (deterministic: whoever asks,
whenever, the same tasks). Two runs of one task share its seed, data and start, so honest
runs agree: their probe losses differ by at most trust.redundancy_loss_tolerance, their
change norms by at most a factor 1 + trust.redundancy_norm_tolerance, and the cosine between
their changes of the start adapter is at least trust.redundancy_min_cosine (`agree`). `decide`
reads the checked results of the original and its duplicates (one per owner: the caller
drops a second result of an owner) and finds the largest group of runs that agree with each
other:

    a group of two or more, larger than any other   -> it wins: its runs are accepted (the
                                                       original vouched for when in it, else
                                                       outvoted and replaced by a winner's
                                                       result), every other run outvoted
    none (no two agree), or a tie between groups    -> another run is needed (`need_run`)

Nothing is ever accepted without a second owner's agreeing run: with no majority in sight
the caller queues another duplicate, and once MAX_DUPLICATES are spent it re-runs the
original (its result dropped without a strike; nobody could tell who was right). A
duplicate is leased only to a worker of an owner with no other run of the task in flight or
in hand (control/lua/lease.lua), so one owner's accounts never vote twice.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations

#: Duplicates queued for one task at most; past them the original stands on its own checks.
MAX_DUPLICATES = 3


def chosen(task_id: str, fraction: float) -> bool:
    """True for a `fraction` of task ids, the same ones every time."""
    if fraction <= 0:
        return False
    draw = int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "big") / 2**64
    return draw < fraction


@dataclass(frozen=True)
class Ballot:
    """One checked result of a task or of one of its duplicates."""

    task_id: str
    attempt: int
    verifying: bool  # still waiting for a verdict (else already accepted)
    probe_loss: float | None
    change_norm: float | None = None
    owner: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return (self.task_id, self.attempt)


def pair(a: Ballot, b: Ballot) -> frozenset[tuple[str, int]]:
    return frozenset((a.key, b.key))


def agree(
    a: Ballot,
    b: Ballot,
    cosine: float,
    *,
    loss_tolerance: float,
    min_cosine: float,
    norm_tolerance: float = math.inf,
) -> bool:
    """Two runs of one task agree: close probe losses, close change norms, one direction."""
    losses = (
        a.probe_loss is None
        or b.probe_loss is None
        or abs(a.probe_loss - b.probe_loss) <= loss_tolerance
    )
    sizes = True
    if a.change_norm is not None and b.change_norm is not None:
        low, high = sorted((a.change_norm, b.change_norm))
        sizes = high <= low * (1 + norm_tolerance)
    return losses and sizes and cosine >= min_cosine


@dataclass(frozen=True)
class Vote:
    """What follows from the results in hand (module docstring)."""

    original: bool | None  # True: vouched for; False: outvoted; None: not decided yet
    accept: tuple[str, ...] = ()  # duplicate task ids to accept (verifying ones)
    reject: tuple[str, ...] = ()  # duplicate task ids outvoted (verifying ones)
    winner: str | None = None  # outvoted original: the winning run whose result replaces it
    need_run: bool = False


def decide(
    original: Ballot,
    others: Sequence[Ballot],
    agrees: Callable[[Ballot, Ballot], bool],
) -> Vote:
    """The vote over the original's result and its duplicates' checked `others`."""
    ballots = [original, *others]
    group = _majority(ballots, agrees)
    if group is None:
        return Vote(None, need_run=True)
    winners = [b for b in others if b in group]
    losers = [b for b in others if b not in group]
    if original in group:
        return Vote(True, accept=_pending(winners), reject=_pending(losers))
    # The first duplicate of the winning group replaces the original: the same one whoever
    # decides, whatever order the runs came in.
    first = min(winners, key=lambda b: (len(b.task_id), b.task_id))
    return Vote(False, accept=_pending(winners), reject=_pending(losers), winner=first.task_id)


def _majority(
    ballots: Sequence[Ballot], agrees: Callable[[Ballot, Ballot], bool]
) -> list[Ballot] | None:
    """The largest set of two or more runs that all agree with each other, if no other set of
    that size exists (a tie between two groups decides nothing). At most a handful of runs:
    every subset is looked at."""
    for size in range(len(ballots), 1, -1):
        groups = [
            list(group)
            for group in combinations(ballots, size)
            if all(agrees(a, b) for a, b in combinations(group, 2))
        ]
        if groups:
            return groups[0] if len(groups) == 1 else None
    return None


def _pending(ballots: Iterable[Ballot]) -> tuple[str, ...]:
    return tuple(b.task_id for b in ballots if b.verifying)
