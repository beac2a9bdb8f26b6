"""Heartbeats at scale: W workers each holding a lease and heartbeating it every 15 s.

    python -m bench heartbeats              # 10,000 workers for 45 s (plus setup)
    python -m bench heartbeats --seconds=300   # the target's five minutes
    python -m bench heartbeats --quick      # 1,000 workers, 30 s
    python -m bench heartbeats --workers=5000 --seconds=120 --processes=3

The coordinator runs as in production (bench/load/server.py) on a fresh embedded Redis and
SeaweedFS. Before the run (not timed) W tasks are queued (bench/load/job.py) and W simulated
workers (bench/load/worker.py, over `--processes` processes, one keep-alive connection
each) enroll and lease one task each, `--setup-concurrency` requests at a time per process.
Then, open loop, every worker heartbeats its lease every `--interval` seconds, the phases
spread evenly over the interval (worker i's first beat at a random point of its own slot
i/W of it), so the coordinator sees a flat W / interval beats a second. A beat's latency
counts from its scheduled time; each carries the steps since the last one (step, loss,
tokens/s, memory, per-step losses), as a training worker's does.

The leases live longer than the run (COTUNE_LEASE_TTL_S is set to an hour) because setup
at 10,000 workers takes minutes and the first beats come only after it; every beat still
renews its lease's deadline and upload targets as usual. The API keeps an idle keep-alive
connection for two heartbeat intervals plus 5 s (runtime/apiserver.py `keep_alive_s`), so a
worker beats on one connection; `connections_opened` counts the new ones (a reconnect after
a reset or a timeout).

psutil samples the coordinator's processes (and Redis's, SeaweedFS's and the load
generator's) once a second: CPU (100 = one core) and RSS. Target (issue "Performance at
scale"): 10,000 workers every 15 s for 5 minutes, p99 under 50 ms, no errors. `make bench`
runs 45 s to fit its twenty minutes; `--seconds=300` is the target's length. Where the
coordinator serves fewer beats than are offered, its backlog, and so the p99, grows with the
run's length: a shorter run understates such a miss. Results: a table and
bench/out/heartbeats.json. A missed target does not fail the run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from bench.load import options
from bench.load.fleet import plan, run_fleet
from bench.load.job import prepare
from bench.load.monitor import Monitor
from bench.load.profile import profile_lines
from bench.load.server import CoordinatorUnderTest
from bench.load.stats import load_average, machine, target_line, verdict

OUT = Path(__file__).parent / "out" / "heartbeats.json"
P99_TARGET_MS = 50.0


def _measure(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    load_start = load_average()
    env = {"COTUNE_LEASE_TTL_S": "3600"}
    with CoordinatorUnderTest(
        home, server=args.server, processes=args.api_processes, env=env
    ) as coordinator:
        job = prepare(coordinator, "bench-heartbeats", args.workers)
        print(
            f"-- {args.workers:,} workers enroll and lease, then heartbeat every "
            f"{args.interval:g} s for {args.seconds:g} s ...",
            flush=True,
        )
        the_plan = plan(
            "heartbeat",
            api_url=coordinator.url,
            join_token=coordinator.join_token("bench-heartbeats", "cluster"),
            duration_s=args.seconds,
            loop="open",
            rate=args.workers / args.interval,
            arrivals="even",
            drain_s=args.drain,
            setup_concurrency=args.setup_concurrency,
            seed=args.seed,
        )
        monitor = Monitor(coordinator.service_pids(), profile=args.profile)
        result = run_fleet(
            the_plan, workers=args.workers, processes=args.processes, monitor=monitor
        )
        leased = coordinator.context.state.leased_count()
        described = coordinator.describe()
    start, end = result.start + args.warmup, result.end
    beats = result.window("heartbeat", start, end)
    offered = args.workers / args.interval
    figures: dict[str, Any] = {
        "machine": machine(load_start),
        "coordinator": described,
        "settings": {
            "workers": args.workers,
            "interval_s": args.interval,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "load_processes": args.processes,
            "api_processes": args.api_processes,
            "setup_concurrency": args.setup_concurrency,
            "seed": args.seed,
        },
        "job": {"tasks": job.tasks, "trials": job.trials, "shards": job.shards},
        "setup_s": round(result.setup_s, 1),
        "leases_held_at_end": leased,
        "offered_per_s": round(offered, 1),
        "served_per_s": round(_served(result, start, end) / (end - start), 1),
        "heartbeats": beats.summary(),
        "scheduled_in_window": round(offered * (end - start)),
        "errors": result.errors_in(start, end),
        "errors_by_kind": dict(result.errors),
        "error_samples": result.error_samples,
        "setup_errors": dict(result.setup_errors),
        "counts": dict(result.counts),
        "drain_s": round(max(result.finished - result.end, 0.0), 2),
        "resources": result.resources,
    }
    p99 = beats.summary()["p99_ms"]
    figures["targets"] = {
        "heartbeat_p99_ms": verdict(
            p99 if p99 is not None else float("inf"), P99_TARGET_MS, at_most=True
        ),
        "errors": verdict(float(figures["errors"]), 0.0, at_most=True),
    }
    return figures


def _served(result: Any, start: float, end: float) -> int:
    """Beats that ended inside the window (per_s of `heartbeats` counts those scheduled)."""
    served = result.events.get("served")
    return 0 if served is None else int(((served >= start) & (served <= end)).sum())


def _report(f: dict[str, Any]) -> None:
    b, res = f["heartbeats"], f["resources"]
    coord = res.get("coordinator", {})
    print()
    print(
        f"heartbeats, {f['machine']['cpus']} CPUs, coordinator: {f['coordinator']['command']} "
        f"({f['coordinator']['processes']} process(es)); setup {f['setup_s']:.0f} s"
    )
    print(
        f"{'workers':>8} {'every':>6} {'offered/s':>9} {'done/s':>8} {'beats':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'max ms':>8} {'errors':>7} {'cpu %':>6} {'cpu max':>7} {'rss MB':>7}"
    )
    settings = f["settings"]
    print(
        f"{settings['workers']:>8,} {settings['interval_s']:>5g}s {f['offered_per_s']:>9,.1f} "
        f"{b['per_s']:>8,.1f} {b['count']:>8,} {b['p50_ms'] or 0:>8.1f} {b['p99_ms'] or 0:>8.1f} "
        f"{b['max_ms'] or 0:>8.1f} {f['errors']:>7,} {coord.get('cpu_mean_pct') or 0:>6.0f} "
        f"{coord.get('cpu_max_pct') or 0:>7.0f} {coord.get('rss_max_mb') or 0:>7.0f}"
    )
    others = ", ".join(
        f"{name} {v['cpu_mean_pct'] or 0:.0f}% cpu"
        for name, v in res.items()
        if name != "coordinator"
    )
    print(f"  (cpu: 100 = one core; coordinator with all its processes; {others})")
    for line in profile_lines(coord.get("profile", {}), indent="  "):
        print(line)
    print("targets:")
    for what, v in f["targets"].items():
        print(target_line(what, v, " ms" if what.endswith("_ms") else ""))


def main(argv: list[str]) -> int:
    parser = options.parser("heartbeats", __doc__, OUT)
    options.add_coordinator(parser)
    add = parser.add_argument
    add("--workers", type=int, help="simulated workers [10000; quick: 1000]")
    add("--seconds", type=float, help="run length [45; quick: 30]")
    add("--interval", type=float, default=15.0, help="seconds between a worker's beats [15]")
    add("--warmup", type=float, default=0.0, help="seconds not counted at the start [0]")
    add("--drain", type=float, default=30.0, help="seconds due beats are sent after the end [30]")
    add("--setup-concurrency", type=int, default=32, help="setup requests in flight a process")
    args = parser.parse_args(argv)
    args.workers = args.workers or (1000 if args.quick else 10_000)
    args.seconds = args.seconds or (30.0 if args.quick else 45.0)
    return options.run("heartbeats", args, _measure, _report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
