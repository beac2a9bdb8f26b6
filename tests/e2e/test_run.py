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


def _cotune(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COTUNE_")}
    return subprocess.run(
        [sys.executable, "-m", "cotune.orchestrator", *args, "--home", str(home)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_run_the_tiny_example_end_to_end_and_stop(tmp_path: Path) -> None:
    """The README's main command: the sweep trains, and --out holds the best adapter."""
    home, out = tmp_path / "home", tmp_path / "out"
    done = _cotune("run", "examples/tiny/sweep.yaml", "--out", str(out), home=home, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in out.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
        "results.json",
    }
    results = json.loads((out / "results.json").read_text())
    assert results["job_id"].startswith("tiny-sweep-")
    assert len(results["trials"]) == 4 and results["shards"] == 2 and results["rounds"] == 2
    assert results["dataset"]["train_rows"] + results["dataset"]["eval_rows"] == 2000
    assert results["best_eval_loss"] < results["base_eval_loss"]
    # Live progress was shown: one line per evaluated round, trial start and end.
    assert "trial 0 started" in done.stdout and "round 0: eval loss" in done.stdout
    assert "status page http://" in done.stdout and "/ui/" in done.stdout  # printed by run

    from peft import PeftModel  # the folder is a PEFT adapter of the base it names
    from transformers import AutoModelForCausalLM

    config = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, str(out))
    assert any("lora_A" in name for name, _ in model.named_parameters())

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
