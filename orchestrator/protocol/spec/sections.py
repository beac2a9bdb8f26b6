"""The sections of a sweep spec (dataset, training, lora, quantization, search, merge, ...).

Each is a pydantic model with every field described (docs/spec.md is generated from them);
orchestrator/protocol/spec/__init__.py assembles them into SweepSpec. Light: pydantic only.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from cotune.orchestrator.protocol.formats import FormatName
from cotune.orchestrator.protocol.search_space import (
    Searchable,
    SearchDim,
    number_check,
    show_value,
)
from pydantic import BaseModel, ConfigDict, Field, PlainValidator

S3_URL = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/\S+$")

_REAL = ("loguniform", "uniform", "choice")
_WHOLE = ("int", "choice")


class Section(BaseModel):
    # strict: YAML gives real types, so "8" or `true` where a number belongs is a mistake.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _location(value: Any, what: str) -> str:
    """A dataset location: local path (file or folder) or s3://bucket/key."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"expected {what}, got {show_value(value)}")
    if not value.strip():
        raise ValueError("must not be empty")
    if value.startswith("s3://"):
        if not S3_URL.match(value):
            raise ValueError(f"expected s3://bucket/key with a valid bucket name, got {value!r}")
    elif "://" in value:
        raise ValueError(f"unsupported scheme in {value!r}; use a local path or s3://bucket/key")
    return value


def _eval_split(value: Any) -> float | str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not 0 < value <= 0.5:
            raise ValueError(f"a fraction must be in (0, 0.5], got {show_value(value)}")
        return float(value)
    return _location(value, "a fraction in (0, 0.5] or a path to an eval file")


class DatasetSpec(Section):
    """Training data: where it is, its row format, and how it is split."""

    path: Annotated[str, PlainValidator(lambda v: _location(v, "a path or s3:// URL"))] = Field(
        description="A .jsonl/.json/.parquet file or a folder of them (relative to the spec "
        "file), or s3://bucket/key."
    )
    format: FormatName = Field(
        "alpaca",
        description="Row format: alpaca (instruction, input, output), chat (messages with role "
        "and content), text (text), completion (prompt, completion).",
    )
    eval_split: Annotated[float | str, PlainValidator(_eval_split)] = Field(
        0.1,
        description="Held-out evaluation data: a fraction of the rows in (0, 0.5], or a path to "
        "an eval file in the same format.",
    )
    shards: int = Field(1, ge=1, description="K: shards per round; each trial trains K tasks.")
    seed: int = Field(
        0,
        description="Key of the row hash that picks the eval split "
        "(training rows go to shards in turn, in input order).",
    )
    max_bad_rows: float = Field(
        0.01, ge=0, le=1, description="Tolerated fraction of rows that do not fit the format."
    )
    max_dropped_rows: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Tolerated fraction of rows that lose every trained token to "
        "training.sequence_len (a prompt that fills it): past it the job fails. Measured by "
        "the coordinator on the eval rows; more than 2% cut or dropped is warned about.",
    )
    max_cut_rows: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Tolerated fraction of rows cut short by training.sequence_len (some "
        "trained tokens lost): past it the job fails; 1: never.",
    )


class TrainingSpec(Section):
    """One shard task's training (the same for every shard task of a round)."""

    sequence_len: int = Field(512, ge=8, le=131072, description="Tokens per training sequence.")
    micro_batch_size: Annotated[
        int | SearchDim, Searchable(number_check(integer=True, ge=1), _WHOLE)
    ] = Field(1, description="Sequences per device step.")
    gradient_accumulation_steps: Annotated[
        int | SearchDim, Searchable(number_check(integer=True, ge=1), _WHOLE)
    ] = Field(1, description="Micro-batches per optimizer step.")
    learning_rate: Annotated[float | SearchDim, Searchable(number_check(gt=0), _REAL)] = Field(
        2e-4, description="Peak learning rate."
    )
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule over the task's steps."
    )
    lr_schedule_span: Literal["round", "trial"] = Field(
        "round",
        description="What the warmup and decay span: round: each round's task runs the whole "
        "schedule over its max_steps (a restart per round); trial: one schedule over the "
        "trial's rounds x max_steps, each round's task taking its slice of it (needs "
        "max_steps).",
    )
    warmup_steps: Annotated[
        int | SearchDim | None, Searchable(number_check(integer=True, ge=0), _WHOLE, nullable=True)
    ] = Field(None, description="Warmup steps. Not with warmup_ratio.")
    warmup_ratio: Annotated[
        float | SearchDim | None, Searchable(number_check(ge=0, lt=1), _REAL, nullable=True)
    ] = Field(None, description="Warmup as a fraction of the steps. Not with warmup_steps.")
    weight_decay: Annotated[float | SearchDim, Searchable(number_check(ge=0), _REAL)] = Field(
        0.0, description="AdamW weight decay."
    )
    optimizer: Literal["adamw_torch", "paged_adamw_8bit", "adamw_8bit"] = Field(
        "adamw_torch",
        description="Optimizer; the 8-bit ones come from bitsandbytes (CUDA workers).",
    )
    max_steps: Annotated[
        int | SearchDim | None, Searchable(number_check(integer=True, ge=1), _WHOLE, nullable=True)
    ] = Field(
        None,
        description="Optimizer steps per shard task per round. Exactly one of max_steps and "
        "num_epochs.",
    )
    num_epochs: float | None = Field(
        None, gt=0, description="Passes over the shard per round (instead of max_steps)."
    )
    gradient_checkpointing: bool = Field(True, description="Trade compute for activation memory.")
    sample_packing: bool = Field(False, description="Pack short rows into full sequences.")
    train_on_inputs: bool = Field(
        False,
        description="false: loss on the completion only where the format has one (alpaca, "
        "chat, completion); true: on every token.",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0: no clipping.")
    checkpoint_steps: int = Field(
        50, ge=1, description="Checkpoint every N steps so an interrupted task resumes."
    )
    seed: int = Field(0, description="Training seed (combined with job, trial, round, shard).")


def _modules(value: Any) -> str | list[str]:
    if value == "all-linear":
        return "all-linear"
    if isinstance(value, list | tuple) and value:
        bad = [m for m in value if not isinstance(m, str) or not re.fullmatch(r"[\w.]+", m)]
        if bad:
            raise ValueError(f"module names are identifiers like q_proj, got {show_value(bad[0])}")
        return list(value)
    raise ValueError(f'expected "all-linear" or a list of module names, got {show_value(value)}')


class LoraSpec(Section):
    """The LoRA adapter trained by every task."""

    lora_r: Annotated[
        int | SearchDim, Searchable(number_check(integer=True, ge=1, le=1024), _WHOLE)
    ] = Field(8, description="LoRA rank r.")
    lora_alpha: Annotated[int | SearchDim, Searchable(number_check(integer=True, ge=1), _WHOLE)] = (
        Field(16, description="LoRA scaling numerator (scale = alpha / r).")
    )
    lora_dropout: Annotated[float | SearchDim, Searchable(number_check(ge=0, lt=1), _REAL)] = Field(
        0.0, description="Dropout on the LoRA input."
    )
    lora_target_modules: Annotated[
        str | list[str] | SearchDim, Searchable(_modules, ("choice",), plain_list=False)
    ] = Field(
        "all-linear",
        description='"all-linear" or a list of module names (a list is the value; search it '
        "with {choice: [[q_proj, v_proj], all-linear]}).",
    )


class QuantizationSpec(Section):
    """How the frozen base model is loaded (axolotl: load_in_4bit / load_in_8bit)."""

    type: Literal["nf4", "fp4", "int8", "none"] = Field(
        "nf4",
        description="nf4/fp4: 4-bit (axolotl load_in_4bit, QLoRA); int8: load_in_8bit; none: "
        "plain LoRA on the compute dtype.",
    )
    double_quant: bool = Field(True, description="4-bit only: quantize the quantization constants.")
    compute_dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Compute dtype; auto: bf16 where the device supports it, else fp32."
    )


class NoPrunerSpec(Section):
    """Every trial runs all rounds."""

    type: Literal["none"] = Field(description="none: no pruning.")


class SuccessiveHalvingPrunerSpec(Section):
    """Optuna's SuccessiveHalvingPruner; rounds are the rungs."""

    type: Literal["successive_halving"] = Field(description="successive_halving.")
    min_resource: int = Field(1, ge=1, description="Rounds before the first rung.")
    reduction_factor: int = Field(2, ge=2, description="Keep 1/reduction_factor at each rung.")
    min_early_stopping_rate: int = Field(0, ge=0, description="Skip this many first rungs.")


class HyperbandPrunerSpec(Section):
    """Optuna's HyperbandPruner; rounds are the resource."""

    type: Literal["hyperband"] = Field(description="hyperband.")
    min_resource: int = Field(1, ge=1, description="Smallest budget in rounds.")
    max_resource: Annotated[int | Literal["auto"], PlainValidator(lambda v: _int_or_auto(v))] = (
        Field("auto", description='Largest budget in rounds; "auto": the spec\'s rounds.')
    )
    reduction_factor: int = Field(3, ge=2, description="Keep 1/reduction_factor at each rung.")


class MedianPrunerSpec(Section):
    """Optuna's MedianPruner: stop a trial whose eval loss is worse than the median so far."""

    type: Literal["median"] = Field(description="median.")
    n_startup_trials: int = Field(5, ge=0, description="Trials that finish before any pruning.")
    n_warmup_steps: int = Field(0, ge=0, description="Rounds a trial runs before it can be pruned.")
    interval_steps: int = Field(1, ge=1, description="Check every N rounds.")


def _int_or_auto(value: Any) -> int | Literal["auto"]:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f'expected "auto" or a whole number >= 1, got {show_value(value)}')


PrunerSpec = Annotated[
    NoPrunerSpec | SuccessiveHalvingPrunerSpec | HyperbandPrunerSpec | MedianPrunerSpec,
    Field(discriminator="type"),
]


class SearchSpec(Section):
    """The hyperparameter search (Optuna: sampler and pruner)."""

    method: Literal["grid", "random", "tpe"] = Field(
        "tpe", description="grid: every combination of the lists; random; tpe: Optuna's TPE."
    )
    n_trials: int | None = Field(
        None,
        ge=1,
        description="Trials to run. grid: caps the grid (default: all of it); random/tpe: "
        "required when the spec has search dimensions (default 1 otherwise).",
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials in flight at once; null: as many as workers allow."
    )
    metric: Literal["eval_loss"] = Field(
        "eval_loss", description="What a trial is judged by: the merged adapter's eval loss."
    )
    direction: Literal["minimize", "maximize"] = Field("minimize", description="Of the metric.")
    seed: int = Field(0, description="Sampler seed.")
    pruner: PrunerSpec = Field(
        default_factory=lambda: NoPrunerSpec(type="none"),
        description="Early stopping between rounds: successive_halving, hyperband, median or "
        "none, with that pruner's parameters.",
    )


# The merge methods a spec may name; orchestrator/merge/registry.py builds them (a test keeps
# the two lists equal).
MergeMethod = Literal["svd", "cat", "linear", "ties", "dare"]


class MergeSpec(Section):
    """How the K shard adapters of a (trial, round) become one."""

    method: MergeMethod = Field(
        "svd",
        description="svd: exact truncated SVD of the mean delta; cat: exact, rank K*r; linear: "
        "mean of A and of B (an approximation); ties, dare: as PEFT does them.",
    )
    rank: int | None = Field(None, ge=1, description="Merged rank (svd, ties, dare); null: lora_r.")
    density: float | None = Field(
        None, gt=0, le=1, description="ties/dare only: fraction of entries kept."
    )


class RequirementsSpec(Section):
    """What a worker needs to take this job's tasks."""

    gpu_memory_gb: float | None = Field(
        None, gt=0, description="GPU memory per task; null: cotune's estimator decides."
    )


class TrustSpec(Section):
    """Who may train this job's tasks, and how a volunteer's result is checked before it counts."""

    allow_volunteers: bool = Field(True, description="Let untrusted volunteer workers train.")
    redundancy: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Fraction of volunteer tasks trained twice (by workers of different "
        "owners) and compared; a third run breaks a disagreement. A duplicate waits until a "
        "worker of another owner asks for work.",
    )
    probe_tolerance: float = Field(
        0.5,
        ge=0,
        description="A volunteer's adapter is rejected when its loss on a probe slice of the "
        "eval split is worse than the round's start (the previous round's merged adapter, or "
        "the base model in round 0) by more than this many nats.",
    )
    probe_rows: int = Field(
        256, ge=1, description="Rows of the eval split (its first ones) in the probe slice."
    )
    redundancy_loss_tolerance: float = Field(
        0.1,
        ge=0,
        description="Two runs of one task agree when their probe losses differ by at most "
        "this many nats ...",
    )
    redundancy_min_cosine: float = Field(
        0.8,
        ge=-1,
        le=1,
        description="... and the cosine between their changes of the start adapter is at "
        "least this (honest runs of one task share their seed and data) ...",
    )
    redundancy_norm_tolerance: float = Field(
        0.25,
        ge=0,
        description="... and the larger of their change norms is at most (1 + this) times "
        "the smaller (a run that did part of the work moves the adapter less).",
    )
