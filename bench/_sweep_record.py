"""What a `cotune run` recorded about its sweep, gathered for bench/endtoend.py.

Three sources, each read as a user (or an operator) could read them:

- `read_record(home)`: after the run, the embedded stack is started again on the run's home
  (the job stays in its Redis, the files in its SeaweedFS) and read through the control
  layer: the job's events, tasks (with the worker's metrics in each result), trials, merge
  records and claims (the claim's remaining TTL dates it), the merge and evaluation
  histograms, and from the store every `eval.json` (`cotune evaluate`'s own `seconds`).
- `parse_worker_log(path)`: a local worker's log (<home>/logs/agent-N.log), whose lines
  carry millisecond timestamps: when it got each lease, fetched its inputs, began
  uploading its adapter, was answered and ended the task.
- `Sampler`: what no record keeps, watched while the run goes on. The coordinator records
  each merge's `merge_s` and `eval_s` only into two histograms (sums over all merges), and
  no time at which a merge's Ray task ended (`round_merged` is the reconciler's next poll).
  The sampler polls Redis and the store every `period_s`: the histograms (an increase of
  one observation is one merge's two durations), the merge claims, and each claimed
  round's `eval.json` (written by the Ray task as its last act) and the job's
  `base_eval.json`, to date their ends. A few Redis reads and HEAD requests per period.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cotune.orchestrator.control.state import _MERGE_CLAIM_TTL_S  # dates a claim by its TTL

HISTOGRAMS = {"merge": "merge_duration_seconds", "eval": "evaluation_duration_seconds"}


# --- while the run goes on ----------------------------------------------------------------


@dataclass
class Sampled:
    """What the sampler saw; times are epoch seconds, each first seen at a poll, with the
    poll before it (the thing happened in between)."""

    polls: int = 0
    errors: int = 0
    last_error: str = ""
    connected_at: float | None = None
    claims: dict[tuple[int, int], float] = field(default_factory=dict)
    evals: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    base_eval: tuple[float, float] | None = None
    # (poll before, poll, observations added, merge seconds added, eval seconds added)
    increments: list[tuple[float, float, int, float, float]] = field(default_factory=list)


class Sampler:
    """Polls the run's Redis and store every `period_s` until `stop()`; see the module
    docstring. Errors (the stack not up yet, or stopping) are counted and retried."""

    def __init__(self, home: Path, period_s: float = 0.2) -> None:
        self.home = home
        self.period_s = period_s
        self.seen = Sampled()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="endtoend-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> Sampled:
        self._stop.set()
        self._thread.join(10)
        return self.seen

    def _run(self) -> None:
        from cotune.orchestrator.runtime.stack import find_running

        info = None
        while info is None and not self._stop.wait(self.period_s):
            with contextlib.suppress(Exception):
                info = find_running(self.home)
        if info is None:
            return
        from cotune.orchestrator.control.state import State, connect
        from cotune.orchestrator.data.objectstore import ObjectStore

        state = State(connect(info.redis_url))
        store = ObjectStore(
            info.s3_endpoint, info.s3_bucket, info.s3_access_key, info.s3_secret_key
        )
        self.seen.connected_at = time.time()
        job_id: str | None = None
        before = (0, 0.0, 0.0)
        previous = started = time.time()
        while not self._stop.wait(self.period_s):
            try:
                began = time.time()
                if job_id is None:
                    jobs = state.list_jobs()
                    job_id = jobs[0].job_id if jobs else None
                before = self._histograms(state, before, previous)
                previous = time.time()  # after the reads: what they saw was done by then
                if job_id is not None:
                    self._files(state, store, job_id, started)
                started = began
                self.seen.polls += 1
            except Exception as exc:  # the stack stopping at the end of the run
                self.seen.errors += 1
                self.seen.last_error = f"{type(exc).__name__}: {exc}"

    def _histograms(
        self, state: Any, before: tuple[int, float, float], previous: float
    ) -> tuple[int, float, float]:
        merge = histogram(state, HISTOGRAMS["merge"])
        evaluation = histogram(state, HISTOGRAMS["eval"])
        now = time.time()
        after = (merge[0], merge[1], evaluation[1])
        if after[0] > before[0]:
            self.seen.increments.append(
                (previous, now, after[0] - before[0], after[1] - before[1], after[2] - before[2])
            )
        return after

    def _files(self, state: Any, store: Any, job_id: str, previous: float) -> None:
        """Claims and written eval.json files; a file seen now was written after `previous`
        (the start of the poll before, which did not see it)."""
        from cotune.orchestrator.data.layout import base_eval_key, merged_prefix
        from cotune.orchestrator.pipeline.roundmerge import EVAL_FILE

        pattern = state.keys.merge_claim(job_id, "*", "*")
        for key in state.redis.scan_iter(match=pattern, count=1000):
            self.seen.claims.setdefault(claim_of(key), time.time())
        for where in self.seen.claims:
            done = merged_prefix(job_id, *where) + EVAL_FILE
            if where not in self.seen.evals and store.exists(done):
                self.seen.evals[where] = (previous, time.time())
        if self.seen.base_eval is None and store.exists(base_eval_key(job_id)):
            self.seen.base_eval = (previous, time.time())


def histogram(state: Any, name: str) -> tuple[int, float]:
    """(observations, sum) of one of the coordinator's Redis histograms."""
    stored = state.redis.hgetall(state.keys.metric_histogram(name))
    raw = {k.decode(): v.decode() for k, v in stored.items()}
    count = sum(int(v) for k, v in raw.items() if k.isdigit())
    return count, float(raw.get("sum", 0.0))


def claim_of(key: bytes | str) -> tuple[int, int]:
    """(trial, round) of a merge claim key `...:merge:<job>:<trial>:<round>:claim`."""
    parts = (key.decode() if isinstance(key, bytes) else key).split(":")
    return int(parts[-3]), int(parts[-2])


# --- after the run ------------------------------------------------------------------------


def read_record(home: Path) -> dict[str, Any]:
    """The run's job as its home keeps it (module docstring); starts the stack and stops it."""
    from cotune.orchestrator.control.events import FIRST
    from cotune.orchestrator.control.state import State, connect
    from cotune.orchestrator.data.layout import base_eval_key, merged_prefix
    from cotune.orchestrator.data.objectstore import ObjectStore
    from cotune.orchestrator.pipeline.roundmerge import EVAL_FILE
    from cotune.orchestrator.runtime.stack import EmbeddedStack

    with EmbeddedStack(home) as info:
        state = State(connect(info.redis_url))
        store = ObjectStore(
            info.s3_endpoint, info.s3_bucket, info.s3_access_key, info.s3_secret_key
        )
        jobs = state.list_jobs()
        if len(jobs) != 1:
            raise RuntimeError(f"expected one job in {home}, found {len(jobs)}")
        job = jobs[0]
        events, after = [], FIRST
        while batch := state.events.read(job.job_id, after, count=1000):
            events += [{"time": e.time, "kind": e.kind, "data": e.data} for e in batch]
            after = batch[-1].id
        tasks = []
        for task in state.tasks_of(job.job_id):
            result = task.result()
            tasks.append(
                {
                    "task_id": task.task_id,
                    "trial": task.trial,
                    "round": task.round,
                    "shard": task.shard,
                    "state": task.state,
                    "attempt": task.attempt,
                    "duplicate_of": task.duplicate_of,
                    "metrics": dict(result.metrics) if result else {},
                }
            )
        merges = []
        for e in events:
            if e["kind"] != "round_merged":
                continue
            trial, round_ = int(e["data"]["trial"]), int(e["data"]["round"])
            claimed = _claimed_at(state, state.keys.merge_claim(job.job_id, trial, round_))
            key = merged_prefix(job.job_id, trial, round_) + EVAL_FILE
            evaluated = json.loads(store.get_bytes(key)) if store.exists(key) else {}
            merges.append(
                {
                    "trial": trial,
                    "round": round_,
                    "merged_at": e["time"],
                    "claimed_at": claimed,
                    "evaluate_seconds": evaluated.get("seconds"),
                }
            )
        base_key = base_eval_key(job.job_id)
        base = json.loads(store.get_bytes(base_key)) if store.exists(base_key) else {}
        return {
            "job_id": job.job_id,
            "state": job.state,
            "events": events,
            "tasks": tasks,
            "task_json": next((t.task_json for t in state.tasks_of(job.job_id)), None),
            "trials": [
                {"number": t.number, "state": t.state, "rounds_done": t.rounds_done}
                for t in state.get_trials(job.job_id)
            ],
            "merges": merges,
            "base_eval_seconds": base.get("seconds"),
            "histograms": {k: histogram(state, name) for k, name in HISTOGRAMS.items()},
        }


def _claimed_at(state: Any, key: str) -> float | None:
    """When a merge claim was taken: its expiry (Redis keeps it absolute, across the
    restart) less the claim's TTL; None once it lapsed. One MULTI, so the clock and the TTL
    are read at the same instant."""
    pipe = state.redis.pipeline(transaction=True)
    pipe.time()
    pipe.pttl(key)
    (seconds, micros), ttl_ms = pipe.execute()
    if ttl_ms <= 0:
        return None
    return float(seconds) + float(micros) / 1e6 + ttl_ms / 1e3 - _MERGE_CLAIM_TTL_S


# --- a local worker's log -----------------------------------------------------------------

_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ([A-Z]+) (.*)$")
_LEASED = re.compile(r"^task (\S+) attempt (\d+)(?:, resuming at step \d+)?$")
_ENDED = re.compile(r"^task (\S+) attempt (\d+): (\w+)$")
_ACCEPTED = re.compile(r"^task (\S+) accepted")


@dataclass
class WorkerLog:
    """One worker agent's log: its start and, per (task, attempt), when each phase began."""

    name: str
    started_at: float | None = None  # its first line (the process is up, imports done)
    enrolled_at: float | None = None
    tasks: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def parse_worker_log(path: Path) -> WorkerLog:
    """Lines of worker/agent.py and worker/transfer.py (the `cotune worker` log format)."""
    log = WorkerLog(path.stem)
    current: dict[str, Any] | None = None
    for raw in path.read_text(errors="replace").splitlines():
        match = _LINE.match(raw)
        if not match:
            continue
        at = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        level, text = match[2], match[3]
        if log.started_at is None:
            log.started_at = at
        if level in ("WARNING", "ERROR", "CRITICAL"):
            log.warnings.append(f"{match[1]} {level} {text}")
        if text.startswith("enrolled with") and log.enrolled_at is None:
            log.enrolled_at = at
        if m := _LEASED.match(text):
            current = log.tasks[(m[1], int(m[2]))] = {"got_at": at}
        elif current is None:
            continue
        elif text.startswith("download ") and ": done" in text:
            current["inputs_at"] = at
        elif text.startswith("upload adapter_config.json: ") and ": done" not in text:
            current.setdefault("upload_at", at)
        elif _ACCEPTED.match(text):
            current["answered_at"] = at
        elif m := _ENDED.match(text):
            current.update(ended_at=at, outcome=m[3])
            current = None
    return log
