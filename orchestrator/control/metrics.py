"""Every Prometheus metric cotune exports, declared in this one module (control/scrape.py
computes and serves them at `GET /metrics`).

Two kinds, by where the number lives:

- **Cluster-wide, kept in Redis**, so every coordinator replica reports the same truth and a
  restart loses nothing. The state gauges (`GAUGES`: `cotune_jobs`, `cotune_tasks`, ...)
  are counted at scrape time by one read-only Lua script (lua/metrics.lua). The event
  counters (`COUNTERS`) and histograms (`HISTOGRAMS`) are counted by the Lua scripts that
  make the transitions, in the same atomic step (lib.lua `tally`, `tally_by` and `observe`,
  into the keys `metrics:counters` and `metrics:histogram:<name>`), so a transition run
  twice counts once. Replicas repeat these series: aggregate them over instances with max().
- **Per process** (`PROCESS`): API request latency, the Redis and object-store errors this
  process met (Redis cannot count its own absence), the version, and the standard
  `process_*` series. They start from zero with the process; sum them over replicas.

    GAUGES, COUNTERS, HISTOGRAMS           # the cluster-wide series (control/scrape.py)
    API_REQUEST_DURATION, REDIS_ERRORS     # this process's (PROCESS)

Names follow Prometheus conventions: one `cotune_` prefix, base units (`_seconds`,
`_bytes`), `_total` on counters, no `_created` series. Label values are bounded by
construction: states, tiers, worker kinds, outcomes and reason classes are the fixed lists
below, routes are templates, the per-job series (label `job_id`, and `trial`) exist only
while their job runs (bounded by its n_trials), and `contributor` only for the leaderboard's
top TOP_CONTRIBUTORS. Never a worker, lease or task id. Each series' HELP text below says
what it means; deploy/prometheus/ has the alert rules, docs/observability.md the reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, get_args

import prometheus_client
from cotune.orchestrator.control.tokens import WorkerKind
from cotune.orchestrator.data.s3errors import ObjectStoreError
from cotune.orchestrator.protocol.states import (
    TERMINAL_JOB_STATES,
)
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

# Counters and histograms of this process export no `<name>_created` series (they would
# double the series count and mean nothing across restarts).
prometheus_client.disable_created_metrics()

PREFIX = "cotune_"
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_PLAIN_0_0_4

# --- the fixed label values -----------------------------------------------------------------

WORKER_KINDS: tuple[str, ...] = get_args(WorkerKind)
WORKER_STATES = ("busy", "idle")  # of a worker seen lately: holds an active lease, or not
#: How a task's attempt (one lease) ended. `accepted` and `rejected` count the verdict, so a
#: volunteer's result counts once it leaves `verifying`.
TASK_OUTCOMES = ("accepted", "rejected", "failed", "expired", "released", "revoked")
#: Why a result was rejected, as a class (the full reason is in the job's events).
REJECTION_REASONS = (
    "intake",  # the cheap checks at `complete` (issued keys, sizes, sha256, header)
    "checks",  # the heavy checks (finite values, step bound, probe loss)
    "unverifiable",  # the heavy checks kept failing to run
    "quarantined",  # its owner was quarantined meanwhile
    "redundancy",  # outvoted or disagreeing runs of one task
    "review",  # the round review (an outlier among the round's shards)
)
ARTIFACT_DIRECTIONS = ("download", "upload")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
UNMATCHED_ROUTE = "unmatched"  # a request no route matched (its path is never a label)
#: The leaderboard's top, by credited tokens, exported as `cotune_contributor_tokens{name}`:
#: a fixed number of series however many people contribute.
TOP_CONTRIBUTORS = 10


# --- the series kept in Redis ---------------------------------------------------------------


@dataclass(frozen=True)
class RedisCounter:
    """A counter the Lua scripts keep in the hash `metrics:counters`: one field per label
    value, `<name>:<value>` (`<name>` without a label), counted by lib.lua `tally_by`."""

    name: str  # without the prefix and `_total`
    help: str
    label: str | None = None
    values: tuple[str, ...] = ()

    def field(self, value: str | None = None) -> str:
        return self.name if value is None else f"{self.name}:{value}"


@dataclass(frozen=True)
class RedisHistogram:
    """A histogram the Lua scripts keep in `metrics:histogram:<name>` (lib.lua `observe`):
    field i counts observations in (buckets[i-2], buckets[i-1]] (1-based, Lua's), field
    len(buckets)+1 those above the last bound, `sum` their sum."""

    name: str  # without the prefix; ends in its unit
    help: str
    buckets: tuple[float, ...]


COUNTERS: tuple[RedisCounter, ...] = (
    RedisCounter(
        "task_attempts",
        "Task attempts (one lease each) by how they ended: accepted or rejected (the "
        "verdict on the result), failed (the worker reported a failure), expired (no "
        "heartbeat before the deadline, or the lease's maximum age), released (given back "
        "by a stopping worker) or revoked (its owner quarantined or join token revoked).",
        "outcome",
        TASK_OUTCOMES,
    ),
    RedisCounter(
        "rejections",
        "Rejected results by reason class (the job's events name the exact reason).",
        "reason",
        REJECTION_REASONS,
    ),
    RedisCounter(
        "tasks_failed",
        "Tasks that failed for good (max_attempts used up, or a non-retryable failure), "
        "failing their trial.",
    ),
    RedisCounter(
        "task_retries",
        "Attempts after which a task was queued again (a failure, an expiry, a release, a "
        "rejection or a revocation that left it attempts to go).",
    ),
    RedisCounter("jobs_finished", "Jobs that ended, by final state.", "state", TERMINAL_JOB_STATES),
    RedisCounter(
        "tokens_trained",
        "Tokens trained by accepted results (the coordinator's count from the task, never "
        "the worker's), by worker kind.",
        "kind",
        WORKER_KINDS,
    ),
    RedisCounter(
        "artifact_bytes",
        "Bytes of artifacts moved between workers and the object store: download (the "
        "inputs a lease hands out as presigned GETs; a worker's cache may skip some) and "
        "upload (results and checkpoints the coordinator verified in the store).",
        "direction",
        ARTIFACT_DIRECTIONS,
    ),
)

# Training runs minutes to hours (a lease lives up to COTUNE_LEASE_MAX_AGE_S, 6 h).
_LONG = (10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0, 14400.0)
_WAIT = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0)
_MERGE = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
_API = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

HISTOGRAMS: tuple[RedisHistogram, ...] = (
    RedisHistogram(
        "task_queue_wait_seconds",
        "Time a task waited in the queue before a lease took it (each attempt).",
        _WAIT,
    ),
    RedisHistogram(
        "task_duration_seconds",
        "Time from lease to reported result of an attempt (training, upload, checks).",
        _LONG,
    ),
    RedisHistogram(
        "merge_duration_seconds",
        "Time to merge a round's shard adapters (download, merge, upload), per round.",
        _MERGE,
    ),
    RedisHistogram(
        "evaluation_duration_seconds",
        "Time to evaluate a round's merged adapter on the eval split, per round.",
        _MERGE,
    ),
)


def lua_config() -> dict[str, Any]:
    """What the Lua scripts get of this table (scripts.py adds it to their config)."""
    return {"histograms": {h.name: list(h.buckets) for h in HISTOGRAMS}}


def counter_fields() -> set[str]:
    """Every field `metrics:counters` may hold."""
    fields = set()
    for c in COUNTERS:
        fields |= {c.field(v) for v in c.values} if c.label else {c.field()}
    return fields


# --- the state gauges, counted at each scrape (control/scrape.py) ---------------------------


@dataclass(frozen=True)
class StateGauge:
    """A gauge control/scrape.py computes from lua/metrics.lua's snapshot at each scrape."""

    name: str  # without the prefix
    help: str
    labels: tuple[str, ...] = ()


_JOB = ("job_id",)  # not `job`: Prometheus sets that to the scrape job's name
_HEARD = ", from their heartbeats (their claims: shown, never credited)."

GAUGES: tuple[StateGauge, ...] = (
    StateGauge("state_up", "1 when this scrape read the state from Redis, 0 when it did not."),
    StateGauge("jobs", "Jobs by state (every job Redis holds).", ("state",)),
    StateGauge("trials", "Trials of unfinished jobs by state.", ("state",)),
    StateGauge(
        "tasks", "Tasks of unfinished jobs by state (redundancy duplicates included).", ("state",)
    ),
    StateGauge("queue_depth", "Queued tasks per memory tier.", ("tier",)),
    StateGauge(
        "workers",
        "Workers that called in within a lease TTL, by kind and state (busy: holding a lease "
        "within its deadline); revoked and quarantined ones left out.",
        ("kind", "state"),
    ),
    StateGauge(
        "owners_quarantined", "Contributors (join token names) quarantined for their strikes."
    ),
    StateGauge(
        "trial_eval_loss",
        "The latest round's eval loss of each trial of a running job (the series ends with "
        "its job).",
        (*_JOB, "trial"),
    ),
    StateGauge(
        "trial_rounds_done",
        "Rounds of each trial of a running job with an eval loss (merged and evaluated).",
        (*_JOB, "trial"),
    ),
    StateGauge(
        "job_trials",
        "The trials of each unfinished job by state (the series end with the job).",
        (*_JOB, "state"),
    ),
    StateGauge(
        "job_tasks",
        "The tasks of each unfinished job by state (the series end with the job).",
        (*_JOB, "state"),
    ),
    StateGauge(
        "job_progress_ratio",
        "Fraction of an unfinished job's trial-rounds done (n_trials x rounds; a pruned, "
        "complete or failed trial counts all its rounds). ETA: (time() - "
        "cotune_job_start_time_seconds) * (1 - ratio) / ratio.",
        _JOB,
    ),
    StateGauge("job_start_time_seconds", "When an unfinished job was submitted (unix time).", _JOB),
    StateGauge(
        "training_tokens_per_second",
        "Tokens per second the workers of each kind report training now" + _HEARD,
        ("kind",),
    ),
    StateGauge(
        "training_memory_bytes",
        "The largest memory in use a worker of each kind reports (GPU or RSS)" + _HEARD,
        ("kind",),
    ),
    StateGauge(
        "training_steps",
        "Optimizer steps done, summed over the live leases of each kind" + _HEARD,
        ("kind",),
    ),
    StateGauge(
        "training_steps_target",
        "Optimizer steps to do (max_steps), summed over the live leases of each kind" + _HEARD,
        ("kind",),
    ),
    StateGauge(
        "contributor_tokens",
        f"Tokens credited to each of the top {TOP_CONTRIBUTORS} contributors (join token "
        "names) of the leaderboard: the coordinator's count, as `cotune leaderboard` shows.",
        ("contributor",),
    ),
)
GAUGE = {g.name: g for g in GAUGES}


# --- the series of this process -------------------------------------------------------------

PROCESS = CollectorRegistry()
"""This process's own series (sum them over replicas): they start at zero with it."""

API_REQUEST_DURATION = Histogram(
    "cotune_api_request_duration_seconds",
    "API request latency, to the response's first byte (an event stream's is its start), "
    "by route template, method and status class.",
    ("route", "method", "status"),
    buckets=_API,
    registry=PROCESS,
)
REDIS_ERRORS = Counter(
    "cotune_redis_errors_total",
    "Redis calls of this process that failed for want of Redis (a request answered 503, a "
    "reconciler pass or scrape that failed).",
    registry=PROCESS,
)
OBJECT_STORE_ERRORS = Counter(
    "cotune_object_store_errors_total",
    "Object store operations of this process that failed after their retries (a request "
    "answered 503, a reconciler step that failed).",
    registry=PROCESS,
)
BUILD_INFO = Gauge(
    "cotune_build_info",
    "The running cotune version.",
    ("version",),
    registry=PROCESS,
    multiprocess_mode="max",
)
prometheus_client.ProcessCollector(registry=PROCESS)  # process_cpu_seconds_total, memory, fds

# Several API processes on one port (COTUNE_API_PROCESSES > 1, runtime/apiserver.py): each
# is started with PROMETHEUS_MULTIPROC_DIR set, so prometheus-client keeps its values in
# files there and a scrape, whichever process answers it, reads the sum over all of them.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def process_exposition() -> bytes:
    """The text of the per-process series: this process's, or the API processes' summed
    (the `process_*` series are then the answering process's own)."""
    import os

    if not os.environ.get(MULTIPROCESS_DIR_ENV):
        return prometheus_client.generate_latest(PROCESS)
    from prometheus_client import multiprocess

    summed = CollectorRegistry()
    multiprocess.MultiProcessCollector(summed)
    own = CollectorRegistry()
    prometheus_client.ProcessCollector(registry=own)
    return prometheus_client.generate_latest(summed) + prometheus_client.generate_latest(own)


def _version() -> str:
    try:
        return version("cotune")
    except PackageNotFoundError:
        return "0+unknown"


BUILD_INFO.labels(_version()).set(1)


def observe_request(route: str | None, method: str, status: int, seconds: float) -> None:
    """One API request into API_REQUEST_DURATION, its labels bounded: the route template
    (UNMATCHED_ROUTE when none matched), a known method or `other`, the status class."""
    method = method.upper() if method.upper() in HTTP_METHODS else "other"
    status_class = f"{status // 100}xx" if 100 <= status <= 599 else "other"
    API_REQUEST_DURATION.labels(route or UNMATCHED_ROUTE, method, status_class).observe(seconds)


def count_error(exc: BaseException) -> bool:
    """Count `exc` in REDIS_ERRORS or OBJECT_STORE_ERRORS if it is one of theirs; False for
    anything else (not counted: a bug, logged where it is caught)."""
    from redis.exceptions import ConnectionError as RedisDown
    from redis.exceptions import TimeoutError as RedisSlow

    # The same test as state.is_unavailable (which cannot be imported here: state imports
    # scripts, which imports this module).
    if isinstance(exc, RedisDown | RedisSlow):
        REDIS_ERRORS.inc()
    elif isinstance(exc, ObjectStoreError):
        OBJECT_STORE_ERRORS.inc()
    else:
        return False
    return True
