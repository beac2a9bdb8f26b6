"""A time window split per instant into categories, for bench/endtoend.py.

Each `Interval` says that during [start, end) something of one category went on (a worker
training, a merge on Ray, a task waiting for a lease), with a label saying what. `split`
walks the window from one interval boundary to the next and gives each instant to the
category of highest priority active then, and to the label of the first interval of that
category (in the order given) that covers it. An instant that no interval covers goes to
the last category under the label `UNCOVERED`. The categories therefore add up to the
window exactly, whatever the intervals overlap.

    parts = split(0.0, 10.0, intervals, priority=("training", "merge", "orchestration"))
    parts.seconds["training"], parts.labels["orchestration"]["lease poll"], parts.busy
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

UNCOVERED = "nothing recorded"


@dataclass(frozen=True)
class Interval:
    start: float
    end: float
    category: str
    label: str = ""


@dataclass(frozen=True)
class Split:
    window_s: float
    seconds: dict[str, float]  # category -> instants it won (sums to window_s)
    labels: dict[str, dict[str, float]]  # category -> label -> instants it won
    busy: dict[str, float]  # category -> instants it was active at all (overlaps included)
    overlap_s: float  # instants with two or more categories active
    segments: list[tuple[float, float, str, str]] = field(repr=False)  # (start, end, cat, label)


def split(
    start: float, end: float, intervals: Iterable[Interval], priority: Sequence[str]
) -> Split:
    """The window [start, end) split per instant by `priority` (first wins)."""
    rank = {name: i for i, name in enumerate(priority)}
    spans = [
        (max(i.start, start), min(i.end, end), i)
        for i in intervals
        if i.category in rank and i.end > start and i.start < end and i.end > i.start
    ]
    unknown = {i.category for i in intervals if i.category not in rank}
    if unknown:
        raise ValueError(f"categories {sorted(unknown)} are not in the priority list")
    cuts = sorted({start, end, *(s for s, _, _ in spans), *(e for _, e, _ in spans)})
    seconds: dict[str, float] = dict.fromkeys(priority, 0.0)
    busy: dict[str, float] = dict.fromkeys(priority, 0.0)
    labels: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    segments: list[tuple[float, float, str, str]] = []
    overlap = 0.0
    for a, b in pairwise(cuts):
        mid, length = (a + b) / 2, b - a
        active = [i for s, e, i in spans if s <= mid < e]
        categories = {i.category for i in active}
        for name in categories:
            busy[name] += length
        if len(categories) > 1:
            overlap += length
        if active:
            best = min(rank[i.category] for i in active)
            winner = next(i for i in active if rank[i.category] == best)
            category, label = winner.category, winner.label
        else:
            category, label = priority[-1], UNCOVERED
        seconds[category] += length
        labels[category][label] += length
        if segments and segments[-1][2:] == (category, label) and segments[-1][1] == a:
            segments[-1] = (segments[-1][0], b, category, label)
        else:
            segments.append((a, b, category, label))
    return Split(
        window_s=end - start,
        seconds=seconds,
        labels={c: dict(sorted(v.items(), key=lambda kv: -kv[1])) for c, v in labels.items()},
        busy=busy,
        overlap_s=overlap,
        segments=segments,
    )
