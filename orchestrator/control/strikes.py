"""Strikes and quarantine: what happens to the owner of a worker that cheats or misbehaves.

An owner is a join token's name: every worker enrolled with a token of that name belongs to
it, so a contributor cannot shed strikes by enrolling again. A strike is recorded for a
rejected result, a call on another worker's lease or a forged checkpoint
(docs/security.md); at `max_strikes` the owner is quarantined in one Lua script: its workers
get no more leases, their active leases are revoked (the tasks go back to the queue, not
counted against their attempts) and no further credit reaches the owner. Cluster workers are
trusted and never quarantined. An admin may quarantine or pardon an owner by hand
(`cotune owner quarantine NAME`, `cotune owner pardon NAME`: api/routes_owners.py); the
limit is COTUNE_MAX_STRIKES (settings.py).

    strikes = Strikes(state)
    if strikes.add(worker_id, "result rejected: NaN in ...").quarantined: ...
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cotune.orchestrator.control.records import text

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State

MAX_STRIKES = 3.0  # settings.py's default (COTUNE_MAX_STRIKES)


@dataclass(frozen=True)
class StrikeOutcome:
    strikes: float
    quarantined: bool
    revoked_leases: int


@dataclass(frozen=True)
class Standing:
    """An owner as the operator sees it: its strikes, its quarantine, its enrolled workers."""

    owner: str
    strikes: float
    quarantined: bool
    workers: int


class Strikes:
    def __init__(self, state: State, *, max_strikes: float = MAX_STRIKES) -> None:
        self.redis = state.redis
        self.keys = state.keys
        self.scripts = state.scripts
        self.clock = state.clock
        self.max_strikes = max_strikes

    def add(
        self, worker_id: str, reason: str, weight: float = 1.0, *, once: str | None = None
    ) -> StrikeOutcome:
        """One strike (or `weight` of one) against the worker's owner; quarantines at the
        limit. An unknown worker: nothing is recorded. `once`: the offense's id (a task and
        attempt, a lease and step): a strike with an id seen in the last day is not counted
        again, so a call resent after a dropped connection strikes once."""
        got = self.scripts(
            "strike", worker_id, weight, reason, self.clock(), self.max_strikes, once or ""
        )
        return StrikeOutcome(float(text(got[0])), text(got[1]) == "1", int(got[2]))

    def count(self, owner: str) -> float:
        return float(text(self.redis.hget(self.keys.strikes(), owner) or 0))

    def is_quarantined(self, owner: str) -> bool:
        return bool(self.redis.sismember(self.keys.quarantined(), owner))

    def quarantined(self) -> list[str]:
        return sorted(text(o) for o in self.redis.smembers(self.keys.quarantined()))

    def standings(self) -> list[Standing]:
        """Every owner with an enrolled worker, a strike or a quarantine, by name."""
        ids = [text(i) for i in self.redis.zrange(self.keys.workers(), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hget(self.keys.worker(worker_id), "name")
        pipe.hgetall(self.keys.strikes())
        pipe.smembers(self.keys.quarantined())
        *names, struck, banned = pipe.execute()
        workers = Counter(text(n) for n in names if n is not None)
        strikes = {text(o): float(text(n)) for o, n in struck.items()}
        quarantined = {text(o) for o in banned}
        return [
            Standing(owner, strikes.get(owner, 0.0), owner in quarantined, workers[owner])
            for owner in sorted(set(workers) | set(strikes) | quarantined)
        ]

    def quarantine(self, owner: str, reason: str = "quarantined by an admin") -> int:
        """Quarantine `owner` now (an operator's lever): its active leases are revoked.
        Returns the number of leases revoked; 0 for an owner with no worker."""
        workers = [text(w) for w in self.redis.smembers(self.keys.owner_workers(owner))]
        volunteers = [
            w
            for w in workers
            if text(self.redis.hget(self.keys.worker(w), "kind") or "") != "cluster"
        ]
        if not volunteers:
            self.redis.sadd(self.keys.quarantined(), owner)
            return 0
        needed = max(self.max_strikes - self.count(owner), 0.0)
        return self.add(volunteers[0], reason, weight=needed).revoked_leases

    def pardon(self, owner: str) -> None:
        """Lift a quarantine and clear the owner's strikes (leases start again at once)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.srem(self.keys.quarantined(), owner)
        pipe.hdel(self.keys.strikes(), owner)
        for worker in self.redis.smembers(self.keys.owner_workers(owner)):
            pipe.hdel(self.keys.worker(text(worker)), "quarantined")
        pipe.execute()
