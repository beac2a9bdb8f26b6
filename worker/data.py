"""Training data: dataset rows (alpaca, chat, text, completion) rendered into token ids.

Each row becomes one `Example`: `input_ids` and `labels`, rendered by
orchestrator/protocol/render.py (the same renderer `cotune validate --tokenizer` measures
with; its docstring shows each format). Examples longer than `sequence_len` are cut at the
end; an example left with no trained token is dropped, and both are counted (`Fit`), so a
task reports how many rows its `sequence_len` cut or dropped. With packing, whole examples
are laid greedily, in order, into blocks of exactly `sequence_len` tokens; position ids
restart at 0 for each example, which transformers turns into a block-diagonal causal mask,
so packed examples never attend to each other and train as they would alone.

Shards are JSON lines, plain (`.jsonl`) or zstd-compressed (`.jsonl.zst`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cotune.orchestrator.protocol.formats import row_checker
from cotune.orchestrator.protocol.render import IGNORE_INDEX, Fit, RenderError, render

__all__ = [
    "IGNORE_INDEX",
    "Block",
    "Collator",
    "DataError",
    "Example",
    "Fit",
    "NoUsableRows",
    "load_examples",
    "pack_examples",
    "read_rows",
    "render_row",
]


class DataError(ValueError):
    """A data file or row that cannot be used; the message names the file and line."""


class NoUsableRows(DataError):
    """Files with no row left to train on or score (empty, or every row dropped)."""


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


@dataclass(frozen=True)
class Block:
    """A packed training sequence: several examples, then padding, `sequence_len` long."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    position_ids: tuple[int, ...]


def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for each non-blank line of a .jsonl or .jsonl.zst file."""
    path = Path(path)
    if not path.name.endswith((".jsonl", ".jsonl.zst")):
        raise DataError(f"{path}: expected a .jsonl or .jsonl.zst file")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    stream_errors: tuple[type[Exception], ...] = ()
    with path.open("rb") as raw:
        if path.name.endswith(".zst"):
            import zstandard

            stream: Any = zstandard.ZstdDecompressor().stream_reader(raw)
            stream_errors = (zstandard.ZstdError,)
        else:
            stream = raw
        text = io.TextIOWrapper(stream, encoding="utf-8")
        try:
            for lineno, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
        except stream_errors as e:
            raise DataError(f"{path}: not a valid zstd stream ({e})") from None


def render_row(
    row: dict[str, Any], fmt: str, tokenizer: Any, *, train_on_inputs: bool, sequence_len: int
) -> Example:
    """One checked row of format `fmt` as token ids and labels, cut to `sequence_len`."""
    try:
        ids, labels = render(row, fmt, tokenizer, train_on_inputs=train_on_inputs)
    except RenderError as e:
        raise DataError(str(e)) from None
    return Example(tuple(ids[:sequence_len]), tuple(labels[:sequence_len]))


def load_examples(
    files: Sequence[Path],
    fmt: str,
    tokenizer: Any,
    *,
    sequence_len: int,
    train_on_inputs: bool,
    fit: Fit | None = None,
) -> list[Example]:
    """Every usable row of `files`, rendered; DataError naming file:line on a bad row.

    `fit`, when given, counts every row: whole, cut or dropped at `sequence_len`."""
    check = row_checker(fmt)
    counted = fit if fit is not None else Fit(sequence_len)
    examples: list[Example] = []
    for path in files:
        for lineno, row in read_rows(path):
            reason = check(row)
            if reason:
                raise DataError(f"{path}:{lineno}: not a {fmt} row: {reason}")
            try:
                ids, labels = render(row, fmt, tokenizer, train_on_inputs=train_on_inputs)
            except RenderError as e:
                raise DataError(f"{path}:{lineno}: {e}") from None
            if counted.add(ids, labels):
                examples.append(Example(tuple(ids[:sequence_len]), tuple(labels[:sequence_len])))
    if not examples:
        names = ", ".join(str(p) for p in files) or "(no files)"
        why = (
            f"every one of its {counted.rows} rows lost all its trained tokens at "
            f"sequence_len {sequence_len} (raise training.sequence_len)"
            if counted.rows
            else "it is empty"
        )
        raise NoUsableRows(f"{names}: no usable {fmt} rows: {why}")
    return examples


def pack_examples(examples: Sequence[Example], sequence_len: int, pad_id: int) -> list[Block]:
    """Lay whole examples, in order, into `sequence_len` blocks (see the module docstring)."""
    blocks: list[Block] = []
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []

    def close() -> None:
        free = sequence_len - len(ids)
        # Padding is a segment of its own (positions restart), masked out of the loss.
        blocks.append(
            Block(
                tuple(ids + [pad_id] * free),
                tuple(labels + [IGNORE_INDEX] * free),
                tuple(positions + list(range(free))),
            )
        )
        ids.clear()
        labels.clear()
        positions.clear()

    for example in examples:
        if ids and len(ids) + len(example.input_ids) > sequence_len:
            close()
        ids.extend(example.input_ids)
        # An example's first label is never predicted when it trains alone; packed, the
        # previous example's last token would predict it, so it is masked.
        labels.append(IGNORE_INDEX)
        labels.extend(example.labels[1:])
        positions.extend(range(len(example.input_ids)))
    if ids:
        close()
    return blocks


class Collator:
    """Batches for the Trainer: padded examples, or stacked packed blocks (no padding mask)."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[Example | Block]) -> dict[str, Any]:
        import torch

        if isinstance(items[0], Block):
            # No attention_mask: transformers derives the per-example mask from position_ids.
            return {
                "input_ids": torch.tensor([b.input_ids for b in items]),
                "labels": torch.tensor([b.labels for b in items]),
                "position_ids": torch.tensor([b.position_ids for b in items]),  # type: ignore[union-attr]
            }
        width = max(len(e.input_ids) for e in items)
        ids, labels, mask = [], [], []
        for e in items:
            free = width - len(e.input_ids)
            ids.append(list(e.input_ids) + [self.pad_id] * free)
            labels.append(list(e.labels) + [IGNORE_INDEX] * free)
            mask.append([1] * len(e.input_ids) + [0] * free)
        return {
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "attention_mask": torch.tensor(mask),
        }
