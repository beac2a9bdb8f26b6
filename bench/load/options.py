"""What the load benchmarks share on their command line, and how each run ends: the flags
of the coordinator under test and of the load generator, a fresh temporary home per run,
the JSON written, the table printed."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.load.stats import write_json


def parser(name: str, doc: str | None, out: Path) -> argparse.ArgumentParser:
    """A benchmark's parser with the shared flags: --quick, --out, --seed."""
    made = argparse.ArgumentParser(
        prog=f"python -m bench {name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    made.add_argument("--quick", action="store_true", help="the small variant (see above)")
    made.add_argument("--seed", type=int, default=0, help="seeds the arrivals [0]")
    made.add_argument("--out", type=Path, default=out, help=f"figures file [{out}]")
    return made


def add_coordinator(
    made: argparse.ArgumentParser, *, server: str = "auto", load_processes: int | None = None
) -> None:
    """--server, --api-processes (the coordinator under test), --processes (the load) and
    --no-profile (skip py-spy's profile of the coordinator: bench/load/profile.py)."""
    choices = ("auto", "api", "coordinator") if server == "auto" else ("api", "coordinator")
    made.add_argument(
        "--server",
        choices=choices,
        default=server,
        help=f"how the coordinator runs (bench/load/server.py) [{server}]",
    )
    made.add_argument("--api-processes", type=int, default=1, help="the API's server processes [1]")
    processes = load_processes or os.cpu_count() or 2
    made.add_argument(
        "--processes",
        type=int,
        default=processes,
        help=f"load-generator processes [{'the CPU count' if not load_processes else processes}]",
    )
    made.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="do not profile the coordinator with py-spy during each case [profiled]",
    )


def run(
    name: str,
    args: argparse.Namespace,
    measure: Callable[[argparse.Namespace, Path], dict[str, Any]],
    report: Callable[[dict[str, Any]], None],
) -> int:
    """Measure in a fresh temporary home, write the figures, print the table."""
    with tempfile.TemporaryDirectory(prefix=f"cotune-bench-{name}-") as tmp:
        figures = measure(args, Path(tmp))
    figures["quick"] = args.quick
    write_json(args.out, figures)
    report(figures)
    print(f"figures written to {args.out}")
    return 0
