"""Per-worker rate limits: a token bucket in Redis for each worker token's calls.

Every authenticated worker call takes one token from its worker's bucket
(control/lua/rate_limit.lua): the bucket holds up to `burst` tokens and refills at `rate` a
second. An empty bucket refuses the call with the seconds until the next token, which the
API answers as 429 with Retry-After (worker/client.py waits that long before retrying). The
defaults (settings.py: 20 a second, bursts of 60) are far above an honest worker's needs (a
heartbeat every few seconds, a lease request every few seconds while idle), so only a
flood is slowed. The buckets live in Redis, so every API process of one coordinator counts
against the same one.

The clock is real time (not the state's clock, which tests move by hand): a bucket refills
with the seconds that really pass.

    limiter = RateLimiter(state, rate_per_s=20, burst=60)
    wait = limiter.take(worker_id)  # 0.0: go ahead; else seconds to wait
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from cotune.orchestrator.control.records import text

if TYPE_CHECKING:
    from cotune.orchestrator.control.state import State


class RateLimiter:
    def __init__(
        self,
        state: State,
        rate_per_s: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")
        if not burst >= 1:
            raise ValueError(f"burst must be >= 1 (one call at least), got {burst}")
        self.scripts = state.scripts
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock

    def take(self, worker_id: str) -> float:
        """One call of `worker_id`: 0.0 if it may go ahead, else the seconds until one may."""
        wait = self.scripts("rate_limit", worker_id, self.rate_per_s, self.burst, self.clock())
        return float(text(wait))
