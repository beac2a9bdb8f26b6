"""The memory estimator against the QLoRA paper's LLaMA-7B figures, its input checks, and the
built-in tiny model's architecture as the protocol states it (what placement estimates from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cotune.orchestrator.protocol.builtin_models import TINY_LLAMA_CONFIG, builtin_config
from cotune.orchestrator.protocol.memory import (
    ModelShape,
    adapted_modules,
    estimate_memory,
    estimate_task_memory,
)
from cotune.orchestrator.protocol.task import TrainTask

MB = 1e6  # the paper's MB
LLAMA_7B = ModelShape(
    hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000
)
# The paper's example: LoRA on the attention projections (about 0.2% of the weights at r=16).
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _estimate(checkpointing: bool, **kw: object):  # type: ignore[no-untyped-def]
    args: dict[str, object] = {
        "model_shape": LLAMA_7B,
        "quant": "nf4",
        "lora_r": 16,
        "target_modules": ATTENTION,
        "sequence_len": 512,
        "micro_batch": 1,
        "gradient_checkpointing": checkpointing,
        "optimizer": "paged_adamw_8bit",
    }
    args.update(kw)
    return estimate_memory(**args)  # type: ignore[arg-type]


def _within(value: float, paper: float, tolerance: float = 0.15) -> bool:
    return abs(value - paper) <= tolerance * paper


def test_4bit_base_weights_match_the_paper() -> None:
    base = _estimate(False).base_weights / MB
    assert _within(base, 5048), base


def test_lora_input_gradients_match_the_paper_without_checkpointing() -> None:
    inputs = _estimate(False).lora_inputs / MB
    assert _within(inputs, 567), inputs


def test_lora_input_gradients_per_sequence_with_checkpointing() -> None:
    one = _estimate(True).lora_inputs / MB
    assert _within(one, 18), one
    # "per sequence": it scales with the micro-batch.
    assert _estimate(True, micro_batch=4).lora_inputs == 4 * _estimate(True).lora_inputs


def test_lora_weights_of_the_papers_size() -> None:
    # About 0.2% of the 6.7B weights: r=16 on q,k,v,o gives 16.8M parameters.
    params = _estimate(False).lora_weights / 4
    assert 0.001 < params / 6.74e9 < 0.004


def test_components_follow_the_settings() -> None:
    nf4 = _estimate(True)
    assert _estimate(True, double_quant=False).base_weights > nf4.base_weights
    assert _estimate(True, quant="int8").base_weights > nf4.base_weights
    assert _estimate(True, quant="none").base_weights > 3 * nf4.base_weights
    assert _estimate(True, optimizer="adamw_torch").optimizer == 4 * nf4.optimizer
    assert _estimate(True, lora_r=32).lora_weights == 2 * nf4.lora_weights
    assert _estimate(False).total > nf4.total
    assert nf4.total == sum(v for k, v in nf4.as_dict().items() if k != "total")


def test_shared_inputs_count_once_without_dropout() -> None:
    shared = _estimate(False, lora_dropout=0.0).lora_inputs
    assert shared == _estimate(False).lora_inputs // 2  # q/k/v share one input; o has its own


def test_from_config_reads_a_hugging_face_config() -> None:
    config = {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "head_dim": 64,
        "tie_word_embeddings": True,
    }
    shape = ModelShape.from_config(config)
    assert shape.width("kv") == 512
    assert shape.tied_embeddings
    # Llama-3.2-1B: about 1.24B parameters in all.
    assert 1.2e9 < shape.linear_params + shape.other_params < 1.3e9


def test_bad_inputs_name_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="missing hidden_size"):
        ModelShape.from_config({"intermediate_size": 1})
    with pytest.raises(ValueError, match="unknown lm_head"):
        adapted_modules(["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="quantization type 'nf5'"):
        _estimate(True, quant="nf5")
    with pytest.raises(ValueError, match="optimizer 'sgd'"):
        _estimate(True, optimizer="sgd")
    with pytest.raises(ValueError, match="must be >= 1"):
        _estimate(True, sequence_len=0)


def test_estimate_for_a_task_uses_its_settings(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    task = TrainTask(base_model=str(tiny_model_dir), sequence_len=256, micro_batch_size=4)
    estimate = estimate_task_memory(task, config)
    shape = ModelShape.from_config(config)
    expected = estimate_memory(
        shape, "nf4", task.lora.r, "all-linear", 256, 4, True, "adamw_torch", lora_dropout=0.0
    )
    assert estimate == expected
    wider = task.model_copy(update={"sequence_len": 512})
    assert estimate_task_memory(wider, config).total > estimate.total


def test_the_tiny_models_protocol_config_is_the_built_one(tiny_model_dir: Path) -> None:
    built = json.loads((tiny_model_dir / "config.json").read_text())
    assert {key: built[key] for key in TINY_LLAMA_CONFIG} == dict(TINY_LLAMA_CONFIG)
    task = TrainTask(base_model="cotune://tiny-llama", sequence_len=256, micro_batch_size=4)
    assert estimate_task_memory(task, TINY_LLAMA_CONFIG) == estimate_task_memory(task, built)
    assert builtin_config("cotune://tiny-llama") is TINY_LLAMA_CONFIG
    assert builtin_config("cotune://huge-llama") is None
    assert builtin_config("org/tiny-llama") is None
