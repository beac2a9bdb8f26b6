"""The exact LoRA tensors a task implies for a base model, and the factors that fill them.

A task's LoRA settings (rank, target modules) and the base model's shape decide every key
and shape of the adapter PEFT saves, so the coordinator knows them before any upload; the
upload is only checked against them. PEFT names a Llama-family model's factors

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

with lora_A (r, in_features) and lora_B (out_features, r); tests/unit/verify/test_expected.py
checks this against an adapter PEFT saves for the built-in tiny model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from cotune.orchestrator.protocol.memory import PROJECTIONS, ModelShape, adapted_modules
from cotune.orchestrator.protocol.task import LoraSettings

#: PEFT's prefix in front of the base model's module path (PeftModel.base_model.model).
KEY_PREFIX = "base_model.model."
#: The decoder-layer block each projection lives in.
BLOCKS: Mapping[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


@dataclass(frozen=True)
class ExpectedModule:
    """One adapted Linear: its module path and the factor shapes its widths imply."""

    path: str
    d_in: int
    d_out: int

    @property
    def key_a(self) -> str:
        return f"{KEY_PREFIX}{self.path}.lora_A.weight"

    @property
    def key_b(self) -> str:
        return f"{KEY_PREFIX}{self.path}.lora_B.weight"


@dataclass(frozen=True)
class ExpectedAdapter:
    """Every factor an adapter of this task must hold: rank and modules come from the task."""

    rank: int
    modules: tuple[ExpectedModule, ...]

    @cached_property
    def shapes(self) -> Mapping[str, tuple[int, int]]:
        """Tensor key -> shape: lora_A (r, d_in), lora_B (d_out, r)."""
        shapes: dict[str, tuple[int, int]] = {}
        for module in self.modules:
            shapes[module.key_a] = (self.rank, module.d_in)
            shapes[module.key_b] = (module.d_out, self.rank)
        return shapes


@dataclass(frozen=True)
class Factors:
    """One module's LoRA pair as float32: its delta is proportional to `b @ a`.

    `a` is (r, d_in), `b` is (d_out, r). The scale lora_alpha / r is the task's, the same for
    every upload of a round, so the statistics in deltas.py leave it out.
    """

    a: np.ndarray
    b: np.ndarray


#: An adapter's factors: module path ("model.layers.0.self_attn.q_proj") -> Factors.
AdapterFactors = Mapping[str, Factors]


def expected_adapter(model: ModelShape, lora: LoraSettings) -> ExpectedAdapter:
    """The factors `lora` adds to a Llama-family model of shape `model`.

    Raises ValueError for a target module the task should never have carried (the spec's
    validation refuses those before a task exists).
    """
    names = adapted_modules(lora.target_modules)
    modules = tuple(
        ExpectedModule(
            path=f"model.layers.{layer}.{BLOCKS[name]}.{name}",
            d_in=model.width(PROJECTIONS[name][0]),
            d_out=model.width(PROJECTIONS[name][1]),
        )
        for layer in range(model.layers)
        for name in PROJECTIONS
        if name in names
    )
    return ExpectedAdapter(rank=lora.r, modules=modules)
