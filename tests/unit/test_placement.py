"""Placement: what a trial's tasks need comes from the memory estimator on the base model's
architecture, per trial; an explicit requirement wins; what cannot be sized is logged."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from cotune.orchestrator.control.tiers import CPU_TIER, GB, tier_for, tiers_for
from cotune.orchestrator.pipeline.placement import DEFAULT_TASK_BYTES, requirement_bytes
from cotune.orchestrator.protocol.builtin_models import TINY_LLAMA_CONFIG
from cotune.orchestrator.protocol.memory import estimate_task_memory
from cotune.orchestrator.protocol.spec import SweepSpec, parse_spec
from cotune.orchestrator.protocol.task import TrainTask

LLAMA_2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}


def spec(base_model: str = "cotune://tiny-llama", **sections: Any) -> SweepSpec:
    data: dict[str, Any] = {
        "name": "place",
        "base_model": base_model,
        "dataset": {"path": "/data/train.jsonl", "format": "alpaca"},
        "training": {"max_steps": 4, "sequence_len": 64, "micro_batch_size": 2},
        "lora": {"lora_r": 4, "lora_alpha": 8},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return parse_spec(data)


def test_the_tiny_model_is_estimated_and_lands_in_the_cpu_tier() -> None:
    tiny = spec()
    need = requirement_bytes(tiny)
    assert need == estimate_task_memory(TrainTask.from_spec(tiny), TINY_LLAMA_CONFIG).total
    assert tier_for(need) == CPU_TIER
    assert CPU_TIER in tiers_for(8 * GB, gpu=False)  # so a CPU worker takes it


def test_each_trial_is_estimated_with_its_own_settings() -> None:
    sweep = spec(
        training={"micro_batch_size": [1, 16]}, lora={"lora_r": [4, 64]}, search={"n_trials": 4}
    )
    small = sweep.with_params({"training.micro_batch_size": 1, "lora.lora_r": 4})
    wider = sweep.with_params({"training.micro_batch_size": 16, "lora.lora_r": 4})
    deeper = sweep.with_params({"training.micro_batch_size": 1, "lora.lora_r": 64})
    assert requirement_bytes(wider) > requirement_bytes(small)
    assert requirement_bytes(deeper) > requirement_bytes(small)


def test_an_explicit_requirement_wins(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        assert requirement_bytes(spec(requirements={"gpu_memory_gb": 30})) == 30 * GB
        assert requirement_bytes(spec("org/model", requirements={"gpu_memory_gb": 0.5})) == (
            GB // 2
        )
    assert caplog.text == ""  # nothing was looked up, nothing to explain


def test_a_local_folder_is_estimated_from_its_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_2_7B))
    llama = spec(str(tmp_path), training={"sequence_len": 512, "micro_batch_size": 1})
    need = requirement_bytes(llama)
    assert need == estimate_task_memory(TrainTask.from_spec(llama), LLAMA_2_7B).total
    # 4-bit 7B: about 5 GB of weights, so an 8 GB card's tier, not the 16 GB default.
    assert tier_for(need) == "8g"


def test_a_hub_id_gets_the_default_and_says_why(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cotune.orchestrator.pipeline.placement"):
        assert requirement_bytes(spec("meta-llama/Llama-2-7b-hf")) == DEFAULT_TASK_BYTES
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert "meta-llama/Llama-2-7b-hf: a Hugging Face hub id" in record.message
    assert "16 GB" in record.message and "requirements.gpu_memory_gb" in record.message


@pytest.mark.parametrize(
    ("config_text", "why"),
    [
        (None, "cannot read"),
        ("{not json", "is not JSON"),
        ('["a list"]', "is not a JSON object"),
        (json.dumps({"n_embd": 768, "n_layer": 12}), "cannot size it (model config: missing"),
    ],
)
def test_a_config_that_cannot_be_used_gets_the_default_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, config_text: str | None, why: str
) -> None:
    if config_text is not None:
        (tmp_path / "config.json").write_text(config_text)
    with caplog.at_level(logging.WARNING, logger="cotune.orchestrator.pipeline.placement"):
        assert requirement_bytes(spec(str(tmp_path))) == DEFAULT_TASK_BYTES
    [record] = caplog.records
    assert record.levelno == logging.WARNING and why in record.message, record.message
    assert str(tmp_path) in record.message


def test_an_s3_model_without_a_store_gets_the_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cotune.orchestrator.pipeline.placement"):
        assert requirement_bytes(spec("s3://models/llama")) == DEFAULT_TASK_BYTES
    assert "bucket 'models'" in caplog.text
