"""The sweep spec's top-level model, `SweepSpec`, built from the sections in sections.py.

Light by design (pydantic + PyYAML). Checks across fields live in checks.py; loading and
parsing in the package (`cotune.orchestrator.protocol.spec`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from cotune.orchestrator.protocol.builtin_models import BUILTIN_CONFIGS
from cotune.orchestrator.protocol.search_space import (
    SEARCH_DIM_TYPES,
    Searchable,
    SearchDim,
    dump_value,
    show_value,
)
from cotune.orchestrator.protocol.spec.errors import (
    SpecError,
    SpecIssue,
)
from cotune.orchestrator.protocol.spec.files import (
    SpecDumper,
    is_local_path,
)
from cotune.orchestrator.protocol.spec.sections import (
    S3_URL,
    DatasetSpec,
    LoraSpec,
    MergeSpec,
    QuantizationSpec,
    RequirementsSpec,
    SearchSpec,
    Section,
    TrainingSpec,
    TrustSpec,
)
from pydantic import Field, field_validator

BUILTIN_MODELS = tuple(BUILTIN_CONFIGS)
_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class SpecReport:
    """A valid spec with what checking it found: warnings, notes and the dataset's rows."""

    spec: SweepSpec
    warnings: list[SpecIssue]
    notes: list[SpecIssue]
    dataset_rows: int | None


class SweepSpec(Section):
    """A sweep: base model, data, training, LoRA, quantization, rounds, search, merge, trust."""

    name: str = Field(max_length=63, description="Job name: a-z, 0-9 and -, at most 63 chars.")
    base_model: str = Field(
        description='Hugging Face id ("org/name"), local folder (./path or /path), '
        "s3://bucket/prefix, or cotune://tiny-llama (a built-in tiny model)."
    )
    base_model_revision: str | None = Field(
        None, description="Hugging Face ids only: the commit sha (or tag) to pin."
    )
    dataset: DatasetSpec = Field(description="Training data.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Per shard task.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="The LoRA adapter.")
    quantization: QuantizationSpec = Field(
        default_factory=QuantizationSpec, description="Base model loading."
    )
    rounds: int = Field(1, ge=1, description="R: federated rounds; rounds=1, shards=1 is a sweep.")
    search: SearchSpec = Field(default_factory=SearchSpec, description="Hyperparameter search.")
    merge: MergeSpec = Field(default_factory=MergeSpec, description="Adapter merging.")
    requirements: RequirementsSpec = Field(
        default_factory=RequirementsSpec, description="Worker requirements."
    )
    trust: TrustSpec = Field(default_factory=TrustSpec, description="Volunteer policy.")

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(
                "use lowercase letters, digits and '-', starting and ending with a letter or "
                f"digit, got {value!r}"
            )
        return value

    @field_validator("base_model")
    @classmethod
    def _check_base_model(cls, value: str) -> str:
        if value.startswith("cotune://"):
            if value.removeprefix("cotune://") not in BUILTIN_MODELS:
                known = ", ".join(f"cotune://{m}" for m in BUILTIN_MODELS)
                raise ValueError(f"unknown built-in model {value!r}; built-ins: {known}")
        elif value.startswith("s3://"):
            if not S3_URL.match(value):
                raise ValueError(f"expected s3://bucket/prefix, got {value!r}")
        elif "://" in value:
            raise ValueError(f"unsupported scheme in {value!r}")
        elif not is_local_path(value) and (
            not _HF_ID.match(value) or ".." in value or "--" in value or len(value) > 96
        ):
            raise ValueError(
                f"{value!r} is not a Hugging Face id (org/name), a local folder (./path or "
                "/path), s3://bucket/prefix or cotune://tiny-llama"
            )
        return value

    @property
    def base_model_kind(self) -> Literal["hf", "local", "s3", "builtin"]:
        if self.base_model.startswith("cotune://"):
            return "builtin"
        if self.base_model.startswith("s3://"):
            return "s3"
        return "local" if is_local_path(self.base_model) else "hf"

    def search_space(self) -> dict[str, SearchDim]:
        """The search dimensions, keyed by dotted path ("training.learning_rate")."""
        return {
            f"{section}.{name}": value
            for section, name in _searchable_fields()
            if isinstance(value := getattr(getattr(self, section), name), SEARCH_DIM_TYPES)
        }

    def is_concrete(self) -> bool:
        """True when no field holds a search dimension (a trial's spec)."""
        return not self.search_space()

    def grid_size(self) -> int | None:
        """Combinations of the grid axes under `method: grid`; None for other methods."""
        if self.search.method != "grid":
            return None
        return math.prod(len(dim.grid_values() or ()) for dim in self.search_space().values())

    def params(self) -> dict[str, Any]:
        """Every searchable field's value by dotted path (dimensions as their YAML mapping)."""
        return {
            f"{section}.{name}": dump_value(getattr(getattr(self, section), name))
            for section, name in _searchable_fields()
        }

    def with_params(self, params: Mapping[str, Any]) -> SweepSpec:
        """A concrete copy: `params` for the named dimensions, each other one at its default.

        The copy is one trial's spec: its search.n_trials is 1 (max_concurrent_trials null).
        """
        space = self.search_space()
        errors = [
            SpecIssue(key, f"not a search dimension of this spec (those: {', '.join(space)})")
            for key in params
            if key not in space
        ]
        updates: dict[str, dict[str, Any]] = {}
        for path, dim in space.items():
            section, name = path.split(".")
            value = dim.default()
            if path in params:
                try:
                    value = _searchable_marker(section, name).scalar(params[path])
                except ValueError as exc:
                    errors.append(SpecIssue(path, str(exc)))
                    continue
                if not dim.contains(value):
                    errors.append(
                        SpecIssue(path, f"{show_value(value)} is outside {dim.describe()}")
                    )
            updates.setdefault(section, {})[name] = value
        if errors:
            raise SpecError(errors)
        # A trial's spec is a one-trial sweep, so it parses back as the valid spec it is.
        updates["search"] = {"n_trials": 1, "max_concurrent_trials": None}
        return self.model_copy(
            update={s: getattr(self, s).model_copy(update=u) for s, u in updates.items()}
        )

    def to_yaml(self) -> str:
        return yaml.dump(self.model_dump(mode="json"), Dumper=SpecDumper, sort_keys=False)


def _searchable_fields() -> list[tuple[str, str]]:
    return [
        (section, name)
        for section in ("training", "lora")
        for name, info in SweepSpec.model_fields[section].annotation.model_fields.items()  # type: ignore[union-attr]
        if any(isinstance(m, Searchable) for m in info.metadata)
    ]


def _searchable_marker(section: str, name: str) -> Searchable:
    model = SweepSpec.model_fields[section].annotation
    info = model.model_fields[name]  # type: ignore[union-attr]
    return next(m for m in info.metadata if isinstance(m, Searchable))
