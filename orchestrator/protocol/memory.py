"""GPU memory estimate of a QLoRA task, from model shape and settings (pure Python).

The coordinator places tasks with it (a worker only leases work that fits its memory), so it
must not need torch. Bytes per component, for a Llama-style decoder (hidden h, intermediate
i, L layers, vocab V, kv width k = kv_heads x head_dim) training on T = micro_batch x
sequence_len tokens, compute dtype of c bytes (2 for bf16/fp16, 4 for fp32):

    base_weights   linear layers: P_lin x bits / 8, with bits = 4 + 8/64 + 32/(64x256) for
                   NF4/FP4 with double quantization (a uint8 scale per 64-weight block, an fp32
                   scale per 256 blocks), 4 + 32/64 without; 8 (+ an fp32 scale per row) for
                   int8; 8c for none. Embeddings, lm_head and norms stay unquantized and
                   `prepare_model_for_kbit_training` casts them to fp32 (4 bytes each).
    lora_weights   N_lora x 4 (adapters train in fp32); N_lora = sum of r x (in + out) over
                   the adapted modules of every layer.
    gradients      N_lora x 4.
    optimizer      N_lora x 8 for 32-bit AdamW (two moments), x 2 for 8-bit AdamW.
    lora_inputs    What the QLoRA paper calls the LoRA input gradients: each adapter keeps its
                   input for the backward pass of A, T x in_features x c per adapted module
                   (modules sharing an input share it unless dropout gives each its own copy),
                   for all L layers; with gradient checkpointing only the layer being
                   recomputed holds them, so one layer's worth.
    checkpoints    With gradient checkpointing: the hidden state kept at each layer boundary,
                   L x T x h x c.
    activations    The base layers' own saved tensors (norm inputs, q/k/v, attention output,
                   gate/up/act outputs, residuals): T x (5h + 2k + 3i) x c per layer, for L
                   layers, or one layer with checkpointing.
    logits         T x V x 4 x 2: fp32 logits and their gradient for the loss.
    overhead       512 MiB: CUDA context, cuBLAS workspace, allocator slack.

Checked against the QLoRA paper (Dettmers et al. 2023, section 4) for LLaMA-7B, 4-bit:
base weights 5,048 MB; LoRA input gradients 567 MB at batch 1 x 512 tokens without gradient
checkpointing, about 18 MB per sequence with it (tests/unit/worker/test_memory.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cotune.orchestrator.protocol.task import TrainTask

MIB = 1 << 20
OVERHEAD_BYTES = 512 * MIB

# Llama projection names -> (input kind, output kind); sizes come from the ModelShape. Public:
# verify/expected.py derives the LoRA factor shapes an adapter must have from it.
PROJECTIONS: dict[str, tuple[str, str]] = {
    "q_proj": ("hidden", "q"),
    "k_proj": ("hidden", "kv"),
    "v_proj": ("hidden", "kv"),
    "o_proj": ("q", "hidden"),
    "gate_proj": ("hidden", "intermediate"),
    "up_proj": ("hidden", "intermediate"),
    "down_proj": ("intermediate", "hidden"),
}
# Modules reading the very same tensor (their saved input is one tensor without dropout).
_INPUT_GROUP = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "mlp_mid",
}
QUANT_TYPES = ("nf4", "fp4", "int8", "none")
_OPTIMIZER_BYTES = {
    "adamw_torch": 8,
    "adamw_torch_fused": 8,
    "paged_adamw_32bit": 8,
    "adamw_8bit": 2,
    "adamw_bnb_8bit": 2,
    "paged_adamw_8bit": 2,
}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None
    tied_embeddings: bool = False

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def width(self, kind: str) -> int:
        return {
            "hidden": self.hidden,
            "q": self.heads * self.head_size,
            "kv": self.kv_heads * self.head_size,
            "intermediate": self.intermediate,
        }[kind]

    @property
    def linear_params(self) -> int:
        """Parameters of the quantizable projections, all layers."""
        per_layer = sum(self.width(i) * self.width(o) for i, o in PROJECTIONS.values())
        return per_layer * self.layers

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied) and norms: never quantized."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + self.hidden * (2 * self.layers + 1)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a Hugging Face config.json (Llama, Mistral, Qwen2 and kin)."""
        required = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "vocab_size",
        )
        missing = [key for key in required if key not in config]
        if missing:
            raise ValueError(f"model config: missing {', '.join(missing)}")
        return cls(
            hidden=int(config["hidden_size"]),
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]),
            kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
            vocab=int(config["vocab_size"]),
            head_dim=int(config["head_dim"]) if config.get("head_dim") else None,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


@dataclass(frozen=True)
class MemoryEstimate:
    base_weights: int
    lora_weights: int
    gradients: int
    optimizer: int
    lora_inputs: int
    checkpoints: int
    activations: int
    logits: int
    overhead: int

    @property
    def total(self) -> int:
        return (
            self.base_weights
            + self.lora_weights
            + self.gradients
            + self.optimizer
            + self.lora_inputs
            + self.checkpoints
            + self.activations
            + self.logits
            + self.overhead
        )

    def as_dict(self) -> dict[str, int]:
        fields = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return {**fields, "total": self.total}


def adapted_modules(target_modules: Sequence[str] | str) -> list[str]:
    """The Llama projections a LoRA target list adapts ("all-linear": all seven)."""
    if target_modules == "all-linear":
        return list(PROJECTIONS)
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [n for n in names if n not in PROJECTIONS]
    if unknown:
        raise ValueError(
            f"lora target_modules: unknown {', '.join(unknown)}; known: {', '.join(PROJECTIONS)}"
        )
    return names


def _bits_per_weight(quant: str, double_quant: bool, compute_bytes: int) -> float:
    if quant in ("nf4", "fp4"):
        return 4 + (8 / 64 + 32 / (64 * 256) if double_quant else 32 / 64)
    if quant == "int8":
        return 8.0
    if quant == "none":
        return 8.0 * compute_bytes
    raise ValueError(f"quantization type {quant!r}: expected one of {', '.join(QUANT_TYPES)}")


def estimate_memory(
    model_shape: ModelShape,
    quant: str,
    lora_r: int,
    target_modules: Sequence[str] | str,
    sequence_len: int,
    micro_batch: int,
    gradient_checkpointing: bool,
    optimizer: str,
    *,
    double_quant: bool = True,
    compute_bytes: int = 2,
    lora_dropout: float = 0.05,
) -> MemoryEstimate:
    """Bytes per component of one training task (formulas in the module docstring)."""
    shape = model_shape
    if lora_r < 1 or sequence_len < 1 or micro_batch < 1:
        raise ValueError("lora_r, sequence_len and micro_batch must be >= 1")
    if compute_bytes not in (2, 4):
        raise ValueError(f"compute_bytes must be 2 or 4, got {compute_bytes}")
    if optimizer not in _OPTIMIZER_BYTES:
        raise ValueError(f"optimizer {optimizer!r}: expected one of {', '.join(_OPTIMIZER_BYTES)}")
    modules = adapted_modules(target_modules)
    tokens = sequence_len * micro_batch
    c = compute_bytes
    h, i, k = shape.hidden, shape.intermediate, shape.width("kv")

    bits = _bits_per_weight(quant, double_quant, c)
    other_bytes = 4 if quant != "none" else c
    base = int(shape.linear_params * bits / 8) + shape.other_params * other_bytes
    if quant == "int8":
        base += 4 * shape.layers * sum(shape.width(o) for _, o in PROJECTIONS.values())

    lora_params = shape.layers * sum(
        lora_r * (shape.width(PROJECTIONS[m][0]) + shape.width(PROJECTIONS[m][1])) for m in modules
    )
    if lora_dropout > 0:
        saved_inputs = sum(shape.width(PROJECTIONS[m][0]) for m in modules)
    else:
        groups = {_INPUT_GROUP[m]: shape.width(PROJECTIONS[m][0]) for m in modules}
        saved_inputs = sum(groups.values())
    live_layers = 1 if gradient_checkpointing else shape.layers
    return MemoryEstimate(
        base_weights=base,
        lora_weights=lora_params * 4,
        gradients=lora_params * 4,
        optimizer=lora_params * _OPTIMIZER_BYTES[optimizer],
        lora_inputs=tokens * saved_inputs * c * live_layers,
        checkpoints=shape.layers * tokens * h * c if gradient_checkpointing else 0,
        activations=tokens * (5 * h + 2 * k + 3 * i) * c * live_layers,
        logits=tokens * shape.vocab * 4 * 2,
        overhead=OVERHEAD_BYTES,
    )


def estimate_task_memory(task: TrainTask, model_config: Mapping[str, Any]) -> MemoryEstimate:
    """The estimate for a TrainTask on the model whose config.json is `model_config`.

    compute_dtype "auto" counts 2 bytes (bf16): the estimate is for GPU placement.
    """
    return estimate_memory(
        ModelShape.from_config(model_config),
        task.quantization.type,
        task.lora.r,
        task.lora.target_modules,
        task.sequence_len,
        task.micro_batch_size,
        task.gradient_checkpointing,
        task.optimizer,
        double_quant=task.quantization.double_quant,
        compute_bytes=4 if task.quantization.compute_dtype == "fp32" else 2,
        lora_dropout=task.lora.dropout,
    )
