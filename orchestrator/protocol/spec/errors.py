"""Spec errors a user can act on: (field path, reason) pairs, pydantic's errors rewritten so."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from cotune.orchestrator.protocol.search_space import show_value
from pydantic import BaseModel, ValidationError


class SpecIssue(NamedTuple):
    """One finding about a spec: the dotted field path (or the file) and the reason."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class SpecError(ValueError):
    """A spec that cannot be used; `errors` lists every problem found, not just the first."""

    def __init__(self, errors: Sequence[SpecIssue]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


def issues_from_validation_error(exc: ValidationError, root: type[BaseModel]) -> list[SpecIssue]:
    """Rewrite pydantic's errors with dotted field paths and plain-words reasons."""
    issues = []
    for err in exc.errors(include_url=False):
        path, owner = _walk(root, err["loc"])
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path += ".type"
        issues.append(SpecIssue(path or "(top level)", _reason(err, owner, err["loc"])))
    return issues


def _walk(root: type[BaseModel], loc: Iterable[Any]) -> tuple[str, type[BaseModel] | None]:
    """The dotted path of `loc`, dropping union tags; and the model owning its last key."""
    parts: list[str] = []
    current: list[type[BaseModel]] = [root]
    owner: type[BaseModel] | None = root
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        tagged = [m for m in current if _tag(m) == item]
        if len(current) > 1 and tagged:
            # A discriminated-union member: pydantic puts its tag in the loc, users never wrote it.
            current, owner = tagged, tagged[0]
            continue
        owner = current[0] if len(current) == 1 else None
        parts.append(f".{item}" if parts else str(item))
        field = owner.model_fields.get(str(item)) if owner else None
        current = _models_in(field.annotation) if field else []
    return "".join(parts), owner


def _tag(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("type")
    args = typing.get_args(field.annotation) if field else ()
    return args[0] if len(args) == 1 else None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


_EXPECTED = {
    "int_type": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping of keys",
    "model_attributes_type": "a mapping of keys",
    "finite_number": "a finite number",
}
_BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def _reason(err: Any, owner: type[BaseModel] | None, loc: Sequence[Any]) -> str:
    kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
    if kind == "missing":
        return "required, but missing"
    if kind == "extra_forbidden":
        return _unknown_key(str(loc[-1]), owner)
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {show_value(got)}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"must be {_BOUNDS[kind]} {bound}, got {show_value(got)}"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']}, got {show_value(got)}"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = ctx.get("expected_tags", "")
        found = f"got {show_value(ctx['tag'])}" if "tag" in ctx else "it is missing"
        return f"needs a type, one of {tags}; {found}"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters, got {len(str(got))}"
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else err["msg"]
    if kind == "value_error":
        return str(ctx["error"])
    return f"{err['msg']} (got {show_value(got)})"


def _unknown_key(key: str, owner: type[BaseModel] | None) -> str:
    if owner is None:
        return "unknown key"
    known = list(owner.model_fields)
    hint = difflib.get_close_matches(key, known, n=1)
    maybe = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"unknown key{maybe} (valid keys here: {', '.join(known)})"
