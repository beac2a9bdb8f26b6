"""How a dataset row becomes token ids and labels, and what a `sequence_len` keeps of it.

One renderer for both roles: the worker trains and evaluates on what `render` gives, and
`cotune validate --tokenizer` measures the same thing before a job starts. Light on purpose
(stdlib only): the tokenizer is passed in, any object with the Hugging Face tokenizer API.

Labels are -100 (ignored by the loss) on the prompt part unless `train_on_inputs` is set,
so the model learns the responses only. How each format renders:

    alpaca      bos + ALPACA template(instruction, input) | output + eos
    completion  bos + prompt | completion + eos
    chat        the tokenizer's chat template; labels on the assistant turns (each turn's
                text from the end of the generation prompt before it to the end of the turn)
    text        bos + text + eos, all of it trained

(`|` marks where the labels start.) A row longer than `sequence_len` is cut at the end; a
row left with no trained token is dropped. `Fit` counts both, so rows lost to a short
`sequence_len` (the alpaca template alone is about 40 tokens) never go unnoticed:

    fit = Fit(sequence_len=64, keep_lengths=True)
    for row in rows:
        kept = fit.add(*render(row, "alpaca", tokenizer, train_on_inputs=False))
    fit.rows, fit.cut, fit.dropped, fit.summary(), fit.distribution()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

IGNORE_INDEX = -100
# More than this fraction of rows cut or dropped earns a warning (events, status, validate).
WARN_FRACTION = 0.02

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class RenderError(ValueError):
    """A row the tokenizer cannot render as its format says (a chat template that rewrites
    earlier turns); the caller adds the file and line."""


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _eos(tokenizer: Any) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _prompt_response(
    tokenizer: Any, prompt: str, response: str, train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    # Prompt and response are tokenized apart so the label boundary is a token boundary.
    prompt_ids = _bos(tokenizer) + _ids(tokenizer, prompt)
    response_ids = _ids(tokenizer, response) + _eos(tokenizer)
    prompt_labels = prompt_ids if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids)
    return prompt_ids + response_ids, prompt_labels + response_ids


def _chat(
    tokenizer: Any, messages: list[dict[str, str]], train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    def render_turns(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        if not msgs and not generation_prompt:
            return ""
        return str(
            tokenizer.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    full = render_turns(messages, False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render_turns(messages[:i], True)
        upto = render_turns(messages[: i + 1], False)
        # Templates that rewrite earlier turns (rare) break the prefix property this relies on.
        if not (full.startswith(upto) and upto.startswith(prefix)):
            raise RenderError("the chat template does not render conversations prefix by prefix")
        spans.append((len(prefix), len(upto)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    if train_on_inputs:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for k, (lo, _hi) in enumerate(encoded["offset_mapping"]):
        if any(start <= lo < end for start, end in spans):
            labels[k] = ids[k]
    return ids, labels


def render(
    row: dict[str, Any], fmt: str, tokenizer: Any, *, train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    """One checked row of format `fmt` as (token ids, labels), whole (not cut)."""
    if fmt == "alpaca":
        extra = row.get("input")
        template = ALPACA_PROMPT if extra else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=row["instruction"], input=extra or "")
        return _prompt_response(tokenizer, prompt, row["output"], train_on_inputs)
    if fmt == "completion":
        return _prompt_response(tokenizer, row["prompt"], row["completion"], train_on_inputs)
    if fmt == "chat":
        return _chat(tokenizer, row["messages"], train_on_inputs)
    if fmt == "text":
        ids = _bos(tokenizer) + _ids(tokenizer, row["text"]) + _eos(tokenizer)
        return ids, list(ids)
    raise RenderError(f"unknown dataset format {fmt!r}")


def fit_problem(
    *,
    rows: int,
    cut: int,
    dropped: int,
    sequence_len: int,
    max_dropped_rows: float,
    max_cut_rows: float,
    where: str,
) -> str | None:
    """Why rows that do not fit fail a job (more than dataset.max_dropped_rows dropped, or
    max_cut_rows cut), naming `where` they were counted; None when they are within both."""
    for count, limit, what, name in (
        (dropped, max_dropped_rows, "lose every trained token", "max_dropped_rows"),
        (cut, max_cut_rows, "are cut short", "max_cut_rows"),
    ):
        if rows and count / rows > limit:
            return (
                f"{count} of {rows} rows of {where} ({count / rows:.1%}) {what} at "
                f"training.sequence_len {sequence_len}, more than dataset.{name} {limit:g}; "
                "raise training.sequence_len (cotune validate --tokenizer shows the row "
                "lengths) or shorten the prompts"
            )
    return None


def percentile(values: list[int], q: float) -> int:
    """The nearest-rank q-th percentile (0 < q <= 100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass
class Fit:
    """What `sequence_len` keeps of the rows added: whole, cut (some trained tokens lost) or
    dropped (every trained token lost, so the row trains nothing)."""

    sequence_len: int
    rows: int = 0
    cut: int = 0
    dropped: int = 0
    # With `keep_lengths` (validate's length distribution), per row: its whole length, and
    # the sequence_len it needs to keep its first trained token.
    keep_lengths: bool = False
    lengths: list[int] = field(default_factory=list)
    needed: list[int] = field(default_factory=list)

    def add(self, ids: list[int], labels: list[int]) -> bool:
        """Count one rendered row; True when it keeps at least one trained token."""
        self.rows += 1
        if self.keep_lengths:
            self.lengths.append(len(ids))
            first = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), None)
            self.needed.append(len(ids) + 1 if first is None else first + 1)
        kept = any(label != IGNORE_INDEX for label in labels[: self.sequence_len])
        if not kept:
            self.dropped += 1
        elif len(ids) > self.sequence_len:
            self.cut += 1
        return kept

    def fraction(self, count: int) -> float:
        return count / self.rows if self.rows else 0.0

    @property
    def warns(self) -> bool:
        """More than WARN_FRACTION of the rows cut or dropped."""
        return max(self.fraction(self.cut), self.fraction(self.dropped)) > WARN_FRACTION

    def counts(self) -> dict[str, int]:
        """The counts as reported with a result: rows, rows_cut, rows_dropped, sequence_len."""
        return {
            "rows": self.rows,
            "rows_cut": self.cut,
            "rows_dropped": self.dropped,
            "sequence_len": self.sequence_len,
        }

    def summary(self) -> str:
        """One line: what sequence_len keeps, e.g. 'of 2700 rows at sequence_len 64: 870
        whole, 0 cut, 1830 dropped (67.8%)'."""
        whole = self.rows - self.cut - self.dropped
        return (
            f"of {self.rows} rows at sequence_len {self.sequence_len}: {whole} whole, "
            f"{self.cut} cut ({self.fraction(self.cut):.1%}), {self.dropped} dropped "
            f"({self.fraction(self.dropped):.1%})"
        )

    def distribution(self) -> dict[str, int]:
        """Row lengths in tokens (p50, p90, p99, max: a sequence_len of p99 keeps 99% of the
        rows whole) and `none_dropped`, the sequence_len that keeps a trained token of every
        row."""
        if not self.lengths:
            return {}
        return {
            "p50": percentile(self.lengths, 50),
            "p90": percentile(self.lengths, 90),
            "p99": percentile(self.lengths, 99),
            "max": max(self.lengths),
            "none_dropped": max(self.needed),
        }
