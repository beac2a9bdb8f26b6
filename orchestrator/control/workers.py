"""The worker registry: enrollment with a join token, worker tokens, who holds what.

A worker enrolls once per start (`POST /v1/workers/enroll`): the join token names the
contributor its work is credited to, and its kind (volunteer or cluster). The worker gets a
fresh id and token; only the token's sha256 is kept. Every later call authenticates with
`authenticate` (constant-time comparison of hashes).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.records import decode_hash, text
from cotune.orchestrator.control.tokens import (
    JoinTokens,
    WorkerKind,
    new_token,
    token_hash,
    token_matches,
)
from cotune.orchestrator.protocol.problems import Unauthorized

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.protocol.wire import Hardware


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    name: str
    kind: WorkerKind
    token_sha256: str
    hardware: dict[str, Any]
    enrolled_at: float
    last_seen: float
    tokens: float
    tasks_accepted: int
    tasks_failed: int
    tasks_rejected: int
    tasks_expired: int
    leases: tuple[str, ...]

    @classmethod
    def from_hash(cls, h: dict[str, str], leases: tuple[str, ...]) -> WorkerRecord:
        return cls(
            worker_id=h["worker_id"],
            name=h["name"],
            kind=h["kind"],  # type: ignore[arg-type]
            token_sha256=h["token_sha256"],
            hardware=json.loads(h.get("hardware") or "{}"),
            enrolled_at=float(h.get("enrolled_at") or 0),
            last_seen=float(h.get("last_seen") or 0),
            tokens=float(h.get("tokens") or 0),
            tasks_accepted=int(h.get("tasks_accepted") or 0),
            tasks_failed=int(h.get("tasks_failed") or 0),
            tasks_rejected=int(h.get("tasks_rejected") or 0),
            tasks_expired=int(h.get("tasks_expired") or 0),
            leases=leases,
        )


class Workers:
    def __init__(self, state: State) -> None:
        self.redis = state.redis
        self.keys = state.keys
        self.clock = state.clock
        self.join_tokens = JoinTokens(state.redis, state.keys)

    def enroll(self, join_token: str, hardware: Hardware) -> tuple[WorkerRecord, str]:
        """A new worker and its token; Unauthorized for an unknown or expired join token."""
        join = self.join_tokens.verify(join_token)
        if join is None:
            raise Unauthorized("unknown or expired join token", "join_token")
        worker_id = "w-" + secrets.token_hex(8)
        token = new_token("worker")
        now = self.clock()
        fields = {
            "worker_id": worker_id,
            "name": join.name,
            "kind": join.kind,
            "token_sha256": token_hash(token),
            "join_token": join.token_sha256,
            "hardware": hardware.model_dump_json(),
            "gpus": str(len(hardware.gpus)),
            "enrolled_at": repr(now),
            "last_seen": repr(now),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.worker(worker_id), mapping=fields)
        pipe.zadd(self.keys.workers(), {worker_id: now})
        pipe.execute()
        return self.get(worker_id), token

    def authenticate(self, worker_id: str, token: str | None) -> WorkerRecord:
        """The worker whose token this is; Unauthorized (changing nothing) otherwise."""
        if not token:
            raise Unauthorized("missing bearer token (Authorization: Bearer <worker token>)")
        raw = self.redis.hget(self.keys.worker(worker_id), "token_sha256")
        if raw is None:
            token_matches(token, "0" * 64)  # same work either way: no timing hint
            raise Unauthorized(f"unknown worker {worker_id!r}; enroll again", "worker_id")
        if not token_matches(token, text(raw)):
            raise Unauthorized(f"wrong token for worker {worker_id}")
        return self.get(worker_id)

    def get(self, worker_id: str) -> WorkerRecord:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.worker(worker_id))
        pipe.smembers(self.keys.worker_leases(worker_id))
        raw, leases = pipe.execute()
        if not raw:
            raise Unauthorized(f"unknown worker {worker_id!r}; enroll again", "worker_id")
        return WorkerRecord.from_hash(decode_hash(raw), tuple(sorted(text(x) for x in leases)))

    def all(self) -> list[WorkerRecord]:
        """Every enrolled worker, oldest first."""
        ids = [text(i) for i in self.redis.zrange(self.keys.workers(), 0, -1)]
        pipe = self.redis.pipeline(transaction=False)
        for worker_id in ids:
            pipe.hgetall(self.keys.worker(worker_id))
            pipe.smembers(self.keys.worker_leases(worker_id))
        replies = pipe.execute()
        return [
            WorkerRecord.from_hash(decode_hash(h), tuple(sorted(text(x) for x in leases)))
            for h, leases in zip(replies[::2], replies[1::2], strict=True)
            if h
        ]

    def leaderboard(self, limit: int = 100) -> list[tuple[str, float, int]]:
        """(contributor, accepted tokens, accepted tasks), most tokens first."""
        rows = self.redis.zrevrange(self.keys.leaderboard(), 0, limit - 1, withscores=True)
        pipe = self.redis.pipeline(transaction=False)
        for name, _ in rows:
            pipe.zscore(self.keys.leaderboard_tasks(), name)
        tasks = pipe.execute()
        return [
            (text(name), float(score), int(n or 0))
            for (name, score), n in zip(rows, tasks, strict=True)
        ]
