"""Dispatch: lease cycles per second and lease latency, beside a no-op request and Ray's
synchronous task rate measured in the same run.

    python -m bench dispatch                  # 100 and 1,000 workers, 10 s a case
    python -m bench dispatch --quick          # 20 and 200 workers, 4 s a case
    python -m bench dispatch --open-rate=300 --arrivals=even --processes=3

The coordinator runs as in production (bench/load/server.py: `cotune api`, or `cotune
coordinator --workers 0` where this checkout has no `cotune api`) on a fresh embedded Redis
and SeaweedFS; simulated workers (bench/load/worker.py, asyncio HTTP clients over
`--processes` processes, one keep-alive connection each) enroll and then, case by case:

- noop: `GET /healthz` back to back, the same workers and connections: the request path's
  ceiling. A lease + release cycle is two requests, so its ceiling is noop rate / 2;
- lease + release, closed loop (each worker's next cycle when its last one ended), at each
  `--workers` size: the queue alone (a release gives the task back, uncounted);
- lease + release, open loop: `--open-rate` cycles a second offered over `--open-workers`
  workers (Poisson or evenly spaced arrivals), latency counted from each cycle's scheduled
  start, so queueing is not hidden;
- lease + complete, closed loop: each cycle uploads a small valid adapter (the task's exact
  tensors, tiny Llama, rank 4) to the three presigned POSTs and completes with a volunteer
  worker's token: the cheap trust checks run (issued keys, sizes, sha256 read back, the
  safetensors header against the task's shapes) and the result waits in `verifying`;
- Ray: `ray.get(f.remote())` back to back in a fresh process with its own local Ray, before
  the coordinator starts.

A closed-loop case is measured for `--seconds` from `--warmup` seconds after every worker
has finished its first cycle (all first cycles start at once: a burst, not the steady
state; bench/load/fleet.py); an open loop from `--warmup` seconds after its start. The
tasks are a running sweep job queued through the control layer (bench/load/job.py); each
case enrolls fresh workers (not timed). Targets (issue "Performance at scale"): closed loop
at 100 workers >= 0.7 of the no-op ceiling and above Ray's rate; open loop p99 lease latency
< 25 ms with no errors; lease + complete >= 200 a second. Results: a table and
bench/out/dispatch.json. A missed target does not fail the run; a failed run does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench.load import options, ray_baselines
from bench.load.fleet import FleetResult, plan, run_fleet
from bench.load.job import adapter_files, first_task, prepare
from bench.load.monitor import Monitor
from bench.load.profile import profile_lines
from bench.load.server import CoordinatorUnderTest
from bench.load.stats import load_average, machine, target_line, verdict

OUT = Path(__file__).parent / "out" / "dispatch.json"
CEILING_TARGET = 0.7  # lease + release cycles/s over the no-op ceiling, closed loop at 100
OPEN_P99_TARGET_MS = 25.0
COMPLETE_TARGET = 200.0  # lease + complete cycles a second
REQUESTS_PER_CYCLE = 2  # lease and release (or complete): the ceiling's divisor


def _case(
    coordinator: CoordinatorUnderTest,
    args: argparse.Namespace,
    name: str,
    scenario: str,
    workers: int,
    **options: Any,
) -> dict[str, Any]:
    print(f"-- {name}: {workers} workers ...", flush=True)
    kind = "volunteer" if scenario == "lease_complete" else "cluster"
    token = coordinator.join_token(f"bench-{kind}", kind) if scenario != "noop" else ""
    the_plan = plan(
        scenario,
        api_url=coordinator.url,
        join_token=token,
        duration_s=args.seconds + args.warmup,
        seed=args.seed,
        **options,
    )
    monitor = Monitor(coordinator.service_pids(), profile=args.profile)
    result = run_fleet(the_plan, workers=workers, processes=args.processes, monitor=monitor)
    return _summary(name, scenario, workers, result, args, the_plan)


def _summary(
    name: str,
    scenario: str,
    workers: int,
    result: FleetResult,
    args: argparse.Namespace,
    the_plan: dict[str, Any],
) -> dict[str, Any]:
    start, end = result.start + args.warmup, result.end
    main_metric = "healthz" if scenario == "noop" else "cycle"
    figures: dict[str, Any] = {
        "name": name,
        "scenario": scenario,
        "loop": the_plan["loop"],
        "workers": workers,
        "processes": result.processes,
        "measured_s": round(end - start, 2),
        "setup_s": round(result.setup_s, 2),
        # Closed loops: measured from when every worker had finished a first cycle.
        "settled": result.settled,
        "settle_s": round(result.settle_s, 2),
        "per_s": round(result.window(main_metric, start, end).rate, 1),
        "latency": {
            metric: result.window(metric, start, end).summary()
            for metric in ("healthz", "lease", "release", "upload", "complete", "cycle")
            if metric in result.samples
        },
        "errors": result.errors_in(start, end),
        "errors_by_kind": dict(result.errors),
        "error_samples": result.error_samples,
        "setup_errors": dict(result.setup_errors),
        "counts": dict(result.counts),
        "resources": result.resources,
    }
    if the_plan["loop"] == "open":
        # per_s above counts the cycles scheduled in the window (the offered load that was
        # served); served_per_s those that ended in it (what the coordinator kept up with).
        served = result.events.get("served")
        in_window = 0 if served is None else int(((served >= start) & (served <= end)).sum())
        figures["served_per_s"] = round(in_window / (end - start), 1)
        # Over the whole run, the drain included: under overload the window above sees the
        # coordinator's queue filling, this its throughput.
        if served is not None and served.size:
            span = float(served.max()) - result.start
            figures["served_overall_per_s"] = round(served.size / span, 1) if span > 0 else None
        figures["offered_per_s"] = the_plan["rate"]
        figures["arrivals"] = the_plan["arrivals"]
        figures["drain_s"] = round(max(result.finished - result.end, 0.0), 2)
    return figures


def _row(case: dict[str, Any]) -> str:
    lat = case["latency"]
    first = lat.get("lease") or lat.get("healthz") or {}
    cycle = lat.get("cycle") or lat.get("healthz") or {}
    offered = f"{case['offered_per_s']:>8,.0f}" if "offered_per_s" in case else f"{'-':>8}"

    def ms(x: Any) -> str:
        return f"{x:>8.1f}" if isinstance(x, int | float) else f"{'-':>8}"

    return (
        f"{case['name']:<26} {case['workers']:>7,} {offered} {case['per_s']:>9,.1f} "
        f"{ms(first.get('p50_ms'))} {ms(first.get('p99_ms'))} {ms(first.get('max_ms'))} "
        f"{ms(cycle.get('p50_ms'))} {ms(cycle.get('p99_ms'))} {case['errors']:>6,}"
    )


def _report(figures: dict[str, Any]) -> None:
    header = (
        f"{'case':<26} {'workers':>7} {'offered':>8} {'done/s':>9} "
        f"{'1st p50':>8} {'1st p99':>8} {'1st max':>8} {'cyc p50':>8} {'cyc p99':>8} {'errors':>6}"
    )
    print()
    print(
        f"dispatch, {figures['machine']['cpus']} CPUs, coordinator: "
        f"{figures['coordinator']['command']} ({figures['coordinator']['processes']} process(es))"
    )
    print("latencies in ms; '1st' is the case's first request (lease, or the no-op)")
    print(header)
    for case in figures["cases"]:
        print(_row(case))
    ray = figures["ray"]
    if ray:
        print(f"{'ray.get(f.remote())':<26} {'-':>7} {'-':>8} {ray['per_s']:>9,.1f}")
    for case in figures["cases"]:
        lines = profile_lines(case["resources"].get("coordinator", {}).get("profile", {}))
        if lines:
            print(f"  {case['name']}, {case['workers']:,} workers:")
            print("\n".join(lines))
    print("targets:")
    for what, v in figures["targets"].items():
        unit = " ms" if what.endswith("_ms") else "/s" if "per_s" in what else ""
        print(target_line(what, v, unit))


def _measure(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    load_start = load_average()
    ray: dict[str, Any] = {}
    if args.ray_seconds > 0:
        print(f"-- Ray's synchronous task rate ({args.ray_seconds:g} s) ...", flush=True)
        ray = ray_baselines.run("task-rate", "--seconds", str(args.ray_seconds))
    env = {"COTUNE_LEASE_TTL_S": "300"}
    with CoordinatorUnderTest(
        home, server=args.server, processes=args.api_processes, env=env
    ) as coordinator:
        pool = max(*args.workers, args.open_workers) + 250
        job = prepare(coordinator, "bench-dispatch", pool + args.complete_tasks)
        files = adapter_files(first_task(coordinator.context.state, job.job_id))
        cases = []
        for n in args.workers:
            cases.append(_case(coordinator, args, "noop (GET /healthz)", "noop", n))
            cases.append(_case(coordinator, args, "lease+release closed", "lease_release", n))
        cases.append(
            _case(
                coordinator,
                args,
                "lease+release open",
                "lease_release",
                args.open_workers,
                loop="open",
                rate=args.open_rate,
                arrivals=args.arrivals,
                drain_s=args.drain,
            )
        )
        cases.append(_case(coordinator, args, "noop (GET /healthz)", "noop", args.complete_workers))
        cases.append(
            _case(
                coordinator,
                args,
                "lease+complete closed",
                "lease_complete",
                args.complete_workers,
                files=files,
            )
        )
        verifying = _task_states(coordinator, job.job_id)
        described = coordinator.describe()
    complete = cases[-1]
    complete["consistency"] = {
        "accepted_answers": complete["counts"].get("accepted", 0),
        "tasks_verifying": verifying.get("verifying", 0),
        "tasks_by_state": verifying,
    }
    figures = {
        "machine": machine(load_start),
        "coordinator": described,
        "settings": {
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "workers": args.workers,
            "open_workers": args.open_workers,
            "open_rate": args.open_rate,
            "arrivals": args.arrivals,
            "complete_workers": args.complete_workers,
            "load_processes": args.processes,
            "api_processes": args.api_processes,
            "seed": args.seed,
        },
        "job": {
            "tasks": job.tasks,
            "trials": job.trials,
            "shards": job.shards,
            "tier": job.tier,
            "seed_s": round(job.seconds, 1),
            "base_eval_wait_s": job.base_eval_wait_s,
            "adapter_bytes": {name: len(data) for name, data in files.items()},
        },
        "ray": ray,
        "cases": cases,
    }
    figures["targets"] = _targets(figures, args)
    return figures


def _task_states(coordinator: CoordinatorUnderTest, job_id: str) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(t.state for t in coordinator.context.state.tasks_of(job_id)))


def _targets(figures: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    cases = figures["cases"]
    targets: dict[str, Any] = {}
    size = 100 if 100 in args.workers else args.workers[0]
    noop = next(c for c in cases if c["scenario"] == "noop" and c["workers"] == size)
    closed = next(c for c in cases if c["name"] == "lease+release closed" and c["workers"] == size)
    ceiling = noop["per_s"] / REQUESTS_PER_CYCLE
    closed["noop_per_s"] = noop["per_s"]
    closed["ceiling_per_s"] = ceiling
    closed["ratio_to_ceiling"] = round(closed["per_s"] / ceiling, 3) if ceiling else None
    for case in cases:  # every closed lease + release beside its own no-op
        if case["name"] == "lease+release closed" and "ratio_to_ceiling" not in case:
            twin = next(
                c for c in cases if c["scenario"] == "noop" and c["workers"] == case["workers"]
            )
            case["noop_per_s"] = twin["per_s"]
            case["ceiling_per_s"] = twin["per_s"] / REQUESTS_PER_CYCLE
            case["ratio_to_ceiling"] = round(case["per_s"] / case["ceiling_per_s"], 3)
    targets[f"closed_{size}_ratio_to_noop_ceiling"] = verdict(
        closed["ratio_to_ceiling"] or 0.0, CEILING_TARGET
    )
    if figures["ray"]:
        ray_rate = figures["ray"]["per_s"]
        closed["ratio_to_ray"] = round(closed["per_s"] / ray_rate, 3)
        targets[f"closed_{size}_cycles_per_s_vs_ray"] = verdict(closed["per_s"], round(ray_rate, 1))
    open_ = next(c for c in cases if c["name"] == "lease+release open")
    targets["open_lease_p99_ms"] = verdict(
        open_["latency"].get("lease", {}).get("p99_ms") or float("inf"),
        OPEN_P99_TARGET_MS,
        at_most=True,
    )
    targets["open_errors"] = verdict(float(open_["errors"]), 0.0, at_most=True)
    complete = next(c for c in cases if c["name"] == "lease+complete closed")
    targets["lease_complete_per_s"] = verdict(complete["per_s"], COMPLETE_TARGET)
    return targets


def main(argv: list[str]) -> int:
    parser = options.parser("dispatch", __doc__, OUT)
    options.add_coordinator(parser)
    add = parser.add_argument
    add("--workers", type=_sizes, help="closed-loop sizes [100,1000; quick: 20,200]")
    add("--seconds", type=float, help="measured seconds a case [10; quick: 4]")
    add("--warmup", type=float, help="seconds not counted at a case's start [2; quick: 1]")
    add("--open-workers", type=int, help="open-loop workers [1000; quick: 200]")
    add("--open-rate", type=float, help="open-loop cycles/s offered [500; quick: 100]")
    add("--arrivals", choices=("poisson", "even"), default="poisson", help="open loop [poisson]")
    add("--drain", type=float, default=30.0, help="seconds due arrivals still run after [30]")
    add("--complete-workers", type=int, help="lease + complete workers [100; quick: 20]")
    add("--complete-tasks", type=int, help="tasks for the completions [8000; quick: 1000]")
    add("--ray-seconds", type=float, help="Ray task-rate seconds, 0 skips it [5; quick: 3]")
    args = parser.parse_args(argv)
    quick = args.quick
    args.workers = args.workers or ([20, 200] if quick else [100, 1000])
    args.seconds = args.seconds or (4.0 if quick else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if quick else 2.0)
    args.open_workers = args.open_workers or (200 if quick else 1000)
    args.open_rate = args.open_rate or (100.0 if quick else 500.0)
    args.complete_workers = args.complete_workers or (20 if quick else 100)
    args.complete_tasks = args.complete_tasks or (1000 if quick else 8000)
    if args.ray_seconds is None:
        args.ray_seconds = 3.0 if quick else 5.0
    return options.run("dispatch", args, _measure, _report)


def _sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
