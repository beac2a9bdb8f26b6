"""Benchmark runner: `python -m bench [name ...] [--flag ...]`.

Runs every module `bench/<name>.py` that exposes `main(argv) -> int` (all of them when no
name is given), in name order, passing the `--flags` through to each, then (for a full run
of them all) rewrites the summary table of docs/benchmarks.md from bench/out/*.json
(bench/_summary.py). Exits non-zero
when a benchmark fails or misses its target.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from collections.abc import Callable
from pathlib import Path


def discover() -> dict[str, Callable[[list[str]], int]]:
    """Benchmark name -> its main, for every bench module that has one."""
    found = {}
    for module in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if module.name.startswith("_"):
            continue
        main = getattr(importlib.import_module(f"bench.{module.name}"), "main", None)
        if callable(main):
            found[module.name] = main
    return found


def run(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")]
    flags = [a for a in argv if a.startswith("-")]
    benchmarks = discover()
    unknown = [n for n in names if n not in benchmarks]
    if unknown:
        print(
            f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(benchmarks)}",
            file=sys.stderr,
        )
        return 2
    failed = []
    for name in names or list(benchmarks):
        print(f"== bench {name} {' '.join(flags)}".rstrip(), flush=True)
        start = time.perf_counter()
        try:
            code = benchmarks[name](flags)
        except SystemExit as exit_:  # argparse exits on --help or a flag it does not know
            code = exit_.code if isinstance(exit_.code, int) else 1
        print(f"== bench {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    from bench._summary import DOC, regenerate

    # The table holds whole runs' figures: one benchmark or a --quick run leaves it alone.
    if not names and "--quick" not in flags and regenerate(command="make bench"):
        print(f"== summary table rewritten in {DOC}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
