"""Search dimensions of a sweep spec: what a searchable field may hold, and how it is parsed.

A searchable field holds either a concrete value or one of four dimensions:
`Choice` (a list, or `{choice: [...]}`), `Uniform` (`{uniform: [lo, hi]}`), `LogUniform`
(`{loguniform: [lo, hi]}`) and `IntRange` (`{int: [lo, hi], log: false, step: 1}`). The
coordinator maps them onto Optuna distributions; this module stays pydantic-and-stdlib only.
"""

from __future__ import annotations

import math
import operator
import reprlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema


@dataclass(frozen=True)
class Choice:
    """One of a finite list of values (a grid axis under `method: grid`)."""

    values: tuple[Any, ...]

    is_continuous = False

    def default(self) -> Any:
        return _thaw(self.values[0])

    def grid_values(self) -> tuple[Any, ...] | None:
        return tuple(_thaw(v) for v in self.values)

    def contains(self, value: Any) -> bool:
        return _freeze(value) in self.values

    def upper(self) -> Any:
        """The largest value (numeric choices); used for upper-bound estimates."""
        return max(self.values)

    def to_raw(self) -> dict[str, Any]:
        return {"choice": [_thaw(v) for v in self.values]}

    def describe(self) -> str:
        return ", ".join(show_value(_thaw(v)) for v in self.values)


@dataclass(frozen=True)
class Uniform:
    """A real number drawn uniformly from [lo, hi]."""

    lo: float
    hi: float

    is_continuous = True

    def default(self) -> float:
        return (self.lo + self.hi) / 2

    def grid_values(self) -> tuple[Any, ...] | None:
        return None

    def contains(self, value: Any) -> bool:
        return _is_number(value) and self.lo <= value <= self.hi

    def upper(self) -> float:
        return self.hi

    def to_raw(self) -> dict[str, Any]:
        return {"uniform": [self.lo, self.hi]}

    def describe(self) -> str:
        return f"uniform [{self.lo:g}, {self.hi:g}]"


@dataclass(frozen=True)
class LogUniform:
    """A positive real number drawn uniformly in log space from [lo, hi]."""

    lo: float
    hi: float

    is_continuous = True

    def default(self) -> float:
        # The geometric middle: the centre of the range as the sampler sees it.
        return math.sqrt(self.lo * self.hi)

    def grid_values(self) -> tuple[Any, ...] | None:
        return None

    def contains(self, value: Any) -> bool:
        return _is_number(value) and self.lo <= value <= self.hi

    def upper(self) -> float:
        return self.hi

    def to_raw(self) -> dict[str, Any]:
        return {"loguniform": [self.lo, self.hi]}

    def describe(self) -> str:
        return f"loguniform [{self.lo:g}, {self.hi:g}]"


@dataclass(frozen=True)
class IntRange:
    """A whole number in [lo, hi] on a `step` grid, optionally drawn in log space."""

    lo: int
    hi: int
    log: bool = False
    step: int = 1

    is_continuous = False

    def default(self) -> int:
        middle = math.sqrt(self.lo * self.hi) if self.log else (self.lo + self.hi) / 2
        # Half up (not Python's half-to-even), so [1, 10] gives 6 as people round.
        snapped = self.lo + math.floor((middle - self.lo) / self.step + 0.5) * self.step
        return min(max(snapped, self.lo), self.hi)

    def grid_values(self) -> tuple[Any, ...] | None:
        # A linear integer range is a finite axis; a log one has no natural grid.
        return None if self.log else tuple(range(self.lo, self.hi + 1, self.step))

    def contains(self, value: Any) -> bool:
        return _is_int(value) and self.lo <= value <= self.hi and (value - self.lo) % self.step == 0

    def upper(self) -> int:
        return self.hi

    def to_raw(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"int": [self.lo, self.hi]}
        if self.log:
            raw["log"] = True
        if self.step != 1:
            raw["step"] = self.step
        return raw

    def describe(self) -> str:
        extra = " log" if self.log else (f" step {self.step}" if self.step != 1 else "")
        return f"int [{self.lo}, {self.hi}]{extra}"


SearchDim = Choice | Uniform | LogUniform | IntRange
SEARCH_DIM_TYPES = (Choice, Uniform, LogUniform, IntRange)
DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
_SHORT = reprlib.Repr()  # keyword arguments arrive only in Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 3, 6, 6, 40


def dump_value(value: Any) -> Any:
    """A searchable field's value as it is written in YAML (dimensions as their mapping)."""
    if isinstance(value, SEARCH_DIM_TYPES):
        return value.to_raw()
    return _thaw(value)


def show_value(value: Any) -> str:
    """A short, YAML-flavoured rendering of a user's value for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    # reprlib bounds the work too: a YAML alias bomb must not be rendered in full.
    text = _SHORT.repr(value) if isinstance(value, list | tuple | dict) else repr(value)
    if isinstance(value, int | float):
        text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass(frozen=True)
class Searchable:
    """Field marker: `Annotated[float | SearchDim, Searchable(...)]` parses values and dims.

    `scalar` checks one concrete value (raising ValueError); `allowed` names the distributions
    that make sense for the field; `plain_list` is False where a YAML list is itself a value
    (lora_target_modules), so searching it needs `{choice: [...]}`; `nullable`: null allowed.
    """

    scalar: Callable[[Any], Any]
    allowed: tuple[str, ...]
    plain_list: bool = True
    nullable: bool = False

    def parse(self, raw: Any) -> Any:
        if raw is None and self.nullable:
            return None
        if isinstance(raw, SEARCH_DIM_TYPES):
            return raw
        if isinstance(raw, dict):
            return self._parse_dim(raw)
        if isinstance(raw, list | tuple) and self.plain_list:
            return self._parse_choice(list(raw), "a list")
        return self.scalar(raw)

    def _parse_dim(self, raw: dict[Any, Any]) -> SearchDim:
        kinds = [k for k in raw if k in DISTRIBUTIONS]
        unknown = [k for k in raw if k not in (*DISTRIBUTIONS, "log", "step")]
        if unknown:
            raise ValueError(
                f"unknown distribution key {show_value(unknown[0])}; "
                f"expected one of {', '.join(DISTRIBUTIONS)}"
            )
        if len(kinds) != 1:
            got = " and ".join(kinds) if kinds else "none"
            raise ValueError(
                f"a distribution is exactly one of {', '.join(DISTRIBUTIONS)} (got {got})"
            )
        kind = kinds[0]
        if kind not in self.allowed:
            raise ValueError(f"{kind} does not fit this field; it takes {self._allowed_text()}")
        if kind != "int" and ("log" in raw or "step" in raw):
            raise ValueError("log and step only go with {int: [lo, hi]}")
        if kind == "choice":
            values = raw["choice"]
            if not isinstance(values, list):
                raise ValueError(f"choice takes a list of values, got {show_value(values)}")
            return self._parse_choice(values, "choice")
        lo, hi = self._bounds(kind, raw[kind])
        if kind == "int":
            return self._int_range(lo, hi, raw.get("log", False), raw.get("step", 1))
        if kind == "loguniform" and lo <= 0:
            raise ValueError(f"loguniform needs lo > 0 (log of {show_value(lo)} is undefined)")
        return LogUniform(float(lo), float(hi)) if kind == "loguniform" else Uniform(lo, hi)

    def _bounds(self, kind: str, bounds: Any) -> tuple[Any, Any]:
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise ValueError(f"{kind} takes [lo, hi], got {show_value(bounds)}")
        checked = []
        for name, bound in zip(("lo", "hi"), bounds, strict=True):
            try:
                checked.append(self.scalar(bound))
            except ValueError as exc:
                raise ValueError(f"{kind} {name}: {exc}") from None
        lo, hi = checked
        if lo >= hi:
            raise ValueError(f"{kind} needs lo < hi, got [{show_value(lo)}, {show_value(hi)}]")
        return lo, hi

    @staticmethod
    def _int_range(lo: int, hi: int, log: Any, step: Any) -> IntRange:
        if not isinstance(log, bool):
            raise ValueError(f"int log must be true or false, got {show_value(log)}")
        if not _is_int(step) or step < 1:
            raise ValueError(f"int step must be a whole number >= 1, got {show_value(step)}")
        if log and step != 1:
            raise ValueError("int with log: true takes no step (a log range has no even grid)")
        if log and lo < 1:
            raise ValueError(f"int with log: true needs lo >= 1, got {lo}")
        if (hi - lo) % step:
            raise ValueError(f"int needs hi - lo to be a multiple of step ({hi} - {lo}, {step})")
        return IntRange(lo, hi, log, step)

    def _parse_choice(self, values: Sequence[Any], what: str) -> Choice:
        if not values:
            raise ValueError(f"{what} needs at least one value (an empty choice searches nothing)")
        parsed = []
        for i, value in enumerate(values):
            try:
                parsed.append(_freeze(self.scalar(value)))
            except ValueError as exc:
                raise ValueError(f"{what} item {i}: {exc}") from None
        duplicates = sorted({show_value(_thaw(v)) for v in parsed if parsed.count(v) > 1})
        if duplicates:
            raise ValueError(f"{what} repeats {', '.join(duplicates)}")
        return Choice(tuple(parsed))

    def _allowed_text(self) -> str:
        forms = {
            "loguniform": "{loguniform: [lo, hi]}",
            "uniform": "{uniform: [lo, hi]}",
            "int": "{int: [lo, hi]}",
            "choice": "{choice: [...]}",
        }
        texts = [forms[k] for k in self.allowed]
        if self.plain_list:
            texts.append("a list of values")
        return "a value, " + ", ".join(texts)

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            self.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(dump_value),
        )

    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "description": "A value, a list of values (choice), or a distribution: "
            + ", ".join(f"{{{k}: ...}}" for k in self.allowed),
        }


_SIGNS = ((">", operator.gt), (">=", operator.ge), ("<", operator.lt), ("<=", operator.le))


@dataclass(frozen=True)
class NumberCheck:
    """The scalar check of a searchable numeric field: type (no bools), finiteness, bounds."""

    integer: bool = False
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    def bounds(self) -> list[tuple[str, float]]:
        values = (self.gt, self.ge, self.lt, self.le)
        return [(sign, v) for (sign, _), v in zip(_SIGNS, values, strict=True) if v is not None]

    def __call__(self, raw: Any) -> int | float:
        if self.integer and not _is_int(raw):
            raise ValueError(f"expected a whole number, got {show_value(raw)}")
        if not _is_number(raw):
            raise ValueError(f"expected a number, got {show_value(raw)}")
        value: int | float = raw if self.integer else float(raw)
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {show_value(raw)}")
        holds = dict(_SIGNS)
        for sign, bound in self.bounds():
            if not holds[sign](value, bound):
                raise ValueError(f"must be {sign} {bound:g}, got {show_value(raw)}")
        return value


def number_check(
    *,
    integer: bool = False,
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> NumberCheck:
    """A NumberCheck (keyword-only, so call sites read as the bounds they set)."""
    return NumberCheck(integer, gt, ge, lt, le)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _freeze(value: Any) -> Any:
    # Choice values must be hashable and comparable: module lists become tuples inside.
    return tuple(value) if isinstance(value, list) else value


def _thaw(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
