"""Scheduling overhead: the makespan of 500 one-second trials on 16 workers against the ideal
(total work / workers), and the same trials run by Ray Tune in the same run.

    python -m bench overhead                 # 500 trials of 1 s, 16 workers; Ray Tune beside
    python -m bench overhead --quick         # 64 trials
    python -m bench overhead --shape=sweep   # a real sweep job instead (see below)

What cotune runs (`--shape`):

- tasks (the default): one running sweep job of one trial and one round whose `--trials`
  shard tasks are queued at the start through the control layer (bench/load/job.py). 16
  simulated workers (bench/load/worker.py) lease, "train" (sleep `--train-seconds`), upload
  the adapter's three files to the presigned POSTs and complete, over and over; an empty
  lease answer is asked again after its retry_after_s (at most 2 s), as a real worker does;
  a 1 s task needs no heartbeat (workers beat every 10 s). They hold
  cluster join tokens, so a result is accepted at completion (a volunteer's would wait for
  the heavy checks, which run a model and are the reconciler's work, not dispatch). The
  makespan runs from the first lease to the last accepted completion. The coordinator is
  `cotune coordinator --workers 0`, the API with the reconciler running (and its local
  Ray), as in production; the reconciler sees the job's trial waiting on its tasks and
  merges the round only after the last completion, outside the makespan. This shape
  measures what the issue asks: the cost of dispatching a task, over and above its work.
- sweep: a real sweep spec (tiny Llama, n_trials = `--trials`, one round, one shard) is
  submitted through `POST /v1/jobs`; the reconciler shards it, asks Optuna for every trial,
  queues each trial's task, and after each accepted task merges and evaluates the trial's
  adapter on Ray. The makespan is again first lease to last accepted completion (every
  trial is asked at once, so the merges compete for the CPUs but do not hold tasks back);
  how far the job got `--sweep-wait` seconds later is reported too. The merges and
  evaluations (a model on Ray, several seconds a trial on 2 busy cores: 8 trials took about
  a minute after their last completion) put 500 trials' job end near an hour away, which is
  why the task shape is the default: it measures dispatch, and this the reconciler.

Ray Tune (ray_baselines.py `tune`): a function trainable that sleeps the same time and
reports once, `--workers` trials at a time (each asks 2/16 of a CPU, so all run at once on
2 CPUs), actors reused, in a fresh process with its own Ray, before the coordinator starts.
Its makespan is from the first trial's start to the last trial's end as the trials timed
themselves (Tuner.fit()'s whole time is reported too). It runs `--tune-trials` trials
(192 by default, 12 waves of 16: Tune costs about 3-4 s a trial a slot here, so its side of
500 trials takes over three minutes of `make bench`'s twenty; `--tune-trials=500` runs the
same count). Each side is compared with its own ideal, so the comparison holds when the
counts differ: the target is cotune's makespan / ideal at most Tune's.

The ideal is trials x train-seconds / workers (500 x 1 s / 16 = 31.25 s). Whole tasks
cannot split, so no schedule beats ceil(trials / workers) x train-seconds (32 s here, 2.4 %
above the ideal): both are reported. Target (issue "Performance at scale"): makespan within
2 % of the ideal, beside Ray Tune's. Results: a table and bench/out/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from bench.load import options, ray_baselines
from bench.load.fleet import FleetResult, plan, run_fleet
from bench.load.job import adapter_files, first_task, prepare, sweep_spec, write_dataset
from bench.load.monitor import Monitor
from bench.load.profile import profile_lines
from bench.load.server import CoordinatorUnderTest
from bench.load.stats import load_average, machine, target_line, verdict

OUT = Path(__file__).parent / "out" / "overhead.json"
TARGET_OVER_IDEAL = 1.02  # makespan / ideal at most
TUNE_TRIALS = 192  # Ray Tune's side (module docstring)
JOB_ID = "bench-overhead"


def _cotune(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    with CoordinatorUnderTest(
        home, server=args.server, processes=args.api_processes
    ) as coordinator:
        state = coordinator.context.state
        if args.shape == "tasks":
            # One trial of `trials` shards: its round is merged only after the last completion.
            job_id = prepare(coordinator, JOB_ID, args.trials, shards=args.trials).job_id
            files = adapter_files(first_task(state, job_id))
        else:
            job_id = _submit(coordinator, args, home)
            files = _sweep_files(coordinator, job_id)
        counts_key = state.keys.job_task_states(job_id)
        job_key = state.keys.job(job_id)

        def all_accepted(stop: Any) -> bool:
            accepted = int(state.redis.hget(counts_key, "accepted") or 0)
            if args.shape == "sweep":
                return accepted >= args.trials or _job_over(state, job_key)
            return accepted >= args.trials

        the_plan = plan(
            "train",
            api_url=coordinator.url,
            join_token=coordinator.join_token("bench-overhead", "cluster"),
            duration_s=args.timeout,
            train_s=args.train_seconds,
            files=files,
            seed=args.seed,
        )
        monitor = Monitor(coordinator.service_pids(), profile=args.profile)
        print(
            f"-- {args.workers} workers train {args.trials} tasks of {args.train_seconds:g} s ...",
            flush=True,
        )
        result = run_fleet(
            the_plan,
            workers=args.workers,
            processes=args.processes,
            watch=all_accepted,
            monitor=monitor,
        )
        job_end = None
        if args.shape == "sweep":
            job_end = _wait_job(state, job_id, job_key, args.sweep_wait)
        tasks_by_state = {
            k.decode(): int(v) for k, v in state.redis.hgetall(counts_key).items() if int(v)
        }
        described = coordinator.describe()
    return _cotune_figures(args, result, described, tasks_by_state, job_end)


def _submit(coordinator: CoordinatorUnderTest, args: argparse.Namespace, home: Path) -> str:
    from cotune.orchestrator.cli.client import CotuneClient

    dataset = home / "bench-data.jsonl"
    write_dataset(dataset, shards=1)
    spec = sweep_spec(dataset, trials=args.trials, shards=1)
    spec["search"]["max_concurrent_trials"] = None
    spec_path = home / "sweep.json"
    spec_path.write_text(json.dumps(spec))
    with CotuneClient(coordinator.url, coordinator.admin_token) as client:
        job_id = client.submit(spec_path)
    print(f"-- submitted sweep job {job_id} ({args.trials} trials, 1 round, 1 shard)", flush=True)
    return job_id


def _sweep_files(coordinator: CoordinatorUnderTest, job_id: str) -> dict[str, bytes]:
    """The adapter for the sweep's tasks, once the reconciler has queued the first one."""
    state = coordinator.context.state
    give_up = time.monotonic() + 300
    while time.monotonic() < give_up:
        if state.tasks_for(job_id, 0, 0):
            return adapter_files(first_task(state, job_id))
        time.sleep(0.2)
    raise RuntimeError(
        f"the reconciler queued no task of {job_id} in 300 s:\n{coordinator.log_tail()}"
    )


def _job_over(state: Any, job_key: str) -> bool:
    value = state.redis.hget(job_key, "state")
    return value is not None and value.decode() in ("succeeded", "failed", "cancelled")


def _wait_job(state: Any, job_id: str, job_key: str, timeout_s: float) -> dict[str, Any]:
    """The sweep after its last completion: how far the reconciler got (merges, evaluations)
    within `timeout_s`."""
    from collections import Counter

    began = time.monotonic()
    while time.monotonic() - began < timeout_s and not _job_over(state, job_key):
        time.sleep(0.5)
    value = state.redis.hget(job_key, "state")
    return {
        "state": value.decode() if value else None,
        "waited_s": round(time.monotonic() - began, 1),
        "trials_by_state": dict(Counter(t.state for t in state.get_trials(job_id))),
    }


def _cotune_figures(
    args: argparse.Namespace,
    result: FleetResult,
    described: dict[str, Any],
    tasks_by_state: dict[str, int],
    job_end: dict[str, Any] | None,
) -> dict[str, Any]:
    leased, accepted = result.events.get("leased"), result.events.get("accepted")
    if leased is None or accepted is None or not accepted.size:
        raise RuntimeError(f"no task was completed: {result.errors} {result.error_samples}")
    makespan = float(accepted.max() - leased.min())
    # Every request of the run (a cycle is lease, train_s of sleep, 3 uploads, complete).
    latency = {
        name: result.window(name, result.start, result.finished).summary()
        for name in ("cycle", "lease", "upload", "complete")
    }
    return {
        "coordinator": described,
        "makespan_s": round(makespan, 3),
        "accepted": int(accepted.size),
        "tasks_by_state": tasks_by_state,
        "latency": latency,
        "errors": sum(result.errors.values()),
        "errors_by_kind": dict(result.errors),
        "error_samples": result.error_samples,
        "counts": dict(result.counts),
        "setup_s": round(result.setup_s, 2),
        "resources": result.resources,
        "job_end": job_end,
    }


def _measure(args: argparse.Namespace, home: Path) -> dict[str, Any]:
    load_start = load_average()
    ideal = args.trials * args.train_seconds / args.workers
    bound = math.ceil(args.trials / args.workers) * args.train_seconds
    tune_ideal = args.tune_trials * args.train_seconds / args.workers
    tune_bound = math.ceil(args.tune_trials / args.workers) * args.train_seconds
    tune: dict[str, Any] = {}
    if not args.no_tune:
        print(
            f"-- Ray Tune: {args.tune_trials} trials of {args.train_seconds:g} s, "
            f"{args.workers} at a time ...",
            flush=True,
        )
        tune = ray_baselines.run(
            "tune",
            "--trials",
            str(args.tune_trials),
            "--seconds",
            str(args.train_seconds),
            "--concurrency",
            str(args.workers),
        )
        tune["makespan_s"] = round(tune["trials_span_s"], 3)
        tune["ideal_s"] = tune_ideal
        tune["lower_bound_s"] = tune_bound
        tune["over_ideal"] = round(tune["trials_span_s"] / tune_ideal, 4)
        tune["fit_over_ideal"] = round(tune["fit_s"] / tune_ideal, 4)
    cotune = _cotune(args, home)
    cotune["over_ideal"] = round(cotune["makespan_s"] / ideal, 4)
    cotune["over_lower_bound"] = round(cotune["makespan_s"] / bound, 4)
    # What each task cost beyond its work, averaged over the workers' time.
    cotune["overhead_per_task_ms"] = round(
        (cotune["makespan_s"] * args.workers - args.trials * args.train_seconds)
        / args.trials
        * 1e3,
        1,
    )
    if tune:
        tune["over_lower_bound"] = round(tune["trials_span_s"] / tune_bound, 4)
        tune["overhead_per_task_ms"] = round(
            (tune["trials_span_s"] * args.workers - args.tune_trials * args.train_seconds)
            / args.tune_trials
            * 1e3,
            1,
        )
    figures: dict[str, Any] = {
        "machine": machine(load_start),
        "settings": {
            "trials": args.trials,
            "tune_trials": args.tune_trials,
            "train_seconds": args.train_seconds,
            "workers": args.workers,
            "shape": args.shape,
            "load_processes": args.processes,
            "api_processes": args.api_processes,
            "join_token_kind": "cluster",
            "seed": args.seed,
        },
        "ideal_s": ideal,
        "lower_bound_s": bound,
        "cotune": cotune,
        "ray_tune": tune,
    }
    targets = {
        "cotune_makespan_over_ideal": verdict(cotune["over_ideal"], TARGET_OVER_IDEAL, at_most=True)
    }
    if tune:
        targets["cotune_over_ideal_vs_ray_tune"] = verdict(
            cotune["over_ideal"], tune["over_ideal"], at_most=True
        )
    figures["targets"] = targets
    return figures


def _report(f: dict[str, Any]) -> None:
    s, c, t = f["settings"], f["cotune"], f["ray_tune"]
    print()
    print(
        f"overhead, {f['machine']['cpus']} CPUs: {s['trials']} trials of {s['train_seconds']:g} s "
        f"on {s['workers']} workers (shape {s['shape']})"
    )
    print(f"coordinator: {c['coordinator']['command']}")
    columns = ("makespan s", 10), ("/ ideal", 8), ("/ bound", 8), ("ms/task", 8), ("errors", 6)
    print(f"{'side':<24} " + " ".join(f"{name:>{width}}" for name, width in columns))
    print(f"{'ideal (work / workers)':<24} {f['ideal_s']:>10.2f} {1:>8.3f}")
    bound = f["lower_bound_s"]
    print(f"{'bound (whole tasks)':<24} {bound:>10.2f} {bound / f['ideal_s']:>8.3f}")
    print(
        f"{'cotune':<24} {c['makespan_s']:>10.2f} {c['over_ideal']:>8.3f} "
        f"{c['over_lower_bound']:>8.3f} {c['overhead_per_task_ms']:>8.1f} {c['errors']:>6}"
    )
    if t:
        tune_label = f"ray tune, {s['tune_trials']} trials"
        print(
            f"{tune_label:<24} {t['makespan_s']:>10.2f} {t['over_ideal']:>8.3f} "
            f"{t['over_lower_bound']:>8.3f} {t['overhead_per_task_ms']:>8.1f} {t['errors']:>6}"
        )
        print(f"{'ray tune (Tuner.fit)':<24} {t['fit_s']:>10.2f} {t['fit_over_ideal']:>8.3f}")
    if c.get("job_end"):
        end = c["job_end"]
        print(
            f"  sweep job {end['state']} {end['waited_s']:.0f} s after the last completion; "
            f"trials: {end['trials_by_state']}"
        )
    for line in profile_lines(c.get("resources", {}).get("coordinator", {}).get("profile", {})):
        print(line)
    print("targets:")
    for what, v in f["targets"].items():
        print(target_line(what, v, " s" if what.endswith("_s") else ""))


def main(argv: list[str]) -> int:
    parser = options.parser("overhead", __doc__, OUT)
    # 16 workers are a light load: one process carries them.
    options.add_coordinator(parser, server="coordinator", load_processes=1)
    add = parser.add_argument
    add("--trials", type=int, help="trials (tasks) [500; quick: 64]")
    add("--tune-trials", type=int, help="Ray Tune's trials [192; quick: --trials]")
    add("--train-seconds", type=float, default=1.0, help="each trial's work [1]")
    add("--workers", type=int, default=16, help="simulated workers [16]")
    add("--shape", choices=("tasks", "sweep"), default="tasks", help="what cotune runs [tasks]")
    add("--no-tune", action="store_true", help="skip the Ray Tune side")
    add("--timeout", type=float, default=1800.0, help="give up on cotune's side after [1800] s")
    add("--sweep-wait", type=float, default=60.0, help="sweep: wait for the job's end [60] s")
    args = parser.parse_args(argv)
    args.trials = args.trials or (64 if args.quick else 500)
    args.tune_trials = args.tune_trials or (args.trials if args.quick else TUNE_TRIALS)
    return options.run("overhead", args, _measure, _report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
