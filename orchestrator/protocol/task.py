"""TrainTask: the concrete settings of one training task, as a worker receives them.

The coordinator builds one from a fully concrete sweep spec (`TrainTask.from_spec`) for each
(trial, round, shard); `cotune train-local` builds one the same way. Light on purpose
(pydantic and stdlib only): it is part of the wire protocol that workers import.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DatasetFormat = Literal["alpaca", "chat", "text", "completion"]
# Names as transformers' TrainingArguments (and axolotl) spell them.
Optimizer = Literal[
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_8bit",
    "adamw_bnb_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
]
LrScheduler = Literal[
    "linear", "cosine", "constant", "constant_with_warmup", "polynomial", "inverse_sqrt"
]
QuantType = Literal["nf4", "fp4", "int8", "none"]
ComputeDtype = Literal["auto", "bf16", "fp16", "fp32"]

_FROZEN = ConfigDict(extra="forbid", frozen=True)


class LoraSettings(BaseModel):
    """The LoRA adapter trained on top of the (frozen, quantized) base model."""

    model_config = _FROZEN

    r: int = Field(8, ge=1, le=1024, description="Rank of the A/B factors.")
    alpha: int = Field(16, ge=1, description="Scaling numerator: deltas scale by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description='Module names to adapt, or "all-linear" (every Linear but lm_head).',
    )

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, list):
            if not value:
                raise ValueError('must name at least one module, or be "all-linear"')
            blank = [m for m in value if not m or m.isspace()]
            if blank:
                raise ValueError("module names must not be empty")
        return value


class QuantizationSettings(BaseModel):
    """How the base model's weights are stored while training (bitsandbytes)."""

    model_config = _FROZEN

    type: QuantType = Field("nf4", description="nf4 | fp4 (4-bit), int8 (8-bit) or none.")
    double_quant: bool = Field(True, description="Quantize the 4-bit scales too (QLoRA).")
    compute_dtype: ComputeDtype = Field(
        "auto", description="auto: bf16 where the device supports it, else fp32."
    )


class TrainTask(BaseModel):
    """Everything a worker needs to know to train one task (besides its data files)."""

    model_config = _FROZEN

    base_model: str = Field(..., min_length=1, description="Local folder, cotune://..., or hub id.")
    base_model_revision: str | None = Field(None, description="Pinned hub revision (commit).")
    dataset_format: DatasetFormat = "alpaca"
    sequence_len: int = Field(512, ge=8, le=1 << 20)
    micro_batch_size: int = Field(1, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(1, ge=1, le=4096)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_scheduler: LrScheduler = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Optimizer = "adamw_torch"
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; None: num_epochs.")
    num_epochs: float = Field(1.0, gt=0, description="Passes over the data when max_steps is None.")
    gradient_checkpointing: bool = True
    sample_packing: bool = False
    train_on_inputs: bool = Field(False, description="False: loss on the responses only.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 turns it off.")
    checkpoint_steps: int | None = Field(None, ge=1, description="Checkpoint every N steps.")
    schedule_steps: int | None = Field(
        None,
        ge=1,
        description="The learning-rate schedule's length when it spans more than this task "
        "(a trial's rounds x max_steps); None: the schedule is this task's max_steps.",
    )
    schedule_offset: int = Field(
        0, ge=0, description="Steps of that schedule done before this task (earlier rounds)."
    )
    seed: int = Field(0, ge=0, lt=2**32)
    lora: LoraSettings = LoraSettings()
    quantization: QuantizationSettings = QuantizationSettings()

    @model_validator(mode="after")
    def _warmup(self) -> TrainTask:
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.schedule_steps is None:
            if self.schedule_offset:
                raise ValueError("schedule_offset needs schedule_steps")
        elif self.max_steps is None or self.schedule_offset + self.max_steps > self.schedule_steps:
            raise ValueError("a spanning schedule needs max_steps, within schedule_steps")
        return self

    @classmethod
    def from_spec(cls, spec: Any, **overrides: Any) -> TrainTask:
        """The task of a fully concrete `SweepSpec` (see `SweepSpec.with_params`).

        `overrides` set task fields the spec does not decide (the seed of a shard, a
        resolved base_model).
        """
        training = spec.training
        lora = spec.lora
        quant = spec.quantization
        fields: dict[str, Any] = {
            "base_model": spec.base_model,
            "base_model_revision": getattr(spec, "base_model_revision", None),
            "dataset_format": spec.dataset.format,
            "lora": {
                "r": lora.lora_r,
                "alpha": lora.lora_alpha,
                "dropout": lora.lora_dropout,
                "target_modules": lora.lora_target_modules,
            },
            "quantization": {
                "type": quant.type,
                "double_quant": quant.double_quant,
                "compute_dtype": quant.compute_dtype,
            },
        }
        for name in _TRAINING_KEYS:
            value = getattr(training, name, None)
            # None in the spec means "not given": the task keeps its default (num_epochs).
            if value is not None:
                fields[name] = value
        fields.update(overrides)
        return cls.model_validate(fields)


# The spec's `training` keys that a task takes over unchanged (axolotl names).
_TRAINING_KEYS = (
    "sequence_len",
    "micro_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "optimizer",
    "max_steps",
    "num_epochs",
    "gradient_checkpointing",
    "sample_packing",
    "train_on_inputs",
    "max_grad_norm",
    "checkpoint_steps",
    "seed",
)


def seed_for(job_id: str, trial: int, round: int, shard: int, base_seed: int = 0) -> int:
    """A deterministic 31-bit seed for one (job, trial, round, shard) task.

    `base_seed` is the spec's training.seed. Hashing (rather than arithmetic on the numbers)
    keeps neighbouring tasks' seeds unrelated, and the same task always gets the same seed,
    whoever trains it.
    """
    if min(trial, round, shard) < 0:
        raise ValueError(f"trial, round and shard must be >= 0, got {trial}, {round}, {shard}")
    key = f"{base_seed}/{job_id}/{trial}/{round}/{shard}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
