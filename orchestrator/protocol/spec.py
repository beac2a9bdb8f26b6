"""The sweep spec: what a submitter asks for (pydantic models), read from YAML and checked.

Light by design (pydantic + PyYAML): the worker and the submitter's base install import it.
Key names follow axolotl where a key means the same thing. Every field's description is the
reference in docs/spec.md (`python -m orchestrator.spec_docs > docs/spec.md`).

    spec = load_spec(Path("examples/tiny/sweep.yaml"))   # raises SpecError listing every problem
    for params in trials: trial_spec = spec.with_params(params)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from orchestrator.protocol import spec_checks
from orchestrator.protocol.search_space import (
    SEARCH_DIM_TYPES,
    Searchable,
    SearchDim,
    dump_value,
    show_value,
)
from orchestrator.protocol.spec_checks import Implied
from orchestrator.protocol.spec_errors import SpecError, SpecIssue, issues_from_validation_error
from orchestrator.protocol.spec_sections import (
    S3_URL,
    DatasetSpec,
    HyperbandPrunerSpec,
    LoraSpec,
    MedianPrunerSpec,
    MergeSpec,
    NoPrunerSpec,
    PrunerSpec,
    QuantizationSpec,
    RequirementsSpec,
    SearchSpec,
    Section,
    SuccessiveHalvingPrunerSpec,
    TrainingSpec,
    TrustSpec,
)
from orchestrator.protocol.spec_yaml import (
    SpecDumper,
    is_local_path,
    parse_spec_text,
    read_spec_file,
    resolve_paths,
)

__all__ = [
    "DatasetSpec",
    "HyperbandPrunerSpec",
    "Implied",
    "LoraSpec",
    "MedianPrunerSpec",
    "MergeSpec",
    "NoPrunerSpec",
    "PrunerSpec",
    "QuantizationSpec",
    "RequirementsSpec",
    "SearchSpec",
    "SpecError",
    "SpecIssue",
    "SpecReport",
    "SuccessiveHalvingPrunerSpec",
    "SweepSpec",
    "TrainingSpec",
    "TrustSpec",
    "inspect_spec",
    "load_spec",
    "parse_spec",
    "parse_spec_yaml",
]

BUILTIN_MODELS = ("tiny-llama",)
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

    def implied(self, dataset_rows: int | None = None) -> Implied:
        """Trials, tasks, merges and a token estimate (an upper bound: no pruning, max dims)."""
        return spec_checks.implied(self, dataset_rows)

    def warnings(self) -> list[SpecIssue]:
        """Legal but probably unintended settings."""
        return spec_checks.warnings(self)

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


# ----- loading ---------------------------------------------------------------------------------


def load_spec(path: Path) -> SweepSpec:
    """Read, validate and check a spec file; raises SpecError listing every problem."""
    return inspect_spec(path).spec


def inspect_spec(path: Path) -> SpecReport:
    """load_spec, plus the warnings, notes and dataset row count that `cotune validate` shows."""
    data = read_spec_file(path)
    spec = _validate(resolve_paths(data, path.resolve().parent))
    files = spec_checks.check_files(spec)
    errors = spec_checks.errors(spec, files.dataset_rows) + files.errors
    if errors:
        raise SpecError(errors)
    return SpecReport(spec, spec.warnings(), files.notes, files.dataset_rows)


def parse_spec(data: Mapping[str, Any]) -> SweepSpec:
    """Validate a spec already parsed (an API body, a stored spec.yaml); no file access."""
    spec = _validate(dict(data))
    errors = spec_checks.errors(spec, None)
    if errors:
        raise SpecError(errors)
    return spec


def parse_spec_yaml(text: str, source: str = "<spec>") -> SweepSpec:
    """parse_spec on YAML text; `source` names it in errors."""
    return parse_spec(parse_spec_text(text, source))


def _validate(data: dict[str, Any]) -> SweepSpec:
    try:
        return SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(issues_from_validation_error(exc, SweepSpec)) from None
