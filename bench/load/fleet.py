"""The load generator: N simulated workers spread over P processes, started together.

Each process (multiprocessing, spawn; not Ray actors, about 90 MB each) runs an asyncio loop
with its share of the workers (bench/load/worker.py). A run goes:

    spawn P processes -> each enrolls its workers (and takes their leases, for heartbeats)
    -> all report ready -> the parent sends one start time -> each runs its scenario -> each
    sends its samples back

Open loops and the overhead benchmark's workers run from the start for `duration_s` (plus
an open loop's drain). A closed loop runs until `duration_s` after the moment every worker
has finished its first cycle (`settled`): N workers start their first cycles at once, and
at N / rate seconds a cycle (13 s for 1,000 workers at 75 cycles/s) that burst would
otherwise be most of a fixed window, or all of it; `max_s` after the start it ends anyway
(`FleetResult.settled` False). `FleetResult.start` is the settled moment for a closed loop.

Setup (enrolling, leasing) is therefore never in the measured figures. The samples of all
processes are merged (`FleetResult`): raw latencies in numpy arrays, counters summed.

    result = run_fleet(plan, workers=1000, processes=2)
    result.window("lease", start + 2, end)   # -> Latencies
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.load.stats import Latencies

START_DELAY_S = 0.5  # from "go" to the common start time: every process is listening by then
# What every simulated worker reports: no GPU, so it takes the cpu tier's tasks (the tiny
# model's), one lease at a time.
HARDWARE = {"gpus": [], "cpu_count": 2, "memory_bytes": 8 << 30, "cotune_version": "bench"}
CAPABILITIES = {"memory_bytes": 4_000_000_000, "bf16": False}


class FleetError(RuntimeError):
    """A load-generator process failed or did not report in time."""


@dataclass
class FleetResult:
    start: float
    end: float
    workers: int
    processes: int
    setup_s: float
    samples: dict[str, tuple[np.ndarray, np.ndarray]]
    counts: Counter[str]
    errors: Counter[str]
    error_samples: dict[str, list[str]]
    events: dict[str, np.ndarray]
    settled: bool | None = None  # closed loops: every worker finished a first cycle
    settle_s: float = 0.0  # from the start to that moment
    setup_errors: Counter[str] = field(default_factory=Counter)
    resources: dict[str, Any] = field(default_factory=dict)
    finished: float = 0.0  # when the last process was done (the open loop's drain included)

    def window(self, name: str, start: float, end: float) -> Latencies:
        """The samples of `name` whose mark is in [start, end]."""
        marks, latencies = self.samples.get(name, (np.empty(0), np.empty(0)))
        keep = (marks >= start) & (marks <= end)
        return Latencies(latencies[keep], end - start)

    def errors_in(self, start: float, end: float) -> int:
        return self.window("error", start, end).count


def plan(
    scenario: str,
    *,
    api_url: str,
    duration_s: float,
    join_token: str = "",
    loop: str = "closed",
    rate: float = 0.0,
    arrivals: str = "poisson",
    drain_s: float = 0.0,
    train_s: float = 0.0,
    files: dict[str, bytes] | None = None,
    setup_concurrency: int = 32,
    seed: int = 0,
    max_s: float = 300.0,
) -> dict[str, Any]:
    """What every load process is told (bench/load/worker.py reads these keys).

    scenario: noop, lease_release, lease_complete, heartbeat or train; loop: closed or open
    (rate: total arrivals per second over all workers; arrivals: poisson or even); drain_s:
    how long after the end an open loop still serves arrivals that were due; max_s: a
    closed loop's longest run, settling included.
    """
    if loop == "open" and rate <= 0:
        raise ValueError("an open loop needs a rate > 0")
    return {
        "scenario": scenario,
        "api_url": api_url,
        "join_token": join_token,
        "duration_s": duration_s,
        "loop": loop,
        "rate": rate,
        "arrivals": arrivals,
        "drain_s": drain_s,
        "train_s": train_s,
        "files": files or {},
        "setup_concurrency": setup_concurrency,
        "seed": seed,
        "max_s": max(max_s, duration_s),
        "hardware": HARDWARE,
        "capabilities": CAPABILITIES,
    }


def run_fleet(
    plan: dict[str, Any],
    *,
    workers: int,
    processes: int,
    ready_timeout_s: float = 600.0,
    watch: Callable[[Any], bool] | None = None,
    monitor: Any = None,
) -> FleetResult:
    """Run `plan` (worker.py's keys) with `workers` workers over `processes` processes.

    `watch(stop_event)`, if given, is called every 0.1 s during the run; returning True
    sets the stop event (the overhead benchmark stops its workers once every task is
    accepted). `monitor` (bench/load/monitor.py) samples CPU and memory during the run.
    """
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    settled = ctx.Value("i", 0)  # closed loops: workers past their first cycle
    processes = max(1, min(processes, workers))
    shares = [
        workers // processes + (1 if i < workers % processes else 0) for i in range(processes)
    ]
    children, pipes, first = [], [], 0
    from bench.load.worker import process_main

    for share in shares:
        parent_end, child_end = ctx.Pipe()
        child_plan = {**plan, "first": first, "count": share, "total": workers}
        proc = ctx.Process(
            target=process_main, args=(child_plan, child_end, stop, settled), daemon=True
        )
        proc.start()
        child_end.close()
        children.append(proc)
        pipes.append(parent_end)
        first += share
    settles = plan["loop"] == "closed" and plan["scenario"] != "train"
    try:
        began = time.monotonic()
        infos = [
            _receive(p, c, "ready", ready_timeout_s) for p, c in zip(pipes, children, strict=True)
        ]
        setup_s = time.monotonic() - began
        start = time.monotonic() + START_DELAY_S
        for pipe in pipes:
            pipe.send(("go", start))
        if monitor is not None:
            monitor.start([c.pid for c in children])
        settled_at: float | None = None
        end = start + (plan["max_s"] if settles else plan["duration_s"])
        limit = (plan["max_s"] if settles else plan["duration_s"]) + plan["drain_s"] + 120.0
        results: list[dict[str, Any]] = []
        pending = list(zip(pipes, children, strict=True))
        while pending:
            for pipe, child in list(pending):
                if pipe.poll():
                    results.append(_receive(pipe, child, "done", 10.0))
                    pending.remove((pipe, child))
                elif not child.is_alive():
                    raise FleetError(f"load process {child.pid} died (exit {child.exitcode})")
            now = time.monotonic()
            if settles and settled_at is None and settled.value >= workers:
                settled_at = now
                end = min(now + plan["duration_s"], end)
            if settles and now >= end:
                stop.set()
            if watch is not None and not stop.is_set() and watch(stop):
                stop.set()
            if now > start + limit:
                raise FleetError(f"load processes did not finish in {limit:.0f} s")
            time.sleep(0.05)
        finished = time.monotonic()
        resources = monitor.stop() if monitor is not None else {}
    finally:
        stop.set()
        for pipe in pipes:
            with contextlib.suppress(OSError, BrokenPipeError):
                pipe.send(("stop", 0.0))
        for child in children:
            child.join(30)
            if child.is_alive():
                child.terminate()
                child.join(5)
    result = _merge(
        results, infos, start, end, finished, workers, len(children), setup_s, resources
    )
    if settles:
        result.settled = settled_at is not None
        result.settle_s = (settled_at or end) - start
        result.start = settled_at if settled_at is not None else start
    return result


def _receive(pipe: Any, child: Any, expected: str, timeout_s: float) -> Any:
    give_up = time.monotonic() + timeout_s
    while not pipe.poll(0.2):
        if not child.is_alive():
            raise FleetError(f"load process {child.pid} died (exit {child.exitcode})")
        if time.monotonic() > give_up:
            raise FleetError(f"load process {child.pid}: no {expected!r} in {timeout_s:.0f} s")
    kind, payload = pipe.recv()
    if kind == "failed":
        raise FleetError(f"load process {child.pid} failed: {payload}")
    if kind != expected:
        raise FleetError(f"load process {child.pid}: {kind!r} where {expected!r} was due")
    return payload


def _merge(
    results: list[dict[str, Any]],
    infos: list[dict[str, Any]],
    start: float,
    end: float,
    finished: float,
    workers: int,
    processes: int,
    setup_s: float,
    resources: dict[str, Any],
) -> FleetResult:
    samples: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in {n for r in results for n in r["samples"]}:
        parts = [r["samples"][name] for r in results if name in r["samples"]]
        samples[name] = (
            np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]),
        )
    events = {
        name: np.concatenate([r["events"][name] for r in results if name in r["events"]])
        for name in {n for r in results for n in r["events"]}
    }
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    setup_errors: Counter[str] = Counter()
    error_samples: dict[str, list[str]] = {}
    for r in results:
        counts.update(r["counts"])
        errors.update(r["errors"])
        for kind, messages in r["error_samples"].items():
            error_samples.setdefault(kind, []).extend(
                messages[: 3 - len(error_samples.get(kind, []))]
            )
    for info in infos:
        setup_errors.update(info["setup"]["errors"])
        counts.update({f"setup_{k}": v for k, v in info["setup"]["counts"].items()})
        for kind, messages in info["setup"]["error_samples"].items():
            error_samples.setdefault("setup " + kind, []).extend(messages)
    return FleetResult(
        start=start,
        end=end,
        workers=workers,
        processes=processes,
        setup_s=setup_s,
        samples=samples,
        counts=counts,
        errors=errors,
        error_samples=error_samples,
        events=events,
        setup_errors=setup_errors,
        resources=resources,
        finished=finished,
    )
