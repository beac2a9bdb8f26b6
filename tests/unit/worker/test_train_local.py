"""`cotune train-local`, run as a user runs it (the real `cotune` entry point, a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl
from cotune.worker.checkpoint import check_checkpoint, latest_checkpoint

ROOT = Path(__file__).resolve().parents[3]
TINY_SPEC = ROOT / "examples" / "tiny" / "sweep.yaml"


def _cotune(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    # One torch thread: the CPU is shared with other test processes (see test_training.py).
    env = {**os.environ, "COTUNE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    code = "from cotune.orchestrator.cli.app import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )


@pytest.fixture
def rows(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    write_jsonl(path, generate_rows("alpaca", 200, seed=4))
    return path


def test_train_local_writes_an_adapter_and_metrics(tmp_path: Path, rows: Path) -> None:
    eval_rows = tmp_path / "eval.jsonl"
    write_jsonl(eval_rows, generate_rows("alpaca", 20, seed=5))
    out = tmp_path / "out"
    run = _cotune(
        "train-local", str(TINY_SPEC), "--data", str(rows), "--eval", str(eval_rows),
        "--out", str(out), "--param", "training.learning_rate=5e-3", "--param", "lora.lora_r=4",
        home=tmp_path / "home",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["tokens"] > 0 and "eval_loss" in metrics
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4
    # The built-in base model was built into $COTUNE_HOME/models, and the adapter names it.
    assert Path(config["base_model_name_or_path"]).parent == tmp_path / "home" / "models"
    # Not a terminal: plain progress lines, one per step.
    assert "step 12/12" in run.stdout and "adapter:" in run.stdout


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--param", "training.learning_rate=0"], "training.learning_rate"),
        (["--param", "training.sequence_len=9"], "not a search dimension"),
        (["--param", "nonsense"], "expected key=value"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(
    tmp_path: Path, rows: Path, extra: list[str], expected: str
) -> None:
    out = tmp_path / "out"
    run = _cotune(
        "train-local", str(TINY_SPEC), "--data", str(rows), "--out", str(out), *extra,
        home=tmp_path / "home",
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert expected in run.stderr
    assert not out.exists() and not (tmp_path / "home").exists()


def test_bad_data_exits_2_and_leaves_no_output(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "x"}\n')
    out = tmp_path / "out"
    run = _cotune(
        "train-local", str(TINY_SPEC), "--data", str(data), "--out", str(out),
        "--param", "training.learning_rate=5e-3", "--param", "lora.lora_r=4",
        "--models-dir", str(tmp_path / "models"),
        home=tmp_path / "home",
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "bad.jsonl:1: not a alpaca row: missing 'output'" in run.stderr
    assert not out.exists()


def test_missing_files_and_used_out_folder_are_refused(tmp_path: Path, rows: Path) -> None:
    args = ["train-local", str(TINY_SPEC), "--param", "training.learning_rate=5e-3"]
    missing = _cotune(
        *args, "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"),
        home=tmp_path / "home",
    )  # fmt: skip
    assert (
        missing.returncode == 2 and "--data" in missing.stderr and "no such file" in missing.stderr
    )
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    refused = _cotune(*args, "--data", str(rows), "--out", str(used), home=tmp_path / "home")
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert [p.name for p in used.iterdir()] == ["keep.txt"]


def test_ctrl_c_checkpoints_and_resume_finishes(tmp_path: Path, rows: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "COTUNE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    args = [
        "train-local", str(TINY_SPEC), "--data", str(rows), "--out", str(out),
        "--param", "training.learning_rate=5e-3", "--param", "lora.lora_r=4",
    ]  # fmt: skip
    code = "from cotune.orchestrator.cli.app import main; main()"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGINT)
            break
    rest, errors = proc.communicate(timeout=300)
    assert proc.returncode == 130, errors
    # The step in flight finishes, a checkpoint is written, and the way on is printed.
    assert "stopped early; resume with --resume" in rest
    checkpoint = latest_checkpoint(out / "checkpoints")
    assert checkpoint is not None and check_checkpoint(checkpoint).step in (2, 3)

    resumed = _cotune(*args, "--resume", str(checkpoint), home=tmp_path / "home")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "metrics.json").read_text())["steps"] == 12
    assert "step 12/12" in resumed.stdout
