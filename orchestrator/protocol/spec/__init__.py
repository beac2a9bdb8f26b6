"""The sweep spec: what a submitter asks for (pydantic models), read from YAML and checked.

Light by design (pydantic + PyYAML): the worker and the submitter's base install import it.
Key names follow axolotl where a key means the same thing. Every field's description is the
reference in docs/spec.md (`python -m cotune.orchestrator.cli.specdocs > docs/spec.md`).

    spec = load_spec(Path("examples/tiny/sweep.yaml"))   # raises SpecError listing every problem
    for params in trials: trial_spec = spec.with_params(params)
    implied(spec).n_trials                               # what the spec implies

The package: sections.py (one model per section), model.py (`SweepSpec`), checks.py (checks
across fields, what a spec implies), errors.py (`SpecError` naming every field), files.py
(YAML in and out); loading and parsing here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cotune.orchestrator.protocol.spec import checks as spec_checks
from cotune.orchestrator.protocol.spec.checks import Implied, implied
from cotune.orchestrator.protocol.spec.errors import (
    SpecError,
    SpecIssue,
    issues_from_validation_error,
)
from cotune.orchestrator.protocol.spec.files import (
    parse_spec_text,
    read_spec_file,
    resolve_paths,
)
from cotune.orchestrator.protocol.spec.model import BUILTIN_MODELS, SpecReport, SweepSpec
from cotune.orchestrator.protocol.spec.sections import (
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
    SuccessiveHalvingPrunerSpec,
    TrainingSpec,
    TrustSpec,
)
from pydantic import ValidationError

__all__ = [
    "BUILTIN_MODELS",
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
    "implied",
    "inspect_spec",
    "load_spec",
    "parse_spec",
    "parse_spec_yaml",
    "spec_warnings",
]


def spec_warnings(spec: SweepSpec) -> list[SpecIssue]:
    """Legal but probably unintended settings."""
    return spec_checks.warnings(spec)


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
    return SpecReport(spec, spec_checks.warnings(spec), files.notes, files.dataset_rows)


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
