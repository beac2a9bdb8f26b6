"""The built-in base models (`cotune://<name>`): each one's architecture, in config.json terms.

One source for both roles: the worker builds the model from it (worker/tinymodel.py), and the
coordinator estimates a task's memory from it (protocol/memory.py) without building anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

BUILTIN_SCHEME = "cotune://"

# A 2-layer Llama. Every Linear's in_features (64 and 256) is a multiple of bitsandbytes'
# 4-bit block size (64), so the model quantizes to NF4/FP4 on CPU as well as CUDA.
TINY_LLAMA_CONFIG: Mapping[str, Any] = MappingProxyType(
    {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 1024,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
    }
)
BUILTIN_CONFIGS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {"tiny-llama": TINY_LLAMA_CONFIG}
)


def builtin_config(base_model: str) -> Mapping[str, Any] | None:
    """The architecture of `cotune://<name>`; None for any other base model or name."""
    if not base_model.startswith(BUILTIN_SCHEME):
        return None
    return BUILTIN_CONFIGS.get(base_model.removeprefix(BUILTIN_SCHEME))
