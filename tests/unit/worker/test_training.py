"""Real QLoRA training of the tiny Llama on CPU (4-bit NF4 base, LoRA adapters, Trainer).

Tolerances: the saved adapter reproduces the in-memory eval loss to 1e-4 (relative; it is
the same 4-bit base and the same weights, so only float summation order differs); a resumed
run repeats the uninterrupted run's per-step losses to 1e-4 (relative; same batches, same
RNG states, same optimizer state).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.data.synthetic import generate_rows, write_jsonl
from cotune.orchestrator.protocol.task import TrainTask
from cotune.worker.checkpoint import CheckpointError, check_checkpoint, latest_checkpoint
from cotune.worker.data import load_examples
from cotune.worker.training import (
    Progress,
    TrainingError,
    evaluate_adapter,
    load_base,
    mean_loss,
    run_training,
)

pytest.importorskip("bitsandbytes", reason="QLoRA needs the worker extra")
peft = pytest.importorskip("peft", reason="QLoRA needs the worker extra")
safetensors_torch = pytest.importorskip("safetensors.torch")
torch = pytest.importorskip("torch")

STEPS = 60


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """Train on one CPU thread: with the cores shared with other test processes, OpenMP
    threads spinning on busy cores made this tiny model's training ~15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass
class Recorder:
    """TrainingHooks that remember everything and can ask to stop after a given step."""

    stop_after: int | None = None
    progress: list[Progress] = field(default_factory=list)
    checkpoints: list[tuple[Path, int]] = field(default_factory=list)

    def on_progress(self, progress: Progress) -> bool:
        self.progress.append(progress)
        return self.stop_after is None or progress.step < self.stop_after

    def on_checkpoint(self, checkpoint_dir: Path, step: int) -> None:
        assert (checkpoint_dir / "adapter_model.safetensors").is_file()
        self.checkpoints.append((checkpoint_dir, step))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("data")
    write_jsonl(folder / "train.jsonl", generate_rows("alpaca", 400, seed=1))
    write_jsonl(folder / "eval.jsonl", generate_rows("alpaca", 40, seed=2))
    return {"train": folder / "train.jsonl", "eval": folder / "eval.jsonl"}


def _task(model_dir: Path, **overrides: Any) -> TrainTask:
    fields: dict[str, Any] = {
        "base_model": str(model_dir),
        "dataset_format": "alpaca",
        "sequence_len": 128,
        "micro_batch_size": 8,
        "learning_rate": 1e-2,
        "lr_scheduler": "cosine",
        "warmup_steps": 3,
        "max_steps": STEPS,
        "gradient_checkpointing": True,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "quantization": {"type": "nf4", "double_quant": True, "compute_dtype": "auto"},
        "seed": 3,
    }
    fields.update(overrides)
    return TrainTask.model_validate(fields)


@pytest.fixture(scope="module")
def trained(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainTask, Any, Recorder]:
    task = _task(tiny_model_dir, checkpoint_steps=25)
    hooks = Recorder()
    work = tmp_path_factory.mktemp("run")
    result = run_training(
        task, work, train_files=[data["train"]], eval_file=data["eval"], hooks=hooks
    )
    return task, result, hooks


def _base_eval_loss(task: TrainTask, eval_file: Path) -> float:
    model, tokenizer = load_base(task)
    examples = load_examples(
        [eval_file], "alpaca", tokenizer, sequence_len=task.sequence_len, train_on_inputs=False
    )
    return mean_loss(model, examples, 8, tokenizer.pad_token_id)


def test_eval_loss_falls_by_a_third(trained: Any, data: dict[str, Path]) -> None:
    task, result, _ = trained
    before = _base_eval_loss(task, data["eval"])
    after = result.metrics["eval_loss"]
    assert after <= 0.7 * before, (before, after)
    assert result.metrics["last_loss"] < result.metrics["first_loss"]


def test_adapter_is_peft_safetensors_and_reproduces_the_eval_loss(
    trained: Any, data: dict[str, Path], tiny_model_dir: Path
) -> None:
    task, result, _ = trained
    files = sorted(p.name for p in result.adapter_dir.iterdir())
    assert "adapter_config.json" in files and "adapter_model.safetensors" in files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    assert Path(config["base_model_name_or_path"]) == tiny_model_dir.resolve()
    weights = safetensors_torch.load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    assert len(weights) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    # A fresh process's view: the base loaded again, the adapter through PeftModel.
    reloaded = evaluate_adapter(task, result.adapter_dir, data["eval"])
    assert reloaded == pytest.approx(result.metrics["eval_loss"], rel=1e-4)


def test_metrics_and_progress_reports(trained: Any) -> None:
    task, result, hooks = trained
    metrics = json.loads((result.adapter_dir.parent / "metrics.json").read_text())
    assert metrics == pytest.approx(result.metrics)
    assert metrics["steps"] == STEPS and not result.stopped
    assert metrics["tokens"] > STEPS * 8 * 20  # about 57 tokens per alpaca row
    assert math.isfinite(metrics["train_loss"])
    # At sequence_len 128 every synthetic row (40-68 tokens) fits whole.
    assert (metrics["rows"], metrics["rows_cut"], metrics["rows_dropped"]) == (400, 0, 0)
    assert metrics["examples"] == 400
    assert [p.step for p in hooks.progress] == list(range(1, STEPS + 1))
    assert [(p.step, p.loss) for p in hooks.progress] == list(result.losses)
    assert hooks.progress[-1].tokens_seen == metrics["tokens"]
    assert all(p.max_steps == STEPS and p.memory_bytes > 0 for p in hooks.progress)
    # Warmup to the peak learning rate, then cosine decay towards zero.
    rates = [p.learning_rate for p in hooks.progress]
    assert rates[0] < rates[1] < rates[2] < max(rates) == pytest.approx(task.learning_rate)
    assert rates[-1] < 0.01 * task.learning_rate
    # Checkpoints every 25 steps (not at the end: the adapter is the result there).
    assert [step for _, step in hooks.checkpoints] == [25, 50]
    info = check_checkpoint(hooks.checkpoints[-1][0])
    assert info.step == 50 and 0 < info.tokens_seen < metrics["tokens"]


def test_resume_repeats_the_uninterrupted_run(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    # Dropout on, so the restored RNG states matter too.
    lora = {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"}
    task = _task(tiny_model_dir, max_steps=8, checkpoint_steps=100, lora=lora)
    whole = run_training(task, tmp_path / "whole", train_files=[data["train"]])

    stopper = Recorder(stop_after=3)
    first = run_training(task, tmp_path / "part", train_files=[data["train"]], hooks=stopper)
    assert first.stopped and first.metrics["steps"] == 3  # stopped within one step
    assert [step for _, step in stopper.checkpoints] == [3]  # checkpoint written on stop
    checkpoint = latest_checkpoint(tmp_path / "part" / "checkpoints")
    assert checkpoint == stopper.checkpoints[0][0]
    assert not (checkpoint / "training_args.bin").exists()  # no pickles leave the machine

    rest = run_training(
        task, tmp_path / "part", train_files=[data["train"]], resume_from=checkpoint
    )
    assert [s for s, _ in rest.losses] == list(range(4, 9))
    resumed = dict(first.losses) | dict(rest.losses)
    for step, loss in whole.losses:
        assert resumed[step] == pytest.approx(loss, rel=1e-4), step
    assert rest.metrics["tokens"] == whole.metrics["tokens"]
    a = safetensors_torch.load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = safetensors_torch.load_file(str(rest.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-4 * (a[key].abs().max() + 1e-6), key


def test_training_continues_from_a_start_adapter(
    trained: Any, data: dict[str, Path], tmp_path: Path
) -> None:
    task, result, hooks = trained
    more = _task(Path(task.base_model), max_steps=2, learning_rate=1e-3, warmup_steps=0)
    follow = run_training(
        more, tmp_path, train_files=[data["train"]], start_adapter=result.adapter_dir
    )
    # It starts where the trained adapter ended, not from a fresh init...
    assert follow.losses[0][1] < 0.8 * hooks.progress[0].loss  # type: ignore[operator]
    # ...and the start adapter is trainable: its weights move.
    start = safetensors_torch.load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    end = safetensors_torch.load_file(str(follow.adapter_dir / "adapter_model.safetensors"))
    assert start.keys() == end.keys()
    assert any(not (start[k] == end[k]).all() for k in start)


@pytest.mark.parametrize(
    "overrides",
    [
        {"sample_packing": True, "optimizer": "paged_adamw_8bit"},
        {"quantization": {"type": "fp4", "double_quant": False}, "optimizer": "adamw_8bit"},
        {"quantization": {"type": "int8"}, "lora": {"target_modules": ["q_proj", "v_proj"]}},
        {"quantization": {"type": "none"}, "gradient_checkpointing": False},
    ],
    ids=["nf4-packing-paged8bit", "fp4-adam8bit", "int8-qv", "unquantized"],
)
def test_settings_variants_train(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path, overrides: dict[str, Any]
) -> None:
    task = _task(tiny_model_dir, max_steps=4, **overrides)
    result = run_training(task, tmp_path, train_files=[data["train"]])
    assert result.metrics["steps"] == 4
    assert all(math.isfinite(loss) for _, loss in result.losses)
    if task.sample_packing:
        # Full blocks: padding only in the last block of each batch's tail.
        assert result.metrics["tokens"] > 4 * 8 * 128 * 0.8


def test_bad_inputs_fail_before_anything_is_written(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    task = _task(tiny_model_dir, max_steps=1)
    work = tmp_path / "work"
    with pytest.raises(TrainingError, match="train_files is empty"):
        run_training(task, work, train_files=[])
    with pytest.raises(CheckpointError, match=r"missing adapter_config\.json"):
        run_training(task, work, train_files=[data["train"]], resume_from=tmp_path)
    with pytest.raises(TrainingError, match=r"start adapter .*: no adapter_config\.json"):
        run_training(task, work, train_files=[data["train"]], start_adapter=tmp_path)
    assert not work.exists()


def test_checkpoint_checks(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    for step in (5, 10, 9):
        (tmp_path / f"checkpoint-{step}").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    folder = tmp_path / "checkpoint-10"
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state.pth",
    ):
        (folder / name).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"missing trainer_state\.json"):
        check_checkpoint(folder)
    (folder / "trainer_state.json").write_text('{"global_step": 10, "num_input_tokens_seen": 99}')
    assert check_checkpoint(folder).step == 10
    (folder / "training_args.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="a pickle"):
        check_checkpoint(folder)


def test_a_task_follows_its_slice_of_a_schedule_spanning_rounds(
    tiny_model_dir: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    """Two 4-step rounds of an 8-step schedule take the whole run's learning rates, in
    order: one warmup (3 steps of 8) and one cosine decay, not a restart per round."""

    def rates(name: str, **fields: Any) -> list[float]:
        hooks = Recorder()
        task = _task(tiny_model_dir, warmup_steps=3, **fields)
        run_training(task, tmp_path / name, train_files=[data["train"]], hooks=hooks)
        return [p.learning_rate for p in hooks.progress]

    whole = rates("whole", max_steps=8)
    first = rates("r0", max_steps=4, schedule_steps=8, schedule_offset=0)
    second = rates("r1", max_steps=4, schedule_steps=8, schedule_offset=4)
    assert first + second == pytest.approx(whole, rel=1e-9)
    restart = rates("restart", max_steps=4)  # the per-round schedule: warmup again
    assert restart != pytest.approx(second) and restart[0] < second[0]
