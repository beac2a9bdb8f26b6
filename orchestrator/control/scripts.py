"""The Lua scripts behind every state transition: each runs atomically inside Redis.

Redis runs a script to its end before serving anything else, so a transition (lease a
task, settle an expired lease, cancel a job) is never seen half done and never races
another; a coordinator killed between two scripts leaves consistent state. Every script is
idempotent: run again, it changes nothing and answers the same.

Scripts get their key templates from orchestrator/control/keys.py (ARGV[1], with a few limits) and
the caller's clock (`now`, unix seconds), so tests can drive time. They use one Redis
instance (keys are built inside the scripts: not for Redis Cluster).

The sources are lua/<name>.lua beside this module, one a script, each run with lua/lib.lua
before it. The shared library holds the task fate rules used by several scripts:
- `task_wanted`: a task is wanted while its job is not finished and its trial (if any)
  still runs; unwanted queued tasks are cancelled instead of leased or re-queued;
- `settle`: a lease ended without an accepted result: the task is queued again at the
  front of its queue (an expiry, a failure and a cluster worker's rejected result count
  toward max_attempts; a release, a revocation and a volunteer's rejected result do not, and
  a volunteer's failures count once per owner), or fails for good (max attempts reached, or
  a cluster worker's non-retryable failure), failing its trial and cancelling that round's
  queued siblings, or is cancelled;
- the queue (see orchestrator/control/queue.py for the design): per (tier, job) lists and a per
  tier rotation of jobs for round robin;
- the metrics: `tally`/`tally_by` (event counters) and `observe` (histograms), declared in
  orchestrator/control/metrics.py, counted in the script that makes the transition.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from cotune.orchestrator.control.events import MAX_EVENTS
from cotune.orchestrator.control.keys import Keys
from cotune.orchestrator.control.metrics import lua_config as metrics_config
from cotune.orchestrator.protocol.states import TERMINAL_JOB_STATES

SCRIPT_NAMES = (
    "create_job",
    "transition_job",
    "record_base_model",
    "record_data_fit",
    "cancel_job",
    "put_trial",
    "record_round",
    "finish_trial",
    "enqueue_task",
    "record_merge",
    "lease",
    "heartbeat",
    "complete",
    "give_up",
    "reclaim",
    "strike",
    "enroll",
    "revoke_join",
    "authorize",
    "verdict",
    "metrics",
)


@functools.cache
def lua_source(name: str) -> str:
    """The Lua source of `lib` or of one script: lua/<name>.lua, installed as package data."""
    lua = resources.files("cotune.orchestrator.control") / "lua"
    return (lua / f"{name}.lua").read_text(encoding="utf-8")


LEASE_KEEP_S = 7 * 24 * 3600  # an ended lease answers retried reports this long
PROGRESS_EVERY_S = 5.0  # heartbeats become progress events at most this often per lease


class Scripts:
    """The scripts registered on one Redis client (EVALSHA, loaded again after a restart)."""

    def __init__(
        self,
        redis: Any,
        keys: Keys,
        *,
        max_events: int = MAX_EVENTS,
        lease_keep_s: int = LEASE_KEEP_S,
        progress_every_s: float = PROGRESS_EVERY_S,
    ) -> None:
        self._config = json.dumps(
            {
                "k": keys.templates(),
                "max_events": max_events,
                "lease_keep_s": lease_keep_s,
                "progress_every_s": progress_every_s,
                "terminal_job_states": list(TERMINAL_JOB_STATES),
                **metrics_config(),
            }
        )
        lib = lua_source("lib")
        self._scripts = {
            name: redis.register_script(lib + lua_source(name)) for name in SCRIPT_NAMES
        }

    def __call__(self, name: str, *args: object) -> Any:
        return self._scripts[name](keys=[], args=[self._config, *(_arg(a) for a in args)])


def _arg(value: object) -> str:
    if isinstance(value, float):
        return repr(value)  # every digit: deadlines and losses survive the trip
    return str(value)
