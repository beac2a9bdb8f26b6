"""`python -m bench endtoend --quick`: the tiny sweep run by `cotune run` on a fresh home, its
wall time split per instant (bench/endtoend.py). Checks the figures file: the categories
add up to the sweep's wall time and the phases to the process's, none is negative, training
and every merge were seen. Timings are not asserted (docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _services_installed() -> None:
    from cotune.orchestrator.runtime.services.redis_server import redis_server_binary
    from cotune.orchestrator.runtime.services.seaweed_server import weed_binary

    try:
        redis_server_binary()
        weed_binary()
    except FileNotFoundError as exc:
        pytest.skip(f"the embedded services are not installed here ({exc})")


@pytest.mark.timeout(900)
def test_endtoend_quick_splits_the_sweep_into_parts_that_add_up(tmp_path: Path) -> None:
    out = tmp_path / "endtoend.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "endtoend", "--quick", f"--out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "targets:" in done.stdout  # the table was printed
    f = json.loads(out.read_text())

    assert f["quick"] and f["job"]["state"] == "succeeded"
    assert f["machine"]["cpus"] >= 1 and len(f["machine"]["load_average_start"]) == 3
    sweep = f["sweep"]
    categories = sweep["categories"]
    assert set(categories) == {"training", "waiting", "merge", "evaluation", "orchestration"}
    assert all(c["seconds"] >= 0 and c["pct"] >= 0 for c in categories.values())
    assert sum(c["seconds"] for c in categories.values()) == pytest.approx(
        sweep["wall_s"], abs=0.01
    )
    assert sum(c["pct"] for c in categories.values()) == pytest.approx(100, abs=0.05)
    assert categories["training"]["seconds"] > 0
    for name, labels in sweep["labels"].items():  # each category's labels add up to it
        assert sum(labels.values()) == pytest.approx(categories[name]["seconds"], abs=0.01)
    assert all(s >= 0 for s in f["process"].values())
    assert sum(f["process"].values()) == pytest.approx(f["wall_s"], abs=0.01)
    assert f["process"]["sweep"] == pytest.approx(sweep["wall_s"], abs=0.01)

    shape = f["job"]["shape"]
    assert shape == {**shape, "trials": 2, "rounds": 2, "shards": 2, "max_steps": 6}
    assert f["job"]["tasks"] == 8 and f["job"]["merges"] == 4
    tasks = [t for t in f["tasks"] if t["outcome"] == "accepted"]
    assert len(tasks) == 8 and all(t["train_s"] > 0 and t["setup_s"] >= 0 for t in tasks)
    assert all(t["worker"] for t in tasks)  # each was found in a worker's log
    for merge in f["merges"]:
        assert merge["merge_s"] > 0 and merge["eval_s"] >= merge["evaluate_inner_s"] > 0
        assert merge["durations_from"].startswith("sampled")
    assert f["settings"]["sampler"]["polls"] > 0
    warm = f["evaluation"]["warm_process"]
    assert warm["imports_s"] > 0 and len(warm["evaluate_s"]) == 3
    target = f["targets"][0]
    assert target["reached"] == categories["orchestration"]["pct"]
    assert {"figure", "reached", "target", "met"} <= set(target)  # bench/_summary.py's rows
