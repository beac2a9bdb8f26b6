"""The summary table of docs/benchmarks.md, regenerated from bench/out/*.json.

`make bench` (`python -m bench` with no names and no --quick) calls `regenerate()` after
its benchmarks ran: every benchmark whose figures file is there gives its rows (figure,
reached, target, met), and the table between the markers below in docs/benchmarks.md is
replaced with them, with the machine, the command and, per row, when its file was written
(a file left from an earlier run shows its own date).

    python -m bench._summary     # rewrite the table from the files present
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "out"
DOC = Path(__file__).parent.parent / "docs" / "benchmarks.md"
BEGIN = "<!-- summary:begin (bench/_summary.py writes this table) -->"
END = "<!-- summary:end -->"

Row = tuple[str, str, str, bool | None]  # figure, reached, target, met (None: no target)


def _sharding(f: dict[str, Any]) -> list[Row]:
    memory, speed = f["memory"], f["speed"]
    return [
        (
            "peak RSS, largest / smallest input",
            f"{memory['ratio_largest_to_smallest']:.2f}",
            f"<= {memory['target_at_most']}",
            memory["ratio_largest_to_smallest"] <= memory["target_at_most"],
        ),
        (
            "rows/s, cotune / datasets",
            f"{speed['ratio']:.2f}x",
            f">= {speed['target_at_least']}x",
            speed["ratio"] >= speed["target_at_least"],
        ),
    ]


def _training(f: dict[str, Any]) -> list[Row]:
    return [
        (
            "tokens/s, cotune / Trainer + PEFT (best of rounds)",
            f"{f['ratio']:.3f}",
            f">= {f['target']}",
            f["ratio"] >= f["target"],
        )
    ]


def _merge(f: dict[str, Any]) -> list[Row]:
    summary = f["summary"]
    rows: list[Row] = []
    for name, ok in summary["targets_met"].items():
        reached = ""
        if name.startswith("svd >=") and summary["svd_speedup_k8"]:
            reached = f"{min(summary['svd_speedup_k8'].values()):.0f}x"
        elif name.startswith("full 7B set <") and "full" in f:
            reached = f"{f['full']['seconds']:.1f} s"
        elif name.startswith("full 7B set peak") and "full" in f:
            reached = f"{f['full']['peak_rss_mb']:.0f} MB"
        rows.append((name, reached, "", bool(ok)))
    return rows


def _scrape(f: dict[str, Any]) -> list[Row]:
    """The row the target is about (scrape.py TARGET_SIZE), not the largest size measured."""
    jobs, workers = f.get("target_size") or (100, 1000)
    at = next(r for r in f["rows"] if (r["jobs"], r["workers"]) == (jobs, workers))
    return [
        (
            f"/metrics p50 at {at['jobs']} jobs / {at['workers']} workers",
            f"{at['metrics_p50_ms']:.1f} ms",
            f"< {f['target_ms']:.0f} ms",
            bool(f["met"]),
        )
    ]


def _targets(f: dict[str, Any]) -> list[Row]:
    """The coordinator benchmarks' shape (bench/load/stats.py `verdict`): `targets` maps a
    figure's name to {target, reached, at_most, met}, or lists them with a `figure` each."""
    targets = f["targets"]
    if isinstance(targets, list):  # [{figure, **verdict}] (endtoend)
        targets = {t["figure"]: t for t in targets}
    rows: list[Row] = []
    for name, v in targets.items():
        sign = "<=" if v.get("at_most") else ">="
        rows.append(
            (
                name.replace("_", " "),
                _number(v["reached"]),
                f"{sign} {_number(v['target'])}",
                bool(v["met"]),
            )
        )
    return rows


def _number(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"
    return str(x)


EXTRACTORS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "dispatch": _targets,
    "heartbeats": _targets,
    "overhead": _targets,
    "endtoend": _targets,
    "sharding": _sharding,
    "merge": _merge,
    "training": _training,
    "scrape": _scrape,
}


def table(out: Path = OUT) -> str:
    lines = [
        "| benchmark | figure | reached | target | met |",
        "| --- | --- | ---: | ---: | :---: |",
    ]
    for name, extract in EXTRACTORS.items():
        path = out / f"{name}.json"
        if not path.is_file():
            continue
        try:
            rows = extract(json.loads(path.read_text()))
        except (KeyError, TypeError, ValueError) as exc:
            rows = [(f"(figures unreadable: {type(exc).__name__} {exc})", "", "", None)]
        stamp = time.strftime("%Y-%m-%d %H:%M", time.gmtime(path.stat().st_mtime))
        for figure, reached, target, met in rows:
            mark = {True: "yes", False: "**no**", None: ""}[met]
            lines.append(f"| {name} ({stamp}) | {figure} | {reached} | {target} | {mark} |")
    return "\n".join(lines)


def regenerate(doc: Path = DOC, out: Path = OUT, command: str = "make bench") -> bool:
    """Rewrite the table in `doc`; False (and nothing written) if its markers are missing."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores"
    body = (
        f"\n`{command}` on {machine}, written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
        f" (each row names when its figures file was written):\n\n{table(out)}\n"
    )
    doc.write_text(head + BEGIN + body + END + tail)
    return True


if __name__ == "__main__":
    print("updated" if regenerate() else f"no summary markers in {DOC}")
