"""TrainTask: built from a concrete sweep spec, strict about its fields; seed_for."""

from __future__ import annotations

from pathlib import Path

import pytest
from cotune.orchestrator.protocol.spec import load_spec
from cotune.orchestrator.protocol.task import TrainTask, seed_for
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[3]
TINY_SPEC = ROOT / "examples" / "tiny" / "sweep.yaml"


def test_from_spec_takes_the_concrete_values() -> None:
    spec = load_spec(TINY_SPEC).with_params({"training.learning_rate": 3e-3, "lora.lora_r": 4})
    task = TrainTask.from_spec(spec, seed=7)
    assert task.base_model == "cotune://tiny-llama"
    assert task.dataset_format == spec.dataset.format
    assert task.learning_rate == 3e-3
    assert task.lora.r == 4
    assert task.lora.alpha == spec.lora.lora_alpha
    assert task.lora.target_modules == spec.lora.lora_target_modules
    assert task.quantization.type == spec.quantization.type
    assert task.max_steps == spec.training.max_steps
    assert task.checkpoint_steps == spec.training.checkpoint_steps
    assert task.seed == 7
    # A task is wire data: it survives a JSON round trip unchanged.
    assert TrainTask.model_validate_json(task.model_dump_json()) == task


def test_from_spec_needs_a_concrete_spec() -> None:
    with pytest.raises(ValidationError, match="learning_rate"):
        TrainTask.from_spec(load_spec(TINY_SPEC))  # still a search dimension


def test_task_rejects_unknown_and_conflicting_fields() -> None:
    with pytest.raises(ValidationError, match=r"learning_rat\n.*Extra inputs"):
        TrainTask(base_model="x/y", learning_rat=1e-3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="warmup_steps or warmup_ratio"):
        TrainTask(base_model="x/y", warmup_steps=2, warmup_ratio=0.1)
    with pytest.raises(ValidationError, match=r"quantization\.type"):
        TrainTask.model_validate({"base_model": "x/y", "quantization": {"type": "nf5"}})
    with pytest.raises(ValidationError, match="target_modules"):
        TrainTask.model_validate({"base_model": "x/y", "lora": {"target_modules": []}})


def test_seed_for_is_deterministic_and_spreads() -> None:
    seeds = {seed_for("job", t, r, s) for t in range(4) for r in range(3) for s in range(5)}
    assert len(seeds) == 60
    assert seed_for("job", 1, 2, 3) == seed_for("job", 1, 2, 3)
    assert seed_for("job", 1, 2, 3) != seed_for("job", 1, 2, 3, base_seed=1)
    assert all(0 <= s < 2**31 for s in seeds)
    with pytest.raises(ValueError, match=">= 0"):
        seed_for("job", -1, 0, 0)


def test_a_spanning_schedule_needs_max_steps_inside_it() -> None:
    task = TrainTask(base_model="x/y", max_steps=4, schedule_steps=12, schedule_offset=8)
    assert (task.schedule_steps, task.schedule_offset) == (12, 8)
    with pytest.raises(ValidationError, match="schedule_offset needs schedule_steps"):
        TrainTask(base_model="x/y", max_steps=4, schedule_offset=4)
    with pytest.raises(ValidationError, match="within schedule_steps"):
        TrainTask(base_model="x/y", max_steps=4, schedule_steps=12, schedule_offset=9)
    with pytest.raises(ValidationError, match="needs max_steps"):
        TrainTask(base_model="x/y", schedule_steps=12)


def test_round_tasks_take_their_slice_of_a_trial_schedule(tmp_path: Path) -> None:
    from cotune.orchestrator.data.sharding import shard_dataset
    from cotune.orchestrator.pipeline.rounds import round_tasks

    spec = load_spec(TINY_SPEC).with_params({"training.learning_rate": 3e-3, "lora.lora_r": 4})
    manifest = shard_dataset(
        ROOT / "examples/tiny/data/train.jsonl",
        fmt="alpaca",
        shards=2,
        eval_split=0.1,
        seed=0,
        out_dir=tmp_path / "data",
    )
    for span, expected in (("round", [(None, 0), (None, 0)]), ("trial", [(24, 0), (24, 12)])):
        training = spec.training.model_copy(update={"lr_schedule_span": span})
        trial_spec = spec.model_copy(update={"training": training})
        got = []
        for rnd in (0, 1):
            start = None if rnd == 0 else {}
            (first, *_) = round_tasks(
                job_id="tiny-1",
                trial_spec=trial_spec,
                manifest=manifest,
                trial=0,
                round=rnd,
                start=start,  # type: ignore[arg-type]
                max_attempts=2,
            )
            task = TrainTask.model_validate_json(first.task_json)
            got.append((task.schedule_steps, task.schedule_offset))
        assert got == expected, span
