"""Placement of an s3:// base model: its config.json is read from the real store (SeaweedFS)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from cotune.orchestrator.control.tiers import tier_for
from cotune.orchestrator.pipeline.placement import DEFAULT_TASK_BYTES, requirement_bytes
from cotune.orchestrator.protocol.memory import estimate_task_memory
from cotune.orchestrator.protocol.spec import SweepSpec, parse_spec
from cotune.orchestrator.protocol.task import TrainTask

pytestmark = pytest.mark.integration

LLAMA_2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
}


def spec(base_model: str) -> SweepSpec:
    return parse_spec(
        {
            "name": "place",
            "base_model": base_model,
            "dataset": {"path": "/data/train.jsonl", "format": "alpaca"},
            "training": {"max_steps": 4, "sequence_len": 512},
        }
    )


def test_a_model_in_the_coordinators_bucket_is_estimated(object_store: Any) -> None:
    object_store.put_bytes("models/llama-7b/config.json", json.dumps(LLAMA_2_7B).encode())
    prefix = f"s3://{object_store.bucket}/models/llama-7b"
    for url in (prefix, prefix + "/"):
        llama = spec(url)
        need = requirement_bytes(llama, object_store)
        assert need == estimate_task_memory(TrainTask.from_spec(llama), LLAMA_2_7B).total
        assert tier_for(need) == "8g"


def test_a_missing_config_or_another_bucket_gets_the_default(
    object_store: Any, caplog: pytest.LogCaptureFixture
) -> None:
    missing = f"s3://{object_store.bucket}/models/none"
    with caplog.at_level(logging.WARNING, logger="cotune.orchestrator.pipeline.placement"):
        assert requirement_bytes(spec(missing), object_store) == DEFAULT_TASK_BYTES
        assert requirement_bytes(spec("s3://elsewhere/m"), object_store) == DEFAULT_TASK_BYTES
    first, second = caplog.records
    assert f"cannot read {missing}/config.json" in first.message
    assert "bucket 'elsewhere'" in second.message and object_store.bucket in second.message
