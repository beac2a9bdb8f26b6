"""Figures of a load run: latency summaries, the machine they were taken on, the JSON file."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Latencies:
    """Raw latencies (seconds) of the requests counted in a window of `span_s` seconds."""

    values: np.ndarray
    span_s: float

    @property
    def count(self) -> int:
        return int(self.values.size)

    @property
    def rate(self) -> float:
        return self.count / self.span_s if self.span_s > 0 else 0.0

    def ms(self, q: float) -> float:
        """The q-quantile (0..1) in milliseconds (nan without samples)."""
        if not self.values.size:
            return float("nan")
        return float(np.quantile(self.values, q) * 1e3)

    def summary(self) -> dict[str, float | int | None]:
        """Count, rate and quantiles in ms (None without samples: JSON has no NaN)."""
        mean = float(self.values.mean() * 1e3) if self.count else float("nan")
        figures = {f"p{round(q * 100)}_ms": self.ms(q) for q in (0.5, 0.9, 0.99)}
        figures.update(max_ms=self.ms(1.0), mean_ms=mean)
        return {
            "count": self.count,
            "per_s": round(self.rate, 1),
            **{k: None if np.isnan(v) else round(v, 2) for k, v in figures.items()},
        }


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine(load_at_start: list[float]) -> dict[str, Any]:
    """Where the figures were taken: platform, CPUs, load average at start and end."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_start": load_at_start,
        "load_average_end": load_average(),
    }


def verdict(reached: float, target: float, *, at_most: bool = False) -> dict[str, Any]:
    """A target and what was reached: met or not, and reached / target."""
    met = reached <= target if at_most else reached >= target
    ratio = round(reached / target, 3) if target else None
    return {
        "target": target,
        "reached": reached,
        "ratio": ratio,
        "at_most": at_most,
        "met": bool(met),
    }


def target_line(what: str, v: dict[str, Any], unit: str = "") -> str:
    sign = "<=" if v["at_most"] else ">="
    ratio = f", ratio {v['ratio']:.2f}" if v["ratio"] is not None else ""
    return (
        f"  {what}: {v['reached']:,.2f}{unit} (target {sign} {v['target']:,.2f}{unit}{ratio}) "
        f"{'met' if v['met'] else 'MISSED'}"
    )


def write_json(path: Path, figures: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=_plain) + "\n")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")
