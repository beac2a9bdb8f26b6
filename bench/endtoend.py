"""End to end: the tiny sweep's wall time split into training, waiting, merge, evaluation and
orchestration.

    python -m bench endtoend              # examples/tiny/sweep.yaml as shipped: 4 trials x 2 shards
                                          #   x 2 rounds, 12 steps a task
    python -m bench endtoend --quick      # 2 trials, 6 steps a task: 8 tasks, 4 merges
    python -m bench endtoend --workers=2 --trials=3 --steps=20 --keep

What runs: the README's main command, `cotune run <spec> --out <tmp>/out --home <tmp>/home`,
as a subprocess in a fresh temporary home, as a first-time user runs it: the embedded Redis
and SeaweedFS, the coordinator (a local Ray, the API, the reconciler) and its local
worker(s) all start from nothing, and the built-in tiny model is built on first use. The
spec is a copy of examples/tiny/sweep.yaml (its dataset path made absolute) with the
overrides of --quick, --trials, --rounds and --steps. The process's wall time is split into
start-up (interpreter, stack, Ray, API, submit), the sweep (the job's `job_created` event to
its `succeeded` one) and the finish (the CLI noticing the end, downloading the best adapter,
stopping everything), each timed from the CLI's own output lines and the job's events.

The sweep is split per instant (bench/_timeline.py): each instant of the sweep counts once,
for the first of these that goes on at that instant anywhere in the system:

1. training: a worker in its training steps (the Trainer's `train_runtime_s`);
2. merge: a merge Ray task downloading, merging and uploading (the coordinator's `merge_s`);
3. evaluation: a `cotune evaluate` run on Ray, of a merge (`eval_s`) or of the base model;
4. waiting: compute being made ready: a worker agent starting (Ray actor, process, imports,
   enrollment) or a worker loading the model and data and building its trainer for a task;
5. orchestration: everything else: no compute is going on and none is being made ready,
   so the sweep waits on cotune itself (reconciler passes, lease polls, Ray dispatch,
   uploads and completions, sharding, job transitions).

An instant where one worker trains while another uploads is training: with parallel workers
the question is whether the sweep's critical path is doing compute, and an instant counts as
orchestration only when nothing in the system computes. Orchestration instants are then
labelled by what was pending (the first that applies: a worker fetching its inputs or
uploading its result, a finished round not yet claimed, a merge task not yet started on
Ray, a finished merge not yet recorded, a round recorded but the next one not yet queued,
a queued task not yet leased, job start or end), so the table says what the time went to.
The category totals add up to the sweep's wall time exactly.

Sources, per figure (all the coordinator's or the worker's own records, none timed from
outside but the process phases):

- task queued, leased, accepted; round merged; trial and job transitions: the job's events
  (Redis, read after the run through the control layer, bench/_sweep_record.py);
- training: each task's `train_runtime_s` in the worker's metrics (a worker's claim, fine
  for a breakdown), ending when the worker's log shows it began uploading the adapter
  (<home>/logs/agent-N.log, millisecond timestamps); so the adapter save and the last
  heartbeat before the upload (tens of ms a task) count as the task's setup (waiting);
- a task's input fetch and setup: the worker's log (lease received, last download done);
- merge and evaluation seconds: the coordinator's `merge_s` and `eval_s` of each merge, which
  it keeps only as histogram sums: a sampler polls the histograms during the run, and each
  single-observation increase is one merge's figures (bench/_sweep_record.py `Sampler`);
  of `eval_s`, `cotune evaluate`'s own `seconds` (its eval.json in the store) is the model
  load and scoring, the rest its process start and imports;
- a merge's end: its eval.json appearing in the store (the sampler; +-1 poll), else the
  `round_merged` event; its claim: the claim key's remaining TTL (ms), else the sampler;
- the base model's evaluation: from the job's `running` event (when the reconciler submits
  it) to its base_eval.json appearing (the sampler), Ray dispatch included;
- a worker agent's start: from the last `task_queued` event before its first log line (the
  reconciler starts agents in the pass that queues work) to its `enrolled` log line.

After the run (unless --no-probe), one fresh process times the imports `cotune evaluate`
makes and then its evaluation of the base model three times, on the run's eval split and
model cache: what a merge's evaluation costs once the libraries are loaded, beside what it
cost in the sweep.

The sampler adds a few Redis reads and S3 HEAD requests every --sample-period (0.2 s) to
the measured run; the echo of the run's output and the readback after it are outside the
sweep's window.

Target (issue "end to end"): orchestration under 5 % of the tiny sweep's wall time. A missed
target is a figure, not a failure: the run fails only when the sweep does. Results: a table
and bench/out/endtoend.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench._evaluate_probe import probe_evaluate
from bench._sweep_intervals import SweepIntervals
from bench._sweep_record import Sampler, parse_worker_log, read_record
from bench._timeline import split
from bench.load.stats import load_average, machine, target_line, verdict, write_json

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "examples" / "tiny" / "sweep.yaml"
OUT = Path(__file__).parent / "out" / "endtoend.json"
TARGET_PCT = 5.0  # orchestration, % of the sweep's wall time, at most
PRIORITY = ("training", "merge", "evaluation", "waiting", "orchestration")
SHOWN = ("training", "waiting", "merge", "evaluation", "orchestration")
QUICK = {"search.n_trials": 2, "training.max_steps": 6}


# --- the run ------------------------------------------------------------------------------


def prepare_spec(src: Path, folder: Path, overrides: dict[str, Any]) -> tuple[Path, dict]:
    """A copy of the spec at `src` in `folder`, its dataset path absolute, with `overrides`
    (dotted keys: "search.n_trials"); the copy's path and its shape."""
    import yaml

    spec = yaml.safe_load(src.read_text())
    data = Path(spec["dataset"]["path"])
    spec["dataset"]["path"] = str(data if data.is_absolute() else (src.parent / data).resolve())
    for dotted, value in overrides.items():
        *parents, last = dotted.split(".")
        node = spec
        for name in parents:
            node = node.setdefault(name, {})
        node[last] = value
    path = folder / src.name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    shape = {
        "trials": spec["search"]["n_trials"],
        "max_concurrent_trials": spec["search"].get("max_concurrent_trials"),
        "shards": spec["dataset"]["shards"],
        "rounds": spec["rounds"],
        "max_steps": spec["training"]["max_steps"],
    }
    return path, shape


def run_sweep(
    spec: Path, folder: Path, workers: int | None, timeout_s: float, echo: bool = True
) -> dict[str, Any]:
    """`cotune run` in a subprocess; its output lines, each with the time it arrived."""
    command = [sys.executable, "-m", "cotune.orchestrator", "run", str(spec)]
    command += ["--out", str(folder / "out"), "--home", str(folder / "home")]
    if workers is not None:
        command += ["--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
    env.update(PYTHONUNBUFFERED="1", COLUMNS="200")  # a line per print, none wrapped
    lines: list[tuple[float, str]] = []
    started = time.time()
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timer = threading.Timer(timeout_s, _interrupt, args=(proc,))
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.time(), line.rstrip("\n")))
            if echo:
                print(f"  | {line.rstrip()}", flush=True)
        rc = proc.wait()
    finally:
        timer.cancel()
    return {
        "command": command,
        "started": started,
        "ended": time.time(),
        "rc": rc,
        "lines": lines,
    }


def _interrupt(proc: subprocess.Popen[str]) -> None:
    """Past the timeout: Ctrl-C (the CLI stops its parts in order), then kill its group."""
    print(f"endtoend: the run passed its timeout; interrupting pid {proc.pid}", flush=True)
    with _quiet():
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        with _quiet():
            os.killpg(proc.pid, signal.SIGKILL)


def _quiet() -> contextlib.suppress:
    return contextlib.suppress(ProcessLookupError, PermissionError)


# --- figures --------------------------------------------------------------------------------


def process_phases(run: dict[str, Any], created: float, finished: float) -> dict[str, float]:
    """The process's wall time in consecutive phases, from its output lines and the job's
    events; a phase whose line is missing is counted in the next."""

    def at(prefix: str) -> float | None:
        return next((t for t, line in run["lines"] if line.startswith(prefix)), None)

    marks = [
        ("start-up: interpreter, embedded stack", at("stack ready in")),
        ("start-up: coordinator (Ray, API)", at("coordinator ready at")),
        ("start-up: submit the job", created),
        ("sweep", finished),
        ("finish: notice the end, download", at("stopping")),
        ("finish: stop workers, Ray, API, stack", run["ended"]),
    ]
    phases, last = {}, run["started"]
    for name, mark in marks:
        if mark is None or mark < last:
            phases[name] = 0.0
            continue
        phases[name], last = mark - last, mark
    return phases


def figures(
    run: dict[str, Any], record: dict[str, Any], t: SweepIntervals, shape: dict[str, Any]
) -> dict[str, Any]:
    parts = split(t.created, t.finished, [*t.intervals, *t.later], PRIORITY)
    wall = parts.window_s
    categories = {
        name: {
            "seconds": round(parts.seconds[name], 3),
            "pct": round(100 * parts.seconds[name] / wall, 2),
        }
        for name in SHOWN
    }
    labels = {
        name: {label: round(s, 3) for label, s in parts.labels.get(name, {}).items()}
        for name in SHOWN
    }
    accepted = [r for r in t.tasks if r["outcome"] == "accepted"]
    medians = {
        key: round(statistics.median(r[key] for r in accepted), 3) if accepted else None
        for key in ("lease_wait_s", "fetch_s", "setup_s", "train_s", "upload_complete_s")
        if all(r.get(key) is not None for r in accepted)
    }
    evals = [m["eval_s"] for m in t.merges]
    inner = [m["evaluate_inner_s"] for m in t.merges]
    orchestration_pct = categories["orchestration"]["pct"]
    target = verdict(orchestration_pct, TARGET_PCT, at_most=True)
    phases = process_phases(run, t.created, t.finished)
    return {
        "benchmark": "endtoend",
        "job": {
            "job_id": record["job_id"],
            "state": record["state"],
            "shape": shape,
            "tasks": len(record["tasks"]),
            "attempts": len(t.tasks),
            "merges": len(t.merges),
            "trials_by_state": dict(Counter(tr["state"] for tr in record["trials"])),
            "workers": len(t.workers),
        },
        "wall_s": round(run["ended"] - run["started"], 3),
        "process": {name: round(s, 3) for name, s in phases.items()},
        "sweep": {
            "wall_s": round(wall, 3),
            "categories": categories,
            "labels": labels,
            "busy_s": {name: round(parts.busy[name], 3) for name in SHOWN},
            "overlap_s": round(parts.overlap_s, 3),
            "training_claimed_s": round(sum(r.get("train_s", 0.0) for r in accepted), 3),
            "worker_training_share": round(
                sum(r.get("train_s", 0.0) for r in accepted) / (wall * max(len(t.workers), 1)), 4
            ),
        },
        "evaluation": {
            "runs": len(evals) + 1,
            "merge_eval_s_sum": round(sum(evals), 3),
            "inside_cotune_evaluate_s_sum": round(sum(inner), 3),
            "process_start_and_imports_s_sum": round(sum(evals) - sum(inner), 3),
            "base_model": _rounded([t.base_eval])[0],
        },
        "task_medians": medians,
        "tasks": _rounded(t.tasks),
        "merges": _rounded(t.merges),
        "workers": _rounded(t.workers),
        "segments": [
            [round(a - t.created, 3), round(b - t.created, 3), c, label]
            for a, b, c, label in parts.segments
        ],
        "notes": t.notes,
        "targets": [{"figure": "orchestration, % of the sweep's wall time", **target}],
    }


def _rounded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in rows]


def report(f: dict[str, Any]) -> None:
    job, sweep, shape = f["job"], f["sweep"], f["job"]["shape"]
    m = f["machine"]
    print()
    print(
        f"endtoend: {job['job_id']} ({shape['trials']} trials x {shape['shards']} shards x "
        f"{shape['rounds']} rounds, {shape['max_steps']} steps a task): {job['attempts']} "
        f"task attempts, {job['merges']} merges, {job['workers']} worker(s); {m['cpus']} CPUs, "
        f"load average {m['load_average_start'][0] if m['load_average_start'] else '?'}"
    )
    print(f"process wall time {f['wall_s']:.1f} s")
    for name, s in f["process"].items():
        print(f"  {name:<44} {s:8.1f} s")
    print(
        f"sweep {sweep['wall_s']:.1f} s, per instant (what the system was doing; active: the "
        "instants it went on at all, overlaps included):"
    )
    print(f"  {'category':<16} {'seconds':>9} {'%':>7} {'active':>9}")
    for name, c in sweep["categories"].items():
        print(f"  {name:<16} {c['seconds']:9.1f} {c['pct']:7.1f} {sweep['busy_s'][name]:9.1f}")
    total = sum(c["seconds"] for c in sweep["categories"].values())
    print(f"  {'total':<16} {total:9.1f} {100.0:7.1f}")
    for name in ("orchestration", "waiting", "evaluation"):
        print(f"  {name}, by what it was:")
        for label, s in list(sweep["labels"][name].items())[:10]:
            print(f"    {label:<52} {s:8.2f} s")
    e = f["evaluation"]
    print(
        f"evaluation: {e['runs'] - 1} merges' eval_s {e['merge_eval_s_sum']:.1f} s, of which "
        f"inside `cotune evaluate` {e['inside_cotune_evaluate_s_sum']:.1f} s and its process "
        f"start + imports {e['process_start_and_imports_s_sum']:.1f} s"
    )
    warm = e.get("warm_process", {})
    if "evaluate_s" in warm:
        print(
            f"  in a warm process: imports {warm['imports_s']:.1f} s once, then the base "
            f"model's evaluation in {min(warm['evaluate_s']):.2f} s (best of 3)"
        )
    print(f"per task (median): {f['task_medians']}")
    for note in f["notes"]:
        print(f"note: {note}")
    print("targets:")
    for t in f["targets"]:
        print(target_line(t["figure"], t, " %"))


def main(argv: list[str]) -> int:
    """Run the sweep, split its time, print and write the figures; 1 if the sweep failed."""
    parser = argparse.ArgumentParser(
        prog="python -m bench endtoend",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="2 trials of 6 steps a task (8 tasks, 4 merges)")
    add("--spec", type=Path, default=SPEC, help="the sweep spec [examples/tiny/sweep.yaml]")
    add("--trials", type=int, help="search.n_trials [the spec's; quick: 2]")
    add("--rounds", type=int, help="rounds [the spec's]")
    add("--steps", type=int, help="training.max_steps [the spec's; quick: 6]")
    add("--workers", type=int, help="cotune run --workers [cotune run's default]")
    add("--sample-period", type=float, default=0.2, help="the sampler's poll period [0.2] s")
    add("--timeout", type=float, default=1800.0, help="interrupt the run after [1800] s")
    add("--keep", action="store_true", help="keep the run's folder (home, out, spec)")
    add("--no-probe", action="store_true", help="skip timing evaluation in a warm process")
    add("--out", type=Path, default=OUT, help=f"figures file [{OUT}]")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    for flag, key in (
        ("trials", "search.n_trials"),
        ("rounds", "rounds"),
        ("steps", "training.max_steps"),
    ):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    load_start = load_average()
    folder = Path(tempfile.mkdtemp(prefix="cotune-bench-endtoend-"))
    try:
        spec, shape = prepare_spec(args.spec, folder, overrides)
        print(f"-- cotune run {spec} ({shape}) in {folder}", flush=True)
        sampler = Sampler(folder / "home", args.sample_period).start()
        try:
            run = run_sweep(spec, folder, args.workers, args.timeout)
        finally:
            seen = sampler.stop()
        if run["rc"] != 0:
            print(f"endtoend: cotune run exited with {run['rc']}", file=sys.stderr)
            return 1
        print("-- reading the job's record from its home ...", flush=True)
        record = read_record(folder / "home")
        logs = [parse_worker_log(p) for p in sorted((folder / "home" / "logs").glob("agent-*.log"))]
        intervals = SweepIntervals(record, logs, seen)
        f = figures(run, record, intervals, shape)
        if not args.no_probe:
            print("-- timing `cotune evaluate`'s work in a warm process ...", flush=True)
            f["evaluation"]["warm_process"] = probe_evaluate(folder, record)
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
    f["machine"] = machine(load_start)
    f["quick"] = args.quick
    f["settings"] = {
        "spec": str(args.spec),
        "overrides": overrides,
        "workers": args.workers,
        "command": run["command"],
        "sample_period_s": args.sample_period,
        "sampler": {
            "polls": seen.polls,
            "errors": seen.errors,
            "last_error": seen.last_error,
            "increments": len(seen.increments),
        },
    }
    write_json(args.out, f)
    report(f)
    print(f"figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
