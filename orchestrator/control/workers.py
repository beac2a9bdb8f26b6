"""The worker registry: enrollment with a join token, worker tokens, who holds what.

A worker enrolls once per start (`POST /v1/workers/enroll`): the join token names the
contributor its work is credited to, and its kind (volunteer or cluster). Enrollment is one
Lua script (control/lua/enroll.lua) that checks the join token (known, unrevoked, unexpired,
uses left, owner not quarantined), counts its use and records the worker, so a token with
`max_uses` 5 enrolls exactly 5 workers however many try at once. The worker gets a fresh id
and token; only the token's sha256 is kept. Every later call authenticates with
`authorize` (one Lua script, control/lua/authorize.lua, comparing hashes), which also renews
the token and takes the call from the worker's rate bucket: a worker
token expires `token_ttl_s` after its last use (renewed at most once a minute, to spare a
write per call). The hardware reported at enrollment sets the worker's lease cap
(`max_leases`: one per GPU, one for a CPU-only worker; enforced in control/lua/lease.lua).

`revoke_join_token` revokes join tokens (by name: every token of that name; or by hash) and
with them every worker token enrolled with them (control/lua/revoke_join.lua): those
workers' next call is refused and their active leases are revoked, the tasks queued again
without a failure counted.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.records import decode_hash, text
from cotune.orchestrator.control.tokens import (
    JoinTokens,
    WorkerKind,
    new_token,
    token_hash,
)
from cotune.orchestrator.protocol.problems import Forbidden, NotFound, Unauthorized

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State
    from cotune.orchestrator.protocol.wire import Hardware

WORKER_TOKEN_TTL_S = 24 * 3600.0  # settings.py's default (COTUNE_WORKER_TOKEN_TTL_S)
RENEW_EVERY_S = 60.0  # a used token's expiry is pushed at most this often


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
    max_leases: int = 1
    token_expires_at: float | None = None
    revoked_at: float | None = None

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
            max_leases=int(h.get("max_leases") or max(int(h.get("gpus") or 0), 1)),
            token_expires_at=float(h["token_expires_at"]) if h.get("token_expires_at") else None,
            revoked_at=float(h["revoked_at"]) if h.get("revoked_at") else None,
        )


@dataclass(frozen=True)
class Revocation:
    """What `revoke_join_token` did (counts of what it revoked now; 0 on a repeat)."""

    tokens: int
    workers: int
    leases: int


class Workers:
    def __init__(self, state: State, *, token_ttl_s: float = WORKER_TOKEN_TTL_S) -> None:
        if token_ttl_s <= RENEW_EVERY_S:
            raise ValueError(
                f"the worker token lifetime (COTUNE_WORKER_TOKEN_TTL_S) must be over "
                f"{RENEW_EVERY_S:.0f} s, got {token_ttl_s:g}"
            )
        self.redis = state.redis
        self.keys = state.keys
        self.clock = state.clock
        self.scripts = state.scripts
        self.token_ttl_s = token_ttl_s
        self.join_tokens = JoinTokens(state.redis, state.keys, state.clock)

    def enroll(self, join_token: str, hardware: Hardware) -> tuple[WorkerRecord, str]:
        """A new worker and its token. Unauthorized for a join token that is unknown,
        expired, revoked or used up (the message says which); Forbidden for a quarantined
        owner."""
        worker_id = "w-" + secrets.token_hex(8)
        token = new_token("worker")
        now = self.clock()
        fields = {
            "worker_id": worker_id,
            "token_sha256": token_hash(token),
            "token_expires_at": repr(now + self.token_ttl_s),
            "hardware": hardware.model_dump_json(),
            "gpus": str(len(hardware.gpus)),
            "max_leases": str(max(len(hardware.gpus), 1)),
            "enrolled_at": repr(now),
            "last_seen": repr(now),
        }
        answer = self.scripts("enroll", token_hash(join_token), worker_id, json.dumps(fields), now)
        got = [text(x) for x in answer]
        status = got[0]
        if status == "unknown":
            raise Unauthorized("unknown or expired join token", "join_token")
        if status == "revoked":
            raise Unauthorized(
                f"join token revoked (at {_when(got[1])}); ask the operator for a new one",
                "join_token",
            )
        if status == "expired":
            raise Unauthorized(
                f"join token expired (at {_when(got[1])}); ask the operator for a new one",
                "join_token",
            )
        if status == "used_up":
            raise Unauthorized(
                f"join token used up: it enrolled {got[1]} worker(s), its max_uses is {got[2]}; "
                "ask the operator for a new one",
                "join_token",
            )
        if status == "quarantined":
            raise Forbidden(
                f"contributor {got[1]!r} is quarantined; ask the operator", "join_token"
            )
        return self.get(worker_id), token

    def authenticate(self, worker_id: str, token: str | None) -> WorkerRecord:
        """The worker whose token this is, its token renewed; Unauthorized (changing
        nothing) for a missing, wrong, revoked or expired token."""
        self.authorize(worker_id, token)
        return self.get(worker_id)

    def authorize(
        self,
        worker_id: str,
        token: str | None,
        rate: tuple[float, float] | None = None,
        *,
        rate_clock: Callable[[], float] = time.time,
    ) -> float:
        """Check and renew the worker's token and, with `rate` (calls a second, burst),
        take one call from its bucket (lib.lua `take_token`): one round trip, the API's on
        every worker call. Unauthorized (changing nothing) as `authenticate`; returns the
        seconds until the bucket allows a call (0.0: go ahead)."""
        if not token:
            raise Unauthorized("missing bearer token (Authorization: Bearer <worker token>)")
        now = self.clock()
        per_s, burst = rate if rate is not None else ("", "")
        got = self.scripts(
            "authorize",
            worker_id,
            token_hash(token),
            now,
            repr(now + self.token_ttl_s),
            self.token_ttl_s - RENEW_EVERY_S,
            per_s,
            burst,
            rate_clock(),
        )
        status = text(got[0])
        if status == "ok":
            return float(text(got[1]))
        if status == "unknown":
            raise Unauthorized(f"unknown worker {worker_id!r}; enroll again", "worker_id")
        if status == "wrong":
            raise Unauthorized(f"wrong token for worker {worker_id}")
        if status == "revoked":
            raise Unauthorized(
                f"worker token revoked (its join token was revoked at {_when(text(got[1]))}); "
                "ask the operator for a new join token"
            )
        raise Unauthorized("worker token expired; enroll again")

    def revoke_join_token(self, name_or_hash: str) -> Revocation:
        """Revoke every join token of that name (or the one with that sha256) and every
        worker token enrolled with them; their active leases are revoked (tasks queued
        again, not counted). NotFound if no join token has that name or hash. Idempotent."""
        got = self.scripts("revoke_join", name_or_hash, self.clock())
        tokens, workers, leases = (int(x) for x in got)
        if tokens < 0:
            raise NotFound(f"no join token named {name_or_hash!r}", "name")
        return Revocation(tokens=tokens, workers=workers, leases=leases)

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


def _when(stamp: str) -> str:
    """A unix time from Redis as UTC ISO 8601 (seconds), for messages."""
    return datetime.fromtimestamp(float(stamp), UTC).isoformat(timespec="seconds")
