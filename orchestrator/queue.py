"""The task queue: memory tiers (best fit), round robin across jobs, at-least-once leasing.

Tiers. A task needs some accelerator memory (the reconciler's estimate); it sits in the
smallest tier whose ceiling holds it (`tier_for`). A worker offering M bytes may take any
tier whose ceiling is <= M, and looks at them from the largest down (`tiers_for`): a big
GPU takes the big work first and only then helps with small work, while a small GPU never
sees work that does not fit it. Ceilings are in decimal GB, as GPUs are sold: every card
reports a little more than its label in bytes (a "24 GB" card has 24 GiB = 25.8e9 bytes,
an H100 "80 GB" 85.5e9), so each lands in its own tier. The smallest tier, "cpu" (up to
2 GB), holds tiny models that any machine can train; it is the only tier a worker without
a GPU takes (it offers its RAM as memory, and would otherwise grab GPU-sized work and
train it a hundred times slower than the GPU that fits it).

Fairness. Each (tier, job) has its own list of queued task ids; each tier has a rotation:
the list of jobs with queued work there. Taking a task moves the job at the head of the
rotation to its tail and pops that job's next task, so jobs take turns task by task,
whatever their sizes. A re-queued task (its lease expired, failed or was given back) goes
to the front of its job's list: a resumed task finishes before new work starts.

At-least-once. The queue, the task and its lease change in one Lua script (see
orchestrator/scripts.py), so a task is always either in its queue or held by exactly one
active lease with a deadline in the `leases:deadlines` sorted set; `Leases.reclaim_expired`
moves overdue leases' tasks back (see docs/architecture.md, "State and queue").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.records import text

if TYPE_CHECKING:
    from orchestrator.state import State

GB = 1_000_000_000


@dataclass(frozen=True)
class Tier:
    name: str
    ceiling_bytes: int


TIERS: tuple[Tier, ...] = (
    Tier("cpu", 2 * GB),
    Tier("8g", 8 * GB),
    Tier("16g", 16 * GB),
    Tier("24g", 24 * GB),
    Tier("40g", 40 * GB),
    Tier("80g", 80 * GB),
    Tier("141g", 141 * GB),
)
TIER_NAMES: tuple[str, ...] = tuple(t.name for t in TIERS)
CPU_TIER = "cpu"


def tier_for(memory_bytes: int) -> str:
    """The tier of a task needing `memory_bytes`: the smallest whose ceiling holds it."""
    if memory_bytes < 0:
        raise ValueError(f"a memory requirement is >= 0 bytes, got {memory_bytes}")
    for tier in TIERS:
        if memory_bytes <= tier.ceiling_bytes:
            return tier.name
    largest = TIERS[-1]
    raise ValueError(
        f"a task needing {memory_bytes / GB:.1f} GB fits no tier (the largest, "
        f"{largest.name}, holds {largest.ceiling_bytes / GB:.0f} GB): lower the sequence "
        "length, batch size or rank, or quantize the base model"
    )


def tiers_for(memory_bytes: int, gpu: bool = True) -> list[str]:
    """The tiers a worker offering `memory_bytes` may take, largest first (a worker without
    a GPU: the cpu tier only)."""
    fitting = [t.name for t in reversed(TIERS) if t.ceiling_bytes <= memory_bytes]
    return fitting if gpu else [t for t in fitting if t == CPU_TIER]


class Queue:
    """A read-only view of the queue, for status pages and metrics."""

    def __init__(self, state: State) -> None:
        self.redis = state.redis
        self.keys = state.keys

    def jobs_in(self, tier: str) -> list[str]:
        """Jobs with queued work in `tier`, in the order they will be served."""
        return [text(j) for j in self.redis.lrange(self.keys.rotation(tier), 0, -1)]

    def depth(self, tier: str, job_id: str | None = None) -> int:
        """Queued tasks in `tier` (of one job, or of all)."""
        jobs = [job_id] if job_id is not None else self.jobs_in(tier)
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            pipe.llen(self.keys.queue(tier, job))
        return sum(pipe.execute())

    def depths(self) -> dict[str, int]:
        """Queued tasks per tier (every tier, zeros included)."""
        return {tier: self.depth(tier) for tier in TIER_NAMES}
