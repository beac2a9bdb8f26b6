"""Ray baselines, each in a fresh process that starts and stops its own local Ray
(`ray.init(num_cpus=2, include_dashboard=False)`; never `ray stop`):

    python -m bench.load.ray_baselines task-rate --seconds 10
        Ray's synchronous task round trip: `ray.get(f.remote())` back to back, after a
        warm-up, as tasks per second.
    python -m bench.load.ray_baselines tune --trials 500 --seconds 1 --concurrency 16
        Ray Tune running `trials` function trials that each sleep `seconds` and report
        once, `concurrency` at a time (each asks 2/concurrency CPUs, so all run at once on
        2 CPUs; actors reused): the makespan of `Tuner.fit()`, and from the first trial's
        start to the last trial's end as the trials themselves timed it.

Each prints one JSON line; `run(...)` calls it from a benchmark and returns the dict.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RAY_CPUS = 2


def _init() -> Any:
    import ray

    ray.init(num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False)
    return ray


def task_rate(seconds: float, warmup: int) -> dict[str, Any]:
    ray = _init()
    try:

        @ray.remote
        def noop() -> None:
            return None

        for _ in range(warmup):
            ray.get(noop.remote())
        calls, began = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - began) < seconds:
            ray.get(noop.remote())
            calls += 1
        return {"calls": calls, "seconds": elapsed, "per_s": calls / elapsed, "warmup": warmup}
    finally:
        ray.shutdown()


def tune_makespan(trials: int, seconds: float, concurrency: int) -> dict[str, Any]:
    ray = _init()
    from ray import tune

    def trainable(config: dict[str, Any]) -> None:
        began = time.time()
        time.sleep(config["seconds"])
        tune.report({"began": began, "ended": time.time()})

    class Timings(tune.Callback):
        """Each trial's own start and end, as it reported them (kept in the driver)."""

        def __init__(self) -> None:
            self.spans: list[tuple[float, float]] = []

        def on_trial_result(self, iteration: int, trials: Any, trial: Any, result: Any) -> None:
            self.spans.append((float(result["began"]), float(result["ended"])))

    timings = Timings()
    try:
        with tempfile.TemporaryDirectory(prefix="cotune-bench-tune-") as storage:
            tuner = tune.Tuner(
                tune.with_resources(trainable, {"cpu": RAY_CPUS / concurrency}),
                param_space={"seconds": seconds},
                tune_config=tune.TuneConfig(
                    num_samples=trials, max_concurrent_trials=concurrency, reuse_actors=True
                ),
                # Tune as a user runs it: its default loggers and progress reporting, quiet.
                run_config=tune.RunConfig(
                    storage_path=storage, name="bench", verbose=0, callbacks=[timings]
                ),
            )
            began = time.time()
            grid = tuner.fit()
            fit_s = time.time() - began
            errors = len(grid.errors)
    finally:
        ray.shutdown()
    if not timings.spans:
        raise RuntimeError("Ray Tune ran no trial")
    first = min(b for b, _ in timings.spans)
    last = max(e for _, e in timings.spans)
    return {
        "trials": trials,
        "trials_done": len(timings.spans),
        "errors": errors,
        "concurrency": concurrency,
        "cpus_per_trial": RAY_CPUS / concurrency,
        "reuse_actors": True,
        "fit_s": fit_s,
        "trials_span_s": last - first,
        "fit_start_to_first_trial_s": first - began,
    }


def run(kind: str, *flags: str, timeout_s: float = 1800.0) -> dict[str, Any]:
    """Run one baseline in a fresh process; its JSON answer."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    done = subprocess.run(
        [sys.executable, "-m", "bench.load.ray_baselines", kind, *flags],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"ray baseline {kind} failed:\n{done.stderr[-3000:]}")
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load.ray_baselines")
    sub = parser.add_subparsers(dest="kind", required=True)
    rate = sub.add_parser("task-rate")
    rate.add_argument("--seconds", type=float, default=10.0)
    rate.add_argument("--warmup", type=int, default=200)
    tune_ = sub.add_parser("tune")
    tune_.add_argument("--trials", type=int, default=500)
    tune_.add_argument("--seconds", type=float, default=1.0)
    tune_.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args(argv)
    if args.kind == "task-rate":
        result = task_rate(args.seconds, args.warmup)
    else:
        result = tune_makespan(args.trials, args.seconds, args.concurrency)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
