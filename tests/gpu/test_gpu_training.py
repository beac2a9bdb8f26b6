"""QLoRA training on a CUDA device: NF4 base in bf16 compute, loss falls, memory reported.

Skipped without CUDA (CI and the development VM have none); run on a GPU machine with
`pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl
from cotune.orchestrator.protocol.task import TrainTask

torch = pytest.importorskip("torch", reason="GPU training needs the worker extra")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _task(model_dir: Path, **overrides: Any) -> TrainTask:
    fields: dict[str, Any] = {
        "base_model": str(model_dir),
        "sequence_len": 256,
        "micro_batch_size": 8,
        "learning_rate": 1e-2,
        "warmup_steps": 3,
        "max_steps": 60,
        "optimizer": "paged_adamw_8bit",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "quantization": {"type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "seed": 3,
    }
    fields.update(overrides)
    return TrainTask.model_validate(fields)


def test_nf4_training_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    from cotune.worker.hardware import detect_hardware
    from cotune.worker.training import (
        compute_dtype,
        evaluate_adapter,
        load_base,
        run_training,
    )

    hardware = detect_hardware()
    assert hardware.kind == "cuda" and hardware.devices[0].total_memory_bytes > 0
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_jsonl(train, generate_rows("alpaca", 800, seed=1))
    write_jsonl(held_out, generate_rows("alpaca", 40, seed=2))
    task = _task(tiny_model_dir)
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    assert compute_dtype(task) == expected

    model, _ = load_base(task)
    assert next(model.parameters()).device.type == "cuda"
    del model

    class Peaks:
        def __init__(self) -> None:
            self.memory: list[int] = []

        def on_progress(self, progress: Any) -> bool:
            self.memory.append(progress.memory_bytes)
            return True

        def on_checkpoint(self, checkpoint_dir: Path, step: int) -> None:
            pass

    hooks = Peaks()
    result = run_training(
        task, tmp_path / "run", train_files=[train], eval_file=held_out, hooks=hooks
    )
    assert result.metrics["steps"] == 60
    assert result.metrics["last_loss"] < 0.8 * result.metrics["first_loss"]
    assert 0 < max(hooks.memory) <= hardware.devices[0].total_memory_bytes
    reloaded = evaluate_adapter(task, result.adapter_dir, held_out)
    assert reloaded == pytest.approx(result.metrics["eval_loss"], rel=1e-2)


def test_resume_on_cuda_repeats_the_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    from cotune.worker.training import run_training

    train = tmp_path / "train.jsonl"
    write_jsonl(train, generate_rows("alpaca", 400, seed=1))
    task = _task(tiny_model_dir, max_steps=8, optimizer="adamw_torch")
    whole = run_training(task, tmp_path / "whole", train_files=[train])

    class StopAt3:
        def on_progress(self, progress: Any) -> bool:
            return progress.step < 3

        def on_checkpoint(self, checkpoint_dir: Path, step: int) -> None:
            pass

    part = run_training(task, tmp_path / "part", train_files=[train], hooks=StopAt3())
    assert part.stopped and part.metrics["steps"] == 3
    checkpoint = tmp_path / "part" / "checkpoints" / "checkpoint-3"
    rest = run_training(task, tmp_path / "part", train_files=[train], resume_from=checkpoint)
    resumed = dict(part.losses) | dict(rest.losses)
    # bf16 kernels on GPU are not bitwise deterministic: a looser tolerance than on CPU.
    for step, loss in whole.losses:
        assert resumed[step] == pytest.approx(loss, rel=2e-2), step
