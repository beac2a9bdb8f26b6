"""`cotune evaluate`: the command the coordinator's trusted evaluation runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.protocol.task import TrainTask

ROOT = Path(__file__).resolve().parents[3]


def evaluate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cotune.orchestrator", "evaluate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def files(tmp_path: Path, tiny_model_dir: Path, synthetic_jsonl: Any) -> dict[str, Path]:
    task = TrainTask(base_model=str(tiny_model_dir), sequence_len=64, micro_batch_size=8)
    task_file = tmp_path / "task.json"
    task_file.write_text(task.model_dump_json())
    return {"task": task_file, "eval": synthetic_jsonl("alpaca", 24, seed=3)}


def test_base_only_and_an_adapter_give_finite_losses_and_differ(
    files: dict[str, Path], tmp_path: Path, tiny_model_dir: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(adapter))

    base_out, adapter_out = tmp_path / "base.json", tmp_path / "adapter.json"
    common = ["--task", str(files["task"]), "--eval", str(files["eval"])]
    done = evaluate(*common, "--base-only", "--out", str(base_out))
    assert done.returncode == 0, done.stderr
    done = evaluate(*common, "--adapter", str(adapter), "--out", str(adapter_out))
    assert done.returncode == 0, done.stderr
    base, tuned = json.loads(base_out.read_text()), json.loads(adapter_out.read_text())
    assert base["adapter"] is None and tuned["adapter"] == str(adapter)
    assert base["eval_tokens"] == tuned["eval_tokens"] > 0
    assert base["examples"] == 24
    # What sequence_len 64 kept of the 24 rows: the coordinator's data fit comes from here.
    assert base["rows"] == 24 and base["sequence_len"] == 64
    assert base["rows_dropped"] == 0 and 0 <= base["rows_cut"] < 24
    assert 0 < base["eval_loss"] < 50 and 0 < tuned["eval_loss"] < 50
    assert base["eval_loss"] != tuned["eval_loss"]  # the random adapter changes the model


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --adapter DIR and --base-only"),
        (["--base-only", "--adapter", "{tmp}"], "exactly one of --adapter DIR and --base-only"),
        (["--adapter", "{tmp}"], "no adapter_config.json"),
        (
            ["--base-only", "--eval", "{tmp}/missing.jsonl"],
            "--eval {tmp}/missing.jsonl: no such file",
        ),
        (["--base-only", "--task", "{tmp}/bad.json"], "micro_batch_size"),
        (["--base-only", "--out", "{tmp}"], "is a folder"),
    ],
)
def test_bad_input_exits_2_naming_what_is_wrong(
    files: dict[str, Path], tmp_path: Path, args: list[str], message: str
) -> None:
    (tmp_path / "bad.json").write_text(json.dumps({"base_model": "x", "micro_batch_size": 0}))
    given = [a.format(tmp=tmp_path) for a in args]
    defaults = {
        "--task": str(files["task"]),
        "--eval": str(files["eval"]),
        "--out": str(tmp_path / "r.json"),
    }
    for flag, value in defaults.items():
        if flag not in given:
            given += [flag, value]
    done = evaluate(*given)
    assert done.returncode == 2, done.stderr
    assert message.format(tmp=tmp_path) in done.stderr
    assert not (tmp_path / "r.json").exists()


def test_every_row_dropped_exits_3_saying_so(files: dict[str, Path], tmp_path: Path) -> None:
    task = TrainTask.model_validate_json(files["task"].read_text())
    short = tmp_path / "short.json"
    short.write_text(task.model_copy(update={"sequence_len": 16}).model_dump_json())
    out = tmp_path / "r.json"
    done = evaluate(
        "--task", str(short), "--eval", str(files["eval"]), "--base-only", "--out", str(out)
    )
    assert done.returncode == 3, done.stderr
    assert "every one of its 24 rows lost all its trained tokens at sequence_len 16" in done.stderr
    assert not out.exists()
