"""The task queue: per-tier lists (control/tiers.py), round robin across jobs, at-least-once
leasing.

Fairness. Each (tier, job) has its own list of queued task ids; each tier has a rotation:
the list of jobs with queued work there. Taking a task moves the job at the head of the
rotation to its tail and pops that job's next task, so jobs take turns task by task,
whatever their sizes. A re-queued task (its lease expired, failed or was given back) goes
to the front of its job's list: a resumed task finishes before new work starts.

At-least-once. The queue, the task and its lease change in one Lua script (see
orchestrator/control/scripts.py), so a task is always either in its queue or held by exactly one
active lease with a deadline in the `leases:deadlines` sorted set; `Leases.reclaim_expired`
moves overdue leases' tasks back (see docs/architecture.md, "State and queue").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cotune.orchestrator.control.records import text
from cotune.orchestrator.control.tiers import TIER_NAMES

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State


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
