"""Spec files as YAML: safe loading, YAML 1.2 numbers, duplicate keys refused, errors located.

PyYAML follows YAML 1.1, where `1e-4` is a string; specs are full of learning rates, so the
loader reads it as the number everyone means. A duplicate key is an error, not a silent
overwrite. Errors carry `file:line:column`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from cotune.orchestrator.protocol.spec.errors import SpecError, SpecIssue

MAX_SPEC_BYTES = 1 << 20


class SpecDumper(yaml.SafeDumper):
    """Block style, except lists of plain values: `lora_r: [4, 8]`, `loguniform: [lo, hi]`."""

    def represent_flat_lists(self, data: list[Any]) -> yaml.SequenceNode:
        flat = all(isinstance(v, str | int | float | bool) or v is None for v in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


SpecDumper.add_representer(list, SpecDumper.represent_flat_lists)


def is_local_path(value: str) -> bool:
    """A base_model written as a path (./x, ../x, /x, ~/x) rather than a Hugging Face id."""
    return value.startswith(("/", "./", "../", "~")) or os.path.isabs(value)


def read_spec_file(path: Path) -> dict[str, Any]:
    where = str(path)
    if not path.exists():
        raise SpecError([SpecIssue(where, "no such file")])
    if not path.is_file():
        raise SpecError([SpecIssue(where, "not a file (a spec is one YAML file)")])
    size = path.stat().st_size
    if size > MAX_SPEC_BYTES:
        raise SpecError([SpecIssue(where, f"{size} bytes; a spec is at most {MAX_SPEC_BYTES}")])
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        reason = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise SpecError([SpecIssue(where, reason)]) from None
    except OSError as exc:
        raise SpecError([SpecIssue(where, f"cannot read it: {exc.strerror}")]) from None
    return parse_spec_text(text, where)


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats (1e-4 is a number) that refuses duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first at line {seen[key]})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?([0-9][0-9_]*)?\.?[0-9]+[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_spec_text(text: str, where: str) -> dict[str, Any]:
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader subclass: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        lines = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError(
            [SpecIssue(where + at, f"YAML syntax error: {exc.problem}{lines}")]
        ) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecIssue(where, f"YAML syntax error: {exc}")]) from None
    if data is None:
        raise SpecError(
            [SpecIssue(where, "empty; a spec needs at least name, base_model, dataset")]
        )
    if not isinstance(data, dict):
        got = type(data).__name__
        raise SpecError([SpecIssue(where, f"the top level must be a mapping of keys, got a {got}")])
    return data


def resolve_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Relative local paths are relative to the spec file's folder; make them absolute."""
    data = dict(data)

    def resolve(value: Any, must_exist: bool) -> Any:
        if not isinstance(value, str) or "://" in value or not value.strip():
            return value
        path = Path(value).expanduser()
        if path.is_absolute():
            return str(path)
        candidate = base_dir / path
        if must_exist and not (is_local_path(value) or candidate.exists()):
            return value  # not a local folder: an "org/name" Hugging Face id
        return os.path.normpath(candidate)

    if isinstance(data.get("dataset"), dict):
        dataset = dict(data["dataset"])
        for key in ("path", "eval_split"):
            if key in dataset:
                dataset[key] = resolve(dataset[key], must_exist=False)
        data["dataset"] = dataset
    if "base_model" in data:
        data["base_model"] = resolve(data["base_model"], must_exist=True)
    return data
