"""The quality benchmark at its smallest (`python -m bench.quality --quick`): real `cotune
run`, `cotune train-local` and `cotune evaluate` processes on the tiny model; its JSON is
checked for shape and for what must hold whatever the figures (training lowers the loss,
every round is scored, nothing of the data was cut). Losses are not asserted against
targets: a missed target is a figure (docs/quality.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.quality.report import critical_path, table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.integration
@pytest.mark.slow
def test_the_quick_run_scores_every_setting_on_the_held_out_file(tmp_path: Path) -> None:
    out = tmp_path / "quality.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.quality", "--quick", f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["quick"] is True and report["budget"]["steps"] == 48
    tiny = report["models"]["tiny"]
    base = tiny["base_eval_loss"]
    assert base is not None and math.isfinite(base)
    one = tiny["one_worker"]
    assert one["steps_per_round"] == 48 and one["eval_losses"][0] < base
    assert [c["steps_per_round"] for c in tiny["one_worker_curve"]] == [24]
    assert tiny["sync"]["2"]["steps_per_round"] == 24
    assert tiny["sync"]["2"]["extra"]["accumulation"] == 2
    (fed,) = tiny["federated"]
    assert (fed["shards"], fed["rounds"], fed["steps_per_round"]) == (2, 2, 12)
    assert len(fed["eval_losses"]) == 2 and all(x < base for x in fed["eval_losses"])
    fit = fed["extra"]["data_fit"]
    assert fit["rows"] == 400 and fit["rows_cut"] == fit["rows_dropped"] == 0
    assert "K 2, R 2, svd" in done.stdout and "(b) one worker" in done.stdout


def test_the_table_counts_the_critical_path_to_the_one_workers_loss() -> None:
    runs = {
        "base_eval_loss": 9.0,
        "one_worker": {"eval_losses": [3.0], "steps_per_round": 96},
        "sync": {"4": {"eval_losses": [4.0], "steps_per_round": 24}},
        "federated": [
            {
                "name": "K 4, R 3, svd",
                "shards": 4,
                "rounds": 3,
                "merge": "svd",
                "steps_per_round": 8,
                "eval_losses": [5.0, 2.9, 2.5],
            },
            {
                "name": "K 4, R 1, svd",
                "shards": 4,
                "rounds": 1,
                "merge": "svd",
                "steps_per_round": 24,
                "eval_losses": [6.0],
            },
        ],
    }
    assert critical_path(runs["federated"][0], 3.0) == (16, 2)
    assert critical_path(runs["federated"][1], 3.0) is None
    text = table(runs, 96)
    assert "| K 4, R 3, svd | 8 | 2.500 | -37.5% | -16.7% | 1.30 | 1.08 |" in text
    assert "16 steps + 2 merges (0.17 T)" in text
    assert "| K 4, R 1, svd | 24 | 6.000 | +50.0% | +100.0% | 0.60 | 0.50 | not reached |" in text
