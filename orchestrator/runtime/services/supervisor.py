"""Restarting a service that died: a bounded restart rate, and what one restart did.

`cotune up` restarts a redis-server or weed that dies (runtime/stack.py `revive`) rather
than stopping the whole stack; a service that keeps dying is given up on once it has used
its budget, so a broken one (a full disk, a corrupt AOF) ends the stack with a clear error
instead of restarting forever.
"""

from __future__ import annotations

import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


@dataclass
class RestartBudget:
    """At most `limit` restarts within any `window_s`."""

    limit: int = MAX_RESTARTS
    window_s: float = RESTART_WINDOW_S
    clock: Callable[[], float] = time.monotonic
    _times: deque[float] = field(default_factory=deque, repr=False)

    def take(self) -> bool:
        """Spend one restart: False (and nothing spent) when the window's budget is used."""
        now = self.clock()
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True

    @property
    def used(self) -> int:
        """Restarts spent within the current window (as of the last `take`)."""
        return len(self._times)


@dataclass(frozen=True)
class Restart:
    """One service brought back: which, how its last run ended, where it answers again."""

    service: str
    old_pid: int
    exit_code: int | None
    new_pid: int
    source: str  # what it came back from: "its AOF", "its data folder"
    where: str  # "port 6379", "S3 port 8333"
    took_s: float
    used: int
    limit: int
    window_s: float

    def line(self) -> str:
        """The one line `cotune up` prints for this restart."""
        return (
            f"{self.service} (pid {self.old_pid}) {describe_exit(self.exit_code)}; restarted "
            f"from {self.source} on {self.where} as pid {self.new_pid} in {self.took_s:.1f} s "
            f"(restart {self.used} of at most {self.limit} in {self.window_s:.0f} s)"
        )


def describe_exit(code: int | None) -> str:
    """How a process ended, in words: 'was killed by SIGKILL', 'exited with code 1'."""
    if code is None:
        return "stopped"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
