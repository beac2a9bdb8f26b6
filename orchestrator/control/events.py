"""Each job's event stream in Redis (a capped Stream): appended by every transition, read by
`GET /v1/jobs/{id}/events` (server-sent events, resumable with Last-Event-ID).

An event is (id, kind, time, data): the id is the Redis stream id ("1712345678901-0"),
ordered, so a reader resumes after the last one it saw. Kinds: job_created, job_state,
base_model_staged, trial_started, trial_finished, round_evaluated, round_merged, task_queued,
task_leased, progress, task_accepted, task_rejected, task_attempt_failed, task_released,
lease_expired, task_failed, task_cancelled, and what the reconciler emits (sharding_started,
dataset_sharded, merge_failed, redundancy_rerun, coordinator_error).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cotune.orchestrator.control.keys import Keys
from cotune.orchestrator.control.records import text

if TYPE_CHECKING:
    import redis as redis_lib

MAX_EVENTS = 10_000  # kept per job (approximately: Redis trims whole nodes)
FIRST = "0-0"


@dataclass(frozen=True)
class Event:
    id: str
    kind: str
    time: float
    data: dict[str, Any]


def check_event_id(value: str) -> str:
    """A stream id such as 1712345678901-0 (or 0-0); ValueError otherwise."""
    ms, _, seq = value.partition("-")
    if not (ms.isdigit() and (seq.isdigit() or seq == "") and len(value) <= 42):
        raise ValueError(f"{value!r} is not an event id (like 1712345678901-0)")
    return value


class Events:
    def __init__(self, redis: redis_lib.Redis, keys: Keys, max_events: int = MAX_EVENTS) -> None:
        self.redis: Any = redis
        self.keys = keys
        self.max_events = max_events

    def append(self, job_id: str, kind: str, data: dict[str, Any], now: float | None = None) -> str:
        fields = {
            "kind": kind,
            "time": repr(now if now is not None else time.time()),
            "data": json.dumps(data, allow_nan=False),
        }
        event_id = self.redis.xadd(
            self.keys.events(job_id),
            fields,
            maxlen=self.max_events,
            approximate=True,
        )
        return text(event_id)

    def read(
        self,
        job_id: str,
        after: str = FIRST,
        *,
        count: int = 500,
        block_ms: int | None = None,
    ) -> list[Event]:
        """Events after the id `after` (oldest first); waits up to `block_ms` for one."""
        answer = self.redis.xread(
            {self.keys.events(job_id): check_event_id(after)}, count=count, block=block_ms
        )
        events: list[Event] = []
        for _stream, entries in answer or []:
            for event_id, raw in entries:
                fields = {text(k): text(v) for k, v in raw.items()}
                events.append(
                    Event(
                        id=text(event_id),
                        kind=fields.get("kind", ""),
                        time=float(fields.get("time") or 0.0),
                        data=json.loads(fields.get("data") or "{}"),
                    )
                )
        return events

    def last_id(self, job_id: str) -> str:
        """The id of the newest event (FIRST when there is none)."""
        newest = self.redis.xrevrange(self.keys.events(job_id), count=1)
        return text(newest[0][0]) if newest else FIRST
