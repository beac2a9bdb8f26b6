"""Sharding benchmark: flat memory across input sizes, and rows/s against Hugging Face datasets.

    python -m bench sharding            # 10/50/200 MB for memory; speed on 50 MB, 3 rounds
    python -m bench sharding --quick    # 10/20/50 MB for memory; speed on 20 MB, 3 rounds
    python -m bench sharding --speed-mb=200 --rounds=3    # speed on the largest input

(1) Memory: cotune's sharder runs in a fresh process per input size; its peak RSS is read
from its VmHWM (bench/_memory.py: not getrusage, which survives fork and exec). The figure
is the ratio peak(largest)/peak(smallest).
(2) Speed: on the same file, cotune (parse, check the format, split eval by hash, K shards
round-robin, zstd) and `datasets` (load_dataset("json") with a fresh cache, then
train_test_split, shard(K, i).to_json per shard and for eval) run interleaved, ours then
theirs, each in a fresh process. Each side's time covers the work only (after imports); the
figure is the ratio of the medians. Inputs are synthetic alpaca rows
(orchestrator/data/synthetic.py). Results: a table on stdout and bench/out/sharding.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._memory import peak_rss_mb

SHARDS = 8
EVAL_FRACTION = 0.05
SEED = 0
SPEED_TARGET = 3.0
MEMORY_TARGET = 1.5  # peak RSS may grow at most this much from the smallest input to the largest
OUT = Path(__file__).parent / "out" / "sharding.json"
MB = 1_000_000


def _child_ours(source: Path, out: Path) -> dict[str, Any]:
    from cotune.orchestrator.data.sharding import shard_dataset

    start = time.perf_counter()
    manifest = shard_dataset(
        source, fmt="alpaca", shards=SHARDS, eval_split=EVAL_FRACTION, seed=SEED, out_dir=out
    )
    return {"seconds": time.perf_counter() - start, "rows": manifest.source.rows}


def _child_theirs(source: Path, out: Path) -> dict[str, Any]:
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    datasets.disable_progress_bars()
    start = time.perf_counter()
    table = datasets.load_dataset(
        "json", data_files=str(source), split="train", cache_dir=str(out / "cache")
    )
    split = table.train_test_split(test_size=EVAL_FRACTION, seed=SEED)
    for i in range(SHARDS):
        split["train"].shard(SHARDS, i).to_json(str(out / f"shard-{i:05d}.jsonl"))
    split["test"].to_json(str(out / "eval.jsonl"))
    return {"seconds": time.perf_counter() - start, "rows": len(table)}


def _child(side: str, source: Path, out: Path) -> int:
    result = (_child_ours if side == "ours" else _child_theirs)(source, out)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))
    return 0


def _run_child(side: str, source: Path, work: Path) -> dict[str, Any]:
    out = work / f"{side}-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "bench.sharding", "--child", side, str(source), str(out)]
    start = time.perf_counter()
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=Path(__file__).parent.parent, check=False
    )
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode:
        raise RuntimeError(f"{side} failed on {source}:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = wall
    return result


def _make_inputs(work: Path, sizes_mb: list[int]) -> dict[int, Path]:
    """Synthetic alpaca JSON lines: the largest file is generated, smaller ones are its head."""
    import orjson
    from cotune.orchestrator.data.synthetic import generate_rows

    biggest = work / f"alpaca-{max(sizes_mb)}mb.jsonl"
    limit = max(sizes_mb) * MB
    with biggest.open("wb") as f:
        written = 0
        # Far more rows than needed; the loop stops at the byte limit.
        for row in generate_rows("alpaca", limit // 40, seed=SEED):
            line = orjson.dumps(row) + b"\n"
            if written + len(line) > limit:
                break
            f.write(line)
            written += len(line)
    files = {max(sizes_mb): biggest}
    for size in sizes_mb:
        if size in files:
            continue
        path = work / f"alpaca-{size}mb.jsonl"
        with biggest.open("rb") as src, path.open("wb") as dst:
            taken = 0
            for line in src:
                if taken + len(line) > size * MB:
                    break
                dst.write(line)
                taken += len(line)
        files[size] = path
    return files


def _measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = sorted({*args.sizes, args.speed_size})
    print(f"generating synthetic alpaca inputs: {', '.join(f'{s} MB' for s in sizes)}", flush=True)
    files = _make_inputs(work, sizes)

    memory = []
    for size in args.sizes:
        result = _run_child("ours", files[size], work)
        memory.append({"input_mb": size, **result})
        print(
            f"  memory: {size:>4} MB  {result['rows']:>9,} rows  "
            f"peak RSS {result['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    memory_ratio = memory[-1]["peak_rss_mb"] / memory[0]["peak_rss_mb"]

    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "theirs": []}
    for round_ in range(args.rounds):
        for side in ("ours", "theirs"):
            result = _run_child(side, files[args.speed_size], work)
            runs[side].append(result)
            print(
                f"  speed round {round_ + 1}: {side:<6} {result['seconds']:6.2f} s "
                f"({result['rows'] / result['seconds']:,.0f} rows/s, "
                f"peak RSS {result['peak_rss_mb']:.0f} MB)",
                flush=True,
            )
    median = {side: statistics.median(r["seconds"] for r in rs) for side, rs in runs.items()}
    rows = runs["ours"][0]["rows"]
    return {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "setup": {
            "format": "alpaca",
            "shards": SHARDS,
            "eval_fraction": EVAL_FRACTION,
            "rounds": args.rounds,
            "speed_input_mb": args.speed_size,
            "rows": rows,
        },
        "memory": {
            "runs": memory,
            "ratio_largest_to_smallest": memory_ratio,
            "target_at_most": MEMORY_TARGET,
        },
        "speed": {
            "runs": runs,
            "median_seconds": median,
            "rows_per_second": {side: rows / s for side, s in median.items()},
            "ratio": median["theirs"] / median["ours"],
            # Each round's pair ran back to back, so its ratio shares that moment's load.
            "round_ratios": [
                t["seconds"] / o["seconds"]
                for o, t in zip(runs["ours"], runs["theirs"], strict=True)
            ],
            "target_at_least": SPEED_TARGET,
        },
    }


def _report(figures: dict[str, Any]) -> bool:
    speed, memory = figures["speed"], figures["memory"]
    rps = speed["rows_per_second"]
    lines = [
        "",
        f"sharding, {figures['machine']['cpus']} CPUs, K={SHARDS}, eval {EVAL_FRACTION}",
        f"{'input':>10} {'rows':>11} {'peak RSS':>10}",
        *(
            f"{m['input_mb']:>7} MB {m['rows']:>11,} {m['peak_rss_mb']:>7.0f} MB"
            for m in memory["runs"]
        ),
        f"peak RSS ratio largest/smallest: {memory['ratio_largest_to_smallest']:.2f} "
        f"(target <= {MEMORY_TARGET})",
        "",
        f"{'side':<8} {'median s':>9} {'rows/s':>12}   ({figures['setup']['speed_input_mb']} MB, "
        f"{figures['setup']['rows']:,} rows, {figures['setup']['rounds']} rounds)",
        *(f"{side:<8} {speed['median_seconds'][side]:>9.2f} {rps[side]:>12,.0f}" for side in rps),
        f"speed ratio cotune/datasets: {speed['ratio']:.2f}x (target >= {SPEED_TARGET}x); "
        f"per round: {', '.join(f'{r:.2f}x' for r in speed['round_ratios'])}",
    ]
    print("\n".join(lines))
    memory_ok = memory["ratio_largest_to_smallest"] <= MEMORY_TARGET
    return bool(speed["ratio"] >= SPEED_TARGET and memory_ok)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench sharding", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small inputs, two rounds")
    parser.add_argument("--rounds", type=int, help="speed rounds per side [3]")
    parser.add_argument("--speed-mb", type=int, help="input size for speed [50; quick: 20]")
    parser.add_argument("--out", type=Path, default=OUT, help=f"figures file [{OUT}]")
    parser.add_argument(
        "--child", nargs=3, metavar=("SIDE", "SOURCE", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.child:
        side, source, out = args.child
        return _child(side, Path(source), Path(out))
    args.sizes = [10, 20, 50] if args.quick else [10, 50, 200]
    args.speed_size = args.speed_mb or (20 if args.quick else 50)
    args.rounds = args.rounds or 3
    with tempfile.TemporaryDirectory(prefix="cotune-bench-") as tmp:
        figures = _measure(args, Path(tmp))
    figures["quick"] = args.quick
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    met = _report(figures)
    print(f"figures written to {args.out}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
