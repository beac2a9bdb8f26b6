"""`cotune run` on the embedded stack: the README's main command, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.e2e


def _cotune(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--home", str(home)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_run_the_tiny_example_shards_into_the_store_and_stops(tmp_path: Path) -> None:
    home, out = tmp_path / "home", tmp_path / "out"
    done = _cotune("run", "examples/tiny/sweep.yaml", "--out", str(out), home=home)
    assert done.returncode == 0, done.stdout + done.stderr

    summary = json.loads((out / "job.json").read_text())
    manifest = summary["manifest"]
    assert summary["job_id"].startswith("tiny-sweep-")
    assert len(manifest["shards"]) == 2
    assert sum(s["rows"] for s in manifest["shards"]) + manifest["eval"]["rows"] == 2000

    stack_file = home / "stack.json"
    pids = json.loads(stack_file.read_text())["pids"] if stack_file.exists() else {}
    assert not [p for p in pids.values() if psutil.pid_exists(p)], "the stack was left running"
    assert not any(
        str(home) in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])
    ), "a process of this run's home is still alive"


def test_run_with_a_bad_spec_exits_2_and_starts_nothing(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nbase_model: cotune://tiny-llama\ndataset: {path: missing.jsonl}\n")
    done = _cotune("run", str(spec), "--out", str(tmp_path / "out"), home=tmp_path / "home")
    assert done.returncode == 2
    assert "dataset.path" in done.stderr
    assert not (tmp_path / "home").exists() and not (tmp_path / "out").exists()
